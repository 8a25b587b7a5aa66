//! The listener shared by every transport: a bounded queue of ready
//! connections that [`Listener::accept`] takes from, fed either directly
//! (memory) or by a background accept task (sockets).
//!
//! The accept task survives transient failures: errors that concern one
//! connection (`ECONNABORTED` and the like) are skipped, resource exhaustion
//! (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, and anything unrecognised) is
//! retried after a growing pause, and only errors that say the listening
//! socket itself is gone (`EBADF`, `EINVAL`, ...) stop it. Each accepted
//! connection is upgraded (socket options, WebSocket handshake, `wsh`
//! sniffing) in its own task under [`crate::HANDSHAKE_TIMEOUT`], so a peer that
//! never finishes its handshake holds up nobody else.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flow::transport::{FramedConn, Listener};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

/// Ready connections queued per listener before upgrades wait for `accept`.
const READY_QUEUE: usize = 32;

/// Handshakes in progress per listener; more connections wait in the kernel.
const MAX_PENDING_HANDSHAKES: usize = 128;

/// First pause after a resource-exhaustion accept error.
const MIN_BACKOFF: Duration = Duration::from_millis(5);

/// Longest pause between accept attempts while resources are exhausted.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A source of raw accepted connections: a socket listener, or a fake in
/// tests.
pub(crate) trait RawAccept: Send + 'static {
    /// One accepted stream.
    type Io: Send + 'static;

    /// Accepts the next stream and names its peer.
    fn accept_raw(&mut self) -> impl Future<Output = io::Result<(Self::Io, String)>> + Send;
}

/// A listening socket shared by the accept task and the listener's close:
/// the task polls it under a short lock, and close takes it out and drops
/// it, so the socket stops accepting as soon as close returns rather than
/// whenever the aborted task is next dropped.
pub(crate) struct SocketSlot<L>(Arc<Mutex<Option<L>>>);

impl<L> Clone for SocketSlot<L> {
    fn clone(&self) -> Self {
        SocketSlot(self.0.clone())
    }
}

impl<L: Send + 'static> SocketSlot<L> {
    /// A slot holding `socket`.
    pub(crate) fn new(socket: L) -> Self {
        SocketSlot(Arc::new(Mutex::new(Some(socket))))
    }

    /// Polls the socket with `poll`; once closed, fails with `EBADF`, which
    /// stops the accept task.
    pub(crate) fn poll_with<T>(
        &self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(&L, &mut std::task::Context<'_>) -> std::task::Poll<io::Result<T>>,
    ) -> std::task::Poll<io::Result<T>> {
        match lock(&self.0).as_ref() {
            Some(socket) => poll(socket, cx),
            None => std::task::Poll::Ready(Err(io::Error::from_raw_os_error(libc::EBADF))),
        }
    }

    /// Drops the socket.
    pub(crate) fn close(&self) {
        drop(lock(&self.0).take());
    }
}

/// Turns a raw accepted stream into a framed connection (socket options,
/// handshakes). Runs in its own task under the handshake timeout.
pub(crate) type Upgrade<Io> =
    Arc<dyn Fn(Io, String) -> BoxFuture<'static, Result<Box<dyn FramedConn>>> + Send + Sync>;

/// What to do about an accept error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptFailure {
    /// Concerns one connection only: try again at once.
    Connection,
    /// Out of some resource: try again after a pause.
    Resources,
    /// The listening socket is gone: stop.
    Fatal,
}

fn classify(err: &io::Error) -> AcceptFailure {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => AcceptFailure::Resources,
            libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT => AcceptFailure::Fatal,
            // accept(2) on Linux passes pending network errors of the new
            // connection through, to be treated like EAGAIN.
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN
            | libc::ETIMEDOUT
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::ENONET
            | libc::ENOPROTOOPT
            | libc::EOPNOTSUPP => AcceptFailure::Connection,
            _ => AcceptFailure::Resources,
        };
    }
    match err.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => AcceptFailure::Connection,
        _ => AcceptFailure::Resources,
    }
}

type ReadyRx = mpsc::Receiver<Box<dyn FramedConn>>;
type OnClose = Box<dyn FnOnce() + Send>;

