//! [`Flow`]: the application's handle on one flow — an ordered,
//! flow-controlled, authenticated byte stream.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::chunk::Chunk;
use super::driver::{Conn, SinkKind};
use super::state::{ConnState, FlowId};
use crate::naming::Endpoint;
use crate::security::{Blessings, Discharges};
use crate::transport::FrameSink;
use crate::{Error, ErrorKind, Result};

/// What the halves of a flow share; dropping the last one closes the flow.
struct FlowInner {
    conn: Conn,
    id: FlowId,
    deadline: Mutex<Option<Instant>>,
    /// Whether `deadline` is set, read without its lock on every read and
    /// write (most flows never have one).
    has_deadline: AtomicBool,
}

impl FlowInner {
    /// The flow's deadline, if any.
    fn deadline(&self) -> Option<Instant> {
        if self.has_deadline.load(Ordering::Acquire) {
            *self.deadline.lock()
        } else {
            None
        }
    }
}

impl Drop for FlowInner {
    fn drop(&mut self) {
        self.conn.shared.drop_flow(self.id);
    }
}

/// A half's timer for the flow deadline.
#[derive(Default)]
struct DeadlineTimer {
    armed_for: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DeadlineTimer {
    /// `Err(Timeout)` once the deadline has passed; otherwise arms a timer
    /// that wakes `cx` when it does.
    fn check(&mut self, inner: &FlowInner, cx: &mut Context<'_>) -> Result<()> {
        let Some(deadline) = inner.deadline() else {
            self.armed_for = None;
            self.sleep = None;
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(Error::timeout("flow deadline passed"));
        }
        if self.armed_for != Some(deadline) {
            self.armed_for = Some(deadline);
            self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        if let Some(sleep) = self.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Err(Error::timeout("flow deadline passed"));
        }
        Ok(())
    }
}

fn io_error(err: Error) -> io::Error {
    let kind = match err.kind() {
        ErrorKind::Timeout => io::ErrorKind::TimedOut,
        ErrorKind::BadState => io::ErrorKind::BrokenPipe,
        ErrorKind::Canceled | ErrorKind::Aborted => io::ErrorKind::ConnectionAborted,
        ErrorKind::BadArg => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, err)
}

/// The reading half of a flow.
pub struct FlowReader {
    inner: Arc<FlowInner>,
    timer: DeadlineTimer,
}

/// The writing half of a flow.
pub struct FlowWriter {
    inner: Arc<FlowInner>,
    timer: DeadlineTimer,
}

/// One flow: an ordered, flow-controlled, authenticated byte stream
/// multiplexed on a [`Conn`].
///
/// Implements [`AsyncRead`] and [`AsyncWrite`]; [`Flow::read_msg`] and
/// [`Flow::write_msg`] work in whole chunks. [`Flow::into_split`] gives
/// halves usable from different tasks without a lock between them. Dropping
/// the flow (every half) closes it.
pub struct Flow {
    reader: FlowReader,
    writer: FlowWriter,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("id", &self.reader.inner.id)
            .field("conn", &self.reader.inner.conn)
            .finish()
    }
}

impl Flow {
    pub(crate) fn new(conn: Conn, id: FlowId) -> Flow {
        let inner = Arc::new(FlowInner {
            conn,
            id,
            deadline: Mutex::new(None),
            has_deadline: AtomicBool::new(false),
        });
        Flow {
            reader: FlowReader {
                inner: inner.clone(),
                timer: DeadlineTimer::default(),
            },
            writer: FlowWriter {
                inner,
                timer: DeadlineTimer::default(),
            },
        }
    }

    /// Splits into owned halves for different tasks.
    pub fn into_split(self) -> (FlowReader, FlowWriter) {
        (self.reader, self.writer)
    }

    /// Reads the next chunk as sent (chunk boundaries are those of the
    /// sender's messages only with fragmentation disabled); `Ok(None)` once
    /// the peer closed its side.
    pub async fn read_msg(&mut self) -> Result<Option<Bytes>> {
        self.reader.read_msg().await
    }

