//! `unix`: length-prefixed frames (as tcp) over Unix domain stream sockets.
//!
//! An address is a filesystem path or, on Linux, `@name` for the abstract
//! socket `name`. Listening on a path:
//! - that does not exist: binds it;
//! - that is a socket nobody listens on (a stale file left by a dead
//!   process; connecting is refused): removes it and binds;
//! - that is a socket someone listens on: fails with
//!   [`ErrorKind::BadArg`] ("in use"), like a tcp port in use. (The probe is
//!   a connection, so that listener sees one connection that closes at
//!   once.);
//! - that exists and is not a socket: fails with [`ErrorKind::BadArg`]
//!   naming the path; the file is left alone.
//!
//! Closing a listener removes its socket file (only if the file is still the
//! one it bound). Dialing a path that is not a socket fails with
//! [`ErrorKind::BadArg`]; a missing path or a stale socket with
//! [`ErrorKind::DialFailed`].

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flow::transport::{FramedConn, Listener, Protocol};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use tokio::net::{UnixListener, UnixStream};

use crate::accept::{QueueListener, RawAccept, SocketSlot, Upgrade};
use crate::framing::StreamConn;

/// How long listen waits when probing whether an existing socket file is
/// live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The `unix` protocol.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnixProtocol;

impl UnixProtocol {
    /// The protocol.
    pub fn new() -> Self {
        UnixProtocol
    }
}

/// Where an address points: a file, or (Linux) an abstract name, which tokio
/// spells with a leading NUL.
fn socket_path(protocol: &str, address: &str) -> Result<(PathBuf, bool)> {
    if address.is_empty() {
        return Err(Error::bad_arg(format!("{protocol}: empty socket path")));
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(name) = address.strip_prefix('@') {
        return Ok((PathBuf::from(format!("\0{name}")), true));
    }
    Ok((PathBuf::from(address), false))
}

fn describe(addr: &tokio::net::unix::SocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        return path.display().to_string();
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(name) = addr.as_abstract_name() {
        return format!("@{}", String::from_utf8_lossy(name));
    }
    "(unnamed)".to_string()
}

fn framed(
    protocol: &str,
    stream: UnixStream,
    local: String,
    remote: String,
) -> Box<dyn FramedConn> {
    let (r, w) = stream.into_split();
    Box::new(StreamConn::new(protocol, r, w, local, remote))
}

async fn connect(protocol: &str, address: &str) -> Result<Box<dyn FramedConn>> {
    let (path, is_abstract) = socket_path(protocol, address)?;
    match UnixStream::connect(&path).await {
        Ok(stream) => {
            let local = stream
                .local_addr()
                .map(|a| describe(&a))
                .unwrap_or_else(|_| "(unnamed)".into());
            Ok(framed(protocol, stream, local, address.to_string()))
        }
        Err(err) => {
            if !is_abstract
                && let Ok(meta) = std::fs::metadata(&path)
                && !meta.file_type().is_socket()
            {
                return Err(Error::with_source(
                    ErrorKind::BadArg,
                    format!("{protocol}: dial {address}: not a socket"),
                    err,
                ));
            }
            Err(Error::with_source(
                ErrorKind::DialFailed,
                format!("{protocol}: dial {address}: {err}"),
                err,
            ))
        }
    }
}

/// Clears the way for binding `path`: removes a stale socket file, refuses a
/// live socket or a file that is not a socket.
async fn clear_stale(protocol: &str, address: &str, path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(Error::with_source(
                ErrorKind::BadArg,
                format!("{protocol}: listen on {address}: cannot inspect the path: {err}"),
                err,
            ));
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::bad_arg(format!(
            "{protocol}: listen on {address}: the path exists and is not a socket"
        )));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Err(_) | Ok(Ok(_)) => Err(Error::bad_arg(format!(
            "{protocol}: listen on {address}: in use by a live listener"
        ))),
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::debug!(path = %path.display(), "removing stale unix socket file");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(Error::with_source(
                    ErrorKind::BadArg,
                    format!("{protocol}: listen on {address}: cannot remove stale socket: {err}"),
                    err,
                )),
            }
        }
        Ok(Err(err)) => Err(Error::with_source(
            ErrorKind::BadArg,
            format!("{protocol}: listen on {address}: existing socket unusable: {err}"),
            err,
        )),
    }
}

struct UnixAccept(SocketSlot<UnixListener>);

impl RawAccept for UnixAccept {
    type Io = UnixStream;

    fn accept_raw(&mut self) -> impl Future<Output = io::Result<(UnixStream, String)>> + Send {
        std::future::poll_fn(|cx| {
            self.0.poll_with(cx, |listener, cx| {
                listener
                    .poll_accept(cx)
                    .map_ok(|(stream, peer)| (stream, describe(&peer)))
            })
        })
    }
}

async fn listen(protocol: &str, address: &str) -> Result<Box<dyn Listener>> {
    let (path, is_abstract) = socket_path(protocol, address)?;
    if !is_abstract {
        clear_stale(protocol, address, &path).await?;
    }
    let listener = UnixListener::bind(&path).map_err(|err| {
        let kind = match err.kind() {
            io::ErrorKind::AddrInUse
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::NotFound => ErrorKind::BadArg,
            _ => ErrorKind::Network,
        };
        Error::with_source(kind, format!("{protocol}: listen on {address}: {err}"), err)
    })?;
    // Remember which file we made, so close removes ours and nobody else's.
    let identity = if is_abstract {
        None
    } else {
        std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let slot = SocketSlot::new(listener);
    let socket = slot.clone();
    let file = path.clone();
    let on_close: Box<dyn FnOnce() + Send> = Box::new(move || {
        socket.close();
        if let Some(identity) = identity
            && let Ok(meta) = std::fs::symlink_metadata(&file)
            && (meta.dev(), meta.ino()) == identity
        {
            let _ = std::fs::remove_file(&file);
        }
    });
    let name: Arc<str> = protocol.into();
    let local = address.to_string();
    let local_for_conns = local.clone();
    let upgrade: Upgrade<UnixStream> = Arc::new(move |stream: UnixStream, peer: String| {
        let conn = framed(&name, stream, local_for_conns.clone(), peer);
        Box::pin(async move { Ok(conn) })
    });
    let listener = QueueListener::spawn(
        UnixAccept(slot),
        upgrade,
        format!("{protocol} {address}"),
        local,
        crate::HANDSHAKE_TIMEOUT,
        Some(on_close),
    );
    Ok(Box::new(listener))
}

impl Protocol for UnixProtocol {
    fn dial<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        Box::pin(crate::tcp::with_timeout(
            protocol,
            address,
            timeout,
            connect(protocol, address),
        ))
    }

    fn resolve<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        Box::pin(async move {
            socket_path(protocol, address)?;
            Ok((protocol.to_string(), vec![address.to_string()]))
        })
    }

    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        Box::pin(listen(protocol, address))
    }
}
