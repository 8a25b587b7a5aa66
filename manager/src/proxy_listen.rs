//! Listening through a proxy: a server that cannot accept connections dials
//! out to a proxy, asks it to listen on its behalf, and takes the tunnels
//! the proxy opens back as connections of its own.
//!
//! The control flow carries one `ProxyServerRequest` (a proxy listening
//! through another proxy sends `MultiProxyRequest` from `proxy::upstream`)
//! and then the proxy's `ProxyResponse`s: its endpoints, carrying this manager's
//! routing id, first at once and again whenever they change. Every other
//! flow the proxy opens on that connection is a tunnel: another party's
//! connection, run end to end through the proxy.

use std::sync::Arc;
use std::time::Duration;

use flow::auth::{AllowEveryone, PeerAuthorizer};
use flow::conn::{Conn, Flow, FlowReader};
use flow::message::Message;
use flow::naming::Endpoint;
use flow::transport::FramedConn;
use flow::{Error, ErrorKind, Result};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::control_wire;
use crate::flow_conn::FlowConn;
use crate::manager::{Inner, Manager};

/// How long tunnels may go on after the proxy's control flow ended.
const TUNNEL_DRAIN: Duration = Duration::from_secs(30);

/// Resolves when listening through a proxy stops working.
#[derive(Debug)]
pub struct ProxyListenHandle {
    endpoints: Vec<Endpoint>,
    failed: watch::Receiver<Option<Error>>,
    conn: Conn,
}

impl ProxyListenHandle {
    /// The proxy's endpoints for this manager, as first announced.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The connection to the proxy.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// Resolves with the reason once the proxy connection or its control
    /// flow is lost.
    pub async fn failed(mut self) -> Error {
        match self.failed.wait_for(Option::is_some).await {
            Ok(err) => err
                .clone()
                .unwrap_or_else(|| Error::new(ErrorKind::Proxy, "proxy lost")),
            Err(_) => Error::new(ErrorKind::Proxy, "manager is gone"),
        }
    }
}

/// Keeps a manager listening through a proxy, re-listening with jittered
/// exponential backoff whenever the proxy is lost, until stopped.
#[derive(Debug)]
pub struct ProxyKeeper {
    stop: watch::Sender<bool>,
}

impl ProxyKeeper {
    /// Stops re-listening and closes the connection to the proxy.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ProxyKeeper {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Reads one control message from a control flow.
async fn read_control(reader: &mut FlowReader) -> Result<Message> {
    let Some(raw) = reader.read_msg().await? else {
        return Err(Error::new(
            ErrorKind::Proxy,
            "the proxy closed the control flow",
        ));
    };
    control_wire::decode_one(raw, "Control")
}

/// The proxy's endpoints for this manager, carrying this manager's own
/// blessing names (it knows them best).
fn parse_endpoints(raw: &[String], names: &[String]) -> Vec<Endpoint> {
    raw.iter()
        .filter_map(|s| match Endpoint::parse(s) {
            Ok(ep) => Some(
                ep.clone()
                    .with_blessing_names(names.iter().cloned())
                    .unwrap_or(ep),
            ),
            Err(e) => {
                tracing::warn!(endpoint = %s, error = %e, "proxy sent a malformed endpoint");
                None
            }
        })
        .collect()
}

impl Manager {
    /// Listens through the proxy at `proxy`, recording its endpoints (and
    /// any error) under `name` in [`Manager::status`]. Returns once the proxy
    /// has answered; the handle resolves when the proxy is lost.
    /// (A proxy chaining through another proxy registers from
    /// `proxy::upstream` instead, with a `MultiProxyRequest`.)
    pub async fn proxy_listen(&self, name: &str, proxy: &Endpoint) -> Result<ProxyListenHandle> {
        let result = self.try_proxy_listen(name, proxy).await;
        if let Err(e) = &result {
            let err = e.clone();
            self.inner.status.update(|s| {
                s.proxy_endpoints.remove(name);
                s.proxy_errors.insert(name.to_string(), Some(err));
            });
        }
        result
    }

    async fn try_proxy_listen(&self, name: &str, proxy: &Endpoint) -> Result<ProxyListenHandle> {
        if self.inner.routing_id.is_null() {
            return Err(Error::bad_state(
                "a dial-only manager (null routing id) cannot listen through a proxy",
            ));
        }
        // A proxy routes but cannot read what it carries (every tunnel runs its
        // own end-to-end handshake), so any proxy the caller names will do.
        let authorizer: Arc<dyn PeerAuthorizer> = Arc::new(AllowEveryone);
        // A connection of its own: everything the proxy opens on it is a
        // tunnel, so it stays out of the cache and the accept queue.
        let conn = self
            .connect_direct(proxy, authorizer, Duration::ZERO)
            .await?;
        let control = conn.open_flow(Default::default())?;
        control.disable_fragmentation()?;
        let (mut reader, mut writer) = control.into_split();
        control_wire::send(&mut writer, &Message::ProxyServerRequest).await?;
        let endpoints = match read_control(&mut reader).await? {
            Message::ProxyResponse(r) => {
                parse_endpoints(&r.endpoints, self.inner.bidi.blessing_names())
            }
            Message::ProxyErrorResponse(e) => {
                conn.close("proxy refused");
                return Err(Error::new(
                    ErrorKind::Proxy,
                    format!("proxy {proxy} refused: {}", e.error),
                ));
            }
            other => {
                conn.close("unexpected control message");
                return Err(Error::new(
                    ErrorKind::Proxy,
                    format!("proxy {proxy} answered with {}", other.name()),
                ));
            }
        };
        let eps = endpoints.clone();
        self.inner.status.update(|s| {
            s.proxy_endpoints.insert(name.to_string(), eps);
            s.proxy_errors.insert(name.to_string(), None);
        });
        let (failed_tx, failed_rx) = watch::channel(None);
        tokio::spawn(accept_tunnels(Arc::downgrade(&self.inner), conn.clone()));
        tokio::spawn(follow_control(
            Arc::downgrade(&self.inner),
            name.to_string(),
            conn.clone(),
            reader,
            writer,
            failed_tx,
        ));
        Ok(ProxyListenHandle {
            endpoints,
            failed: failed_rx,
            conn,
        })
    }