/// A listener that hands out connections from a bounded queue.
pub(crate) struct QueueListener {
    ready: tokio::sync::Mutex<ReadyRx>,
    closed: watch::Sender<bool>,
    /// Why the feeding task stopped, if it stopped by itself.
    failure: Arc<Mutex<Option<Error>>>,
    local: String,
    label: String,
    task: Mutex<Option<AbortHandle>>,
    on_close: Mutex<Option<OnClose>>,
}

impl QueueListener {
    /// A listener fed through the returned sender (nothing runs in the
    /// background). `on_close` runs once, when the listener closes.
    pub(crate) fn new(
        label: String,
        local: String,
        on_close: Option<OnClose>,
    ) -> (Self, mpsc::Sender<Box<dyn FramedConn>>) {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let listener = QueueListener {
            ready: tokio::sync::Mutex::new(rx),
            closed: watch::Sender::new(false),
            failure: Arc::new(Mutex::new(None)),
            local,
            label,
            task: Mutex::new(None),
            on_close: Mutex::new(on_close),
        };
        (listener, tx)
    }

    /// A listener fed by a background task that accepts from `raw` and
    /// upgrades each stream with `upgrade`. `on_close` runs once, when the
    /// listener closes, and should make the socket refuse new connections
    /// at once (the task itself is stopped asynchronously).
    pub(crate) fn spawn<A: RawAccept>(
        raw: A,
        upgrade: Upgrade<A::Io>,
        label: String,
        local: String,
        handshake_timeout: Duration,
        on_close: Option<OnClose>,
    ) -> Self {
        let (listener, tx) = QueueListener::new(label.clone(), local, on_close);
        let failure = listener.failure.clone();
        let task = tokio::spawn(accept_loop(
            raw,
            upgrade,
            tx,
            label,
            handshake_timeout,
            failure,
        ));
        *lock(&listener.task) = Some(task.abort_handle());
        listener
    }

    fn closed_error(&self) -> Error {
        Error::bad_state(format!("{}: listener closed", self.label))
    }

    async fn next(&self) -> Result<Box<dyn FramedConn>> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(self.closed_error());
        }
        let mut ready = tokio::select! {
            guard = self.ready.lock() => guard,
            _ = closed.wait_for(|c| *c) => return Err(self.closed_error()),
        };
        tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => Err(self.closed_error()),
            conn = ready.recv() => match conn {
                Some(conn) => Ok(conn),
                None => Err(lock(&self.failure).clone().unwrap_or_else(|| self.closed_error())),
            },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Listener for QueueListener {
    fn accept(&self) -> BoxFuture<'_, Result<Box<dyn FramedConn>>> {
        Box::pin(self.next())
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn close(&self) {
        if self.closed.send_replace(true) {
            return;
        }
        if let Some(on_close) = lock(&self.on_close).take() {
            on_close();
        }
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        // Connections accepted but not yet taken are closed now, not when the
        // listener is dropped.
        if let Ok(mut ready) = self.ready.try_lock() {
            ready.close();
            while ready.try_recv().is_ok() {}
        }
    }
}

impl Drop for QueueListener {
    fn drop(&mut self) {
        self.close();
    }
}