    /// Writes all of `bufs`, in order.
    pub async fn write_msg(&mut self, bufs: &[&[u8]]) -> Result<()> {
        self.writer.write_msg(bufs).await
    }

    /// Writes all of `bufs` and half-closes the flow.
    pub async fn write_msg_and_close(&mut self, bufs: &[&[u8]]) -> Result<()> {
        self.writer.write_msg_and_close(bufs).await
    }

    /// See [`FlowWriter::write_bytes`].
    pub async fn write_bytes(&mut self, msg: &Bytes) -> Result<()> {
        self.writer.write_bytes(msg).await
    }

    /// See [`FlowWriter::sender`].
    pub fn sender(&self) -> Result<MessageSender> {
        self.writer.sender()
    }

    /// Waits until what was written is in frames (and the flow is open on
    /// the wire, even if nothing was written).
    pub async fn flush(&mut self) -> Result<()> {
        self.writer.flush_flow().await
    }

    /// Half-closes: the peer reads the end of the flow after what was
    /// written. Reading goes on.
    pub fn close_write(&self) {
        self.writer.close_write();
    }

    /// Closes the flow: no more writes, unread and later bytes are dropped.
    pub fn close(&self) {
        let inner = &self.reader.inner;
        inner.conn.shared.state.lock().close_flow(inner.id);
    }

    /// Resolves when the flow is closed both ways (or its connection closed).
    pub async fn closed(&self) {
        let inner = &self.reader.inner;
        poll_fn(|cx| {
            inner
                .conn
                .shared
                .state
                .lock()
                .poll_flow_closed(cx, inner.id)
        })
        .await
    }

    /// Makes pending and later reads and writes fail with `Timeout` from
    /// `deadline` on; `None` removes the deadline.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        set_deadline(&self.reader.inner, deadline);
    }

    /// Sends every later write as exactly one message, never split (for
    /// carrying another connection's frames).
    pub fn disable_fragmentation(&self) -> Result<()> {
        let inner = &self.reader.inner;
        inner
            .conn
            .shared
            .state
            .lock()
            .disable_fragmentation(inner.id)
    }

    /// Sends payloads without encrypting them again: they are end-to-end
    /// encrypted already (proxied connections). Implies
    /// [`Flow::disable_fragmentation`].
    pub fn set_passthrough(&self) -> Result<()> {
        let inner = &self.reader.inner;
        inner.conn.shared.state.lock().set_passthrough(inner.id)
    }

    /// The connection this flow is multiplexed on.
    pub fn conn(&self) -> &Conn {
        &self.reader.inner.conn
    }

    /// This side's endpoint.
    pub fn local_endpoint(&self) -> &Endpoint {
        self.conn().local_endpoint()
    }

    /// The peer's endpoint.
    pub fn remote_endpoint(&self) -> &Endpoint {
        self.conn().remote_endpoint()
    }

    /// The blessings the peer presented on this flow.
    pub fn remote_blessings(&self) -> Blessings {
        self.with_state(|state, id| state.flow_remote_credentials(id).0)
    }

    /// The discharges the peer presented on this flow.
    pub fn remote_discharges(&self) -> Discharges {
        self.with_state(|state, id| state.flow_remote_credentials(id).1)
    }

    /// The blessings this side presented on this flow.
    pub fn local_blessings(&self) -> Blessings {
        self.with_state(|state, id| state.flow_local_credentials(id).0)
    }

    /// The discharges this side presented on this flow.
    pub fn local_discharges(&self) -> Discharges {
        self.with_state(|state, id| state.flow_local_credentials(id).1)
    }

    /// Whether this flow is a side channel.
    pub fn is_side_channel(&self) -> bool {
        self.with_state(|state, id| state.is_side_channel(id))
    }

    /// Runs `f` on the connection's state, locked, with this flow's id.
    fn with_state<T>(&self, f: impl FnOnce(&mut ConnState, FlowId) -> T) -> T {
        let inner = &self.reader.inner;
        f(&mut inner.conn.shared.state.lock(), inner.id)
    }
}

