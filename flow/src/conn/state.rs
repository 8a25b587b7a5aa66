//! The connection multiplexer as a sans-I/O state machine.
//!
//! [`ConnState`] owns the flow table, the flow-control accounting, the write
//! scheduler, the health-check clock and the connection's lifecycle. It owns
//! no socket, spawns nothing and never reads the clock: the driver feeds it
//! decrypted frames ([`ConnState::handle_frame`]) and the current time, asks
//! it for frames to send ([`ConnState::build_frame`]) and for its next
//! deadline ([`ConnState::poll_timeout`]). Flow handles call the `poll_*`
//! methods under the driver's lock; wakers are the only async piece here.
//!
//! Peer input that breaks the protocol never panics: it closes the
//! connection with an [`ErrorKind::BadArg`] error whose reason goes to the
//! peer in a `TearDown`.

use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use flow_message::codec::Reader;
use flow_message::{
    BlessingsMsg, Data, DischargesMsg, Flags, Message, OpenFlow, Release, ReleaseMsg, TearDown,
};

use super::chunk::{Chunk, MAX_DATA_HEADER};
use super::config::ConnConfig;
use super::flow_control::{Budget, RecvWindow, SendCredit, SharedPool};
use crate::security::{Blessings, Discharges};
use crate::{Error, ErrorKind, Result};

/// Identifies a flow within its connection.
pub type FlowId = u64;

/// A table keyed by flow id. Ids come from the peer, so the hash is keyed
/// per table (foldhash's random state), not a fixed function a peer could
/// aim collisions at; it is several times cheaper than SipHash.
pub(crate) type FlowMap<V> = HashMap<FlowId, V, foldhash::fast::RandomState>;

/// Which side of the handshake this end was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection.
    Dialer,
    /// Accepted the connection.
    Acceptor,
}

impl Role {
    fn id_bit(self) -> u64 {
        match self {
            Role::Dialer => 0,
            Role::Acceptor => 1,
        }
    }
}

/// Blessings key of the credentials each side presented in its handshake.
pub const CONN_BLESSINGS_KEY: u64 = 1;
/// Discharges key meaning "no discharges".
pub const NO_DISCHARGES_KEY: u64 = 0;

/// Marks the ids of flows this side opened that have no wire id yet: wire
/// ids are handed out when the `OpenFlow` goes out, so the peer sees them in
/// increasing order whatever order the application writes in.
const PROVISIONAL: FlowId = 1 << 63;

/// Largest header an `OpenFlow` can have (type byte and six varints).
const MAX_OPEN_FLOW_HEADER: usize = 1 + 6 * 9;
/// While data flows, the round-trip time is sampled this often (a health
/// check rides along with the data; an idle connection sends none).
const RTT_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Another flow that received data this recently makes the connection
/// contended: windows then shrink to [`ConnConfig::contended_window`].
const CONTENTION_SPAN: Duration = Duration::from_millis(50);

/// Most bytes a flow queues for sending, whatever credit it holds: enough
/// to keep the writer busy, few enough that the buffers in circulation stay
/// warm in [`ConnState::spare_buffer`]'s pool.
const MAX_QUEUED: u64 = 1024 * 1024;

/// Buffers of written chunks kept for reuse, per connection: writing into
/// memory already touched saves the page faults and zeroing of fresh
/// allocations on every write.
const MAX_SPARE_BUFFERS: usize = 32;

/// A chunk at least this long goes out as a frame of its own, encrypted in
/// place, rather than being copied into a shared frame.
pub(crate) const ZERO_COPY_MIN: usize = 8 * 1024;
/// A message handed over as `Bytes` at least this long may be queued as
/// it is on a passthrough flow ([`ConnState::keeps_held`]). It keeps alive
/// the buffer it arrived in: with received payloads small against their
/// frame copied ([`detach`]) and a transport's reads of 128 KiB, at most
/// about 16 times its size.
pub(crate) const HOLD_MIN: usize = 16 * 1024;
/// A received payload smaller than 1/`COPY_RATIO` of its frame is copied out
/// so it does not pin the whole frame in memory.
const COPY_RATIO: usize = 8;

/// What the handshake settled, which the multiplexer starts from.
#[derive(Debug, Clone)]
pub struct Established {
    /// This side's role.
    pub role: Role,
    /// Negotiated protocol version.
    pub version: u32,
    /// Largest plaintext frame this side may send.
    pub max_frame: usize,
    /// Largest plaintext frame this side accepts (what it announced).
    pub max_recv_frame: usize,
    /// Shared tokens the peer granted for first payloads.
    pub peer_shared_tokens: u64,
    /// Round-trip time measured during the handshake.
    pub rtt: Duration,
    /// Blessings this side presented.
    pub local_blessings: Blessings,
    /// Discharges this side presented.
    pub local_discharges: Discharges,
    /// Blessings the peer presented, bound to the channel.
    pub remote_blessings: Blessings,
    /// Discharges the peer presented.
    pub remote_discharges: Discharges,
}

/// Options of a new flow.
#[derive(Debug, Clone, Default)]
pub struct FlowOptions {
    /// The flow does not keep the connection busy (it may be closed for
    /// idleness while the flow is open).
    pub side_channel: bool,
    /// Blessings (and discharges) to present on this flow instead of the
    /// connection's.
    pub blessings: Option<(Blessings, Discharges)>,
}

/// Counters of a connection, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Payload bytes sent on flows.
    pub bytes_sent: u64,
    /// Payload bytes received on flows.
    pub bytes_received: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Flows opened, by either side.
    pub flows_opened: u64,
    /// Flows finished and forgotten.
    pub flows_closed: u64,
    /// Flows open now.
    pub flows_open: u64,
}

/// A frame [`ConnState::build_frame`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltFrame {
    /// Bytes from the frame start to encrypt; anything after is a
    /// passthrough payload sent as is.
    pub encrypted_len: usize,
    /// When set, the frame is this buffer — [`super::FRAME_OVERHEAD`] bytes
    /// of room for the sealer, then the frame — and the caller's buffer was
    /// not touched (a whole chunk sent without copying).
    pub own_buffer: Option<BytesMut>,
    /// A passthrough payload that follows the frame's encrypted part as
    /// it is, from the buffer it arrived in (empty for most frames; with
    /// `own_buffer` holding only the room and the header).
    pub tail: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    /// Open for writing.
    Open,
    /// The application closed the write side; `CLOSE` not sent yet.
    Closing,
    /// `CLOSE` sent.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Open,
    /// The peer sent `CLOSE`: once the queue drains, reads see the end.
    PeerClosed,
}

#[derive(Debug)]
struct FlowEntry {
    /// The `OpenFlow` went out (always true for flows the peer opened).
    opened: bool,
    /// The provisional id the application's handle still uses.
    alias: Option<FlowId>,
    send_state: SendState,
    credit: SendCredit,
    send_queue: VecDeque<Chunk>,
    queued: u64,
    in_ready: bool,
    recv_state: RecvState,
    window: RecvWindow,
    recv_queue: VecDeque<Bytes>,
    pending_release: Option<u64>,
    /// The application closed the flow (or dropped every handle): incoming
    /// bytes are thrown away and their credit returned at once.
    discarding: bool,
    handle_alive: bool,
    side_channel: bool,
    /// Each write is sent as exactly one `Data` message.
    whole_messages: bool,
    /// Payloads are already end-to-end encrypted; send them unencrypted.
    passthrough: bool,
    /// Whether the reading task pushes this flow's data to a sink.
    sink: SinkState,
    /// The end of the flow is in the hands of the task delivering to sinks
    /// (a `SinkItem::End` not yet delivered): until it is, messages before
    /// it may still come back to the reader, which must not see the end.
    end_in_flight: bool,
    /// Credentials other than the connection's, if either side presents
    /// any (boxed: most flows use the connection's).
    keys: Option<Box<FlowKeys>>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    closed_wakers: Vec<Waker>,
}

/// Whether a flow's data goes to a sink (see [`ConnState::attach_sink`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkState {
    /// Data waits in the flow for its reader.
    None,
    /// Data goes to the sink; the reader sees only errors until the end
    /// of the flow has been delivered after the last data. Its credit goes
    /// back as it arrives, or when the sink takes it.
    Attached { credit_on_arrival: bool },
    /// The end of the flow reached the sink: the reader sees it too.
    Ended,
}

/// What the reading task hands to flows' sinks after a frame, in order
/// (see [`ConnState::take_sink_items`]).
#[derive(Debug, PartialEq, Eq)]
pub enum SinkItem {
    /// One message of the flow, and whether its credit already went back
    /// (a sink that takes everything); if not, report it with
    /// [`ConnState::sink_took`] once taken.
    Data(FlowId, Bytes, bool),
    /// The peer ended the flow: after delivering everything before it,
    /// call [`ConnState::sink_ended`].
    End(FlowId),
}

/// [`SinkItem`]s of one frame, in order: usually one, kept without an
/// allocation.
#[derive(Debug, Default)]
pub struct SinkItems {
    first: Option<SinkItem>,
    rest: Vec<SinkItem>,
}

impl SinkItems {
    fn push(&mut self, item: SinkItem) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push(item);
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }
}

impl IntoIterator for SinkItems {
    type Item = SinkItem;
    type IntoIter = std::iter::Chain<std::option::IntoIter<SinkItem>, std::vec::IntoIter<SinkItem>>;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

/// Keys (blessings, discharges) of the credentials each side presents on
/// a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKeys {
    local: (u64, u64),
    remote: (u64, u64),
}

impl FlowKeys {
    /// The connection's own credentials on both sides.
    const CONN: FlowKeys = FlowKeys {
        local: (CONN_BLESSINGS_KEY, CONN_BLESSINGS_KEY),
        remote: (CONN_BLESSINGS_KEY, CONN_BLESSINGS_KEY),
    };

