//! The proxy server: services that cannot accept connections listen
//! through it; clients reach them through it, end to end.
//!
//! A [`Proxy`] runs on a [`Manager`] and reads the first message of every
//! flow a peer opens:
//!
//! - a `ProxyServerRequest` (a server) or `MultiProxyRequest` (a proxy
//!   listening through this one) opens a **control flow**: the registrant's
//!   blessings are checked against the listen policy, its routing id is
//!   bound to its key, and the proxy answers `ProxyResponse` with its own
//!   endpoints rewritten for the registrant (or `ProxyErrorResponse` with
//!   the reason, and closes). The flow stays open; the proxy pushes a new
//!   `ProxyResponse` when its endpoints change, and the registration ends
//!   when the flow or its connection closes.
//! - a dialer's handshake hello opens a **tunnel**: the hello names the
//!   endpoint the dialer wants; the proxy skips route hops naming itself,
//!   forwards to the downstream proxy named by the next hop, or else to the
//!   server registered under the endpoint's routing id, by opening a new
//!   flow on that registrant's connection, writing the hello, and relaying
//!   whole messages both ways as passthrough payloads. The proxy never sees
//!   the plaintext of the end-to-end connection inside and never encrypts
//!   it a second time.
//!
//! Refusals are typed ([`Refusal`]) and counted ([`Proxy::stats`], and
//! `/metrics` when a metrics address is configured).

mod control;
mod metrics;
mod registry;
mod route;
mod tunnel;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use flow::conn::{Conn, Flow};
use flow::message::Message;
use flow::naming::{Endpoint, RoutingId};
use flow::security::BlessingPattern;
use flow::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot, watch};

pub use metrics::{LATENCY_BUCKETS, LatencyHistogram, ProxyStats};

use crate::Manager;
use crate::control_wire;
use metrics::Counters;
use registry::{Claim, Registration, Registry};
use route::Kind;

/// Time a peer has to send the first message of a flow it opened.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time `Proxy::start` waits for each upstream proxy's first answer.
const UPSTREAM_START_WAIT: Duration = Duration::from_secs(10);

/// The proxy's abuse limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Most servers and downstream proxies listening at once (default
    /// 10,000).
    pub max_servers: usize,
    /// Most registrations (routing ids) one key may hold at once (default
    /// 64).
    pub max_servers_per_identity: usize,
    /// Most proxied flows open at once to one server or downstream proxy
    /// (default 10,000).
    pub max_flows_per_server: usize,
    /// Bytes (both ways together, end-to-end frames as relayed) after which
    /// a proxied flow is cut; `None`: no limit (the default).
    pub max_bytes_per_flow: Option<u64>,
    /// Time after which a proxied flow is cut; `None`: no limit (the
    /// default).
    pub max_flow_duration: Option<Duration>,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_servers: 10_000,
            max_servers_per_identity: 64,
            max_flows_per_server: 10_000,
            max_bytes_per_flow: None,
            max_flow_duration: None,
        }
    }
}

/// What a [`Proxy`] listens on and whom it serves.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Where to listen: each endpoint's protocol and address (the shorthand
    /// `tcp/127.0.0.1:8100` parses into one; port 0 picks a port).
    pub listen: Vec<Endpoint>,
    /// Who may listen through the proxy: peers with a validated blessing
    /// name matching one of these. `None` (the default): the proxy's own
    /// default blessing names and their extensions.
    pub allow_listen: Option<Vec<BlessingPattern>>,
    /// Who may dial through the proxy. Empty (the default) means everyone,
    /// as does the pattern `...`.
    pub allow_dial: Vec<BlessingPattern>,
    /// Abuse limits.
    pub limits: ProxyLimits,
    /// Proxies to listen through (a chain): the proxy registers with each
    /// (`MultiProxyRequest`) and adds the endpoints they give it to its own.
    /// The shorthand `tcp/127.0.0.1:8100` is fine: the handshake learns the
    /// routing id.
    pub via: Vec<Endpoint>,
    /// Where to serve `/metrics` (Prometheus text) and `/healthz`.
    pub metrics: Option<SocketAddr>,
}

