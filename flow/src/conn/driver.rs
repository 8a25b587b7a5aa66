//! The tokio driver of a connection: the handshake over a [`FramedConn`],
//! then two tasks — a reader that opens frames and feeds the state machine,
//! and a writer that asks it for frames, seals them and writes them in
//! batches. No task per flow.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use super::cipher::{FRAME_OVERHEAD, FrameOpener, FrameSealer};
use super::clock::{self, Deadline, Watch};
use super::flow::Flow;
use super::flow::{Delivery, MessageSink};
use super::handshake::{Acceptor, Dialer, DialerStep, HandshakeDone, HandshakeParams};
use super::noise_dh::PreparedKey;
use super::state::{
    BuiltFrame, ConnState, ConnStats, FlowId, FlowMap, FlowOptions, SinkItem, SinkItems,
    ZERO_COPY_MIN,
};
use crate::auth::AuthorizedPeer;
use crate::naming::Endpoint;
use crate::security::{Blessings, Discharges};
use crate::transport::{Frame, FrameReader, FrameSink, FrameWriter, FramedConn};
use crate::{Error, ErrorKind, Result};

/// Most frames one batch (one vectored write) carries.
const BATCH_FRAMES: usize = 16;
/// Most bytes one batch carries.
const BATCH_BYTES: usize = 256 * 1024;
/// Most bytes one batch carries while several flows are busy: a message
/// that arrives while a batch is being written waits for all of it.
const CONTENDED_BATCH_BYTES: usize = 64 * 1024;

/// What a connection knows besides its state machine.
pub(crate) struct Shared {
    pub(crate) state: Mutex<ConnState>,
    /// This connection's registration with the health-check clock.
    watch: Arc<Watch>,
    /// Sinks of flows whose data the reading task pushes (keyed by the
    /// ids [`SinkItem`]s carry).
    sinks: Mutex<FlowMap<Arc<SinkEntry>>>,
    /// What turns the state machine's frames into bytes on the transport;
    /// taken by whoever is sending (the writer task, or an application task
    /// when the transport can take frames without waiting).
    transmitter: Mutex<Option<Box<Transmitter>>>,
    /// Whether application tasks may send frames themselves.
    sends_inline: bool,
    id: u64,
    local_endpoint: Endpoint,
    remote_endpoint: Endpoint,
    requested_endpoint: Option<Endpoint>,
    authorized: AuthorizedPeer,
    resumed: bool,
    local_addr: String,
    remote_addr: String,
}

static NEXT_CONN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// An established, authenticated connection multiplexing flows.
///
/// Cheap to clone; every clone is the same connection. This is also the
/// "managed connection" view flows give of their connection: endpoints,
/// blessings, negotiated version, RTT, last use, `closed()`.
///
/// When every handle (and every flow) is gone, the connection closes.
#[derive(Clone)]
pub struct Conn {
    pub(crate) shared: Arc<Shared>,
    _guard: Arc<CloseOnDrop>,
}

