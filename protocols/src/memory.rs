//! `memory`: in-process listeners and connections by name, for tests and
//! embedding.
//!
//! An address is any name. Listening on a name already listened on fails
//! with [`ErrorKind::BadArg`]; listening on the empty name picks a fresh
//! unique one (see [`Listener::local_addr`]). Dialing a name nobody listens on
//! fails with [`ErrorKind::DialFailed`]; a dial waits (up to its timeout)
//! while the listener's queue of unaccepted connections is full.
//!
//! Frames travel as [`Bytes`] through bounded channels of
//! [`MEMORY_QUEUE_FRAMES`] frames each way, so a slow reader holds its writer
//! back. A frame reaches the reader without a copy when the writer's caller
//! has dropped its own handle to it by then, and is copied once otherwise.
//! Closing the writer (or dropping it) is seen by the peer's reader as a
//! clean end of stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flow::transport::{Frame, FrameReader, FrameWriter, FramedConn, Listener, Protocol};
use flow::{Error, ErrorKind, Result};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::MAX_FRAME_SIZE;
use crate::accept::QueueListener;
use crate::framing::check_frame_sizes;

/// Frames queued in each direction of a memory connection before the writer
/// waits for the reader.
pub const MEMORY_QUEUE_FRAMES: usize = 32;

type ConnSender = mpsc::Sender<Box<dyn FramedConn>>;

/// The names listened on, and a counter for fresh names.
#[derive(Default)]
struct Namespace {
    listeners: Mutex<HashMap<String, (u64, ConnSender)>>,
    next_id: AtomicU64,
}

impl Namespace {
    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn listeners(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, ConnSender)>> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `memory` protocol. Each value made by [`MemoryProtocol::new`] has its
/// own namespace; values from [`MemoryProtocol::shared`] (the one in the
/// default registry) share the process-wide one.
#[derive(Clone)]
pub struct MemoryProtocol {
    ns: Arc<Namespace>,
}

impl std::fmt::Debug for MemoryProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryProtocol").finish_non_exhaustive()
    }
}

impl Default for MemoryProtocol {
    fn default() -> Self {
        MemoryProtocol::new()
    }
}

impl MemoryProtocol {
    /// A memory protocol with a namespace of its own.
    pub fn new() -> Self {
        MemoryProtocol {
            ns: Arc::new(Namespace::default()),
        }
    }

    /// A memory protocol in the process-wide namespace.
    pub fn shared() -> Self {
        static SHARED: OnceLock<Arc<Namespace>> = OnceLock::new();
        MemoryProtocol {
            ns: SHARED.get_or_init(Default::default).clone(),
        }
    }

    fn start_listening(&self, protocol: &str, address: &str) -> Result<Box<dyn Listener>> {
        let id = self.ns.fresh_id();
        let name = if address.is_empty() {
            format!("memory-listener-{id}")
        } else {
            address.to_string()
        };
        let mut listeners = self.ns.listeners();
        if let Some((_, existing)) = listeners.get(&name)
            && !existing.is_closed()
        {
            return Err(Error::bad_arg(format!(
                "{protocol}: listen on {name}: address in use"
            )));
        }
        let ns: Weak<Namespace> = Arc::downgrade(&self.ns);
        let key = name.clone();
        let on_close = Box::new(move || {
            if let Some(ns) = ns.upgrade() {
                let mut listeners = ns.listeners();
                if listeners.get(&key).is_some_and(|(owner, _)| *owner == id) {
                    listeners.remove(&key);
                }
            }
        });
        let (listener, tx) =
            QueueListener::new(format!("{protocol} {name}"), name.clone(), Some(on_close));
        listeners.insert(name, (id, tx));
        Ok(Box::new(listener))
    }

    async fn connect(&self, protocol: &str, address: &str) -> Result<Box<dyn FramedConn>> {
        let listener = self.ns.listeners().get(address).map(|(_, tx)| tx.clone());
        let Some(listener) = listener else {
            return Err(Error::new(
                ErrorKind::DialFailed,
                format!("{protocol}: dial {address}: nobody listens on it"),
            ));
        };
        let dialer = format!("memory-dialer-{}", self.ns.fresh_id());
        let (ours, theirs) = pipe(protocol, dialer, address.to_string());
        listener.send(Box::new(theirs)).await.map_err(|_| {
            Error::new(
                ErrorKind::DialFailed,
                format!("{protocol}: dial {address}: listener closed"),
            )
        })?;
        Ok(Box::new(ours))
    }
}

/// Two connected ends: the first is the dialer's.
fn pipe(protocol: &str, dialer: String, listener: String) -> (MemoryConn, MemoryConn) {
    let (to_listener, from_dialer) = mpsc::channel(MEMORY_QUEUE_FRAMES);
    let (to_dialer, from_listener) = mpsc::channel(MEMORY_QUEUE_FRAMES);
    let dialer_end = MemoryConn::new(
        protocol,
        to_listener,
        from_listener,
        dialer.clone(),
        listener.clone(),
    );
    let listener_end = MemoryConn::new(protocol, to_dialer, from_dialer, listener, dialer);
    (dialer_end, listener_end)
}