impl ProxyConfig {
    /// A configuration listening on `specs` (each `PROTOCOL/ADDRESS` or a
    /// full endpoint), with every other setting at its default.
    pub fn listening_on<S: AsRef<str>>(specs: &[S]) -> Result<ProxyConfig> {
        Ok(ProxyConfig {
            listen: specs
                .iter()
                .map(|s| Endpoint::parse(s.as_ref()))
                .collect::<Result<_>>()?,
            ..ProxyConfig::default()
        })
    }
}

/// Why the proxy refused a registration or a proxied flow.
///
/// A refused registrant gets a `ProxyErrorResponse` whose text starts with
/// [`Refusal::as_str`] and a colon ([`Refusal::of_message`] reads it back);
/// a refused tunnel is closed (tunnels have no in-band error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Refusal {
    /// The registrant's blessings match no listen pattern.
    ListenNotAllowed,
    /// The dialer's blessings match no dial pattern.
    DialNotAllowed,
    /// Another key owns the routing id.
    RoutingIdTaken,
    /// The registrant showed no blessings, so no key to bind its routing id
    /// to.
    NoIdentity,
    /// The registrant's routing id is null or the proxy's own.
    BadRoutingId,
    /// The proxy has as many registrations as it takes.
    TooManyServers,
    /// The registrant's key holds as many registrations as it may.
    TooManyForIdentity,
    /// The target has as many proxied flows open as it may.
    TooManyFlows,
    /// No server or downstream proxy is registered for the target.
    UnknownTarget,
    /// The target's connection would not take a new flow.
    TargetUnavailable,
    /// The flow arrived over a connection that itself came through a
    /// tunnel (proxying over a proxied connection).
    Tunneled,
    /// The first message was neither a proxy request nor a handshake hello,
    /// or did not come in time.
    BadRequest,
    /// The proxy has no endpoints to give out yet.
    NotListening,
    /// The proxy is shutting down.
    ShuttingDown,
}

impl Refusal {
    /// Every reason, in declaration order.
    pub const ALL: [Refusal; 14] = [
        Refusal::ListenNotAllowed,
        Refusal::DialNotAllowed,
        Refusal::RoutingIdTaken,
        Refusal::NoIdentity,
        Refusal::BadRoutingId,
        Refusal::TooManyServers,
        Refusal::TooManyForIdentity,
        Refusal::TooManyFlows,
        Refusal::UnknownTarget,
        Refusal::TargetUnavailable,
        Refusal::Tunneled,
        Refusal::BadRequest,
        Refusal::NotListening,
        Refusal::ShuttingDown,
    ];

    /// The reason's name, as in metrics labels and error texts.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ListenNotAllowed => "listen_not_allowed",
            Refusal::DialNotAllowed => "dial_not_allowed",
            Refusal::RoutingIdTaken => "routing_id_taken",
            Refusal::NoIdentity => "no_identity",
            Refusal::BadRoutingId => "bad_routing_id",
            Refusal::TooManyServers => "too_many_servers",
            Refusal::TooManyForIdentity => "too_many_for_identity",
            Refusal::TooManyFlows => "too_many_flows",
            Refusal::UnknownTarget => "unknown_target",
            Refusal::TargetUnavailable => "target_unavailable",
            Refusal::Tunneled => "tunneled",
            Refusal::BadRequest => "bad_request",
            Refusal::NotListening => "not_listening",
            Refusal::ShuttingDown => "shutting_down",
        }
    }

    /// The reason a `ProxyErrorResponse` text gives, if it is one of these.
    pub fn of_message(text: &str) -> Option<Refusal> {
        let name = text.split(':').next()?.trim();
        Refusal::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the proxy cut a proxied flow it had set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Cutoff {
    /// [`ProxyLimits::max_bytes_per_flow`] was reached.
    MaxBytes,
    /// [`ProxyLimits::max_flow_duration`] passed.
    MaxDuration,
}

impl Cutoff {
    /// Every limit, in declaration order.
    pub const ALL: [Cutoff; 2] = [Cutoff::MaxBytes, Cutoff::MaxDuration];

    /// The limit's name, as in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Cutoff::MaxBytes => "max_bytes",
            Cutoff::MaxDuration => "max_duration",
        }
    }
}