    /// What a flow stores: nothing for the connection's credentials.
    fn boxed(self) -> Option<Box<FlowKeys>> {
        (self != FlowKeys::CONN).then(|| Box::new(self))
    }
}

impl FlowEntry {
    /// Keys of the credentials either side presents on this flow.
    fn keys(&self) -> FlowKeys {
        self.keys.as_deref().copied().unwrap_or(FlowKeys::CONN)
    }

    /// A flow not yet opened on the wire, with no handle, nothing queued
    /// either way and the connection's credentials on both sides.
    fn new(credit: SendCredit, window: RecvWindow, side_channel: bool) -> FlowEntry {
        FlowEntry {
            opened: false,
            alias: None,
            send_state: SendState::Open,
            credit,
            send_queue: VecDeque::new(),
            queued: 0,
            in_ready: false,
            recv_state: RecvState::Open,
            window,
            recv_queue: VecDeque::new(),
            pending_release: None,
            discarding: false,
            handle_alive: false,
            side_channel,
            whole_messages: false,
            passthrough: false,
            sink: SinkState::None,
            end_in_flight: false,
            keys: None,
            read_waker: None,
            write_waker: None,
            closed_wakers: Vec::new(),
        }
    }

    /// Whether this flow may no longer open on the wire: the peer asked for
    /// no new flows (acknowledged as `ack_sent`) before its `OpenFlow`
    /// was queued.
    fn barred_by_lame_duck(&self, ack_sent: bool) -> bool {
        !self.opened && ack_sent && !self.in_ready
    }

    fn is_sendable(&self) -> bool {
        match self.send_state {
            SendState::Closing => true,
            SendState::Open => !self.opened || !self.send_queue.is_empty(),
            SendState::Closed => false,
        }
    }

    fn send_done(&self) -> bool {
        self.send_state == SendState::Closed
    }

    fn recv_done(&self) -> bool {
        self.recv_state == RecvState::PeerClosed && (self.recv_queue.is_empty() || self.discarding)
    }

    fn is_finished(&self) -> bool {
        // A flow never opened on the wire is unknown to the peer, which will
        // send nothing on it.
        !self.handle_alive && self.send_done() && (self.recv_done() || !self.opened)
    }

    /// Flags of this flow's `Data` messages, besides `CLOSE`.
    fn data_flags(&self) -> Flags {
        if self.passthrough {
            Flags::PASSTHROUGH
        } else {
            Flags::NONE
        }
    }

    /// Puts messages a sink did not take back in the queue for the reader,
    /// after what is waiting (a closed flow released their credit when it
    /// closed: they are dropped).
    fn requeue(&mut self, msgs: impl IntoIterator<Item = Bytes>) {
        if !self.discarding {
            self.recv_queue.extend(msgs);
        }
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    fn wake_closed(&mut self) {
        for w in self.closed_wakers.drain(..) {
            w.wake();
        }
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        for w in self.closed_wakers.drain(..) {
            w.wake();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Open,
    /// Closing: the `TearDown` (if any) is queued; nothing else is sent.
    Closing,
    /// Closed: nothing more is sent or received.
    Closed,
}

/// The multiplexer of one connection.
#[derive(Debug)]
pub struct ConnState {
    role: Role,
    config: ConnConfig,
    version: u32,
    max_frame: usize,
    max_recv_frame: usize,
    /// Boxed: the table holds a pointer per slot, so its spare capacity
    /// and the copy it leaves behind each time it grows stay small (idle
    /// memory per flow), and re-keying a flow moves a pointer.
    flows: FlowMap<Box<FlowEntry>>,
    next_local_seq: u64,
    next_provisional: u64,
    aliases: FlowMap<FlowId>,
    highest_peer_id: Option<FlowId>,
    accept_queue: VecDeque<FlowId>,
    accept_waker: Option<Waker>,
    pool: SharedPool,
    /// Bytes the peer's `OpenFlow`s carried on flows not yet accepted: the
    /// shared tokens it has in use, as this side counts them.
    peer_pool_in_use: u64,
    budget: Budget,
    ready: VecDeque<FlowId>,
    release_queue: VecDeque<FlowId>,
    /// Releases of flows forgotten before their release went out (the first
    /// grant must still reach the peer: it returns its shared tokens).
    orphan_releases: Vec<Release>,
    control: VecDeque<Message>,
    /// How many messages at the front of `control` came from
    /// [`ConnState::send_first`] and are not sent yet: they survive a close
    /// (a dialer closing at once still completes its channel binding, so the
    /// acceptor sees a well-formed handshake and then the `TearDown`).
    unsent_first: usize,
    /// Allocations of sent chunks, for the next writes.
    spare_buffers: Vec<BytesMut>,
    health_response_due: bool,
    writer_waker: WriterWaker,
    local_blessings: Vec<(Blessings, u64)>,
    local_discharges: Vec<(Discharges, u64)>,
    remote_blessings: HashMap<u64, Blessings>,
    remote_discharges: HashMap<u64, Discharges>,
    rtt: Duration,
    last_received: Instant,
    last_used: Instant,
    health_sent_at: Option<Instant>,
    /// When the round trip is next sampled while data flows (a sample's
    /// time plus [`RTT_PROBE_INTERVAL`]).
    next_rtt_probe: Instant,
    /// The two flows that most recently received data, and when.
    recent_receivers: [Option<(FlowId, Instant)>; 2],
    /// Data and ends for flows with sinks, not yet taken by the reader.
    sink_items: SinkItems,
    peer_lame_duck: bool,
    local_lame_duck: bool,
    lame_duck_acked: bool,
    /// The peer asked for lame duck; the answer waits until every flow this
    /// side has started opening is open on the wire.
    lame_duck_ack_due: bool,
    lame_duck_ack_sent: bool,
    lifecycle: Lifecycle,
    error: Option<Error>,
    conn_wakers: Vec<Waker>,
    busy_flows: usize,
    stats: ConnStats,
}

fn violation(message: impl Into<String>) -> Error {
    Error::bad_arg(format!("protocol violation: {}", message.into()))
}

/// The writer task's waker, and whether wakes are held back.
#[derive(Debug, Default)]
struct WriterWaker {
    waker: Option<Waker>,
    held: bool,
}

impl WriterWaker {
    fn wake(&mut self) {
        if !self.held {
            wake_opt(&mut self.waker);
        }
    }
}

fn wake_opt(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

fn push_waker(wakers: &mut Vec<Waker>, cx: &Context<'_>) {
    if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
        wakers.push(cx.waker().clone());
    }
}

impl ConnState {
    /// A multiplexer starting from what the handshake settled, at `now`.
    pub fn new(config: ConnConfig, est: Established, now: Instant) -> Self {
        let mut remote_blessings = HashMap::new();
        remote_blessings.insert(CONN_BLESSINGS_KEY, est.remote_blessings);
        let mut remote_discharges = HashMap::new();
        remote_discharges.insert(NO_DISCHARGES_KEY, Discharges::new());
        remote_discharges.insert(CONN_BLESSINGS_KEY, est.remote_discharges);
        let budget = Budget::new(config.connection_budget);
        ConnState {
            role: est.role,
            version: est.version,
            max_frame: est.max_frame,
            max_recv_frame: est.max_recv_frame,
            flows: FlowMap::default(),
            next_local_seq: 1,
            next_provisional: 1,
            aliases: FlowMap::default(),
            highest_peer_id: None,
            accept_queue: VecDeque::new(),
            accept_waker: None,
            pool: SharedPool::new(est.peer_shared_tokens),
            peer_pool_in_use: 0,
            budget,
            ready: VecDeque::new(),
            release_queue: VecDeque::new(),
            orphan_releases: Vec::new(),
            control: VecDeque::new(),
            unsent_first: 0,
            spare_buffers: Vec::new(),
            health_response_due: false,
            writer_waker: WriterWaker::default(),
            local_blessings: vec![(est.local_blessings, CONN_BLESSINGS_KEY)],
            local_discharges: vec![(est.local_discharges, CONN_BLESSINGS_KEY)],
            remote_blessings,
            remote_discharges,
            rtt: est.rtt,
            last_received: now,
            last_used: now,
            health_sent_at: None,
            next_rtt_probe: rtt_probe_after(now),
            recent_receivers: [None, None],
            sink_items: SinkItems::default(),
            peer_lame_duck: false,
            local_lame_duck: false,
            lame_duck_acked: false,
            lame_duck_ack_due: false,
            lame_duck_ack_sent: false,
            lifecycle: Lifecycle::Open,
            error: None,
            conn_wakers: Vec::new(),
            busy_flows: 0,
            stats: ConnStats::default(),
            config,
        }
    }

    // ----- Connection-level queries -------------------------------------

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The latest round-trip time (handshake, then health checks).
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// When a flow last sent or received bytes.
    pub fn last_used(&self) -> Instant {
        self.last_used
    }

    /// Counters for metrics.
    pub fn stats(&self) -> ConnStats {
        let mut stats = self.stats;
        stats.flows_open = self.flows.len() as u64;
        stats
    }

    /// Whether no flow other than side channels is open.
    pub fn is_idle(&self) -> bool {
        self.busy_flows == 0
    }

    /// Whether the peer asked this side to open no more flows.
    pub fn is_peer_lame_duck(&self) -> bool {
        self.peer_lame_duck
    }

    /// Whether the peer acknowledged this side's lame duck.
    pub fn is_lame_duck_acked(&self) -> bool {
        self.lame_duck_acked
    }

    /// Why the connection closed, once it has.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Whether the connection is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.lifecycle != Lifecycle::Open
    }

    /// Whether nothing more will ever be sent: the driver may close the
    /// transport once the last built frame is written.
    pub fn is_finished(&self) -> bool {
        self.lifecycle == Lifecycle::Closed
            || (self.lifecycle == Lifecycle::Closing && self.control.is_empty())
    }

    /// Sum of all receive windows, in bytes (bounded by the budget).
    pub fn window_total(&self) -> u64 {
        self.budget.used()
    }

    /// Number of flows in the table.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The remote blessings presented on the connection.
    pub fn remote_blessings(&self) -> Blessings {
        self.remote_blessings
            .get(&CONN_BLESSINGS_KEY)
            .cloned()
            .unwrap_or_else(Blessings::empty)
    }

    /// The remote discharges presented on the connection.
    pub fn remote_discharges(&self) -> Discharges {
        self.remote_discharges
            .get(&CONN_BLESSINGS_KEY)
            .cloned()
            .unwrap_or_default()
    }

    /// The blessings this side presented on the connection.
    pub fn local_blessings(&self) -> Blessings {
        self.local_blessings[0].0.clone()
    }

    /// The discharges this side presented on the connection.
    pub fn local_discharges(&self) -> Discharges {
        self.local_discharges[0].0.clone()
    }

    /// Resolves once the connection is closed.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        if let Some(err) = &self.error {
            return Poll::Ready(err.clone());
        }
        push_waker(&mut self.conn_wakers, cx);
        Poll::Pending
    }