/// One end of an in-process connection.
struct MemoryConn {
    reader: MemoryReader,
    writer: MemoryWriter,
    local: String,
    remote: String,
}

impl MemoryConn {
    fn new(
        protocol: &str,
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        local: String,
        remote: String,
    ) -> Self {
        let label: Arc<str> = format!("{protocol} {local}<->{remote}").into();
        MemoryConn {
            reader: MemoryReader {
                rx,
                taken: Vec::new(),
            },
            writer: MemoryWriter {
                tx: Some(tx),
                label,
            },
            local,
            remote,
        }
    }
}

impl FramedConn for MemoryConn {
    fn split(self: Box<Self>) -> (Box<dyn FrameReader>, Box<dyn FrameWriter>) {
        let this = *self;
        (Box::new(this.reader), Box::new(this.writer))
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn remote_addr(&self) -> String {
        self.remote.clone()
    }

    fn max_frame_size(&self) -> usize {
        MAX_FRAME_SIZE
    }
}

/// Frames a reader takes off its channel at once.
const READ_BATCH: usize = 32;

struct MemoryReader {
    rx: mpsc::Receiver<Bytes>,
    /// Frames taken off the channel and not yet returned, in reverse order.
    taken: Vec<Bytes>,
}

impl MemoryReader {
    async fn next_frame(&mut self) -> Option<BytesMut> {
        if self.taken.is_empty() {
            // One wakeup for up to a batch of frames.
            if self.rx.recv_many(&mut self.taken, READ_BATCH).await == 0 {
                return None;
            }
            self.taken.reverse();
        }
        self.taken.pop().map(BytesMut::from)
    }
}

impl FrameReader for MemoryReader {
    fn read_frame(&mut self) -> BoxFuture<'_, Result<Option<BytesMut>>> {
        Box::pin(async move { Ok(self.next_frame().await) })
    }
}

struct MemoryWriter {
    tx: Option<mpsc::Sender<Bytes>>,
    label: Arc<str>,
}

impl MemoryWriter {
    async fn send_all(&mut self, frames: &[Frame]) -> Result<()> {
        check_frame_sizes(&self.label, frames)?;
        let Some(tx) = &self.tx else {
            return Err(Error::bad_state(format!(
                "{}: write after close",
                self.label
            )));
        };
        for frame in frames {
            tx.send(frame.to_bytes())
                .await
                .map_err(|_| Error::network(format!("{}: peer closed", self.label)))?;
        }
        Ok(())
    }
}

impl FrameWriter for MemoryWriter {
    fn write_frames<'a>(&'a mut self, frames: &'a [Frame]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.send_all(frames))
    }

    fn close(&mut self) -> BoxFuture<'_, Result<()>> {
        self.tx = None;
        Box::pin(async { Ok(()) })
    }
}

impl Protocol for MemoryProtocol {
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
            self.connect(protocol, address),
        ))
    }

    fn listen<'a>(
        &'a self,
        protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        Box::pin(async move { self.start_listening(protocol, address) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_are_exclusive_and_freed_on_close() {
        let proto = MemoryProtocol::new();
        let listener = proto.listen("memory", "svc").await.expect("listen");
        let err = proto
            .listen("memory", "svc")
            .await
            .map(drop)
            .expect_err("in use");
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(err.message().contains("svc"));
        listener.close();
        let again = proto.listen("memory", "svc").await.expect("free again");
        // Closing the old listener again must not unregister the new one.
        listener.close();
        drop(listener);
        proto
            .dial("memory", "svc", Duration::from_secs(1))
            .await
            .expect("new listener still registered");
        drop(again);
    }

    #[tokio::test]
    async fn namespaces_are_separate() {
        let a = MemoryProtocol::new();
        let b = MemoryProtocol::new();
        let _l = a.listen("memory", "only-in-a").await.expect("listen");
        let err = b
            .dial("memory", "only-in-a", Duration::from_secs(1))
            .await
            .expect_err("other namespace");
        assert_eq!(err.kind(), ErrorKind::DialFailed);
        assert!(err.message().contains("only-in-a"));
    }

    #[tokio::test]
    async fn dial_times_out_when_nobody_accepts() {
        let proto = MemoryProtocol::new();
        let _l = proto.listen("memory", "busy").await.expect("listen");
        let mut conns = Vec::new();
        let err = loop {
            match proto
                .dial("memory", "busy", Duration::from_millis(50))
                .await
            {
                Ok(conn) => conns.push(conn),
                Err(err) => break err,
            }
            assert!(conns.len() < 1000, "queue never filled");
        };
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(err.message().contains("busy"));
    }
}