/// A refusal and what it was about.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub(crate) reason: Refusal,
    pub(crate) detail: String,
}

impl Refused {
    pub(crate) fn new(reason: Refusal, detail: impl Into<String>) -> Refused {
        Refused {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Where listening through one upstream proxy stands.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// The upstream proxy, as configured.
    pub via: Endpoint,
    /// The endpoints it gave this proxy (empty while not registered).
    pub endpoints: Vec<Endpoint>,
    /// Why the last registration failed or ended, if it did.
    pub error: Option<Error>,
}

struct Upstream {
    status: UpstreamStatus,
    /// The connection carrying the registration: flows the upstream proxy
    /// opens on it are tunnels it forwards here.
    conn: Option<Conn>,
}

pub(crate) struct Inner {
    manager: Manager,
    own_rid: RoutingId,
    allow_listen: Vec<BlessingPattern>,
    allow_dial: Vec<BlessingPattern>,
    limits: ProxyLimits,
    registry: Mutex<Registry<Conn>>,
    /// Shared with tunnels' sinks, which must not hold the proxy itself.
    counters: Arc<Counters>,
    /// Endpoints of the listeners this proxy started.
    direct: Mutex<Vec<Endpoint>>,
    upstreams: Mutex<Vec<Upstream>>,
    /// The proxy's own endpoints (direct, then through upstream proxies).
    endpoints: watch::Sender<Vec<Endpoint>>,
    /// Set when shutdown starts (or the proxy is dropped).
    stopping: watch::Sender<bool>,
    /// Set when shutdown has finished.
    done: watch::Sender<bool>,
    /// Pinged whenever a tunnel ends.
    tunnel_ended: Notify,
}

impl Inner {
    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Recomputes the proxy's endpoints; registrants hear of a change.
    fn refresh_endpoints(&self) {
        if self.is_stopping() {
            return;
        }
        let mut all = self.direct.lock().clone();
        for u in self.upstreams.lock().iter() {
            all.extend(u.status.endpoints.iter().cloned());
        }
        self.endpoints.send_if_modified(|current| {
            if *current == all {
                false
            } else {
                *current = all;
                true
            }
        });
    }

    /// Whether `conn` carries this proxy's registration with an upstream
    /// proxy (flows on it are tunnels that proxy forwards).
    fn is_upstream(&self, conn: &Conn) -> bool {
        self.upstreams
            .lock()
            .iter()
            .any(|u| u.conn.as_ref() == Some(conn))
    }

    /// Counts and logs a refusal.
    fn refused(&self, conn: &Conn, refused: &Refused) {
        self.counters.refused(refused.reason);
        tracing::info!(
            peer = %conn.remote_addr(),
            names = ?conn.remote_blessings().names(),
            reason = %refused,
            "proxy refused"
        );
    }

    /// Checks whether the peer of `conn` may listen as `kind`, and
    /// registers it.
    fn claim(
        &self,
        conn: &Conn,
        kind: Kind,
    ) -> std::result::Result<Arc<Registration<Conn>>, Refused> {
        if self.is_stopping() {
            return Err(Refused::new(
                Refusal::ShuttingDown,
                "the proxy is shutting down",
            ));
        }
        if self.manager.is_tunneled(conn) {
            return Err(tunneled());
        }
        let names = &conn.authorized_peer().names;
        if !self.allow_listen.iter().any(|p| p.matched_by(names)) {
            return Err(Refused::new(
                Refusal::ListenNotAllowed,
                format!(
                    "blessing names {names:?} match none of the listen patterns {:?}",
                    self.allow_listen
                        .iter()
                        .map(BlessingPattern::as_str)
                        .collect::<Vec<_>>()
                ),
            ));
        }
        let Some(key) = conn.remote_blessings().public_key() else {
            return Err(Refused::new(
                Refusal::NoIdentity,
                "no blessings shown, so no key to bind the routing id to",
            ));
        };
        let rid = conn.remote_endpoint().routing_id();
        if rid.is_null() || rid == self.own_rid {
            return Err(Refused::new(
                Refusal::BadRoutingId,
                format!("routing id {rid} cannot listen through this proxy"),
            ));
        }
        if self.endpoints.borrow().is_empty() {
            return Err(Refused::new(
                Refusal::NotListening,
                "the proxy has no endpoints yet",
            ));
        }
        let (registration, replaced) = self.registry.lock().register(
            Claim {
                rid,
                kind,
                key,
                conn: conn.clone(),
            },
            &self.limits,
        )?;
        if let Some(old) = replaced {
            old.end(format!(
                "{}: the same key registered routing id {rid} again",
                Refusal::RoutingIdTaken
            ));
        }
        self.counters.registered();
        Ok(registration)
    }

    fn stats(&self) -> ProxyStats {
        let (servers, proxies) = self.registry.lock().counts();
        self.counters.snapshot(servers, proxies)
    }
}

/// The refusal of a flow on a connection that itself came through a
/// tunnel. A configured chain never needs one: this proxy relays the
/// tunnels its upstream proxies forward without terminating them, so they
/// never become connections of its manager.
fn tunneled() -> Refused {
    Refused::new(
        Refusal::Tunneled,
        "the connection came through a proxy; no proxying over a proxied connection",
    )
}

struct MetricsView(Weak<Inner>);

impl metrics::MetricsSource for MetricsView {
    fn metrics(&self) -> Option<String> {
        self.0.upgrade().map(|inner| inner.stats().to_prometheus())
    }

    fn healthy(&self) -> bool {
        self.0.upgrade().is_some_and(|inner| !inner.is_stopping())
    }
}

/// A proxy server running on a [`Manager`].
///
/// Dropping it stops its tasks without draining (use [`Proxy::shutdown`]);
/// the manager is left as it is.
pub struct Proxy {
    inner: Arc<Inner>,
    metrics_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("routing_id", &self.inner.own_rid)
            .field("endpoints", &*self.inner.endpoints.borrow())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts a proxy on `manager` (which must have a routing id: a
    /// dial-only manager cannot be reached). Returns once it listens on
    /// every configured address, serves metrics if asked to, and has heard
    /// once from each upstream proxy (registered or failed; failures are
    /// retried in the background and reported by [`Proxy::upstreams`]).
    ///
    /// Fails if a listen address or the metrics address cannot be bound.
    pub async fn start(manager: Manager, config: ProxyConfig) -> Result<Proxy> {
        let own_rid = manager.routing_id();
        if own_rid.is_null() {
            return Err(Error::bad_arg(
                "a proxy needs a manager with a routing id (this one is dial-only)",
            ));
        }
        let allow_listen = match config.allow_listen {
            Some(patterns) => patterns,
            None => manager
                .principal()
                .default_blessings()
                .names()
                .iter()
                .filter_map(|name| BlessingPattern::prefix(name).ok())
                .collect(),
        };
        let allow_dial = if config.allow_dial.is_empty() {
            vec![BlessingPattern::all()]
        } else {
            config.allow_dial
        };
        let upstreams = config
            .via
            .iter()
            .map(|via| Upstream {
                status: UpstreamStatus {
                    via: via.clone(),
                    endpoints: Vec::new(),
                    error: None,
                },
                conn: None,
            })
            .collect();
        // Clients dial a proxied endpoint with the server's routing id; the
        // manager must take their connections instead of refusing them.
        manager.set_routes_others(true);
        let inner = Arc::new(Inner {
            manager: manager.clone(),
            own_rid,
            allow_listen,
            allow_dial,
            limits: config.limits,
            registry: Mutex::new(Registry::default()),
            counters: Arc::new(Counters::default()),
            direct: Mutex::new(Vec::new()),
            upstreams: Mutex::new(upstreams),
            endpoints: watch::channel(Vec::new()).0,
            stopping: watch::channel(false).0,
            done: watch::channel(false).0,
            tunnel_ended: Notify::new(),
        });
        tokio::spawn(accept_loop(
            Arc::downgrade(&inner),
            manager,
            inner.done.subscribe(),
        ));
        let mut proxy = Proxy {
            inner,
            metrics_addr: None,
        };
        for ep in &config.listen {
            if let Err(e) = proxy.listen(ep.protocol(), ep.address()).await {
                proxy.stop_tasks();
                return Err(e.context(format!(
                    "proxy listening on {}/{}",
                    ep.protocol(),
                    ep.address()
                )));
            }
        }
        if let Some(addr) = config.metrics {
            match metrics::bind(addr).await {
                Ok(listener) => {
                    proxy.metrics_addr = listener.local_addr().ok();
                    tokio::spawn(metrics::serve(
                        listener,
                        MetricsView(Arc::downgrade(&proxy.inner)),
                        proxy.inner.done.subscribe(),
                    ));
                }
                Err(e) => {
                    proxy.stop_tasks();
                    return Err(Error::with_source(
                        ErrorKind::Network,
                        format!("serving metrics on {addr}: {e}"),
                        e,
                    ));
                }
            }
        }
        let mut first_answers = Vec::new();
        for (index, via) in config.via.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(upstream::run(Arc::downgrade(&proxy.inner), index, via, tx));
            first_answers.push(rx);
        }
        let _ = tokio::time::timeout(
            UPSTREAM_START_WAIT,
            futures::future::join_all(first_answers),
        )
        .await;
        Ok(proxy)
    }

    /// The proxy's routing id (its manager's).
    pub fn routing_id(&self) -> RoutingId {
        self.inner.own_rid
    }

    /// The manager the proxy runs on.
    pub fn manager(&self) -> &Manager {
        &self.inner.manager
    }

    /// The proxy's endpoints: its listeners', then those given by upstream
    /// proxies (which name this proxy at the end of their route). These are
    /// what registrants are given, rewritten for each.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner.endpoints.borrow().clone()
    }

    /// A watch of [`Proxy::endpoints`].
    pub fn watch_endpoints(&self) -> watch::Receiver<Vec<Endpoint>> {
        self.inner.endpoints.subscribe()
    }

    /// Where registering through each configured upstream proxy stands.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        self.inner
            .upstreams
            .lock()
            .iter()
            .map(|u| u.status.clone())
            .collect()
    }