    /// Keeps listening through `proxy` under `name`: re-listens with
    /// jittered exponential backoff (a quick first retry, then doubling up
    /// to 30 s) whenever it fails, until the keeper is stopped or dropped.
    pub fn keep_proxy_listening(&self, name: &str, proxy: &Endpoint) -> ProxyKeeper {
        let (stop, mut stopped) = watch::channel(false);
        let manager = Arc::downgrade(&self.inner);
        let name = name.to_string();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(30));
            loop {
                let Some(inner) = manager.upgrade() else {
                    return;
                };
                let m = Manager { inner };
                let attempt = tokio::select! {
                    r = m.proxy_listen(&name, &proxy) => r,
                    _ = stopped.wait_for(|s| *s) => return,
                };
                match attempt {
                    Ok(handle) => {
                        backoff.reset();
                        let conn = handle.conn().clone();
                        drop(m);
                        tokio::select! {
                            err = handle.failed() => {
                                tracing::info!(%proxy, error = %err, "lost the proxy; listening again");
                            }
                            _ = stopped.wait_for(|s| *s) => {
                                conn.close("stopped listening through the proxy");
                                if let Some(inner) = manager.upgrade() {
                                    inner.status.update(|s| {
                                        s.proxy_endpoints.remove(&name);
                                        s.proxy_errors.remove(&name);
                                    });
                                }
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        drop(m);
                        let pause = backoff.next_pause();
                        tracing::debug!(%proxy, error = %e, ?pause, "listening through the proxy failed");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stopped.wait_for(|s| *s) => return,
                        }
                    }
                }
            }
        });
        ProxyKeeper { stop }
    }

    /// Whether `conn` arrived through a proxy's tunnel.
    pub fn is_tunneled(&self, conn: &Conn) -> bool {
        self.inner.tunneled.lock().contains(&conn.id())
    }
}

/// Takes the proxy's tunnels on `conn` as connections to this manager.
async fn accept_tunnels(inner: std::sync::Weak<Inner>, conn: Conn) {
    loop {
        let Ok(flow) = conn.accept_flow().await else {
            return;
        };
        let Some(inner) = inner.upgrade() else { return };
        let manager = Manager { inner };
        tokio::spawn(async move {
            if let Err(e) = manager.accept_tunnel(flow).await {
                tracing::debug!(error = %e, "tunnelled handshake failed");
            }
        });
    }
}

impl Manager {
    async fn accept_tunnel(&self, flow: Flow) -> Result<()> {
        let tunnel = FlowConn::new(flow)?;
        let params = self.accept_params(tunnel.max_frame_size(), self.inner.bidi.clone());
        let conn = Conn::accept(Box::new(tunnel), params).await?;
        self.adopt(conn, Vec::new(), true)
    }
}

/// Follows the proxy's control flow: endpoint updates, and the loss of the
/// proxy.
async fn follow_control(
    inner: std::sync::Weak<Inner>,
    name: String,
    conn: Conn,
    mut reader: FlowReader,
    writer: flow::conn::FlowWriter,
    failed: watch::Sender<Option<Error>>,
) {
    let err = loop {
        let msg = tokio::select! {
            m = read_control(&mut reader) => m,
            e = conn.closed() => Err(e),
        };
        match msg {
            Ok(Message::ProxyResponse(r)) => {
                let Some(inner) = inner.upgrade() else { return };
                let eps = parse_endpoints(&r.endpoints, inner.bidi.blessing_names());
                inner.status.update(|s| {
                    s.proxy_endpoints.insert(name.clone(), eps);
                    s.proxy_errors.insert(name.clone(), None);
                });
            }
            Ok(Message::ProxyErrorResponse(e)) => {
                break Error::new(ErrorKind::Proxy, format!("proxy error: {}", e.error));
            }
            Ok(other) => {
                break Error::new(
                    ErrorKind::Proxy,
                    format!("unexpected {} on the proxy control flow", other.name()),
                );
            }
            Err(e) => break Error::new(ErrorKind::Proxy, format!("lost the proxy: {e}")),
        }
    };
    drop(writer);
    // Tunnels still open on the connection finish first (the proxy may be
    // shutting down gracefully); nothing new is opened on it.
    conn.enter_lame_duck();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(TUNNEL_DRAIN, conn.idle()).await;
        conn.close("proxy control flow ended");
    });
    if let Some(inner) = inner.upgrade() {
        let recorded = err.clone();
        inner.status.update(|s| {
            s.proxy_endpoints.remove(&name);
            s.proxy_errors.insert(name.clone(), Some(recorded));
        });
    }
    failed.send_replace(Some(err));
}