async fn accept_loop<A: RawAccept>(
    mut raw: A,
    upgrade: Upgrade<A::Io>,
    ready: mpsc::Sender<Box<dyn FramedConn>>,
    label: String,
    handshake_timeout: Duration,
    failure: Arc<Mutex<Option<Error>>>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut handshakes = JoinSet::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        while handshakes.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (io, peer) = match raw.accept_raw().await {
            Ok(accepted) => {
                backoff = MIN_BACKOFF;
                accepted
            }
            Err(err) => match classify(&err) {
                AcceptFailure::Connection => {
                    tracing::debug!(listener = %label, error = %err, "accept: skipping failed connection");
                    continue;
                }
                AcceptFailure::Resources => {
                    // Let connection holders close idle connections first.
                    crate::pressure::resources_exhausted();
                    tracing::warn!(
                        listener = %label,
                        error = %err,
                        retry_in = ?backoff,
                        "accept failed; retrying after a pause"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                AcceptFailure::Fatal => {
                    tracing::debug!(listener = %label, error = %err, "accept: listener stopped");
                    let kind = ErrorKind::Network;
                    *lock(&failure) = Some(Error::with_source(
                        kind,
                        format!("{label}: accepting failed for good: {err}"),
                        err,
                    ));
                    return;
                }
            },
        };
        let handshake = upgrade(io, peer.clone());
        let ready = ready.clone();
        let label = label.clone();
        handshakes.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(handshake_timeout, handshake).await {
                Ok(Ok(conn)) => {
                    // Only fails if the listener closed meanwhile.
                    let _ = ready.send(conn).await;
                }
                Ok(Err(err)) => {
                    tracing::debug!(listener = %label, %peer, error = %err, "dropping connection");
                }
                Err(_) => {
                    tracing::debug!(listener = %label, %peer, "handshake timed out; dropping connection");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::StreamConn;
    use bytes::Bytes;
    use flow::transport::FrameReader;
    use std::collections::VecDeque;
    use tokio::io::DuplexStream;

    /// Plays back a script of accept results, then waits forever.
    struct Scripted {
        script: VecDeque<io::Result<DuplexStream>>,
    }

    impl RawAccept for Scripted {
        type Io = DuplexStream;

        fn accept_raw(
            &mut self,
        ) -> impl Future<Output = io::Result<(DuplexStream, String)>> + Send {
            let next = self.script.pop_front();
            async move {
                match next {
                    Some(result) => result.map(|io| (io, "fake-peer".to_string())),
                    None => std::future::pending().await,
                }
            }
        }
    }

    fn plain_upgrade() -> Upgrade<DuplexStream> {
        Arc::new(|io: DuplexStream, peer: String| {
            Box::pin(async move {
                let (r, w) = tokio::io::split(io);
                let conn: Box<dyn FramedConn> =
                    Box::new(StreamConn::new("fake", r, w, "here".into(), peer));
                Ok(conn)
            }) as BoxFuture<'static, Result<Box<dyn FramedConn>>>
        })
    }

    fn os_error(code: i32) -> io::Result<DuplexStream> {
        Err(io::Error::from_raw_os_error(code))
    }

    #[tokio::test]
    async fn survives_exhaustion_and_aborted_connections() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (ours2, theirs2) = tokio::io::duplex(1024);
        let raw = Scripted {
            script: VecDeque::from([
                os_error(libc::EMFILE),
                os_error(libc::ENFILE),
                os_error(libc::ECONNABORTED),
                os_error(libc::ENOBUFS),
                os_error(libc::ENOMEM),
                Ok(theirs),
                os_error(libc::EMFILE),
                Ok(theirs2),
            ]),
        };
        let listener = QueueListener::spawn(
            raw,
            plain_upgrade(),
            "fake".into(),
            "here".into(),
            Duration::from_secs(5),
            None,
        );
        for peer in [ours, ours2] {
            let conn = listener.accept().await.expect("accepted despite errors");
            assert_eq!(conn.remote_addr(), "fake-peer");
            let (_r, mut w) = conn.split();
            w.write_frames(&[Bytes::from_static(b"hi").into()])
                .await
                .expect("write");
            let (r, _w) = tokio::io::split(peer);
            let mut reader = crate::framing::StreamReader::new(r, "peer".into());
            let frame = reader.read_frame().await.expect("read").expect("frame");
            assert_eq!(&frame[..], b"hi");
        }
    }

    #[tokio::test]
    async fn fatal_error_is_reported_not_hung() {
        let raw = Scripted {
            script: VecDeque::from([os_error(libc::EBADF)]),
        };
        let listener = QueueListener::spawn(
            raw,
            plain_upgrade(),
            "fake".into(),
            "here".into(),
            Duration::from_secs(5),
            None,
        );
        let err = listener.accept().await.expect_err("listener broken");
        assert_eq!(err.kind(), ErrorKind::Network);
        assert!(err.message().contains("fake"));
    }

    #[test]
    fn classification() {
        let c = |code| classify(&io::Error::from_raw_os_error(code));
        assert_eq!(c(libc::EMFILE), AcceptFailure::Resources);
        assert_eq!(c(libc::ECONNABORTED), AcceptFailure::Connection);
        assert_eq!(c(libc::EINVAL), AcceptFailure::Fatal);
        assert_eq!(
            classify(&io::Error::from(io::ErrorKind::ConnectionReset)),
            AcceptFailure::Connection
        );
    }
}