    /// Where `/metrics` and `/healthz` are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        self.inner.stats()
    }

    /// Listens on one more address; registrants are sent the new endpoints.
    pub async fn listen(&self, protocol: &str, address: &str) -> Result<Endpoint> {
        if self.inner.is_stopping() {
            return Err(Error::bad_state("the proxy is shutting down"));
        }
        let handle = self.inner.manager.listen(protocol, address).await?;
        let endpoint = handle.endpoint().clone();
        self.inner.direct.lock().push(endpoint.clone());
        self.inner.refresh_endpoints();
        let weak = Arc::downgrade(&self.inner);
        let ep = endpoint.clone();
        tokio::spawn(async move {
            let err = handle.failed().await;
            if let Some(inner) = weak.upgrade() {
                if !inner.is_stopping() {
                    tracing::warn!(endpoint = %ep, error = %err, "proxy listener failed");
                }
                inner.direct.lock().retain(|e| *e != ep);
                inner.refresh_endpoints();
            }
        });
        Ok(endpoint)
    }

    /// Whether [`Proxy::shutdown`] has started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.is_stopping()
    }

    /// Shuts down gracefully: stops listening, ends every registration
    /// (registrants are told `shutting_down` and move to another proxy),
    /// lame-ducks every connection so peers open no new flows, waits until
    /// the proxied flows have finished or `grace` has passed, then closes
    /// every connection and the manager. Idempotent; later calls wait for
    /// the first to finish.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        if inner.stopping.send_replace(true) {
            let mut done = inner.done.subscribe();
            let _ = done.wait_for(|d| *d).await;
            return;
        }
        tracing::info!(
            tunnels = inner.counters.active_tunnels(),
            "proxy shutting down"
        );
        inner.endpoints.send_replace(Vec::new());
        inner.manager.stop_listening();
        inner.direct.lock().clear();
        for c in inner.manager.connections() {
            c.enter_lame_duck();
        }
        let drained = async {
            loop {
                let ended = inner.tunnel_ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if inner.counters.active_tunnels() == 0 {
                    return;
                }
                ended.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::info!(
                tunnels = inner.counters.active_tunnels(),
                "grace period over; closing proxied flows"
            );
        }
        for c in inner.manager.connections() {
            c.close("the proxy shut down");
        }
        inner.manager.close().await;
        inner.done.send_replace(true);
    }

    fn stop_tasks(&self) {
        self.inner.stopping.send_replace(true);
        self.inner.done.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// Takes every flow peers open on the manager and sorts it out.
async fn accept_loop(weak: Weak<Inner>, manager: Manager, mut done: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = until_set(&mut done) => return,
            accepted = manager.accept() => accepted,
        };
        match accepted {
            Ok(flow) => {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                tokio::spawn(classify(inner, flow));
            }
            Err(e) => {
                // Interrupted by `stop_listening`, or the manager closed.
                tracing::debug!(error = %e, "proxy accept interrupted");
                tokio::select! {
                    () = until_set(&mut done) => return,
                    () = manager.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
}

/// Resolves once `flag` is set (or its sender is gone).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// What a flow's first message makes of it: a control flow of this kind,
/// if it is a proxy request.
fn control_kind(first: &bytes::Bytes) -> Option<Kind> {
    match control_wire::decode_one(first.clone(), "proxy request") {
        Ok(Message::ProxyServerRequest) => Some(Kind::Server),
        Ok(Message::MultiProxyRequest) => Some(Kind::Proxy),
        _ => None,
    }
}

/// Reads a flow's first message and serves it as a control flow or a
/// tunnel.
async fn classify(inner: Arc<Inner>, mut flow: Flow) {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, flow.read_msg()).await;
    let conn = flow.conn().clone();
    let msg = match first {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.remote_addr(), error = %e, "flow failed before its first message");
            return;
        }
        Err(_) => {
            inner.refused(
                &conn,
                &Refused::new(
                    Refusal::BadRequest,
                    format!("no first message within {FIRST_MESSAGE_TIMEOUT:?}"),
                ),
            );
            flow.close();
            return;
        }
    };
    if let Some(kind) = control_kind(&msg) {
        control::serve(inner, flow, kind).await;
    } else if flow::conn::handshake::is_hello(&msg) {
        tunnel::serve(inner, flow, msg).await;
    } else {
        inner.refused(
            &conn,
            &Refused::new(
                Refusal::BadRequest,
                "the first message is neither a proxy request nor a handshake hello",
            ),
        );
        flow.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order_and_read_back() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            let text = Refused::new(*r, "because").to_string();
            assert_eq!(Refusal::of_message(&text), Some(*r), "{text}");
        }
        for (i, c) in Cutoff::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert_eq!(Refusal::of_message("something else: x"), None);
    }

    #[test]
    fn control_requests_are_told_from_other_messages() {
        let encode = |m: Message| {
            let mut buf = bytes::BytesMut::new();
            m.encode(&mut buf);
            buf.freeze()
        };
        assert_eq!(
            control_kind(&encode(Message::ProxyServerRequest)),
            Some(Kind::Server)
        );
        assert_eq!(
            control_kind(&encode(Message::MultiProxyRequest)),
            Some(Kind::Proxy)
        );
        assert_eq!(control_kind(&encode(Message::EnterLameDuck)), None);
        let mut trailing = bytes::BytesMut::new();
        Message::ProxyServerRequest.encode(&mut trailing);
        trailing.extend_from_slice(b"x");
        assert_eq!(control_kind(&trailing.freeze()), None);
        assert_eq!(control_kind(&bytes::Bytes::from_static(b"FL\x01")), None);
        assert_eq!(control_kind(&bytes::Bytes::new()), None);
    }
}
