//! `tcp`, `tcp4`, `tcp6`: length-prefixed frames over TCP.
//!
//! A frame is a 4-byte big-endian length and that many bytes; lengths over
//! [`crate::MAX_FRAME_SIZE`] are refused. Every socket gets `TCP_NODELAY`,
//! keepalive, and (on Linux) `TCP_NOTSENT_LOWAT` of [`TCP_NOTSENT_LOWAT`].
//!
//! Addresses are `host:port` (IPv6 literals in brackets). `resolve` does DNS
//! and returns every address; `tcp4` and `tcp6` keep only their family, `tcp`
//! keeps both. Dial tries the resolved addresses in order under one timeout.
//! An empty host in a listen address (`:0`) means every interface.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use flow::transport::{FramedConn, Listener, Protocol};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

use crate::accept::{QueueListener, RawAccept, SocketSlot, Upgrade};
use crate::framing::StreamConn;

/// `TCP_NOTSENT_LOWAT` for every tcp socket (Linux): the kernel reports the
/// socket writable only while less than this many bytes wait unsent. Keeping
/// the unsent queue short keeps latency low under load, because frames wait
/// in the connection's own queue, where priorities still apply, rather than in
/// the kernel's.
pub const TCP_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);

/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Which address family a protocol name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Any,
    V4,
    V6,
}

impl Family {
    /// `tcp4`, `ws4`, `wsh4` ask for IPv4, names ending in 6 for IPv6, others
    /// for either.
    pub(crate) fn of(protocol: &str) -> Family {
        if protocol.ends_with('4') {
            Family::V4
        } else if protocol.ends_with('6') {
            Family::V6
        } else {
            Family::Any
        }
    }

    fn admits(self, addr: &SocketAddr) -> bool {
        match self {
            Family::Any => true,
            Family::V4 => addr.is_ipv4(),
            Family::V6 => addr.is_ipv6(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::Any => "IP",
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Splits `host:port` (host may be a bracketed IPv6 literal, or empty).
fn split_host_port<'a>(protocol: &str, address: &'a str) -> Result<(&'a str, u16)> {
    let bad = |why: &str| Error::bad_arg(format!("{protocol}: bad address {address:?}: {why}"));
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, port) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = port.strip_prefix(':').ok_or_else(|| bad("missing port"))?;
        (host, port)
    } else {
        address
            .rsplit_once(':')
            .ok_or_else(|| bad("missing port"))?
    };
    let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
    Ok((host, port))
}

/// Resolves `address` into the socket addresses of `family`, in the order
/// the resolver gave them.
pub(crate) async fn resolve_addrs(
    protocol: &str,
    family: Family,
    address: &str,
) -> Result<Vec<SocketAddr>> {
    let (host, port) = split_host_port(protocol, address)?;
    let found: Vec<SocketAddr> = if host.is_empty() {
        let any = match family {
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            Family::Any | Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        vec![SocketAddr::new(any, port)]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, port)]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::ResolveFailed,
                    format!("{protocol}: cannot resolve {address}: {e}"),
                    e,
                )
            })?
            .collect()
    };
    let kept: Vec<SocketAddr> = found.into_iter().filter(|a| family.admits(a)).collect();
    if kept.is_empty() {
        return Err(Error::new(
            ErrorKind::ResolveFailed,
            format!("{protocol}: {address} has no {} address", family.name()),
        ));
    }
    Ok(kept)
}

/// Sets the socket options every tcp connection gets. Failures are logged,
/// not fatal: the connection works without them.
pub(crate) fn configure(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    let result = stream.set_nodelay(true).and_then(|()| {
        let keepalive = TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL);
        sock.set_tcp_keepalive(&keepalive)
    });
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let result = result.and_then(|()| sock.set_tcp_notsent_lowat(TCP_NOTSENT_LOWAT));
    if let Err(err) = result {
        tracing::debug!(error = %err, "could not set tcp socket options");
    }
}

/// Connects to the first address of `address` that accepts, and configures
/// the socket. No timeout: callers wrap the whole dial in theirs.
pub(crate) async fn connect(protocol: &str, address: &str) -> Result<TcpStream> {
    let addrs = resolve_addrs(protocol, Family::of(protocol), address).await?;
    let mut last: Option<(SocketAddr, io::Error)> = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                configure(&stream);
                return Ok(stream);
            }
            Err(err) => last = Some((*addr, err)),
        }
    }
    let tried = addrs.len();
    match last {
        Some((addr, err)) => Err(Error::with_source(
            ErrorKind::DialFailed,
            format!("{protocol}: dial {address}: {addr}: {err} ({tried} address(es) tried)"),
            err,
        )),
        None => Err(Error::new(
            ErrorKind::DialFailed,
            format!("{protocol}: dial {address}: no address to try"),
        )),
    }
}

/// Runs `dial` under `timeout`, turning expiry into a
/// [`ErrorKind::Timeout`] error that names the address.
pub(crate) async fn with_timeout<T>(
    protocol: &str,
    address: &str,
    timeout: Duration,
    dial: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, dial).await {
        Ok(result) => result,
        Err(_) => Err(Error::timeout(format!(
            "{protocol}: dial {address}: no connection within {timeout:?}"
        ))),
    }
}

