//! [`Manager`]: what applications hold. It listens, accepts, dials, caches
//! and reuses connections, pins the ones asked for, and evicts idle ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flow::auth::{AllowEveryone, PeerAuthorizer, PeerInfo};
use flow::conn::{Conn, ConnConfig, Flow, FlowOptions, HandshakeParams};
use flow::naming::{Endpoint, RoutingId};
use flow::security::{BlessingPattern, Principal};
use flow::transport::{FramedConn, Listener};
use flow::{Error, ErrorKind, Result};
use flow_protocols::Registry;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, watch};

use crate::accept::AcceptHub;
use crate::cache::{AddrKey, ConnCache};
use crate::flow_conn::FlowConn;
use crate::status::{ListenStatus, StatusCell};

/// How long a failed dial is remembered: dials to the same place within it
/// fail at once instead of connecting again.
pub const DIAL_FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// Most handshakes with incoming connections in progress per listener.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Connections closed at once when a file-descriptor limit is hit.
const FD_EVICTION_BATCH: usize = 16;

/// Builds a [`Manager`].
#[derive(Clone)]
pub struct ManagerBuilder {
    principal: Principal,
    routing_id: RoutingId,
    registry: Option<Arc<Registry>>,
    idle_expiry: Duration,
    channel_timeout: Duration,
    close_grace: Duration,
    conn_config: ConnConfig,
}

impl std::fmt::Debug for ManagerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerBuilder")
            .field("routing_id", &self.routing_id)
            .field("idle_expiry", &self.idle_expiry)
            .field("channel_timeout", &self.channel_timeout)
            .finish_non_exhaustive()
    }
}

impl ManagerBuilder {
    /// A builder for a manager acting as `principal`, with a random routing
    /// id and the defaults below.
    pub fn new(principal: Principal) -> Self {
        ManagerBuilder {
            principal,
            routing_id: RoutingId::random(),
            registry: None,
            idle_expiry: Duration::from_secs(60),
            channel_timeout: Duration::from_secs(30),
            close_grace: Duration::from_secs(5),
            conn_config: ConnConfig::default(),
        }
    }

    /// The routing id; [`RoutingId::NULL`] makes a dial-only manager, which
    /// refuses to listen.
    pub fn routing_id(mut self, rid: RoutingId) -> Self {
        self.routing_id = rid;
        self
    }

    /// A dial-only manager (routing id [`RoutingId::NULL`]).
    pub fn dial_only(self) -> Self {
        self.routing_id(RoutingId::NULL)
    }

    /// The protocol registry (default: a fresh one with every transport).
    pub fn registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// How long a connection with no flows (side channels aside) is kept
    /// (default 60 s).
    pub fn idle_expiry(mut self, expiry: Duration) -> Self {
        self.idle_expiry = expiry;
        self
    }

    /// Silence after which a connection is declared dead, unless a dial
    /// says otherwise (default 30 s).
    pub fn channel_timeout(mut self, timeout: Duration) -> Self {
        self.channel_timeout = timeout;
        self
    }

    /// How long [`Manager::close`] lets flows finish (default 5 s).
    pub fn close_grace(mut self, grace: Duration) -> Self {
        self.close_grace = grace;
        self
    }

    /// Limits and tunables of every connection (call before the options
    /// above that change it).
    pub fn conn_config(mut self, config: ConnConfig) -> Self {
        self.conn_config = config;
        self
    }

    /// Only peers with a blessing matching one of `patterns` may see this
    /// manager's blessings when they connect to it: others see only its
    /// public key and are refused. (Dialers must be willing to show their
    /// blessings first to such a server: see
    /// [`ManagerBuilder::reveal_to_hidden_servers`].)
    pub fn blessings_visible_to(mut self, patterns: Vec<BlessingPattern>) -> Self {
        self.conn_config.blessings_visible_to = Some(patterns);
        self
    }