impl FlowReader {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Result<Option<Bytes>>> {
        if let Err(e) = self.timer.check(&self.inner, cx) {
            return Poll::Ready(Err(e));
        }
        let inner = &self.inner;
        inner
            .conn
            .shared
            .state
            .lock()
            .poll_read(cx, Instant::now, inner.id, max)
    }

    /// See [`Flow::read_msg`].
    pub async fn read_msg(&mut self) -> Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx, usize::MAX)).await
    }

    /// See [`Flow::set_deadline`] (it applies to both halves).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        set_deadline(&self.inner, deadline);
    }

    /// The connection this flow is on.
    pub fn conn(&self) -> &Conn {
        &self.inner.conn
    }

    /// From now on, the connection's reading task offers each message of
    /// this flow to `sink` as it arrives (messages already waiting first),
    /// instead of keeping it for this reader; a message's credit goes back
    /// to the peer when the sink takes it. This reader then returns only
    /// the end of the flow, after the last message was delivered, or an
    /// error. A sink that refuses a message is detached: that message and
    /// those after it come out of this reader again, in order, and the
    /// sink can be attached again later. Returns false (and changes
    /// nothing) if the flow was closed, is not yet open on the wire, or
    /// has a sink already.
    pub fn attach_sink(&self, sink: Arc<dyn MessageSink>) -> bool {
        self.inner
            .conn
            .shared
            .attach_sink(self.inner.id, SinkKind::Messages(sink))
    }

    /// As [`FlowReader::attach_sink`], for a sink that takes every
    /// message (a transport's, see
    /// [`crate::transport::FrameReader::attach_sink`]): each message's
    /// credit goes back as it arrives, so `sink` must bound what it keeps.
    pub fn attach_frame_sink(&self, sink: Arc<dyn FrameSink>) -> bool {
        self.inner
            .conn
            .shared
            .attach_sink(self.inner.id, SinkKind::Frames(sink))
    }
}

/// Takes a flow's messages as its connection's reading task receives them,
/// or refuses one it cannot take now (see [`FlowReader::attach_sink`]).
pub trait MessageSink: Send + Sync + 'static {
    /// The flow's next message, whole and in order.
    fn offer(&self, msg: Bytes) -> Delivery;
}

/// What a [`MessageSink`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The sink took the message.
    Taken,
    /// The sink could not take the message now; here it is back,
    /// unchanged. It and everything after it wait for the flow's reader.
    Refused(Bytes),
}

/// Writes whole messages to a flow from code that cannot wait, such as a
/// [`MessageSink`] forwarding one flow's messages to another (see
/// [`FlowWriter::sender`]). Keeps the flow open like a handle.
#[derive(Clone)]
pub struct MessageSender {
    inner: Arc<FlowInner>,
}

impl MessageSender {
    /// As [`FlowWriter::try_write_msg`].
    pub fn try_send(&self, msg: &[u8]) -> Result<bool> {
        try_send_whole(&self.inner, msg, None)
    }

    /// As [`MessageSender::try_send`], for a message already in a
    /// [`Bytes`]: a big one (16 KiB or more) on a passthrough flow is
    /// queued as it is and goes out from it, uncopied (a relayed message,
    /// say); others are copied as usual.
    pub fn try_send_bytes(&self, msg: &Bytes) -> Result<bool> {
        try_send_whole(&self.inner, msg, Some(msg))
    }
}

impl FlowWriter {
    fn poll_write_bufs(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> Poll<Result<usize>> {
        self.poll_write_from(cx, bufs, None)
    }

    /// Writes what credit allows of `bufs` (see [`poll_send`]), once the
    /// deadline check passes.
    fn poll_write_from(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[&[u8]],
        held: Option<&Bytes>,
    ) -> Poll<Result<usize>> {
        if let Err(e) = self.timer.check(&self.inner, cx) {
            return Poll::Ready(Err(e));
        }
        poll_send(&self.inner, cx, bufs, held)
    }

    fn poll_flush_flow(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Err(e) = self.timer.check(&self.inner, cx) {
            return Poll::Ready(Err(e));
        }
        let inner = &self.inner;
        inner.conn.shared.state.lock().poll_flush(cx, inner.id)
    }

    /// See [`Flow::write_msg`].
    pub async fn write_msg(&mut self, bufs: &[&[u8]]) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Usually all of it goes at once; only a partial write needs a
        // copy of the slice list to advance through.
        let mut written = poll_fn(|cx| self.poll_write_bufs(cx, bufs)).await?;
        if written >= total {
            return Ok(());
        }
        let mut parts: Vec<&[u8]> = bufs.to_vec();
        advance(&mut parts, written);
        while written < total {
            let n = poll_fn(|cx| self.poll_write_bufs(cx, &parts)).await?;
            written += n;
            advance(&mut parts, n);
        }
        Ok(())
    }

