//! Chains: this proxy listening through an upstream proxy.
//!
//! The proxy dials the upstream proxy and registers with a
//! `MultiProxyRequest` on a control flow. The upstream proxy answers with
//! its endpoints, their route ending with this proxy's routing id; they
//! join this proxy's own endpoints (and so those of every server
//! registered here). Flows the upstream proxy opens on that connection
//! are tunnels it forwards; the accept loop relays them like any other,
//! without terminating them, so the route can go on. Lost registrations
//! are retried with jittered exponential backoff until shutdown.

use std::sync::{Arc, Weak};
use std::time::Duration;

use flow::auth::{AllowEveryone, PatternAuthorizer, PeerAuthorizer};
use flow::message::Message;
use flow::naming::Endpoint;
use flow::{Error, ErrorKind, Result};
use tokio::sync::{oneshot, watch};

use super::{Inner, until_set};
use crate::backoff::Backoff;
use crate::control_wire;

/// First delay before registering again.
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// Longest delay between attempts.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Keeps this proxy registered with the upstream proxy `via` (entry
/// `index` of the proxy's upstreams). `first` is told once the first
/// attempt has an outcome.
pub(super) async fn run(
    weak: Weak<Inner>,
    index: usize,
    via: Endpoint,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let mut stopping = inner.stopping.subscribe();
        if *stopping.borrow() {
            return;
        }
        let (registered, err) = register_once(&inner, index, &via, &mut first, &mut stopping).await;
        set_status(&inner, index, Vec::new(), None, Some(err.clone()));
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        drop(inner);
        if registered {
            backoff.reset();
        }
        let wait = backoff.next_pause();
        if !*stopping.borrow() {
            tracing::warn!(%via, error = %err, retry_in = ?wait, "not listening through upstream proxy");
        }
        tokio::select! {
            () = until_set(&mut stopping) => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn set_status(
    inner: &Inner,
    index: usize,
    endpoints: Vec<Endpoint>,
    conn: Option<flow::conn::Conn>,
    error: Option<Error>,
) {
    if let Some(u) = inner.upstreams.lock().get_mut(index) {
        u.status.endpoints = endpoints;
        u.status.error = error;
        u.conn = conn;
    }
    inner.refresh_endpoints();
}

/// One registration, from dialing until it is lost: whether the upstream
/// proxy answered with endpoints at least once, and why it ended.
async fn register_once(
    inner: &Arc<Inner>,
    index: usize,
    via: &Endpoint,
    first: &mut Option<oneshot::Sender<()>>,
    stopping: &mut watch::Receiver<bool>,
) -> (bool, Error) {
    let authorizer: Arc<dyn PeerAuthorizer> = match PatternAuthorizer::for_endpoint(via) {
        Ok(a) => Arc::new(a),
        Err(_) => Arc::new(AllowEveryone),
    };
    let dialed = tokio::select! {
        () = until_set(stopping) => return (false, Error::new(ErrorKind::Aborted, "shutting down")),
        dialed = inner.manager.dial(via, authorizer, Duration::ZERO) => dialed,
    };
    let flow = match dialed {
        Ok(flow) => flow,
        Err(e) => return (false, e),
    };
    if let Err(e) = flow.disable_fragmentation() {
        return (false, e);
    }
    let conn = flow.conn().clone();
    let (mut reader, mut writer) = flow.into_split();
    if let Err(e) = control_wire::send(&mut writer, &Message::MultiProxyRequest).await {
        return (false, e);
    }
    let mut registered = false;
    loop {
        let msg = tokio::select! {
            biased;
            () = until_set(stopping) => {
                writer.close_write();
                return (registered, Error::new(ErrorKind::Aborted, "shutting down"));
            }
            msg = reader.read_msg() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                return (
                    registered,
                    Error::new(
                        ErrorKind::Proxy,
                        "the upstream proxy ended the registration",
                    ),
                );
            }
            Err(e) => return (registered, e),
        };
        match decode(msg) {
            Ok(endpoints) => {
                tracing::info!(%via, endpoints = endpoints.len(), "listening through upstream proxy");
                registered = true;
                set_status(inner, index, endpoints, Some(conn.clone()), None);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Err(e) => return (registered, e),
        }
    }
}

/// The endpoints of a `ProxyResponse`, or the error the upstream proxy
/// answered.
fn decode(msg: bytes::Bytes) -> Result<Vec<Endpoint>> {
    match control_wire::decode_one(msg, "upstream proxy answer") {
        Ok(Message::ProxyResponse(resp)) => {
            let mut endpoints = Vec::with_capacity(resp.endpoints.len());
            for s in &resp.endpoints {
                match Endpoint::parse(s) {
                    Ok(ep) => endpoints.push(ep),
                    Err(e) => {
                        tracing::warn!(endpoint = %s, error = %e, "upstream proxy sent a bad endpoint")
                    }
                }
            }
            Ok(endpoints)
        }
        Ok(Message::ProxyErrorResponse(resp)) => Err(Error::new(
            ErrorKind::Proxy,
            format!("upstream proxy refused: {}", resp.error),
        )),
        Ok(other) => Err(Error::new(
            ErrorKind::Proxy,
            format!("upstream proxy sent {} on the control flow", other.name()),
        )),
        Err(e) => Err(e.context("upstream proxy answer")),
    }
}