    /// Resolves once the peer acknowledged this side's lame duck (or the
    /// connection closed).
    pub fn poll_lame_duck_acked(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.lame_duck_acked || self.error.is_some() {
            return Poll::Ready(());
        }
        push_waker(&mut self.conn_wakers, cx);
        Poll::Pending
    }

    /// Resolves once no non-side-channel flow is open (or the connection
    /// closed).
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.busy_flows == 0 || self.error.is_some() {
            return Poll::Ready(());
        }
        push_waker(&mut self.conn_wakers, cx);
        Poll::Pending
    }

    fn wake_conn(&mut self) {
        for w in self.conn_wakers.drain(..) {
            w.wake();
        }
    }

    /// Registers the writer task's waker: woken when there is something to
    /// send or a deadline changed.
    pub fn register_writer(&mut self, waker: &Waker) {
        if !self
            .writer_waker
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(waker))
        {
            self.writer_waker.waker = Some(waker.clone());
        }
    }

    /// While `held`, the writer task is not woken: someone else is building
    /// and sending frames, and decides afterwards whether the writer has
    /// anything left to do ([`ConnState::wake_writer`]).
    pub(crate) fn hold_writer_wakes(&mut self, held: bool) {
        self.writer_waker.held = held;
    }

    /// Wakes the writer task (unless its wakes are held).
    pub(crate) fn wake_writer(&mut self) {
        self.writer_waker.wake();
    }

    /// Whether [`ConnState::build_frame`] has something to send.
    pub fn wants_to_send(&self) -> bool {
        match self.lifecycle {
            Lifecycle::Closed => false,
            Lifecycle::Closing => !self.control.is_empty(),
            Lifecycle::Open => {
                !self.control.is_empty()
                    || self.health_response_due
                    || self.lame_duck_ack_due
                    || !self.release_queue.is_empty()
                    || !self.orphan_releases.is_empty()
                    || !self.ready.is_empty()
            }
        }
    }

    /// Queues `msgs` to go out before anything else (the dialer's channel
    /// binding, so it shares a frame with the first flow's bytes).
    pub fn send_first(&mut self, msgs: Vec<Message>) {
        self.unsent_first += msgs.len();
        for msg in msgs.into_iter().rev() {
            self.control.push_front(msg);
        }
        self.writer_waker.wake();
    }

    // ----- Lifecycle ------------------------------------------------------

    fn fail(&mut self, err: Error, teardown: Option<String>) {
        if self.lifecycle != Lifecycle::Open {
            return;
        }
        tracing::debug!(error = %err, "connection closing");
        self.error = Some(err);
        self.control.truncate(self.unsent_first);
        if teardown.is_some() {
            self.queue_pending_ends();
        }
        self.ready.clear();
        self.release_queue.clear();
        self.orphan_releases.clear();
        self.health_response_due = false;
        self.lame_duck_ack_due = false;
        self.lifecycle = match teardown {
            Some(reason) => {
                self.control
                    .push_back(Message::TearDown(TearDown { reason }));
                Lifecycle::Closing
            }
            None => Lifecycle::Closed,
        };
        for entry in self.flows.values_mut() {
            entry.wake_all();
        }
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        self.wake_conn();
        self.writer_waker.wake();
    }

    /// Before a `TearDown`: the ends of flows on the wire that have nothing
    /// else left to send go out ahead of it (an end needs no credit), so a
    /// flow shut down before the connection closed still ends cleanly for
    /// the peer. Bytes still queued are dropped, as closing drops them.
    fn queue_pending_ends(&mut self) {
        for &id in &self.ready {
            let Some(entry) = self.flows.get_mut(&id) else {
                continue;
            };
            // Ids of flows on the wire are never provisional.
            if entry.opened && entry.send_state == SendState::Closing && entry.send_queue.is_empty()
            {
                entry.send_state = SendState::Closed;
                self.control.push_back(Message::Data(Data {
                    id,
                    flags: Flags::CLOSE,
                    payload: Bytes::new(),
                }));
            }
        }
    }

    /// Whether flow `id`'s end, once queued, is as sure to reach the peer
    /// as a frame: the flow is on the wire and nothing else of it waits
    /// (a close of the connection sends such ends ahead of its `TearDown`).
    pub fn end_is_queued_safely(&self, id: FlowId) -> bool {
        let id = self.resolve(id);
        self.flows.get(&id).is_some_and(|entry| {
            entry.opened && entry.send_queue.is_empty() && self.error.is_none()
        })
    }

    /// Closes the connection from this side, telling the peer `reason`.
    pub fn close(&mut self, reason: &str) {
        let err = Error::new(ErrorKind::Aborted, format!("connection closed: {reason}"));
        self.fail(err, Some(reason.to_string()));
    }

    /// Closes the connection with `err` (its kind kept), telling the peer
    /// its message.
    pub fn close_with(&mut self, err: Error) {
        let reason = err.message().to_string();
        self.fail(err, Some(reason));
    }

    /// The transport failed or ended: nothing more can be sent or received.
    pub fn transport_failed(&mut self, err: Error) {
        self.fail(err, None);
        self.lifecycle = Lifecycle::Closed;
    }

    /// Asks the peer to open no more flows on this connection.
    pub fn enter_lame_duck(&mut self) {
        if self.local_lame_duck || self.lifecycle != Lifecycle::Open {
            return;
        }
        self.local_lame_duck = true;
        self.control.push_back(Message::EnterLameDuck);
        self.writer_waker.wake();
    }

    // ----- Time -----------------------------------------------------------

    /// The next instant [`ConnState::handle_timeout`] must be called at.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.lifecycle != Lifecycle::Open {
            return None;
        }
        let timeout = self.config.channel_timeout;
        let dead_at = self.last_received + timeout;
        if self.health_sent_at.is_some() {
            Some(dead_at)
        } else {
            Some(self.last_received + timeout / 2)
        }
    }

    /// The latest time a clock that runs [`ConnState::handle_timeout`] may
    /// look again without missing a deadline, whatever arrives meanwhile:
    /// [`ConnState::poll_timeout`] can move earlier (an answered round-trip
    /// probe takes the deadline from a full channel timeout after the last
    /// frame to half of one after the answer), never before `now` plus
    /// half the channel timeout.
    pub fn next_check(&self, now: Instant) -> Option<Instant> {
        let deadline = self.poll_timeout()?;
        Some(deadline.min(now + self.config.channel_timeout / 2))
    }

    /// Runs the health-check clock: sends a check after half the channel
    /// timeout of silence, closes the connection after all of it.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.lifecycle != Lifecycle::Open {
            return;
        }
        let timeout = self.config.channel_timeout;
        let silent = now.saturating_duration_since(self.last_received);
        if silent >= timeout {
            let err = Error::network(format!(
                "peer sent nothing for {silent:?} (channel timeout {timeout:?})"
            ));
            self.fail(err, Some("channel timeout".to_string()));
        } else if silent >= timeout / 2 && self.health_sent_at.is_none() {
            self.health_sent_at = Some(now);
            self.control.push_back(Message::HealthCheckRequest);
            self.writer_waker.wake();
        }
    }

    // ----- Receiving ------------------------------------------------------

    /// Feeds a decrypted frame: its first `encrypted_len` bytes were
    /// encrypted, the rest is at most one passthrough payload. A protocol
    /// violation closes the connection and is returned.
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes, encrypted_len: usize) -> Result<()> {
        if self.lifecycle == Lifecycle::Closed {
            return Ok(());
        }
        self.last_received = now;
        self.stats.frames_received += 1;
        let frame_len = frame.len();
        if frame_len > self.max_recv_frame {
            return self.violate(format!(
                "frame of {frame_len} bytes, over the {} announced",
                self.max_recv_frame
            ));
        }
        let mut reader = Reader::new(frame, "Frame");
        if reader.is_empty() {
            return self.violate("empty frame");
        }
        while !reader.is_empty() {
            let start = reader.position();
            let msg = match Message::decode(&mut reader) {
                Ok(msg) => msg,
                Err(err) => return self.violate(err.to_string()),
            };
            if reader.position() > encrypted_len {
                let ok = match &msg {
                    Message::Data(d) => {
                        d.flags.contains(Flags::PASSTHROUGH)
                            && reader.is_empty()
                            && start <= encrypted_len
                            && encrypted_len - start
                                == Data::header_len(d.id, d.flags, d.payload.len())
                    }
                    _ => false,
                };
                if !ok {
                    return self.violate("unencrypted bytes outside a passthrough payload");
                }
            }
            self.stats.messages_received += 1;
            if let Err(err) = self.handle_message(now, msg, frame_len) {
                self.close_with(err.clone());
                return Err(err);
            }
            if self.lifecycle == Lifecycle::Closed {
                break;
            }
        }
        Ok(())
    }

    fn violate(&mut self, message: impl Into<String>) -> Result<()> {
        let err = violation(message);
        self.close_with(err.clone());
        Err(err)
    }

    fn handle_message(&mut self, now: Instant, msg: Message, frame_len: usize) -> Result<()> {
        match msg {
            Message::OpenFlow(open) => self.on_open_flow(now, open, frame_len),
            Message::Data(data) => self.on_data(now, data.id, data.flags, data.payload, frame_len),
            Message::Release(release) => self.on_release(release),
            Message::HealthCheckRequest => {
                self.health_response_due = true;
                self.writer_waker.wake();
                Ok(())
            }
            Message::HealthCheckResponse => {
                if let Some(sent) = self.health_sent_at.take() {
                    self.rtt = now.saturating_duration_since(sent);
                    self.next_rtt_probe = rtt_probe_after(now);
                    // The next check is due earlier than the deadline the
                    // writer sleeps towards.
                    self.writer_waker.wake();
                }
                Ok(())
            }
            Message::TearDown(td) => {
                let err = Error::new(
                    ErrorKind::Aborted,
                    format!("connection closed by peer: {}", td.reason),
                );
                self.fail(err, None);
                Ok(())
            }
            Message::EnterLameDuck => {
                if !self.peer_lame_duck {
                    self.peer_lame_duck = true;
                    self.lame_duck_ack_due = true;
                    self.writer_waker.wake();
                    self.wake_conn();
                }
                Ok(())
            }
            Message::AckLameDuck => {
                if !self.local_lame_duck {
                    return Err(violation("AckLameDuck without EnterLameDuck"));
                }
                self.lame_duck_acked = true;
                self.wake_conn();
                Ok(())
            }
            Message::Blessings(b) => self.on_blessings(b),
            Message::Discharges(d) => self.on_discharges(d),
            other => Err(violation(format!(
                "unexpected {} after the handshake",
                other.name()
            ))),
        }
    }

    fn on_blessings(&mut self, msg: BlessingsMsg) -> Result<()> {
        if self.remote_blessings.contains_key(&msg.key) {
            return Err(violation(format!("blessings key {} sent twice", msg.key)));
        }
        if self.remote_blessings.len() >= self.config.max_peer_credentials {
            return Err(violation("too many blessings"));
        }
        let blessings = Blessings::decode(msg.bytes).map_err(|e| violation(e.to_string()))?;
        let conn_key = self
            .remote_blessings
            .get(&CONN_BLESSINGS_KEY)
            .and_then(|b| b.public_key());
        if blessings.public_key().is_some() && blessings.public_key() != conn_key {
            return Err(Error::auth(
                "peer presented flow blessings for a key other than the connection's",
            ));
        }
        self.remote_blessings.insert(msg.key, blessings);
        Ok(())
    }

    fn on_discharges(&mut self, msg: DischargesMsg) -> Result<()> {
        if self.remote_discharges.contains_key(&msg.key) {
            return Err(violation(format!("discharges key {} sent twice", msg.key)));
        }
        if self.remote_discharges.len() >= self.config.max_peer_credentials {
            return Err(violation("too many discharges"));
        }
        let discharges = Discharges::decode(msg.bytes).map_err(|e| violation(e.to_string()))?;
        self.remote_discharges.insert(msg.key, discharges);
        Ok(())
    }

    fn peer_role_bit(&self) -> u64 {
        1 - self.role.id_bit()
    }

    /// Whether `id` names a flow that existed at some point.
    fn is_past_flow(&self, id: FlowId) -> bool {
        if id & 1 == self.role.id_bit() {
            id >> 1 < self.next_local_seq && id >> 1 != 0
        } else {
            self.highest_peer_id.is_some_and(|h| id <= h)
        }
    }

    fn on_open_flow(&mut self, now: Instant, open: OpenFlow, frame_len: usize) -> Result<()> {
        let id = open.id;
        if id & 1 != self.peer_role_bit() || id >> 1 == 0 {
            return Err(violation(format!(
                "peer opened flow {id} with one of our ids"
            )));
        }
        if self.highest_peer_id.is_some_and(|h| id <= h) {
            return Err(violation(format!("flow {id} opened twice or out of order")));
        }
        // The peer may race OpenFlows with our EnterLameDuck, but none may
        // follow its AckLameDuck.
        if self.local_lame_duck && self.lame_duck_acked {
            return Err(violation("flow opened after acknowledging lame duck"));
        }
        if self.flows.len() >= self.config.max_flows {
            return Err(violation(format!(
                "more than {} flows open",
                self.config.max_flows
            )));
        }
        if self.accept_queue.len() >= self.config.max_pending_accepts {
            return Err(violation(format!(
                "more than {} flows waiting to be accepted",
                self.config.max_pending_accepts
            )));
        }
        let carried = open.payload.len() as u64;
        let granted = self.config.effective_shared_tokens();
        if self.peer_pool_in_use + carried > granted {
            return Err(violation(format!(
                "OpenFlow carried {carried} bytes with {} of the {granted} shared tokens already in use",
                self.peer_pool_in_use
            )));
        }
        if !self.remote_blessings.contains_key(&open.blessings_key) {
            return Err(violation(format!(
                "flow {id} refers to unknown blessings {}",
                open.blessings_key
            )));
        }
        if !self.remote_discharges.contains_key(&open.discharge_key) {
            return Err(violation(format!(
                "flow {id} refers to unknown discharges {}",
                open.discharge_key
            )));
        }
        self.highest_peer_id = Some(id);
        // Until the application accepts the flow, the peer has no credit on
        // it: what the OpenFlow carried is paid from the shared tokens, which
        // go back (with the flow's own window) at accept.
        self.peer_pool_in_use += carried;
        let side_channel = open.flags.contains(Flags::SIDE_CHANNEL);
        let mut entry = FlowEntry {
            opened: true,
            keys: FlowKeys {
                remote: (open.blessings_key, open.discharge_key),
                ..FlowKeys::CONN
            }
            .boxed(),
            ..FlowEntry::new(
                SendCredit::opened_by_peer(open.initial_tokens),
                RecvWindow::opened_by_peer(carried),
                side_channel,
            )
        };
        if carried > 0 {
            self.last_used = now;
            self.stats.bytes_received += carried;
            entry.recv_queue.push_back(detach(open.payload, frame_len));
        }
        if open.flags.contains(Flags::CLOSE) {
            entry.recv_state = RecvState::PeerClosed;
        }
        self.insert_flow(id, entry);
        self.accept_queue.push_back(id);
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        self.writer_waker.wake();
        Ok(())
    }

    fn on_data(
        &mut self,
        now: Instant,
        id: FlowId,
        flags: Flags,
        payload: Bytes,
        frame_len: usize,
    ) -> Result<()> {
        let Some(entry) = self.flows.get_mut(&id) else {
            return Err(if self.is_past_flow(id) {
                violation(format!("data for flow {id} after it closed"))
            } else {
                violation(format!("data for unknown flow {id}"))
            });
        };
        if entry.recv_state == RecvState::PeerClosed {
            return Err(violation(format!("data for flow {id} after its CLOSE")));
        }
        let n = payload.len() as u64;
        if let Err(e) = entry.window.on_data(n) {
            return Err(violation(format!(
                "flow {id} sent {} bytes with {} bytes of credit",
                e.sent, e.credit
            )));
        }
        self.stats.bytes_received += n;
        if n > 0 {
            self.last_used = now;
            note_receiver(&mut self.recent_receivers, id, now);
        }
        let (sink, credit_on_arrival) = match entry.sink {
            SinkState::Attached { credit_on_arrival } => (true, credit_on_arrival),
            SinkState::None | SinkState::Ended => (false, false),
        };
        if entry.discarding {
            let release = entry.window.discard();
            if release > 0 {
                queue_release(&mut self.release_queue, id, entry, release);
            }
        } else if sink {
            if n > 0 {
                // Its credit goes back now, or once the sink takes it
                // (`sink_took`).
                // A sink may keep it (a relay queues it on another flow).
                self.sink_items.push(SinkItem::Data(
                    id,
                    detach(payload, frame_len),
                    credit_on_arrival,
                ));
                if credit_on_arrival {
                    self.consumed(id, n, || now);
                }
            }
        } else if n > 0 {
            entry.recv_queue.push_back(detach(payload, frame_len));
        }
        let Some(entry) = self.flows.get_mut(&id) else {
            return Ok(());
        };
        if flags.contains(Flags::CLOSE) {
            entry.recv_state = RecvState::PeerClosed;
            entry.wake_closed();
            if sink {
                self.sink_items.push(SinkItem::End(id));
                entry.end_in_flight = true;
            }
        }
        // A sink's reader waits for the end to be delivered, not for data.
        if !sink && let Some(w) = entry.read_waker.take() {
            w.wake();
        }
        if !self.release_queue.is_empty() {
            self.writer_waker.wake();
        }
        self.maybe_reap(id);
        Ok(())
    }

    fn on_release(&mut self, release: ReleaseMsg) -> Result<()> {
        let pool_before = self.pool.available();
        for Release { flow_id, tokens } in release.releases {
            let past = self.is_past_flow(flow_id);
            match self.flows.get_mut(&flow_id) {
                Some(entry) => {
                    entry.credit.on_release(tokens, &mut self.pool);
                    if let Some(w) = entry.write_waker.take() {
                        w.wake();
                    }
                }
                None if past => {}
                None => return Err(violation(format!("release for unknown flow {flow_id}"))),
            }
        }
        // Returned shared tokens may unblock first writes on other flows
        // (nothing else holds up an unopened flow's write): only then is
        // the walk over every flow worth it.
        if self.pool.available() <= pool_before {
            return Ok(());
        }
        for entry in self.flows.values_mut() {
            if !entry.opened
                && let Some(w) = entry.write_waker.take()
            {
                w.wake();
            }
        }
        Ok(())
    }

    // ----- Sending --------------------------------------------------------

    /// Writes the next frame's plaintext into `buf` (which must be empty).
    /// Returns `None` when there is nothing to send.
    pub fn build_frame(&mut self, now: Instant, buf: &mut BytesMut) -> Option<BuiltFrame> {
        debug_assert!(buf.is_empty());
        if self.lifecycle == Lifecycle::Closed {
            return None;
        }
        let max = self.max_frame;
        if self.lifecycle == Lifecycle::Closing {
            while let Some(msg) = self.control.pop_front() {
                msg.encode(buf);
                self.stats.messages_sent += 1;
            }
            self.unsent_first = 0;
            self.lifecycle = Lifecycle::Closed;
            return self.finish_frame(buf, None);
        }
        // Sample the round trip now and then while data flows.
        if self.health_sent_at.is_none() && !self.ready.is_empty() && now >= self.next_rtt_probe {
            self.health_sent_at = Some(now);
            self.control.push_back(Message::HealthCheckRequest);
        }
        // Control messages first.
        while let Some(msg) = self.control.front() {
            if !buf.is_empty() && buf.len() + msg.encoded_len() > max {
                break;
            }
            if let Some(msg) = self.control.pop_front() {
                msg.encode(buf);
                self.stats.messages_sent += 1;
                self.unsent_first = self.unsent_first.saturating_sub(1);
            }
        }
        if self.health_response_due && buf.len() < max {
            self.health_response_due = false;
            Message::HealthCheckResponse.encode(buf);
            self.stats.messages_sent += 1;
        }
        self.emit_releases(buf, max / 2);
        // Then data, one slice per ready flow in turn.
        let mut clear_from = None;
        while buf.len() + MAX_DATA_HEADER < max {
            let Some(mut id) = self.ready.pop_front() else {
                break;
            };
            if id & PROVISIONAL != 0 {
                match self.assign_wire_id(id) {
                    Some(wire) => id = wire,
                    None => continue,
                }
            }
            let Some(entry) = self.flows.get_mut(&id) else {
                continue;
            };
            let own_frame = match emit_flow(
                id,
                entry,
                buf,
                max,
                &mut self.stats,
                &mut self.spare_buffers,
            ) {
                Emitted::Nothing => {
                    // Did not fit: it goes first in the next frame.
                    self.ready.push_front(id);
                    break;
                }
                Emitted::Some { passthrough_at } => {
                    if passthrough_at.is_some() {
                        clear_from = passthrough_at;
                    }
                    None
                }
                Emitted::OwnFrame(frame, tail, encrypted) => Some((frame, tail, encrypted)),
            };
            self.last_used = now;
            if entry.is_sendable() {
                self.ready.push_back(id);
            } else {
                entry.in_ready = false;
            }
            wake_opt(&mut entry.write_waker);
            if entry.send_state == SendState::Closed {
                entry.wake_closed();
            }
            self.maybe_reap(id);
            if let Some((frame, tail, encrypted)) = own_frame {
                self.stats.frames_sent += 1;
                return Some(BuiltFrame {
                    encrypted_len: encrypted.unwrap_or(frame.len() - super::FRAME_OVERHEAD),
                    own_buffer: Some(frame),
                    tail,
                });
            }
            if clear_from.is_some() {
                break;
            }
        }
        if self.lame_duck_ack_due
            && buf.len() < max
            && clear_from.is_none()
            && !self.flows.values().any(|e| !e.opened && e.in_ready)
        {
            self.lame_duck_ack_due = false;
            self.lame_duck_ack_sent = true;
            Message::AckLameDuck.encode(buf);
            self.stats.messages_sent += 1;
        }
        self.finish_frame(buf, clear_from)
    }

    /// Gives the unopened flow `provisional` its wire id, about to go out in
    /// an `OpenFlow`.
    fn assign_wire_id(&mut self, provisional: FlowId) -> Option<FlowId> {
        let mut entry = self.flows.remove(&provisional)?;
        let wire = (self.next_local_seq << 1) | self.role.id_bit();
        self.next_local_seq += 1;
        entry.alias = Some(provisional);
        self.flows.insert(wire, entry);
        self.aliases.insert(provisional, wire);
        Some(wire)
    }

    /// The id under which flow `id` (as its handle knows it) is stored.
    fn resolve(&self, id: FlowId) -> FlowId {
        if id & PROVISIONAL == 0 {
            return id;
        }
        self.aliases.get(&id).copied().unwrap_or(id)
    }

    /// The wire id of flow `id` (as its handle knows it), once it has one.
    pub fn wire_id(&self, id: FlowId) -> Option<FlowId> {
        let id = self.resolve(id);
        (id & PROVISIONAL == 0).then_some(id)
    }

    /// The quick way for one small whole message through a connection with
    /// nothing else to send: builds into `buf` a frame holding only `msg`
    /// as flow `id`'s next message, paid from the flow's credit. `None`,
    /// with nothing changed, unless
    /// the connection is open with nothing queued to send (no control
    /// message, release, scheduled flow or due round-trip probe), the flow
    /// is open on the wire, keeps messages whole and has nothing queued,
    /// and its credit covers `msg`; the message then takes the usual way.
    pub fn build_message_frame(
        &mut self,
        id: FlowId,
        msg: &[u8],
        now: Instant,
        buf: &mut BytesMut,
    ) -> Option<BuiltFrame> {
        debug_assert!(buf.is_empty());
        let len = msg.len();
        let idle = self.lifecycle == Lifecycle::Open
            && self.error.is_none()
            && self.control.is_empty()
            && !self.health_response_due
            && self.release_queue.is_empty()
            && self.orphan_releases.is_empty()
            && self.ready.is_empty();
        let probe_due = self.health_sent_at.is_none() && now >= self.next_rtt_probe;
        if !idle || probe_due || len == 0 || len >= ZERO_COPY_MIN {
            return None;
        }
        let id = self.resolve(id);
        let max_message = self.max_message() as u64;
        let max_frame = self.max_frame;
        let entry = self.flows.get_mut(&id)?;
        let plain = entry.opened
            && entry.whole_messages
            && entry.send_state == SendState::Open
            && !entry.discarding
            && entry.send_queue.is_empty();
        let flags = entry.data_flags();
        if !plain
            || len as u64 > max_message
            || entry.credit.available(&self.pool, false, max_message) < len as u64
            || Data::header_len(id, flags, len) + len > max_frame
        {
            return None;
        }
        entry
            .credit
            .take(len as u64, &mut self.pool, false, max_message);
        Data::encode_header(id, flags, len, buf);
        let clear_from = entry.passthrough.then_some(buf.len());
        buf.put_slice(msg);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += len as u64;
        self.last_used = now;
        self.finish_frame(buf, clear_from)
    }

    fn finish_frame(&mut self, buf: &BytesMut, clear_from: Option<usize>) -> Option<BuiltFrame> {
        if buf.is_empty() {
            return None;
        }
        self.stats.frames_sent += 1;
        Some(BuiltFrame {
            encrypted_len: clear_from.unwrap_or(buf.len()),
            own_buffer: None,
            tail: Bytes::new(),
        })
    }

    fn emit_releases(&mut self, buf: &mut BytesMut, limit: usize) {
        if self.release_queue.is_empty() && self.orphan_releases.is_empty() {
            return;
        }
        let mut releases = std::mem::take(&mut self.orphan_releases);
        // Type byte and count, then at most 18 bytes per entry.
        let mut size = 1 + 9 + 18 * releases.len();
        while let Some(&id) = self.release_queue.front() {
            if size + 18 > limit.saturating_sub(buf.len()) && !releases.is_empty() {
                break;
            }
            self.release_queue.pop_front();
            if let Some(tokens) = self
                .flows
                .get_mut(&id)
                .and_then(|e| e.pending_release.take())
            {
                releases.push(Release {
                    flow_id: id,
                    tokens,
                });
                size += 18;
            }
        }
        if !releases.is_empty() {
            Message::Release(ReleaseMsg { releases }).encode(buf);
            self.stats.messages_sent += 1;
        }
    }

    fn maybe_reap(&mut self, id: FlowId) {
        if !self.flows.get(&id).is_some_and(|e| e.is_finished()) {
            return;
        }
        if let Some(mut entry) = self.flows.remove(&id) {
            if let Some(alias) = entry.alias {
                self.aliases.remove(&alias);
            }
            if let Some(tokens) = entry.pending_release.take()
                && self.lifecycle == Lifecycle::Open
            {
                self.orphan_releases.push(Release {
                    flow_id: id,
                    tokens,
                });
            }
            self.budget.refund(entry.window.window());
            entry.credit.forfeit(&mut self.pool);
            if !entry.side_channel {
                self.busy_flows -= 1;
                if self.busy_flows == 0 {
                    self.wake_conn();
                }
            }
            self.stats.flows_closed += 1;
            entry.wake_all();
        }
    }

    // ----- Flow operations (called by flow handles) ------------------------

    /// Opens a flow from this side. Nothing is sent until the first write
    /// (or flush).
    pub fn open_flow(&mut self, opts: FlowOptions) -> Result<FlowId> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        if self.peer_lame_duck {
            return Err(peer_lame_duck());
        }
        if self.local_lame_duck {
            return Err(Error::bad_state("connection is closing (lame duck)"));
        }
        if self.flows.len() >= self.config.max_flows {
            return Err(Error::bad_state(format!(
                "connection has {} flows open, its limit",
                self.config.max_flows
            )));
        }
        let id = PROVISIONAL | self.next_provisional;
        self.next_provisional += 1;
        let local = match opts.blessings {
            None => (CONN_BLESSINGS_KEY, CONN_BLESSINGS_KEY),
            Some((b, d)) => self.credential_keys(b, d)?,
        };
        let window = self
            .budget
            .open_window(self.config.initial_window, self.config.min_window, 0);
        let entry = FlowEntry {
            handle_alive: true,
            keys: FlowKeys {
                local,
                ..FlowKeys::CONN
            }
            .boxed(),
            ..FlowEntry::new(
                SendCredit::opened_locally(),
                RecvWindow::new(window),
                opts.side_channel,
            )
        };
        self.insert_flow(id, entry);
        Ok(id)
    }

    /// Adds a flow to the table and counts it.
    fn insert_flow(&mut self, id: FlowId, entry: FlowEntry) {
        if !entry.side_channel {
            self.busy_flows += 1;
        }
        self.stats.flows_opened += 1;
        self.flows.insert(id, Box::new(entry));
    }

    fn credential_keys(
        &mut self,
        blessings: Blessings,
        discharges: Discharges,
    ) -> Result<(u64, u64)> {
        let conn_key = self.local_blessings[0].0.public_key();
        if blessings.public_key().is_some() && blessings.public_key() != conn_key {
            return Err(Error::bad_arg(
                "flow blessings must be for the connection's public key",
            ));
        }
        let bkey = match self.local_blessings.iter().find(|(b, _)| *b == blessings) {
            Some((_, key)) => *key,
            None => {
                let key = self.local_blessings.len() as u64 + 1;
                self.control.push_back(Message::Blessings(BlessingsMsg {
                    key,
                    bytes: blessings.to_bytes(),
                }));
                self.local_blessings.push((blessings, key));
                key
            }
        };
        let dkey = if discharges.is_empty() {
            NO_DISCHARGES_KEY
        } else {
            match self.local_discharges.iter().find(|(d, _)| *d == discharges) {
                Some((_, key)) => *key,
                None => {
                    let key = self.local_discharges.len() as u64 + 1;
                    self.control.push_back(Message::Discharges(DischargesMsg {
                        key,
                        blessings_key: bkey,
                        bytes: discharges.to_bytes(),
                    }));
                    self.local_discharges.push((discharges, key));
                    key
                }
            }
        };
        Ok((bkey, dkey))
    }

    /// The next flow the peer opened.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Result<FlowId>> {
        while let Some(id) = self.accept_queue.pop_front() {
            if let Some(entry) = self.flows.get_mut(&id) {
                entry.handle_alive = true;
                let carried = entry.window.window();
                self.peer_pool_in_use -= carried;
                let window = self.budget.open_window(
                    self.config.initial_window,
                    self.config.min_window,
                    carried,
                );
                let grant = entry.window.widen_to(window);
                // The first grant, even of zero bytes, returns the peer's
                // borrowed shared tokens.
                if self.lifecycle == Lifecycle::Open {
                    queue_release(&mut self.release_queue, id, entry, grant);
                    self.writer_waker.wake();
                }
                return Poll::Ready(Ok(id));
            }
        }
        if let Some(err) = &self.error {
            return Poll::Ready(Err(err.clone()));
        }
        self.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn entry(&mut self, id: FlowId) -> Result<&mut FlowEntry> {
        self.flows
            .get_mut(&id)
            .map(|entry| &mut **entry)
            .ok_or_else(|| Error::bad_state(format!("flow {id} is closed")))
    }

    /// Makes every write of the flow go out as exactly one `Data` message
    /// (for carrying frames of another connection).
    pub fn disable_fragmentation(&mut self, id: FlowId) -> Result<()> {
        let id = self.resolve(id);
        self.entry(id)?.whole_messages = true;
        Ok(())
    }

    /// Sends the flow's payloads unencrypted (they are already end-to-end
    /// encrypted); implies whole messages.
    pub fn set_passthrough(&mut self, id: FlowId) -> Result<()> {
        let id = self.resolve(id);
        let entry = self.entry(id)?;
        entry.whole_messages = true;
        entry.passthrough = true;
        Ok(())
    }

    /// The largest single message [`ConnState::poll_write`] accepts with
    /// fragmentation disabled.
    pub fn max_message(&self) -> usize {
        // Half a frame, so it fits beside the control messages that go first.
        self.max_frame / 2 - MAX_OPEN_FLOW_HEADER
    }

    /// The remote blessings presented on flow `id`.
    pub fn flow_remote_credentials(&self, id: FlowId) -> (Blessings, Discharges) {
        let id = self.resolve(id);
        let (bkey, dkey) = self
            .flows
            .get(&id)
            .map_or(FlowKeys::CONN, |e| e.keys())
            .remote;
        (
            self.remote_blessings
                .get(&bkey)
                .cloned()
                .unwrap_or_else(Blessings::empty),
            self.remote_discharges
                .get(&dkey)
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// The local blessings presented on flow `id`.
    pub fn flow_local_credentials(&self, id: FlowId) -> (Blessings, Discharges) {
        let id = self.resolve(id);
        let (bkey, dkey) = self
            .flows
            .get(&id)
            .map_or(FlowKeys::CONN, |e| e.keys())
            .local;
        let blessings = self
            .local_blessings
            .iter()
            .find(|(_, k)| *k == bkey)
            .map(|(b, _)| b.clone())
            .unwrap_or_else(Blessings::empty);
        let discharges = self
            .local_discharges
            .iter()
            .find(|(_, k)| *k == dkey)
            .map(|(d, _)| d.clone())
            .unwrap_or_default();
        (blessings, discharges)
    }

    /// Whether a message of `len` bytes handed over as `Bytes` is queued
    /// on flow `id` as it is ([`Chunk::Held`]) rather than copied: only a
    /// big one on a passthrough flow, which goes out as its frame's clear
    /// tail (a smaller one is copied into its frame anyway, and an
    /// encrypted one is copied to be sealed).
    pub(crate) fn keeps_held(&self, id: FlowId, len: usize) -> bool {
        let id = self.resolve(id);
        len >= HOLD_MIN && self.flows.get(&id).is_some_and(|e| e.passthrough)
    }

    /// Whether flow `id` keeps each write whole (fragmentation disabled).
    pub fn keeps_messages_whole(&self, id: FlowId) -> bool {
        let id = self.resolve(id);
        self.flows.get(&id).is_some_and(|e| e.whole_messages)
    }

    /// Whether flow `id` is a side channel.
    pub fn is_side_channel(&self, id: FlowId) -> bool {
        let id = self.resolve(id);
        self.flows.get(&id).is_some_and(|e| e.side_channel)
    }

    /// Reads the next chunk of at most `max` bytes from flow `id`;
    /// `Ok(None)` at the end of the flow. `now` gives the time, asked only
    /// when the read grants credit back or another flow is busy too.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        now: impl FnOnce() -> Instant,
        id: FlowId,
        max: usize,
    ) -> Poll<Result<Option<Bytes>>> {
        let id = self.resolve(id);
        let error = self.error.clone();
        let Some(entry) = self.flows.get_mut(&id) else {
            return Poll::Ready(Ok(None));
        };
        if let Some(front) = entry.recv_queue.front_mut() {
            let chunk = if front.len() <= max {
                entry.recv_queue.pop_front().unwrap_or_default()
            } else {
                front.split_to(max)
            };
            if error.is_none() {
                self.consumed(id, chunk.len() as u64, now);
            }
            return Poll::Ready(Ok(Some(chunk)));
        }
        if matches!(entry.sink, SinkState::Attached { .. }) {
            // Everything goes to the sink; only an error or the delivered
            // end of the flow ends this read.
            if let Some(err) = error {
                return Poll::Ready(Err(err));
            }
            entry.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let ended = entry.recv_state == RecvState::PeerClosed && !entry.end_in_flight;
        if ended || entry.discarding {
            self.maybe_reap(id);
            return Poll::Ready(Ok(None));
        }
        if let Some(err) = error {
            return Poll::Ready(Err(err));
        }
        entry.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The application (or a sink) took `n` bytes of flow `id`: grants
    /// credit back when the window says so. `now` is asked only then, or
    /// when another flow is busy too.
    fn consumed(&mut self, id: FlowId, n: u64, now: impl FnOnce() -> Instant) {
        let now = std::cell::LazyCell::new(now);
        let rtt = self.rtt;
        // While another flow is busy too, a flow keeps a smaller window, so it
        // cannot queue much ahead of the others' messages.
        let contended = self.recent_receivers.iter().flatten().any(|(other, at)| {
            *other != id && now.saturating_duration_since(*at) < CONTENTION_SPAN
        });
        let max_window = if contended {
            self.config.max_window.min(self.config.contended_window)
        } else {
            self.config.max_window
        };
        let Some(entry) = self.flows.get_mut(&id) else {
            return;
        };
        if let Some(release) =
            entry
                .window
                .on_consumed(n, || *now, rtt, max_window, &mut self.budget)
        {
            queue_release(&mut self.release_queue, id, entry, release);
            self.writer_waker.wake();
        }
    }

    /// Sends flow `id`'s data to a sink from now on: the reading task takes
    /// it with [`ConnState::take_sink_items`] after each frame, reports
    /// what the sink took with [`ConnState::sink_took`] (its credit goes
    /// back then) and what it refused with [`ConnState::sink_refused`]; the
    /// flow's reader sees only errors, and the end of the flow once
    /// [`ConnState::sink_ended`] says it was delivered. Returns the flow's
    /// id as the items name it, what was already waiting to be read (to
    /// deliver first), and whether the peer had already ended the flow
    /// (then call `sink_ended` after delivering that). `None` if the flow
    /// is gone, not yet opened on the wire, already has a sink, or its
    /// reader gave up.
    /// With `credit_on_arrival`, for a sink that takes every message, each
    /// message's credit goes back as it arrives (and that of what was
    /// waiting, at `now`) instead.
    pub fn attach_sink(
        &mut self,
        id: FlowId,
        credit_on_arrival: bool,
        now: impl FnOnce() -> Instant,
    ) -> Option<(FlowId, Vec<Bytes>, bool)> {
        let id = self.resolve(id);
        let entry = self.flows.get_mut(&id)?;
        // A flow not yet opened on the wire has no id the peer's messages
        // will carry: it gets no sink.
        if !entry.opened || entry.discarding || entry.sink != SinkState::None {
            return None;
        }
        entry.sink = SinkState::Attached { credit_on_arrival };
        let waiting: Vec<Bytes> = entry.recv_queue.drain(..).collect();
        // An end still being delivered reaches this sink as an item.
        let ended = entry.recv_state == RecvState::PeerClosed && !entry.end_in_flight;
        let n = waiting.iter().map(|b| b.len() as u64).sum();
        if credit_on_arrival && n > 0 && self.error.is_none() {
            self.consumed(id, n, now);
        }
        Some((id, waiting, ended))
    }

    /// Flow `id`'s sink took `n` more bytes: their credit goes back as if
    /// they were read. (Bytes of a flow closed since were released then.)
    /// `now` is asked only when credit goes back.
    pub fn sink_took(&mut self, id: FlowId, n: u64, now: impl FnOnce() -> Instant) {
        let live = self.flows.get(&id).is_some_and(|e| !e.discarding);
        if live && n > 0 && self.error.is_none() {
            self.consumed(id, n, now);
        }
    }

    /// Flow `id`'s sink refused `msgs` (the first it could not take, then
    /// those after it, in order): the sink is detached and they wait for
    /// the flow's reader, which can attach a sink again once it caught up.
    pub fn sink_refused(&mut self, id: FlowId, msgs: impl IntoIterator<Item = Bytes>) {
        if let Some(entry) = self.flows.get_mut(&id) {
            entry.sink = SinkState::None;
            entry.requeue(msgs);
        }
    }

    /// Gives a message of flow `id` taken for a sink that has since been
    /// detached back to the flow's reader, after what is waiting. Hands it
    /// back if a sink is attached again: deliver it to that one instead.
    pub fn return_to_reader(&mut self, id: FlowId, msg: Bytes) -> std::result::Result<(), Bytes> {
        match self.flows.get_mut(&id) {
            Some(entry) if matches!(entry.sink, SinkState::Attached { .. }) => Err(msg),
            Some(entry) => {
                entry.requeue([msg]);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Data and ends for flows with sinks since the last call, in order.
    pub fn take_sink_items(&mut self) -> SinkItems {
        std::mem::take(&mut self.sink_items)
    }

    /// Everything flow `id` (as [`SinkItem`]s name it) received reached its
    /// sink, the end included: its reader may now see the end too.
    pub fn sink_ended(&mut self, id: FlowId) {
        if let Some(entry) = self.flows.get_mut(&id) {
            entry.sink = SinkState::Ended;
        }
        self.end_returned(id);
    }

    /// The end of flow `id`, taken for a sink that has since been detached,
    /// was handled after every message before it: the reader, once it has
    /// read those, sees the end.
    pub fn end_returned(&mut self, id: FlowId) {
        if let Some(entry) = self.flows.get_mut(&id) {
            entry.end_in_flight = false;
            if let Some(w) = entry.read_waker.take() {
                w.wake();
            }
            self.maybe_reap(id);
        }
    }

    /// Takes credit for up to `total` bytes on flow `id` (all or nothing,
    /// and at most one message, when fragmentation is disabled). Returns how
    /// many bytes the caller may now `commit_write`; it copies
    /// them outside the lock.
    pub fn reserve_write(
        &mut self,
        cx: &mut Context<'_>,
        id: FlowId,
        total: usize,
    ) -> Poll<Result<usize>> {
        let id = self.resolve(id);
        if let Some(err) = &self.error {
            return Poll::Ready(Err(err.clone()));
        }
        let max_message = self.max_message();
        let max_chunk = self.max_chunk();
        let max_queue = MAX_QUEUED.max(max_message as u64);
        let lame_duck_ack_sent = self.lame_duck_ack_sent;
        let entry = match self.flows.get_mut(&id) {
            Some(e) => e,
            None => return Poll::Ready(Err(Error::bad_state(format!("flow {id} is closed")))),
        };
        if entry.send_state != SendState::Open || entry.discarding {
            return Poll::Ready(Err(Error::bad_state("write on a flow closed for writing")));
        }
        if entry.barred_by_lame_duck(lame_duck_ack_sent) {
            return Poll::Ready(Err(peer_lame_duck()));
        }
        if total == 0 {
            schedule(&mut self.ready, id, entry);
            self.writer_waker.wake();
            return Poll::Ready(Ok(0));
        }
        if entry.whole_messages && total > max_message {
            return Poll::Ready(Err(Error::bad_arg(format!(
                "message of {total} bytes is larger than the {max_message} bytes a frame carries"
            ))));
        }
        // Before the OpenFlow goes out, bytes are borrowed from the shared
        // tokens and ride inside it: at most one message's worth.
        let can_borrow = !entry.opened && (!entry.whole_messages || entry.send_queue.is_empty());
        let have = entry
            .credit
            .available(&self.pool, can_borrow, max_message as u64);
        // The peer's credit may be huge: never queue more than a window's
        // worth locally.
        let have = have.min(max_queue.saturating_sub(entry.queued));
        let n = if entry.whole_messages {
            if have < total as u64 { 0 } else { total }
        } else {
            (have as usize).min(total).min(max_chunk)
        };
        if n == 0 {
            // Send the OpenFlow (empty if need be) to earn the flow's credit.
            schedule(&mut self.ready, id, entry);
            self.writer_waker.wake();
            entry.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let taken = entry
            .credit
            .take(n as u64, &mut self.pool, can_borrow, max_message as u64);
        debug_assert_eq!(taken, n as u64);
        Poll::Ready(Ok(n))
    }

    /// A buffer for the next chunk of at least `len` payload bytes, from
    /// those already used when one is big enough.
    pub(crate) fn spare_buffer(&mut self, len: usize) -> BytesMut {
        // A recycled frame starts a little into its allocation; `reserve`
        // takes the whole allocation back when it is big enough.
        if len < ZERO_COPY_MIN {
            return BytesMut::new();
        }
        self.spare_buffers.pop().unwrap_or_default()
    }

    /// Keeps `buf` (a sent chunk's allocation, no longer shared) for reuse.
    pub fn recycle(&mut self, mut buf: BytesMut) {
        if self.spare_buffers.len() < MAX_SPARE_BUFFERS && buf.capacity() >= ZERO_COPY_MIN {
            buf.clear();
            self.spare_buffers.push(buf);
        }
    }

    /// Whether several flows have been busy lately (received data, or have
    /// data to send): then small messages should not wait behind big
    /// batches.
    pub fn is_contended(&self, now: Instant) -> bool {
        let recent = self
            .recent_receivers
            .iter()
            .flatten()
            .filter(|(_, at)| now.saturating_duration_since(*at) < CONTENTION_SPAN)
            .count();
        recent >= 2 || self.ready.len() >= 2
    }

    /// Whether flow `id` has not gone out on the wire yet (its first bytes
    /// ride inside its `OpenFlow`, paid from shared tokens).
    pub(crate) fn is_unopened(&self, id: FlowId) -> bool {
        let id = self.resolve(id);
        self.flows.get(&id).is_some_and(|e| !e.opened)
    }

    /// Queues `chunk`, whose bytes [`ConnState::reserve_write`] paid for.
    pub(crate) fn commit_write(&mut self, id: FlowId, chunk: Chunk) {
        let id = self.resolve(id);
        if self.error.is_some() {
            return;
        }
        let Some(entry) = self.flows.get_mut(&id) else {
            return;
        };
        entry.queued += chunk.len() as u64;
        entry.send_queue.push_back(chunk);
        schedule(&mut self.ready, id, entry);
        self.writer_waker.wake();
    }

    /// Queues bytes of `bufs` on flow `id`, as many as credit allows right
    /// now. Returns the number of bytes taken. (Copies under the caller's
    /// lock; flow handles use [`ConnState::reserve_write`] instead.)
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        id: FlowId,
        bufs: &[&[u8]],
    ) -> Poll<Result<usize>> {
        let total = bufs.iter().map(|b| b.len()).sum();
        let n = match self.reserve_write(cx, id, total) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if n > 0 {
            self.commit_write(id, Chunk::copy_from(bufs, n));
        }
        Poll::Ready(Ok(n))
    }

    /// The largest chunk one write queues: it always fits a frame whole.
    fn max_chunk(&self) -> usize {
        self.max_frame - MAX_DATA_HEADER
    }

    /// Resolves once everything written on flow `id` is in a frame (and the
    /// flow is open on the wire).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>, id: FlowId) -> Poll<Result<()>> {
        let id = self.resolve(id);
        let error = self.error.clone();
        let Some(entry) = self.flows.get_mut(&id) else {
            return Poll::Ready(Ok(()));
        };
        if entry.barred_by_lame_duck(self.lame_duck_ack_sent) {
            return Poll::Ready(Err(peer_lame_duck()));
        }
        let pending =
            !entry.opened || entry.send_state == SendState::Closing || !entry.send_queue.is_empty();
        if !pending {
            return Poll::Ready(Ok(()));
        }
        if let Some(err) = error {
            return Poll::Ready(Err(err));
        }
        schedule(&mut self.ready, id, entry);
        self.writer_waker.wake();
        entry.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Half-closes flow `id`: after what was written, the peer reads the end
    /// of the flow. Reading goes on.
    pub fn close_write(&mut self, id: FlowId) {
        let id = self.resolve(id);
        let Some(entry) = self.flows.get_mut(&id) else {
            return;
        };
        if entry.send_state == SendState::Open {
            if entry.barred_by_lame_duck(self.lame_duck_ack_sent) {
                // The peer never heard of this flow and may not any more.
                entry.send_state = SendState::Closed;
                entry.wake_closed();
                return;
            }
            entry.send_state = SendState::Closing;
            schedule(&mut self.ready, id, entry);
            self.writer_waker.wake();
        }
    }

    /// Closes flow `id` fully: writes end as with [`ConnState::close_write`],
    /// bytes not yet read are dropped, and later ones thrown away.
    pub fn close_flow(&mut self, id: FlowId) {
        let id = self.resolve(id);
        self.close_write(id);
        let Some(entry) = self.flows.get_mut(&id) else {
            return;
        };
        if !entry.discarding {
            entry.discarding = true;
            entry.recv_queue.clear();
            let release = entry.window.discard();
            if release > 0 && self.lifecycle == Lifecycle::Open {
                queue_release(&mut self.release_queue, id, entry, release);
                self.writer_waker.wake();
            }
            entry.wake_all();
        }
        self.maybe_reap(id);
    }

    /// Every handle of flow `id` is gone: close it fully and forget it once
    /// both directions are done.
    pub fn drop_flow(&mut self, id: FlowId) {
        let id = self.resolve(id);
        let Some(entry) = self.flows.get_mut(&id) else {
            return;
        };
        entry.handle_alive = false;
        if !entry.opened && entry.send_queue.is_empty() {
            // Never seen by the peer: nothing to send.
            entry.send_state = SendState::Closed;
            entry.discarding = true;
            entry.recv_state = RecvState::PeerClosed;
            if let Some(pos) = self.ready.iter().position(|&r| r == id) {
                self.ready.remove(pos);
            }
        }
        self.close_flow(id);
        self.maybe_reap(id);
    }

    /// Wakes whoever waits on flow `id` (its deadline changed).
    pub fn wake_flow(&mut self, id: FlowId) {
        let id = self.resolve(id);
        if let Some(entry) = self.flows.get_mut(&id) {
            wake_opt(&mut entry.read_waker);
            wake_opt(&mut entry.write_waker);
        }
    }

    /// Resolves once flow `id` is closed in both directions, or the
    /// connection closed.
    pub fn poll_flow_closed(&mut self, cx: &mut Context<'_>, id: FlowId) -> Poll<()> {
        let id = self.resolve(id);
        if self.error.is_some() {
            return Poll::Ready(());
        }
        match self.flows.get_mut(&id) {
            None => Poll::Ready(()),
            Some(entry) => {
                let write_done = entry.send_state == SendState::Closed;
                let read_done = entry.recv_state == RecvState::PeerClosed || entry.discarding;
                if write_done && read_done {
                    return Poll::Ready(());
                }
                push_waker(&mut entry.closed_wakers, cx);
                Poll::Pending
            }
        }
    }
}

/// Records that flow `id` received data at `now`.
fn note_receiver(recent: &mut [Option<(FlowId, Instant)>; 2], id: FlowId, now: Instant) {
    match recent[0] {
        Some((first, _)) if first == id => recent[0] = Some((id, now)),
        _ => {
            recent[1] = recent[0];
            recent[0] = Some((id, now));
        }
    }
}

/// A payload small against its frame is copied so it does not keep the whole
/// frame alive.
fn detach(payload: Bytes, frame_len: usize) -> Bytes {
    if frame_len > 4096 && payload.len() * COPY_RATIO < frame_len {
        Bytes::copy_from_slice(&payload)
    } else {
        payload
    }
}

/// When the round trip is next sampled after a sample at `now`. (A clock
/// reading plus a second does not overflow; were it to, the probe would
/// be due at once rather than never.)
fn rtt_probe_after(now: Instant) -> Instant {
    now.checked_add(RTT_PROBE_INTERVAL).unwrap_or(now)
}

/// The error for new flows once the peer entered lame duck.
fn peer_lame_duck() -> Error {
    Error::bad_state("connection is in lame duck: the peer asked for no new flows")
}

fn queue_release(queue: &mut VecDeque<FlowId>, id: FlowId, entry: &mut FlowEntry, tokens: u64) {
    match &mut entry.pending_release {
        Some(pending) => *pending += tokens,
        None => {
            entry.pending_release = Some(tokens);
            queue.push_back(id);
        }
    }
}

fn schedule(ready: &mut VecDeque<FlowId>, id: FlowId, entry: &mut FlowEntry) {
    if !entry.in_ready && entry.is_sendable() {
        entry.in_ready = true;
        ready.push_back(id);
    }
}

enum Emitted {
    Nothing,
    Some {
        passthrough_at: Option<usize>,
    },
    /// A chunk as a frame of its own, perhaps with the payload to follow
    /// it as it is (see [`Chunk::into_frame`]); for a passthrough payload,
    /// only the header's bytes are encrypted.
    OwnFrame(BytesMut, Bytes, Option<usize>),
}

/// Writes the next piece of flow `id` into `buf` (an `OpenFlow` first if
/// the flow is not open on the wire), or hands back a whole chunk as a frame
/// of its own.
fn emit_flow(
    id: FlowId,
    entry: &mut FlowEntry,
    buf: &mut BytesMut,
    max: usize,
    stats: &mut ConnStats,
    spare: &mut Vec<BytesMut>,
) -> Emitted {
    let room = max - buf.len();
    if !entry.opened {
        // Everything queued so far was paid from shared tokens and must ride
        // inside the OpenFlow.
        let payload_len = entry.queued as usize;
        let mut flags = Flags::NONE;
        if entry.side_channel {
            flags = flags | Flags::SIDE_CHANNEL;
        }
        let closing = entry.send_state == SendState::Closing;
        if closing {
            flags = flags | Flags::CLOSE;
        }
        let (blessings_key, discharge_key) = entry.keys().local;
        let open = OpenFlow {
            id,
            initial_tokens: entry.window.outstanding(),
            blessings_key,
            discharge_key,
            flags,
            payload: Bytes::new(),
        };
        if open.header_len(payload_len) + payload_len > room {
            return Emitted::Nothing;
        }
        open.encode_header(payload_len, buf);
        for chunk in entry.send_queue.drain(..) {
            buf.put_slice(chunk.as_slice());
        }
        entry.queued = 0;
        entry.opened = true;
        if closing {
            entry.send_state = SendState::Closed;
        }
        stats.messages_sent += 1;
        stats.bytes_sent += payload_len as u64;
        return Emitted::Some {
            passthrough_at: None,
        };
    }
    let Some(front) = entry.send_queue.front() else {
        // Only the CLOSE is left.
        return emit_close(id, entry, buf, room, stats);
    };
    let len = front.len();
    let last = entry.send_queue.len() == 1;
    let mut flags = entry.data_flags();
    if entry.send_state == SendState::Closing && last {
        flags = flags | Flags::CLOSE;
    }
    let header_len = Data::header_len(id, flags, len);
    if header_len + len > room {
        return Emitted::Nothing;
    }
    let zero_copy = len >= ZERO_COPY_MIN;
    if zero_copy && !buf.is_empty() {
        // Worth a frame of its own: it goes first in the next one.
        return Emitted::Nothing;
    }
    let Some(chunk) = entry.send_queue.pop_front() else {
        return Emitted::Nothing;
    };
    entry.queued -= len as u64;
    if flags.contains(Flags::CLOSE) {
        entry.send_state = SendState::Closed;
    }
    stats.messages_sent += 1;
    stats.bytes_sent += len as u64;
    if zero_copy {
        let mut header = BytesMut::with_capacity(MAX_DATA_HEADER);
        Data::encode_header(id, flags, len, &mut header);
        let encrypted = entry.passthrough.then_some(header.len());
        let (frame, tail) = chunk.into_frame(&header, entry.passthrough);
        return Emitted::OwnFrame(frame, tail, encrypted);
    }
    Data::encode_header(id, flags, len, buf);
    let passthrough_at = entry.passthrough.then_some(buf.len());
    buf.put_slice(chunk.as_slice());
    if let Some(used) = chunk.into_buffer()
        && spare.len() < MAX_SPARE_BUFFERS
        && used.capacity() >= ZERO_COPY_MIN
    {
        spare.push(used);
    }
    Emitted::Some { passthrough_at }
}

fn emit_close(
    id: FlowId,
    entry: &mut FlowEntry,
    buf: &mut BytesMut,
    room: usize,
    stats: &mut ConnStats,
) -> Emitted {
    if entry.send_state != SendState::Closing {
        return Emitted::Some {
            passthrough_at: None,
        };
    }
    if Data::header_len(id, Flags::CLOSE, 0) > room {
        return Emitted::Nothing;
    }
    Data::encode_header(id, Flags::CLOSE, 0, buf);
    entry.send_state = SendState::Closed;
    stats.messages_sent += 1;
    Emitted::Some {
        passthrough_at: None,
    }
}