/// Binds a listening socket for `address`, trying its resolved addresses in
/// order.
pub(crate) async fn bind(protocol: &str, address: &str) -> Result<TcpListener> {
    let addrs = resolve_addrs(protocol, Family::of(protocol), address).await?;
    let mut last = None;
    for addr in &addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some((*addr, err)),
        }
    }
    match last {
        Some((addr, err)) => {
            let kind = match err.kind() {
                io::ErrorKind::AddrInUse
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::PermissionDenied => ErrorKind::BadArg,
                _ => ErrorKind::Network,
            };
            Err(Error::with_source(
                kind,
                format!("{protocol}: listen on {address}: {addr}: {err}"),
                err,
            ))
        }
        None => Err(Error::bad_arg(format!(
            "{protocol}: listen on {address}: no address"
        ))),
    }
}

/// Accepts raw tcp streams for the background accept task.
pub(crate) struct TcpAccept(pub(crate) SocketSlot<TcpListener>);

impl RawAccept for TcpAccept {
    type Io = TcpStream;

    fn accept_raw(&mut self) -> impl Future<Output = io::Result<(TcpStream, String)>> + Send {
        std::future::poll_fn(|cx| {
            self.0.poll_with(cx, |listener, cx| {
                listener
                    .poll_accept(cx)
                    .map_ok(|(stream, peer)| (stream, peer.to_string()))
            })
        })
    }
}

/// A length-prefixed conn over a configured tcp stream; `buffered` holds
/// bytes already read from it.
pub(crate) fn framed(
    protocol: &str,
    stream: TcpStream,
    buffered: BytesMut,
) -> Result<Box<dyn FramedConn>> {
    let local = stream
        .local_addr()
        .map_err(|e| crate::framing::io_error(protocol, "local address", e))?;
    let remote = stream
        .peer_addr()
        .map_err(|e| crate::framing::io_error(protocol, "peer address", e))?;
    let (r, w) = stream.into_split();
    Ok(Box::new(StreamConn::with_buffered(
        protocol,
        r,
        buffered,
        w,
        local.to_string(),
        remote.to_string(),
    )))
}

/// Starts a background-accepting listener on `address` whose accepted
/// streams go through `upgrade`.
pub(crate) async fn listen_with(
    protocol: &str,
    address: &str,
    upgrade: Upgrade<TcpStream>,
) -> Result<Box<dyn Listener>> {
    let listener = bind(protocol, address).await?;
    let local = listener
        .local_addr()
        .map_err(|e| crate::framing::io_error(protocol, "local address", e))?
        .to_string();
    let slot = SocketSlot::new(listener);
    let on_close = {
        let slot = slot.clone();
        Box::new(move || slot.close())
    };
    let label = format!("{protocol} {local}");
    Ok(Box::new(QueueListener::spawn(
        TcpAccept(slot),
        upgrade,
        label,
        local,
        crate::HANDSHAKE_TIMEOUT,
        Some(on_close),
    )))
}

/// The `tcp`, `tcp4` and `tcp6` protocols.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpProtocol;

impl TcpProtocol {
    /// The protocol; one value serves all three names.
    pub fn new() -> Self {
        TcpProtocol
    }
}

impl Protocol for TcpProtocol {
    fn dial<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        Box::pin(with_timeout(protocol, address, timeout, async move {
            let stream = connect(protocol, address).await?;
            framed(protocol, stream, BytesMut::new())
        }))
    }

    fn resolve<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        Box::pin(async move {
            let addrs = resolve_addrs(protocol, Family::of(protocol), address).await?;
            Ok((
                protocol.to_string(),
                addrs.iter().map(ToString::to_string).collect(),
            ))
        })
    }

    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        let name: Arc<str> = protocol.into();
        let upgrade: Upgrade<TcpStream> = Arc::new(move |stream: TcpStream, _peer: String| {
            let name = name.clone();
            Box::pin(async move {
                configure(&stream);
                framed(&name, stream, BytesMut::new())
            })
        });
        Box::pin(listen_with(protocol, address, upgrade))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("tcp", "a.b:80").ok(), Some(("a.b", 80)));
        assert_eq!(split_host_port("tcp", "[::1]:9").ok(), Some(("::1", 9)));
        assert_eq!(split_host_port("tcp", ":0").ok(), Some(("", 0)));
        for bad in ["nohost", "[::1]", "[::1", "h:99999", "h:x"] {
            let err = split_host_port("tcp", bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::BadArg);
            assert!(err.message().contains(bad));
        }
    }

    #[tokio::test]
    async fn sockets_get_their_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (dialed, accepted) = tokio::join!(connect("tcp", &address), listener.accept());
        let dialed = dialed.expect("dial");
        let (accepted, _) = accepted.expect("accept");
        configure(&accepted);
        for stream in [&dialed, &accepted] {
            let sock = SockRef::from(stream);
            assert!(sock.tcp_nodelay().expect("nodelay"));
            assert!(sock.keepalive().expect("keepalive"));
            assert_eq!(sock.tcp_keepalive_time().expect("time"), KEEPALIVE_TIME);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            assert_eq!(sock.tcp_notsent_lowat().expect("lowat"), TCP_NOTSENT_LOWAT);
        }
    }

    #[test]
    fn families_from_names() {
        assert_eq!(Family::of("tcp"), Family::Any);
        assert_eq!(Family::of("wsh4"), Family::V4);
        assert_eq!(Family::of("ws6"), Family::V6);
    }
}