/// Closes the connection when the last [`Conn`] handle goes (the reader and
/// writer tasks hold [`Shared`] only, so they do not keep it open).
struct CloseOnDrop(std::sync::Weak<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.state.lock().close("every handle was dropped");
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("local", &self.shared.local_endpoint.to_string())
            .field("remote", &self.shared.remote_endpoint.to_string())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Conn {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Conn {}

/// Runs `wait` (a read of the peer's next handshake frame) and, while it
/// waits, makes the ephemeral key pair of a later handshake, off this
/// one's critical path.
async fn while_waiting<T>(wait: impl Future<Output = T>) -> T {
    let (out, ()) = futures::join!(wait, async { PreparedKey::make_spare() });
    out
}

async fn read_handshake_frame(reader: &mut dyn FrameReader, what: &str) -> Result<BytesMut> {
    match reader.read_frame().await? {
        Some(frame) => Ok(frame),
        None => Err(Error::network(format!(
            "peer closed the connection during the handshake (waiting for {what})"
        ))),
    }
}

impl Conn {
    /// Runs the dialer's handshake over `transport` to reach `remote`, then
    /// starts the connection. Fails with `Timeout` after the configured
    /// handshake timeout, `Auth` if the acceptor's identity does not hold
    /// up, `NotTrusted` if the authorizer refuses it.
    pub async fn dial(
        transport: Box<dyn FramedConn>,
        params: HandshakeParams,
        remote: Endpoint,
    ) -> Result<Conn> {
        let timeout = params.config.handshake_timeout;
        let local_addr = transport.local_addr();
        let remote_addr = transport.remote_addr();
        let config = params.config.clone();
        let (mut reader, mut writer) = transport.split();
        let handshake = async {
            let (mut dialer, hello) = Dialer::start(params, remote, Instant::now())?;
            writer.write_frames(&[hello.into()]).await?;
            let answer = while_waiting(read_handshake_frame(reader.as_mut(), "the answer")).await?;
            dialer.on_response(answer, Instant::now())?;
            let binding = read_handshake_frame(reader.as_mut(), "the binding").await?;
            match dialer.on_binding(binding, SystemTime::now())? {
                DialerStep::Done(done) => Ok(*done),
                DialerStep::Reveal { frame, wait } => {
                    writer.write_frames(&[frame.into()]).await?;
                    let reveal = reader.read_frame().await?.ok_or_else(|| {
                        Error::not_trusted(
                            "the acceptor hung up instead of showing its blessings \
                             (this side may not see them)",
                        )
                    })?;
                    wait.on_reveal(reveal, SystemTime::now())
                }
            }
        };
        let done = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                Error::timeout(format!(
                    "handshake with {remote_addr} timed out after {timeout:?}"
                ))
            })?
            .map_err(|e| e.context(format!("dialing {remote_addr}")))?;
        Ok(Conn::start(
            config,
            done,
            reader,
            writer,
            local_addr,
            remote_addr,
        ))
    }

    /// Runs the acceptor's handshake over `transport`, then starts the
    /// connection.
    pub async fn accept(transport: Box<dyn FramedConn>, params: HandshakeParams) -> Result<Conn> {
        let timeout = params.config.handshake_timeout;
        let local_addr = transport.local_addr();
        let remote_addr = transport.remote_addr();
        let config = params.config.clone();
        let (mut reader, mut writer) = transport.split();
        let handshake = async {
            let mut acceptor = Acceptor::new(params);
            let hello = read_handshake_frame(reader.as_mut(), "the hello").await?;
            let answer = acceptor.on_hello(hello, Instant::now())?;
            writer.write_frames(&answer.map(Frame::from)).await?;
            let binding =
                while_waiting(read_handshake_frame(reader.as_mut(), "the binding")).await?;
            let done =
                match acceptor.on_binding(binding, Instant::now(), SystemTime::now(), &remote_addr)
                {
                    Ok(done) => done,
                    Err(refusal) => {
                        if let Some(goodbye) = refusal.goodbye {
                            let _ = writer.write_frames(&[goodbye.into()]).await;
                            let _ = writer.close().await;
                        }
                        return Err(refusal.error);
                    }
                };
            if !done.frames_to_send.is_empty() {
                let frames: Vec<Frame> = done
                    .frames_to_send
                    .iter()
                    .cloned()
                    .map(Frame::from)
                    .collect();
                writer.write_frames(&frames).await?;
            }
            Ok::<_, Error>(done)
        };
        let done = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                Error::timeout(format!(
                    "handshake from {remote_addr} timed out after {timeout:?}"
                ))
            })?
            .map_err(|e| e.context(format!("accepting from {remote_addr}")))?;
        Ok(Conn::start(
            config,
            done,
            reader,
            writer,
            local_addr,
            remote_addr,
        ))
    }

    fn start(
        config: super::ConnConfig,
        done: HandshakeDone,
        reader: Box<dyn FrameReader>,
        writer: Box<dyn FrameWriter>,
        local_addr: String,
        remote_addr: String,
    ) -> Conn {
        let now = Instant::now();
        let mut state = ConnState::new(config, done.established, now);
        state.send_first(done.initial_messages);
        if let Some((frame, encrypted_len)) = done.leftover {
            // A violation here closes the connection; the writer sends the
            // TearDown and flows see the error.
            let _ = state.handle_frame(now, frame, encrypted_len);
        }
        let sends_inline = writer.writes_without_waiting();
        let first_deadline = state.next_check(now);
        let shared = Arc::new_cyclic(|me: &std::sync::Weak<Shared>| Shared {
            state: Mutex::new(state),
            watch: Watch::new(me.clone()),
            sinks: Mutex::new(FlowMap::default()),
            transmitter: Mutex::new(Some(Box::new(Transmitter::new(writer, done.sealer)))),
            sends_inline,
            id: NEXT_CONN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            local_endpoint: done.local_endpoint,
            remote_endpoint: done.remote_endpoint,
            requested_endpoint: done.requested_endpoint,
            authorized: done.authorized,
            resumed: done.resumed,
            local_addr,
            remote_addr,
        });
        if let Some(at) = first_deadline {
            clock::arm(&shared.watch, at);
        }
        // Over a transport that can push frames (a flow of another
        // connection), that connection's reading task opens and handles
        // this one's frames itself; the reading task here then only
        // watches for the end.
        let mut reader = reader;
        let pushed = Arc::new(PushedFrames {
            shared: shared.clone(),
            opener: Mutex::new(Some(done.opener)),
        });
        // Not attached: the opener comes back to this side's reading task.
        let opener = if reader.attach_sink(pushed.clone()) {
            None
        } else {
            pushed.opener.lock().take()
        };
        tokio::spawn(read_loop(shared.clone(), reader, opener));
        tokio::spawn(write_loop(shared.clone()));
        let guard = Arc::new(CloseOnDrop(Arc::downgrade(&shared)));
        Conn {
            shared,
            _guard: guard,
        }
    }

    /// Opens a flow to the peer. Nothing goes out until the first write or
    /// flush; the first bytes ride inside the `OpenFlow`.
    pub fn open_flow(&self, opts: FlowOptions) -> Result<Flow> {
        let id = self.shared.state.lock().open_flow(opts)?;
        Ok(Flow::new(self.clone(), id))
    }

    /// The next flow the peer opened.
    pub async fn accept_flow(&self) -> Result<Flow> {
        let id = poll_fn(|cx| self.shared.state.lock().poll_accept(cx)).await?;
        Ok(Flow::new(self.clone(), id))
    }

    /// Polls for the next flow the peer opened (for callers that multiplex
    /// many connections in one task).
    pub fn poll_accept_flow(&self, cx: &mut std::task::Context<'_>) -> Poll<Result<Flow>> {
        match self.shared.state.lock().poll_accept(cx) {
            Poll::Ready(Ok(id)) => Poll::Ready(Ok(Flow::new(self.clone(), id))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Closes the connection, telling the peer `reason`; flows fail.
    pub fn close(&self, reason: &str) {
        self.shared.state.lock().close(reason);
    }

    /// Asks the peer to open no more flows here (lame duck).
    pub fn enter_lame_duck(&self) {
        self.shared.state.lock().enter_lame_duck();
    }

    /// Resolves when the peer acknowledged the lame duck (or the connection
    /// closed).
    pub async fn lame_duck_acked(&self) {
        poll_fn(|cx| self.shared.state.lock().poll_lame_duck_acked(cx)).await
    }

    /// Resolves when no flow but side channels is open (or the connection
    /// closed).
    pub async fn idle(&self) {
        poll_fn(|cx| self.shared.state.lock().poll_idle(cx)).await
    }

    /// Resolves, with the reason, once the connection is closed.
    pub async fn closed(&self) -> Error {
        poll_fn(|cx| self.shared.state.lock().poll_closed(cx)).await
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.state.lock().error().cloned()
    }

    /// Whether the connection is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().is_closed()
    }

    /// Whether no flow but side channels is open.
    pub fn is_idle(&self) -> bool {
        self.shared.state.lock().is_idle()
    }

    /// Whether the peer asked for no new flows.
    pub fn is_peer_lame_duck(&self) -> bool {
        self.shared.state.lock().is_peer_lame_duck()
    }

    /// A number naming this connection, unique within the process.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// This side's endpoint.
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.shared.local_endpoint
    }

    /// The peer's endpoint, with the routing id it announced.
    pub fn remote_endpoint(&self) -> &Endpoint {
        &self.shared.remote_endpoint
    }

    /// The endpoint the dialer asked to reach (acceptor side).
    pub fn requested_endpoint(&self) -> Option<&Endpoint> {
        self.shared.requested_endpoint.as_ref()
    }

    /// Whether the handshake resumed: the peer proved its key with a ticket
    /// from an earlier connection instead of a signature.
    pub fn resumed(&self) -> bool {
        self.shared.resumed
    }

    /// The transport's local address.
    pub fn local_addr(&self) -> &str {
        &self.shared.local_addr
    }

    /// The transport's remote address.
    pub fn remote_addr(&self) -> &str {
        &self.shared.remote_addr
    }

    /// The peer's blessing names this side's authorizer accepted, and the
    /// rejected ones.
    pub fn authorized_peer(&self) -> &AuthorizedPeer {
        &self.shared.authorized
    }

    /// The blessings the peer presented for the connection.
    pub fn remote_blessings(&self) -> Blessings {
        self.shared.state.lock().remote_blessings()
    }

    /// The discharges the peer presented for the connection.
    pub fn remote_discharges(&self) -> Discharges {
        self.shared.state.lock().remote_discharges()
    }

    /// The blessings this side presented for the connection.
    pub fn local_blessings(&self) -> Blessings {
        self.shared.state.lock().local_blessings()
    }

    /// The discharges this side presented for the connection.
    pub fn local_discharges(&self) -> Discharges {
        self.shared.state.lock().local_discharges()
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u32 {
        self.shared.state.lock().version()
    }

    /// The latest round-trip time.
    pub fn rtt(&self) -> std::time::Duration {
        self.shared.state.lock().rtt()
    }

    /// When a flow last sent or received bytes.
    pub fn last_used(&self) -> Instant {
        self.shared.state.lock().last_used()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> ConnStats {
        self.shared.state.lock().stats()
    }

    /// The largest message a flow with fragmentation disabled can write.
    pub fn max_message(&self) -> usize {
        self.shared.state.lock().max_message()
    }
}

/// The reading task: opens frames and feeds the state machine. With no
/// `opener`, frames are pushed to the connection by the transport (see
/// [`PushedFrames`]) and this task only waits for the end or an error.
async fn read_loop(
    shared: Arc<Shared>,
    mut reader: Box<dyn FrameReader>,
    mut opener: Option<FrameOpener>,
) {
    loop {
        let result = if opener.is_some() {
            reader.read_frame().await
        } else {
            // Frames are pushed: wait for the transport's end, or for this
            // connection to close (then dropping the reader lets the
            // carrying flow throw away what still comes).
            tokio::select! {
                result = reader.read_frame() => result,
                _ = poll_fn(|cx| shared.state.lock().poll_closed(cx)) => return,
            }
        };
        let err = match result {
            Ok(Some(frame)) => match opener.as_mut() {
                Some(opener) => match opener.open(frame) {
                    Ok((plain, encrypted_len)) => {
                        if !shared.handle_frame(plain, encrypted_len) {
                            return;
                        }
                        continue;
                    }
                    Err(e) => e,
                },
                None => Error::bad_state("a transport that pushes frames also returned one"),
            },
            Ok(None) => Error::network(format!("{} closed the connection", shared.remote_addr)),
            Err(e) => e.context(format!("reading from {}", shared.remote_addr)),
        };
        shared.reading_failed(err);
        return;
    }
}

thread_local! {
    /// While this thread does one piece of work that spans connections,
    /// the time it started (see [`work_time`]).
    static WORK_TIME: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The time to stamp state-machine work with: while this thread does one
/// piece of work that reaches other connections microseconds later — it
/// delivers what a received frame carried to sinks (which may handle or
/// send frames of other connections in turn), or sends frames through a
/// transport that is itself a flow — the time that work started;
/// otherwise the clock's. Spares a clock read per hop on a proxy's relay
/// and at each end of a proxied connection.
fn work_time() -> Instant {
    WORK_TIME.get().unwrap_or_else(Instant::now)
}

/// Sets [`work_time`] for one piece of work; restores the outer one when
/// dropped.
struct WorkTimeScope(Option<Instant>);

impl WorkTimeScope {
    fn enter(now: Instant) -> WorkTimeScope {
        WorkTimeScope(WORK_TIME.replace(Some(now)))
    }
}

impl Drop for WorkTimeScope {
    fn drop(&mut self) {
        WORK_TIME.set(self.0);
    }
}

/// A flow's sink: one that takes every message (its credit goes back as
/// it arrives), or one that may refuse (credit goes back when it takes).
pub(crate) enum SinkKind {
    /// See [`super::FlowReader::attach_frame_sink`].
    Frames(Arc<dyn FrameSink>),
    /// See [`super::FlowReader::attach_sink`].
    Messages(Arc<dyn MessageSink>),
}

impl SinkKind {
    fn takes_everything(&self) -> bool {
        matches!(self, SinkKind::Frames(_))
    }

    fn offer(&self, msg: Bytes) -> Delivery {
        match self {
            SinkKind::Frames(sink) => {
                sink.deliver(msg);
                Delivery::Taken
            }
            SinkKind::Messages(sink) => sink.offer(msg),
        }
    }
}

/// A flow's sink, with the lock that keeps its deliveries in order.
struct SinkEntry {
    sink: SinkKind,
    /// Held while delivering; true once the sink refused a message (it is
    /// then out of the table, and what was meant for it goes elsewhere).
    refused: Mutex<bool>,
}

/// Credit for bytes flows' sinks took, summed while one flow's messages
/// follow each other, returned to the state machine in one lock.
#[derive(Default)]
struct SinkCredit(Option<(FlowId, u64)>);

impl SinkCredit {
    fn add(&mut self, shared: &Shared, id: FlowId, n: u64) {
        match &mut self.0 {
            Some((last, sum)) if *last == id => *sum += n,
            _ => {
                self.flush(shared);
                self.0 = Some((id, n));
            }
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if let Some((id, n)) = self.0.take() {
            shared.state.lock().sink_took(id, n, work_time);
        }
    }
}

impl Shared {
    /// Feeds an opened frame to the state machine and hands what it has
    /// for flows' sinks to them; false once the connection is closed.
    fn handle_frame(&self, plain: Bytes, encrypted_len: usize) -> bool {
        let now = work_time();
        let (open, items) = {
            let mut state = self.state.lock();
            let handled = state.handle_frame(now, plain, encrypted_len);
            (
                handled.is_ok() && !state.is_closed(),
                state.take_sink_items(),
            )
        };
        // Even when this frame closed the connection: what came before the
        // close was received like any data.
        if !items.is_empty() {
            let _now = WorkTimeScope::enter(now);
            self.deliver_to_sinks(items);
        }
        open
    }

    /// Ends the connection after `err` while receiving.
    fn reading_failed(&self, err: Error) {
        let mut state = self.state.lock();
        if err.kind() == ErrorKind::Auth {
            // A frame that fails authentication: tell the peer if we can.
            state.close_with(err);
        } else {
            state.transport_failed(err);
        }
    }

    /// Hands `items` to their flows' sinks, in order, and returns the
    /// credit of what they took.
    fn deliver_to_sinks(&self, items: SinkItems) {
        let mut credit = SinkCredit::default();
        for item in items {
            match item {
                SinkItem::Data(id, data, credited) => {
                    let n = data.len() as u64;
                    if self.deliver_data(id, data) && !credited {
                        credit.add(self, id, n);
                    }
                }
                SinkItem::End(id) => {
                    credit.flush(self);
                    self.deliver_end(id);
                }
            }
        }
        credit.flush(self);
    }

    /// Runs `f` with flow `id`'s sink and its delivery lock held; `None`
    /// if the flow has no sink. Skips a sink that refused meanwhile (it
    /// left the table when it refused; another may have been attached
    /// since).
    fn with_sink<R>(
        &self,
        id: FlowId,
        f: impl FnOnce(&Arc<SinkEntry>, &mut bool) -> R,
    ) -> Option<R> {
        loop {
            let entry = self.sinks.lock().get(&id).cloned()?;
            let mut refused = entry.refused.lock();
            if !*refused {
                return Some(f(&entry, &mut refused));
            }
        }
    }

    /// Offers `data` to flow `id`'s sink; true if it took it. What it
    /// refuses, and data whose sink refused earlier, goes back to the
    /// flow's reader.
    fn deliver_data(&self, id: FlowId, data: Bytes) -> bool {
        // Moved into the sink only once one is found.
        let mut data = Some(data);
        loop {
            let offered = self.with_sink(id, |entry, refused| {
                let Some(msg) = data.take() else {
                    return false;
                };
                match entry.sink.offer(msg) {
                    Delivery::Taken => true,
                    Delivery::Refused(back) => {
                        self.detach_refusing(id, entry, refused, [back]);
                        false
                    }
                }
            });
            if let Some(taken) = offered {
                return taken;
            }
            // Detached (or never had one): the reader gets it, after what
            // its sink refused — unless a sink was attached again
            // meanwhile; then that one is offered it.
            let Some(msg) = data.take() else {
                return false;
            };
            match self.state.lock().return_to_reader(id, msg) {
                Ok(()) => return false,
                Err(back) => data = Some(back),
            }
        }
    }

    /// The sink `entry` of flow `id` refused the first of `msgs`: it
    /// leaves the table and they go back to the reader, in order.
    fn detach_refusing(
        &self,
        id: FlowId,
        entry: &Arc<SinkEntry>,
        refused: &mut bool,
        msgs: impl IntoIterator<Item = Bytes>,
    ) {
        *refused = true;
        // The state first: a deliverer that no longer finds the sink then
        // finds the flow detached (it waits on `refused` until then if it
        // found the sink).
        self.state.lock().sink_refused(id, msgs);
        let mut sinks = self.sinks.lock();
        if sinks.get(&id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            sinks.remove(&id);
        }
    }

    /// The peer ended flow `id`: once everything before reached its sink,
    /// its reader may see the end. (A detached flow's reader sees it after
    /// the messages returned to it.)
    fn deliver_end(&self, id: FlowId) {
        let delivered = self.with_sink(id, |_, _| {
            self.sinks.lock().remove(&id);
            self.state.lock().sink_ended(id);
        });
        if delivered.is_none() {
            self.state.lock().end_returned(id);
        }
    }

    /// Every handle of flow `id` is gone: the state machine closes it, and
    /// its sink, if any, is forgotten (what still comes for it is thrown
    /// away with the flow's other data).
    pub(crate) fn drop_flow(&self, id: FlowId) {
        let key = {
            let mut state = self.state.lock();
            let key = state.wire_id(id);
            state.drop_flow(id);
            key
        };
        if let Some(key) = key {
            self.sinks.lock().remove(&key);
        }
    }

    /// See [`super::FlowReader::attach_sink`].
    pub(crate) fn attach_sink(&self, id: FlowId, sink: SinkKind) -> bool {
        let credit_on_arrival = sink.takes_everything();
        let entry = Arc::new(SinkEntry {
            sink,
            refused: Mutex::new(false),
        });
        // Held until what was waiting is delivered, so the reading task,
        // which takes it for each later message, delivers after.
        let mut refused = entry.refused.lock();
        let (id, waiting, ended) = {
            let mut state = self.state.lock();
            let Some(attached) = state.attach_sink(id, credit_on_arrival, Instant::now) else {
                return false;
            };
            self.sinks.lock().insert(attached.0, entry.clone());
            attached
        };
        // Credit for what the sink takes (unless it went back on arrival).
        let mut taken = 0;
        let mut waiting = waiting.into_iter();
        while let Some(data) = waiting.next() {
            let n = if credit_on_arrival {
                0
            } else {
                data.len() as u64
            };
            match entry.sink.offer(data) {
                Delivery::Taken => taken += n,
                Delivery::Refused(back) => {
                    self.detach_refusing(
                        id,
                        &entry,
                        &mut refused,
                        std::iter::once(back).chain(waiting),
                    );
                    self.state.lock().sink_took(id, taken, Instant::now);
                    return true;
                }
            }
        }
        let mut state = self.state.lock();
        state.sink_took(id, taken, Instant::now);
        if ended {
            self.sinks.lock().remove(&id);
            state.sink_ended(id);
        }
        true
    }
}

/// Frames of this connection pushed by the connection carrying them: the
/// carrier's reading task opens and handles them here.
struct PushedFrames {
    shared: Arc<Shared>,
    opener: Mutex<Option<FrameOpener>>,
}

impl FrameSink for PushedFrames {
    fn deliver(&self, frame: Bytes) {
        let frame = frame
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        // Without an opener, this side's reading task opens frames itself
        // and none come here.
        let opened = self.opener.lock().as_mut().map(|opener| opener.open(frame));
        match opened {
            Some(Ok((plain, encrypted_len))) => {
                self.shared.handle_frame(plain, encrypted_len);
            }
            Some(Err(e)) => self.shared.reading_failed(e),
            // What this connection cannot use any more it drops.
            None => {}
        }
    }
}

/// Waits until the state machine has something to send (or the
/// transmitter holds frames not yet written) and the transmitter is free;
/// returns the transmitter. (The health-check clock runs on the clock
/// thread, which wakes this task when a check is due.)
///
/// Woken for new work, the task first lets the tasks that are ready run:
/// what one queued without sending (the end of a flow, say) then often
/// leaves with the next one's inline write, in one frame and one system
/// call, instead of in a write of its own.
async fn wait_for_work(shared: &Shared) -> Box<Transmitter> {
    let mut slept = false;
    loop {
        let woke = poll_fn(|cx| {
            let mut state = shared.state.lock();
            {
                let mut slot = shared.transmitter.lock();
                if let Some(tx) = slot.as_ref()
                    && (state.wants_to_send() || state.is_finished() || tx.has_unwritten())
                {
                    // A closing connection's last frames go at once.
                    if slept && !state.is_closed() {
                        return Poll::Ready(Woke::Yield);
                    }
                    return Poll::Ready(slot.take().map_or(Woke::Again, Woke::Work));
                }
                // Nothing to do, or an application task is sending: it
                // wakes this task afterwards if anything is left.
            }
            state.register_writer(cx.waker());
            slept = true;
            Poll::Pending
        })
        .await;
        match woke {
            Woke::Work(tx) => return tx,
            Woke::Yield => {
                slept = false;
                tokio::task::yield_now().await;
            }
            Woke::Again => {}
        }
    }
}

/// What [`wait_for_work`] found.
enum Woke {
    /// The transmitter, to send with.
    Work(Box<Transmitter>),
    /// Work that arrived while sleeping: let ready tasks go first.
    Yield,
    /// Look again.
    Again,
}

/// The writer task: sends what the state machine has to send, in batches,
/// until the connection is finished or the transport fails.
async fn write_loop(shared: Arc<Shared>) {
    loop {
        let mut tx = wait_for_work(&shared).await;
        let finished = {
            let mut state = shared.state.lock();
            tx.build(&mut state, Instant::now());
            state.is_finished()
        };
        if let Err(e) = tx.seal() {
            shared.state.lock().transport_failed(e);
            return;
        }
        if tx.has_unwritten() {
            let result = write_with_health(&shared, tx.writer.as_mut(), &tx.sealed).await;
            let written = tx.sealed.len();
            tx.recycle_written(&shared, written);
            if let Err(e) = result {
                shared
                    .state
                    .lock()
                    .transport_failed(e.context(format!("writing to {}", shared.remote_addr)));
                return;
            }
        }
        if finished {
            let _ = tx.writer.close().await;
            return;
        }
        *shared.transmitter.lock() = Some(tx);
    }
}

/// The transport's write half with the connection's sealer, and the
/// buffers frames are built in.
struct Transmitter {
    writer: Box<dyn FrameWriter>,
    sealer: FrameSealer,
    /// Where small frames are built, several per allocation.
    arena: BytesMut,
    /// Frames built, not yet sealed: room for the sealer and the body,
    /// how much of it to encrypt, and a payload sent clear after it.
    built: Vec<(BytesMut, usize, Bytes)>,
    /// Sealed frames not yet taken by the transport, in order.
    sealed: Vec<Frame>,
}

impl Transmitter {
    fn new(writer: Box<dyn FrameWriter>, sealer: FrameSealer) -> Transmitter {
        Transmitter {
            writer,
            sealer,
            arena: BytesMut::new(),
            built: Vec::with_capacity(BATCH_FRAMES),
            sealed: Vec::with_capacity(BATCH_FRAMES),
        }
    }

    /// Whether sealed frames, or the rest of one the transport took in
    /// part, wait for the transport.
    fn has_unwritten(&self) -> bool {
        !self.sealed.is_empty() || self.writer.has_pending()
    }

    /// Builds a batch of frames from what `state` has to send.
    fn build(&mut self, state: &mut ConnState, now: Instant) {
        let frame_cap = FRAME_OVERHEAD + state.max_message() * 3;
        let mut bytes = 0;
        let batch_bytes = if state.is_contended(now) {
            CONTENDED_BATCH_BYTES
        } else {
            BATCH_BYTES
        };
        while self.built.len() < BATCH_FRAMES && bytes < batch_bytes {
            let reserve = frame_cap.max(64 * 1024);
            match self.build_one(reserve, |body| state.build_frame(now, body)) {
                Some(n) => bytes += n,
                None => break,
            }
        }
    }

    /// Builds the frame of [`ConnState::build_message_frame`]; false if
    /// that way does not apply.
    fn build_message(&mut self, state: &mut ConnState, id: FlowId, msg: &[u8]) -> bool {
        self.build_one(64 * 1024, |body| {
            state.build_message_frame(id, msg, work_time(), body)
        })
        .is_some()
    }

    /// Builds one frame with `fill`, which writes its body into the arena
    /// after room for the sealer (or hands back a buffer of its own), and
    /// adds it to those built. Returns the body's length, or `None` if
    /// `fill` built nothing.
    fn build_one(
        &mut self,
        reserve: usize,
        fill: impl FnOnce(&mut BytesMut) -> Option<BuiltFrame>,
    ) -> Option<usize> {
        let arena = &mut self.arena;
        arena.reserve(reserve);
        arena.put_bytes(0, FRAME_OVERHEAD);
        let mut body = arena.split_off(FRAME_OVERHEAD);
        match fill(&mut body) {
            Some(BuiltFrame {
                encrypted_len,
                own_buffer: Some(own),
                tail,
            }) => {
                // A whole chunk, sent from its own buffer (or its header
                // from one, then the chunk as it is).
                arena.clear();
                arena.unsplit(body);
                let len = own.len() + tail.len();
                self.built.push((own, encrypted_len, tail));
                Some(len)
            }
            Some(frame) => {
                let len = body.len() + frame.tail.len();
                arena.unsplit(body);
                self.built
                    .push((arena.split(), frame.encrypted_len, frame.tail));
                Some(len)
            }
            None => {
                arena.clear();
                arena.unsplit(body);
                None
            }
        }
    }

    /// Seals the frames built, in order, after those already sealed.
    fn seal(&mut self) -> Result<()> {
        for (mut frame, encrypted_len, tail) in self.built.drain(..) {
            self.sealer.seal(&mut frame, encrypted_len)?;
            self.sealed.push(Frame::with_tail(frame.freeze(), tail));
        }
        Ok(())
    }

    /// Drops the first `n` sealed frames, the transport having taken them;
    /// large frames sent from their own buffers go back for reuse.
    fn recycle_written(&mut self, shared: &Shared, n: usize) {
        let mut reusable = Vec::new();
        for frame in self.sealed.drain(..n) {
            let (head, _tail) = frame.into_parts();
            if head.len() >= ZERO_COPY_MIN
                && let Ok(buf) = head.try_into_mut()
            {
                reusable.push(buf);
            }
        }
        if !reusable.is_empty() {
            let mut state = shared.state.lock();
            for buf in reusable {
                state.recycle(buf);
            }
        }
    }
}

/// The transmitter, taken by an application task about to change the
/// state machine, with the writer task's wakes held back meanwhile.
pub(crate) struct HeldTransmitter {
    tx: Box<Transmitter>,
}

impl Deadline for Shared {
    fn fire(&self, now: Instant) -> Option<Instant> {
        let mut state = self.state.lock();
        state.handle_timeout(now);
        state.next_check(now)
    }
}

impl Shared {
    /// Frames sealed but not yet taken by the transport, when no one holds
    /// the transmitter.
    #[cfg(test)]
    pub(crate) fn sealed_ahead(&self) -> Option<usize> {
        self.transmitter.lock().as_ref().map(|tx| tx.sealed.len())
    }

    /// Takes the transmitter, when this connection's transport can take
    /// frames without waiting and no one else is sending; until
    /// [`Shared::send_held`], changes to the state do not wake the writer.
    pub(crate) fn hold_transmitter(&self) -> Option<HeldTransmitter> {
        let tx = self.take_transmitter()?;
        self.state.lock().hold_writer_wakes(true);
        Some(HeldTransmitter { tx })
    }

    /// The transmitter, for this task to send with, if the transport takes
    /// frames without waiting and no one else is sending.
    fn take_transmitter(&self) -> Option<Box<Transmitter>> {
        if !self.sends_inline {
            return None;
        }
        let mut slot = self.transmitter.lock();
        if slot.as_ref().is_some_and(|tx| tx.has_unwritten()) {
            // The transport is full: leave the frames to the writer task,
            // which waits for room before building more, so no more than a
            // batch is ever sealed ahead of the transport.
            return None;
        }
        slot.take()
    }

    /// Sends what the state machine has to send through the held
    /// transmitter, as far as the transport takes it without waiting; then
    /// gives the transmitter back and wakes the writer task if anything is
    /// left for it.
    pub(crate) fn send_held(&self, held: HeldTransmitter) {
        // A transport that is a flow (a proxied connection's) sends on the
        // carrying connection with the same time.
        let now = work_time();
        let _now = WorkTimeScope::enter(now);
        self.transmit(held.tx, |tx, state| {
            state.hold_writer_wakes(false);
            tx.build(state, now);
            true
        });
    }

    /// Sends `msg` as flow `id`'s next whole message at once, from this
    /// task, when the connection has nothing else to send and the flow
    /// has the credit (see [`ConnState::build_message_frame`]): one lock
    /// of the state instead of one to reserve, one to queue and one to
    /// build. False, with nothing done, when that does not apply.
    pub(crate) fn send_message_now(&self, id: FlowId, msg: &[u8]) -> bool {
        // Big messages go out from their own buffers the usual way.
        if msg.is_empty() || msg.len() >= ZERO_COPY_MIN {
            return false;
        }
        let Some(tx) = self.take_transmitter() else {
            return false;
        };
        self.transmit(tx, |tx, state| tx.build_message(state, id, msg))
    }

    /// Builds frames into `tx` with `build` under the state's lock, seals
    /// them and writes what the transport takes without waiting; then gives
    /// the transmitter back and wakes the writer task if anything is left
    /// for it. Returns what `build` did.
    fn transmit(
        &self,
        mut tx: Box<Transmitter>,
        build: impl FnOnce(&mut Transmitter, &mut ConnState) -> bool,
    ) -> bool {
        let built = build(&mut tx, &mut self.state.lock());
        let result = if built {
            tx.seal().and_then(|()| {
                let taken = tx.writer.try_write_frames(&tx.sealed)?;
                tx.recycle_written(self, taken);
                Ok(())
            })
        } else {
            Ok(())
        };
        let unwritten = tx.has_unwritten();
        *self.transmitter.lock() = Some(tx);
        let mut state = self.state.lock();
        if let Err(e) = result {
            state.transport_failed(e.context(format!("writing to {}", self.remote_addr)));
        }
        // Whatever was queued while the transmitter was out is sent by the
        // writer task.
        if unwritten || state.wants_to_send() || state.is_finished() {
            state.wake_writer();
        }
        built
    }
}

/// Writes a batch while keeping the health-check clock running, so a peer
/// that stops reading is still declared dead on time.
async fn write_with_health(
    shared: &Shared,
    writer: &mut dyn FrameWriter,
    frames: &[Frame],
) -> Result<()> {
    let mut write = writer.write_frames(frames);
    loop {
        let deadline = shared.state.lock().poll_timeout();
        let Some(deadline) = deadline else {
            return write.await;
        };
        tokio::select! {
            result = &mut write => return result,
            _ = tokio::time::sleep_until(deadline.into()) => {
                let mut state = shared.state.lock();
                state.handle_timeout(Instant::now());
                if state.is_closed() {
                    return Err(state
                        .error()
                        .cloned()
                        .unwrap_or_else(|| Error::network("connection closed while writing")));
                }
            }
        }
    }
}