    /// Whether this manager, dialing a server that hides its blessings,
    /// shows its own first (off by default: a dialer normally authorizes the
    /// server before revealing anything).
    pub fn reveal_to_hidden_servers(mut self, reveal: bool) -> Self {
        self.conn_config.reveal_to_hidden_acceptors = reveal;
        self
    }

    /// Builds the manager. Must be called within a tokio runtime (it starts
    /// the idle reaper).
    pub fn build(self) -> Manager {
        let own_registry = self.registry.is_none();
        let registry = self
            .registry
            .unwrap_or_else(|| Arc::new(Registry::with_defaults()));
        let names = self.principal.default_blessings().names();
        let bidi = Endpoint::new("", "")
            .with_routing_id(self.routing_id)
            .with_blessing_names(names)
            .unwrap_or_else(|_| Endpoint::new("", "").with_routing_id(self.routing_id));
        let mut conn_config = self.conn_config;
        conn_config.channel_timeout = self.channel_timeout;
        let (closed_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            principal: self.principal,
            routing_id: self.routing_id,
            registry,
            idle_expiry: self.idle_expiry,
            close_grace: self.close_grace,
            conn_config,
            bidi,
            cache: Mutex::new(ConnCache::default()),
            tunneled: Mutex::new(std::collections::HashSet::new()),
            routes_others: std::sync::atomic::AtomicBool::new(false),
            accept: AcceptHub::new(),
            listeners: Mutex::new(Vec::new()),
            status: StatusCell::new(),
            inflight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            closing: Mutex::new(false),
            closed: closed_tx,
            reaper_wake: Notify::new(),
            fd_hook: Mutex::new(None),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        let manager = Manager { inner };
        let weak = Arc::downgrade(&manager.inner);
        let hook: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(inner) = weak.upgrade() {
                let n = Manager { inner }.evict_lru(FD_EVICTION_BATCH);
                tracing::warn!(
                    closed = n,
                    "out of file descriptors; closed idle connections"
                );
            }
        });
        flow_protocols::pressure::on_resource_exhaustion(&hook);
        *manager.inner.fd_hook.lock() = Some(hook);
        if own_registry {
            // A registry of its own gets the `proxy` protocol, dialing
            // through this manager. (Callers who pass a registry register
            // `ProxyProtocol::new(&manager)` themselves if they want it.)
            manager.inner.registry.register(
                "proxy",
                Arc::new(crate::flow_conn::ProxyProtocol::new(&manager)),
                vec!["proxy".to_string()],
            );
        }
        manager
    }
}

type DialFuture = Shared<BoxFuture<'static, Result<Conn>>>;

/// What dials are keyed by: where, and whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DialKey {
    protocol: String,
    address: String,
    rid: RoutingId,
}

struct ListenerEntry {
    endpoint: Endpoint,
    listener: Arc<dyn Listener>,
}

pub(crate) struct Inner {
    pub(crate) principal: Principal,
    pub(crate) routing_id: RoutingId,
    pub(crate) registry: Arc<Registry>,
    idle_expiry: Duration,
    close_grace: Duration,
    pub(crate) conn_config: ConnConfig,
    pub(crate) bidi: Endpoint,
    pub(crate) cache: Mutex<ConnCache>,
    /// Connections that arrived through a proxy's tunnel.
    pub(crate) tunneled: Mutex<std::collections::HashSet<u64>>,
    /// Accept connections asking for other routing ids (proxies).
    routes_others: std::sync::atomic::AtomicBool,
    pub(crate) accept: Arc<AcceptHub>,
    listeners: Mutex<Vec<ListenerEntry>>,
    pub(crate) status: StatusCell,
    inflight: Mutex<HashMap<DialKey, DialFuture>>,
    failures: Mutex<HashMap<DialKey, (Instant, Error)>>,
    closing: Mutex<bool>,
    closed: watch::Sender<bool>,
    reaper_wake: Notify,
    /// Registered with `flow_protocols::pressure`: listeners out of file
    /// descriptors ask the manager to close idle connections.
    fd_hook: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

/// Manages flows and the connections under them.
///
/// Cheap to clone; clones are the same manager.
#[derive(Clone)]
pub struct Manager {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("routing_id", &self.inner.routing_id)
            .finish_non_exhaustive()
    }
}