    /// Writes `msg` whole if the flow can take it right now, without
    /// waiting; `Ok(false)`, with nothing written, if it cannot. Only for
    /// flows that keep messages whole (see [`Flow::disable_fragmentation`]);
    /// on others it fails with [`ErrorKind::BadState`].
    pub fn try_write_msg(&self, msg: &[u8]) -> Result<bool> {
        check_whole(&self.inner)?;
        try_send_whole(&self.inner, msg, None)
    }

    /// A handle that writes whole messages to this flow without waiting,
    /// for code that cannot hold this writer (see [`MessageSender`]). Only
    /// for flows that keep messages whole, as
    /// [`FlowWriter::try_write_msg`].
    pub fn sender(&self) -> Result<MessageSender> {
        check_whole(&self.inner)?;
        Ok(MessageSender {
            inner: self.inner.clone(),
        })
    }

    /// As [`FlowWriter::write_msg`] for one message already in a
    /// [`Bytes`], sent from it uncopied where
    /// [`MessageSender::try_send_bytes`] would be.
    pub async fn write_bytes(&mut self, msg: &Bytes) -> Result<()> {
        let written = poll_fn(|cx| self.poll_write_from(cx, &[msg], Some(msg))).await?;
        if written < msg.len() {
            // Taken in part (a flow that splits messages): the rest the
            // usual way.
            self.write_msg(&[&msg[written..]]).await?;
        }
        Ok(())
    }

    /// See [`Flow::write_msg_and_close`].
    pub async fn write_msg_and_close(&mut self, bufs: &[&[u8]]) -> Result<()> {
        self.write_msg(bufs).await?;
        self.close_write();
        Ok(())
    }

    async fn flush_flow(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_flush_flow(cx)).await
    }

    /// See [`Flow::set_deadline`] (it applies to both halves).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        set_deadline(&self.inner, deadline);
    }

    /// See [`Flow::close_write`].
    pub fn close_write(&self) {
        let inner = &self.inner;
        inner.conn.shared.state.lock().close_write(inner.id);
    }

    /// The connection this flow is on.
    pub fn conn(&self) -> &Conn {
        &self.inner.conn
    }
}

/// Queues what credit allows of `bufs` on the flow and, where the
/// transport takes frames without waiting, sends them from this task,
/// sparing a hand-off to the writer task. `held`, when given, is `bufs`'
/// one buffer as a [`Bytes`] the flow may keep instead of copying it.
fn poll_send(
    inner: &FlowInner,
    cx: &mut Context<'_>,
    bufs: &[&[u8]],
    held: Option<&Bytes>,
) -> Poll<Result<usize>> {
    let Some(transmitter) = inner.conn.shared.hold_transmitter() else {
        return poll_queue_bufs(inner, cx, bufs, held);
    };
    let result = poll_queue_bufs(inner, cx, bufs, held);
    inner.conn.shared.send_held(transmitter);
    result
}