/// Resolves when a listener fails, so the caller may listen again.
#[derive(Debug)]
pub struct ListenHandle {
    endpoint: Endpoint,
    failed: watch::Receiver<Option<Error>>,
}

impl ListenHandle {
    /// The endpoint this listener accepts on.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Resolves with the error once the listener fails or is stopped.
    pub async fn failed(mut self) -> Error {
        match self.failed.wait_for(Option::is_some).await {
            Ok(err) => err
                .clone()
                .unwrap_or_else(|| Error::bad_state("listener stopped")),
            Err(_) => Error::bad_state("manager is gone"),
        }
    }
}

/// Authorizes the first hop of a dial to `target`: a peer announcing
/// another routing id is a proxy, trusted to route only (the end-to-end
/// handshake inside the tunnel faces the real authorizer); the target itself
/// faces `inner`.
#[derive(Debug)]
struct ProxyAware {
    target: RoutingId,
    inner: Arc<dyn PeerAuthorizer>,
}

impl PeerAuthorizer for ProxyAware {
    fn authorize_peer(&self, peer: &PeerInfo<'_>) -> Result<flow::auth::AuthorizedPeer> {
        if peer.remote_endpoint.routing_id() != self.target {
            return Ok(peer.validate());
        }
        self.inner.authorize_peer(peer)
    }

    fn blessings_for_peer(
        &self,
        principal: &Principal,
        peer_names: &[String],
    ) -> Result<(flow::security::Blessings, flow::security::Discharges)> {
        self.inner.blessings_for_peer(principal, peer_names)
    }
}

/// Whether `err` comes from running out of file descriptors.
fn is_fd_exhaustion(err: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
        {
            return true;
        }
        source = s.source();
    }
    err.message().contains("Too many open files")
}

impl Manager {
    /// A builder for a manager acting as `principal`.
    pub fn builder(principal: Principal) -> ManagerBuilder {
        ManagerBuilder::new(principal)
    }

    /// The manager's routing id.
    pub fn routing_id(&self) -> RoutingId {
        self.inner.routing_id
    }

    /// The manager's principal.
    pub fn principal(&self) -> &Principal {
        &self.inner.principal
    }

    /// The registry the manager dials and listens with.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    fn check_open(&self) -> Result<()> {
        if *self.inner.closing.lock() {
            return Err(Error::new(ErrorKind::Aborted, "manager is closed"));
        }
        Ok(())
    }

    // ----- Listening ------------------------------------------------------

    /// Starts accepting flows on `protocol`/`address`; returns once
    /// listening. The handle resolves if the listener later fails.
    pub async fn listen(&self, protocol: &str, address: &str) -> Result<ListenHandle> {
        self.check_open()?;
        if self.inner.routing_id.is_null() {
            return Err(Error::bad_state(
                "a dial-only manager (null routing id) cannot listen",
            ));
        }
        let key = (protocol.to_string(), address.to_string());
        let listener: Arc<dyn Listener> = match self.inner.registry.listen(protocol, address).await
        {
            Ok(l) => Arc::from(l),
            Err(e) => {
                let err = e.clone();
                self.inner.status.update(|s| {
                    s.listen_errors.insert(key.clone(), err);
                });
                return Err(e);
            }
        };
        let endpoint = Endpoint::new(protocol, listener.local_addr())
            .with_routing_id(self.inner.routing_id)
            .with_blessing_names(self.inner.bidi.blessing_names().iter().cloned())?;
        let (failed_tx, failed_rx) = watch::channel(None);
        self.inner.listeners.lock().push(ListenerEntry {
            endpoint: endpoint.clone(),
            listener: listener.clone(),
        });
        self.inner.status.update(|s| {
            s.listen_errors.remove(&key);
            s.endpoints.push(endpoint.clone());
        });
        tokio::spawn(accept_loop(
            Arc::downgrade(&self.inner),
            listener,
            key,
            endpoint.clone(),
            failed_tx,
        ));
        Ok(ListenHandle {
            endpoint,
            failed: failed_rx,
        })
    }

    /// Stops every listener; pending [`Manager::accept`] calls fail.
    /// Listening again works.
    pub fn stop_listening(&self) {
        let listeners: Vec<ListenerEntry> = std::mem::take(&mut *self.inner.listeners.lock());
        for l in &listeners {
            l.listener.close();
        }
        self.inner.status.update(|s| {
            s.endpoints
                .retain(|ep| !listeners.iter().any(|l| l.endpoint == *ep));
        });
        self.inner.accept.interrupt();
    }

    /// What the manager listens on and what went wrong.
    pub fn status(&self) -> ListenStatus {
        self.inner.status.snapshot(&self.inner.bidi)
    }

    /// The next flow a peer opened: on a listener, through a proxy, or back
    /// over a connection this manager dialed.
    pub async fn accept(&self) -> Result<Flow> {
        self.check_open()?;
        self.inner.accept.accept().await
    }

    // ----- Dialing --------------------------------------------------------

    /// A flow to `remote`, over a cached connection if one is usable (its
    /// peer passes `authorizer`), else a new one. `channel_timeout` applies
    /// to a new connection (zero: the manager's default).
    pub async fn dial(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Flow> {
        self.dial_with(
            remote,
            authorizer,
            channel_timeout,
            FlowOptions::default(),
            false,
        )
        .await
    }

    /// Like [`Manager::dial`] with flow options (side channel, blessings).
    pub async fn dial_with(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
        opts: FlowOptions,
        cached_only: bool,
    ) -> Result<Flow> {
        self.check_open()?;
        // A connection may enter lame duck between lookup and open: retry
        // once on a fresh one.
        let conn = self
            .conn_for(remote, &authorizer, channel_timeout, cached_only)
            .await?;
        match conn.open_flow(opts.clone()) {
            Err(e) if e.kind() == ErrorKind::BadState => {}
            result => return result,
        }
        self.conn_for(remote, &authorizer, channel_timeout, cached_only)
            .await?
            .open_flow(opts)
    }

    /// A flow to `remote` over a cached connection only; fails with
    /// [`ErrorKind::DialFailed`] when there is none.
    pub async fn dial_cached(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Flow> {
        self.dial_with(
            remote,
            authorizer,
            channel_timeout,
            FlowOptions::default(),
            true,
        )
        .await
    }

    /// A side-channel flow (one that does not keep the connection busy) on
    /// exactly `conn`.
    pub async fn dial_side_channel_cached(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        conn: &Conn,
        _channel_timeout: Duration,
    ) -> Result<Flow> {
        self.check_open()?;
        if conn.is_closed() {
            return Err(Error::new(
                ErrorKind::DialFailed,
                format!("the connection to {remote} is closed"),
            ));
        }
        self.authorize_cached(conn, &authorizer)?;
        conn.open_flow(FlowOptions {
            side_channel: true,
            ..FlowOptions::default()
        })
    }

    /// Re-runs `authorizer` on a cached connection's peer.
    fn authorize_cached(&self, conn: &Conn, authorizer: &Arc<dyn PeerAuthorizer>) -> Result<()> {
        let blessings = conn.remote_blessings();
        let discharges = conn.remote_discharges();
        authorizer
            .authorize_peer(&PeerInfo {
                principal: &self.inner.principal,
                local_endpoint: conn.local_endpoint(),
                remote_endpoint: conn.remote_endpoint(),
                remote_blessings: &blessings,
                remote_discharges: &discharges,
                now: std::time::SystemTime::now(),
            })
            .map(|_| ())
    }

    /// A connection to `remote`: the cached one with the lowest RTT whose
    /// peer passes `authorizer`, else (unless `cached_only`) a new one,
    /// shared with concurrent dials of the same endpoint.
    pub(crate) async fn conn_for(
        &self,
        remote: &Endpoint,
        authorizer: &Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
        cached_only: bool,
    ) -> Result<Conn> {
        let addrs = vec![AddrKey::of(remote)];
        if let Some(conn) = self.best_cached(remote, &addrs, authorizer) {
            return Ok(conn);
        }
        if cached_only {
            return Err(Error::new(
                ErrorKind::DialFailed,
                format!("no cached connection to {remote}"),
            ));
        }
        let key = DialKey {
            protocol: remote.protocol().to_string(),
            address: remote.address().to_string(),
            rid: remote.routing_id(),
        };
        if let Some((at, err)) = self.inner.failures.lock().get(&key).cloned()
            && at.elapsed() < DIAL_FAILURE_MEMORY
        {
            return Err(err.context("failed moments ago"));
        }
        let fut = {
            let mut inflight = self.inner.inflight.lock();
            match inflight.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = self
                        .clone()
                        .dial_new(
                            remote.clone(),
                            authorizer.clone(),
                            channel_timeout,
                            key.clone(),
                        )
                        .boxed()
                        .shared();
                    inflight.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        let conn = fut.await?;
        // Joined someone else's dial: their authorizer chose the peer.
        self.authorize_cached(&conn, authorizer)?;
        Ok(conn)
    }

    fn best_cached(
        &self,
        remote: &Endpoint,
        addrs: &[AddrKey],
        authorizer: &Arc<dyn PeerAuthorizer>,
    ) -> Option<Conn> {
        let candidates = self.inner.cache.lock().candidates(remote, addrs);
        candidates
            .into_iter()
            .filter(|c| self.authorize_cached(c, authorizer).is_ok())
            .min_by_key(Conn::rtt)
    }

    async fn dial_new(
        self,
        remote: Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
        key: DialKey,
    ) -> Result<Conn> {
        let result = self
            .dial_possibly_through_proxy(&remote, authorizer, channel_timeout)
            .await;
        self.inner.inflight.lock().remove(&key);
        match result {
            Ok((conn, direct)) => {
                // A connection through a proxy is found by routing id only:
                // the address is the proxy's.
                let addrs = if direct {
                    vec![AddrKey::of(&remote)]
                } else {
                    Vec::new()
                };
                self.adopt(conn.clone(), addrs, false)?;
                self.inner.failures.lock().remove(&key);
                Ok(conn)
            }
            Err(e) => {
                let mut failures = self.inner.failures.lock();
                failures.retain(|_, (at, _)| at.elapsed() < DIAL_FAILURE_MEMORY);
                failures.insert(key, (Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Reaches `remote`: directly, or — when the peer at its address turns
    /// out to be a proxy (another routing id) — through a tunnel over the
    /// connection to that proxy, with the end-to-end handshake inside.
    /// Returns the connection and whether it is direct.
    async fn dial_possibly_through_proxy(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<(Conn, bool)> {
        let want = remote.routing_id();
        if !want.is_null()
            && let Some(proxy) = self.cached_proxy_for(remote)
        {
            let conn = self
                .tunnel_through(&proxy, remote, authorizer, channel_timeout)
                .await?;
            return Ok((conn, false));
        }
        // The authorizer judges the server, never a proxy on the way.
        let first_hop: Arc<dyn PeerAuthorizer> = if want.is_null() {
            authorizer.clone()
        } else {
            Arc::new(ProxyAware {
                target: want,
                inner: authorizer.clone(),
            })
        };
        let conn = self
            .handshake_over_transport(remote, first_hop, channel_timeout)
            .await?;
        let got = conn.remote_endpoint().routing_id();
        if want.is_null() || got == want {
            return Ok((conn, true));
        }
        // A proxy: keep its connection for later tunnels and its own flows.
        self.adopt(conn.clone(), vec![AddrKey::of(remote)], false)?;
        let inner = self
            .tunnel_through(&conn, remote, authorizer, channel_timeout)
            .await?;
        Ok((inner, false))
    }

    /// A connection whose peer has exactly `remote`'s routing id (or any,
    /// when it names none), made directly: used for proxies themselves.
    pub(crate) async fn connect_direct(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Conn> {
        let conn = self
            .handshake_over_transport(remote, authorizer, channel_timeout)
            .await?;
        let want = remote.routing_id();
        let got = conn.remote_endpoint().routing_id();
        if !want.is_null() && got != want {
            conn.close("wrong routing id");
            return Err(Error::new(
                ErrorKind::DialFailed,
                format!("{remote} answered as routing id {got}, not {want}"),
            ));
        }
        Ok(conn)
    }

    async fn handshake_over_transport(
        &self,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Conn> {
        let transport = self.dial_transport(remote).await?;
        let params = self.dial_params(transport.max_frame_size(), authorizer, channel_timeout);
        Conn::dial(transport, params, remote.clone()).await
    }

    fn dial_params(
        &self,
        transport_max_frame: usize,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> HandshakeParams {
        let mut config = self.inner.conn_config.clone();
        if !channel_timeout.is_zero() {
            config.channel_timeout = channel_timeout;
        }
        HandshakeParams {
            transport_max_frame,
            config,
            principal: self.inner.principal.clone(),
            authorizer,
            local_endpoint: self.inner.bidi.clone(),
        }
    }

    /// A cached connection to the proxy at `remote`'s address (a peer there
    /// with another routing id).
    fn cached_proxy_for(&self, remote: &Endpoint) -> Option<Conn> {
        let mut cache = self.inner.cache.lock();
        cache
            .candidates(
                &Endpoint::new(remote.protocol(), remote.address()),
                &[AddrKey::of(remote)],
            )
            .into_iter()
            .find(|c| c.remote_endpoint().routing_id() != remote.routing_id())
    }

    /// Runs the end-to-end handshake with `remote` inside a flow on the
    /// connection to a proxy.
    async fn tunnel_through(
        &self,
        proxy: &Conn,
        remote: &Endpoint,
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Conn> {
        let flow = proxy.open_flow(Default::default())?;
        let tunnel = FlowConn::new(flow)?;
        let params = self.dial_params(tunnel.max_frame_size(), authorizer, channel_timeout);
        let conn = Conn::dial(Box::new(tunnel), params, remote.clone())
            .await
            .map_err(|e| e.context(format!("through proxy {}", proxy.remote_endpoint())))?;
        let want = remote.routing_id();
        let got = conn.remote_endpoint().routing_id();
        if got != want {
            conn.close("wrong routing id");
            return Err(Error::new(
                ErrorKind::Proxy,
                format!("the proxy led to routing id {got}, not {want}"),
            ));
        }
        Ok(conn)
    }

    /// Connects the transport, resolving the address and trying each
    /// result; when file descriptors run out, closes idle connections and
    /// tries again.
    async fn dial_transport(&self, remote: &Endpoint) -> Result<Box<dyn FramedConn>> {
        let timeout = self.inner.conn_config.handshake_timeout;
        let registry = &self.inner.registry;
        let (protocol, addresses) = registry
            .resolve(remote.protocol(), remote.address())
            .await?;
        let mut last = None;
        for address in &addresses {
            for attempt in 0..2 {
                match registry.dial(&protocol, address, timeout).await {
                    Ok(t) => return Ok(t),
                    Err(e) if attempt == 0 && is_fd_exhaustion(&e) => {
                        tracing::warn!(error = %e, "out of file descriptors; closing idle connections");
                        self.evict_lru(FD_EVICTION_BATCH);
                    }
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::new(
                ErrorKind::ResolveFailed,
                format!("{remote} resolved to no address"),
            )
        }))
    }

    /// Closes up to `n` idle connections, least recently used first.
    pub(crate) fn evict_lru(&self, n: usize) -> usize {
        let victims = self.inner.cache.lock().take_lru_idle(n);
        for c in &victims {
            c.close("closed to free file descriptors");
        }
        victims.len()
    }

    /// Takes an established connection into the cache and the accept hub
    /// (marking it as carried by a proxy's tunnel when `tunneled`); a
    /// manager that is closing takes nothing: it closes the connection and
    /// fails with [`ErrorKind::Aborted`].
    pub(crate) fn adopt(&self, conn: Conn, addrs: Vec<AddrKey>, tunneled: bool) -> Result<()> {
        {
            // Checked under the cache lock: `close` sets `closing` before
            // it lists the cache, so it never misses a connection adopted
            // here.
            let mut cache = self.inner.cache.lock();
            if *self.inner.closing.lock() {
                drop(cache);
                conn.close("manager is closing");
                return Err(Error::new(ErrorKind::Aborted, "manager is closed"));
            }
            if tunneled {
                self.inner.tunneled.lock().insert(conn.id());
            }
            cache.insert(conn.clone(), addrs);
        }
        self.inner.accept.add(conn);
        Ok(())
    }

    /// Connections in the cache.
    pub fn connections(&self) -> Vec<Conn> {
        self.inner.cache.lock().all()
    }

    /// Whether `conn` is pinned.
    pub fn is_pinned(&self, conn: &Conn) -> bool {
        self.inner.cache.lock().is_pinned(conn)
    }

    // ----- Closing --------------------------------------------------------

    /// Lame-ducks every connection, lets flows finish within the grace
    /// period, then tears everything down. Idempotent.
    pub async fn close(&self) {
        let already = std::mem::replace(&mut *self.inner.closing.lock(), true);
        if already {
            self.closed().await;
            return;
        }
        self.stop_listening();
        self.inner.accept.close();
        let conns = self.inner.cache.lock().all();
        for c in &conns {
            c.enter_lame_duck();
        }
        // Each connection closes as soon as it has drained: a proxied
        // connection runs inside a flow of the connection to its proxy,
        // which only drains once the inner one is closed.
        let drained = futures::future::join_all(conns.iter().map(|c| async move {
            c.lame_duck_acked().await;
            c.idle().await;
            c.close("manager closed");
        }));
        let _ = tokio::time::timeout(self.inner.close_grace, drained).await;
        for c in &conns {
            c.close("manager closed");
        }
        self.inner.reaper_wake.notify_one();
        self.inner.closed.send_replace(true);
    }

    /// Resolves once [`Manager::close`] has finished.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Accepts transports from one listener and runs their handshakes.
async fn accept_loop(
    inner: std::sync::Weak<Inner>,
    listener: Arc<dyn Listener>,
    key: (String, String),
    endpoint: Endpoint,
    failed: watch::Sender<Option<Error>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let result = listener.accept().await;
        let Some(inner) = inner.upgrade() else {
            listener.close();
            return;
        };
        let transport = match result {
            Ok(t) => t,
            Err(e) => {
                let stopped = !inner
                    .listeners
                    .lock()
                    .iter()
                    .any(|l| l.endpoint == endpoint);
                if !stopped {
                    tracing::warn!(error = %e, ?key, "listener failed");
                    inner.listeners.lock().retain(|l| l.endpoint != endpoint);
                    let err = e.clone();
                    inner.status.update(|s| {
                        s.endpoints.retain(|ep| *ep != endpoint);
                        s.listen_errors.insert(key.clone(), err);
                    });
                }
                let _ = failed.send(Some(e));
                return;
            }
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let manager = Manager { inner };
        let local = endpoint.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = manager.handshake_incoming(transport, local).await {
                tracing::debug!(error = %e, "incoming handshake failed");
            }
        });
    }
}

impl Manager {
    async fn handshake_incoming(
        &self,
        transport: Box<dyn FramedConn>,
        local: Endpoint,
    ) -> Result<()> {
        let remote_addr = transport.remote_addr();
        let params = self.accept_params(transport.max_frame_size(), local);
        let conn = Conn::accept(transport, params).await?;
        if let Some(requested) = conn.requested_endpoint() {
            let rid = requested.routing_id();
            if !rid.is_null() && rid != self.inner.routing_id && !self.is_proxy_target(&conn) {
                conn.close(&format!("routing id {rid} is not served here"));
                return Err(Error::new(
                    ErrorKind::Proxy,
                    format!("{remote_addr} asked for routing id {rid}, which is not served here"),
                ));
            }
        }
        let addrs = vec![AddrKey {
            protocol: conn.remote_endpoint().protocol().to_string(),
            address: conn.remote_addr().to_string(),
        }];
        self.adopt(conn, addrs, false)
    }

    /// The acceptor's side of a handshake over a transport carrying frames
    /// of at most `max_frame` bytes, answering as `local`. Every
    /// authenticated peer is accepted: the application authorizes per
    /// request.
    pub(crate) fn accept_params(&self, max_frame: usize, local: Endpoint) -> HandshakeParams {
        HandshakeParams {
            transport_max_frame: max_frame,
            config: self.inner.conn_config.clone(),
            principal: self.inner.principal.clone(),
            authorizer: Arc::new(AllowEveryone),
            local_endpoint: local,
        }
    }

    /// Whether this manager takes connections asking for other routing ids
    /// (a proxy's business; a plain manager refuses them).
    fn is_proxy_target(&self, _conn: &Conn) -> bool {
        self.inner
            .routes_others
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes this manager accept connections that ask for routing ids other
    /// than its own, so it can route them onward (what a proxy does).
    pub fn set_routes_others(&self, routes: bool) {
        self.inner
            .routes_others
            .store(routes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Closes connections idle for longer than the expiry, and sweeps closed
/// ones, until the manager is gone.
async fn reap_idle(inner: std::sync::Weak<Inner>) {
    loop {
        let (period, expiry) = match inner.upgrade() {
            Some(i) => {
                if *i.closed.borrow() {
                    return;
                }
                let expiry = i.idle_expiry;
                (
                    (expiry / 4).clamp(Duration::from_millis(20), Duration::from_secs(5)),
                    expiry,
                )
            }
            None => return,
        };
        let wake = match inner.upgrade() {
            Some(i) => i,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = wake.reaper_wake.notified() => {}
        }
        drop(wake);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let cutoff = Instant::now()
            .checked_sub(expiry)
            .unwrap_or_else(Instant::now);
        let expired = {
            let mut cache = inner.cache.lock();
            cache.sweep();
            // Forget tunnels that are gone (same lock order as `adopt`).
            let live: std::collections::HashSet<u64> = cache.all().iter().map(Conn::id).collect();
            inner.tunneled.lock().retain(|id| live.contains(id));
            cache.take_expired(cutoff)
        };
        inner.accept.sweep();
        for conn in expired {
            tracing::debug!(remote = %conn.remote_endpoint(), "closing idle connection");
            tokio::spawn(async move {
                // Lame duck first so a flow the peer is opening right now is
                // not lost; close once it is acknowledged and still idle.
                conn.enter_lame_duck();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.lame_duck_acked()).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.idle()).await;
                conn.close("idle");
            });
        }
    }
}

impl Default for ManagerBuilder {
    fn default() -> Self {
        ManagerBuilder::new(Principal::new())
    }
}