/// Queues what credit allows of `bufs` (or all of `held`, if given and
/// credit allows all of it) on the flow.
fn poll_queue_bufs(
    inner: &FlowInner,
    cx: &mut Context<'_>,
    bufs: &[&[u8]],
    held: Option<&Bytes>,
) -> Poll<Result<usize>> {
    let total = bufs.iter().map(|b| b.len()).sum();
    let (n, buffer) = {
        let mut state = inner.conn.shared.state.lock();
        if state.is_unopened(inner.id) {
            // Bytes borrowed for the OpenFlow must be queued before the
            // OpenFlow can go out: copy them under the lock (they are
            // few: at most the shared tokens).
            return state.poll_write(cx, inner.id, bufs);
        }
        let n = ready!(state.reserve_write(cx, inner.id, total))?;
        if let Some(msg) =
            held.filter(|msg| n > 0 && msg.len() == n && state.keeps_held(inner.id, n))
        {
            state.commit_write(inner.id, Chunk::Held(msg.clone()));
            return Poll::Ready(Ok(n));
        }
        (n, state.spare_buffer(n))
    };
    if n > 0 {
        // Copy outside the lock: the credit is already ours.
        let chunk = Chunk::copy_into(buffer, bufs, n);
        inner.conn.shared.state.lock().commit_write(inner.id, chunk);
    }
    Poll::Ready(Ok(n))
}

/// Fails unless flow `inner` keeps messages whole (which, once set, stays).
fn check_whole(inner: &FlowInner) -> Result<()> {
    let whole = inner
        .conn
        .shared
        .state
        .lock()
        .keeps_messages_whole(inner.id);
    if whole {
        Ok(())
    } else {
        Err(Error::bad_state(
            "writing without waiting needs a flow that keeps messages whole",
        ))
    }
}

/// Writes `msg` whole if flow `inner` (one that keeps messages whole) can
/// take it now (see [`FlowWriter::try_write_msg`]). A deadline that passed
/// fails it; none is waited for.
fn try_send_whole(inner: &FlowInner, msg: &[u8], held: Option<&Bytes>) -> Result<bool> {
    if inner.deadline().is_some_and(|at| Instant::now() >= at) {
        return Err(Error::timeout("flow deadline passed"));
    }
    if inner.conn.shared.send_message_now(inner.id, msg) {
        return Ok(true);
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match poll_send(inner, &mut cx, &[msg], held) {
        Poll::Ready(Ok(_)) => Ok(true),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(false),
    }
}

fn set_deadline(inner: &FlowInner, deadline: Option<Instant>) {
    {
        let mut slot = inner.deadline.lock();
        *slot = deadline;
        inner
            .has_deadline
            .store(deadline.is_some(), Ordering::Release);
    }
    // Wake both halves so they re-arm their timers.
    inner.conn.shared.state.lock().wake_flow(inner.id);
}

fn advance(parts: &mut Vec<&[u8]>, mut n: usize) {
    while n > 0 {
        let Some(first) = parts.first_mut() else {
            return;
        };
        if first.len() <= n {
            n -= first.len();
            parts.remove(0);
        } else {
            *first = &first[n..];
            n = 0;
        }
    }
}

impl AsyncRead for FlowReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match ready!(this.poll_chunk(cx, buf.remaining())) {
            Ok(Some(chunk)) => {
                buf.put_slice(&chunk);
                Poll::Ready(Ok(()))
            }
            Ok(None) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

impl AsyncWrite for FlowWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_bufs(cx, &[buf]).map_err(io_error)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let parts: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.get_mut().poll_write_bufs(cx, &parts).map_err(io_error)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_flow(cx).map_err(io_error)
    }

    /// Ends the flow and flushes: returns once what was written is in
    /// frames and the end is as sure to go out — at once when nothing else
    /// of the flow waits (a queued end is sent even by closing the
    /// connection, ahead of its `TearDown`), else once it is in a frame.
    /// The end leaves with the next write on the connection, this task's
    /// or another's, or the writer task's, so it rarely costs a system
    /// call and a segment of its own.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.timer.check(&this.inner, cx) {
            return Poll::Ready(Err(io_error(e)));
        }
        let shared = &this.inner.conn.shared;
        this.close_write();
        // With everything written already in frames, the queued end is as
        // sure as a frame (closing the connection sends it first): it
        // leaves with the next write on the connection.
        if shared.state.lock().end_is_queued_safely(this.inner.id) {
            return Poll::Ready(Ok(()));
        }
        this.poll_flush_flow(cx).map_err(io_error)
    }
}

impl AsyncRead for Flow {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Flow {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}
