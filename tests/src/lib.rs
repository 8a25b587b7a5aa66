//! Helpers shared by the end-to-end tests in `tests/tests/`: identities,
//! authenticated connection pairs over real TCP on loopback, echo servers,
//! deterministic data patterns with checksums, a hand-driven adversarial
//! peer, and guards that turn hangs and stray panics into failures.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use flow::auth::{AllowEveryone, PeerAuthorizer};
use flow::conn::handshake::Dialer;
use flow::conn::{
    Conn, ConnConfig, FRAME_OVERHEAD, Flow, FlowOptions, FrameOpener, FrameSealer, HandshakeParams,
};
use flow::message::Message;
use flow::naming::{Endpoint, RoutingId};
use flow::security::Principal;
use flow::transport::{FrameReader, FrameWriter, Listener};
use flow::{Error, ErrorKind, Result};
use flow_protocols::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Limit for steps that should take well under a second: generous, only
/// there to turn a hang into a failure.
pub const SHORT: Duration = Duration::from_secs(20);

/// Limit for the bulk tests (gigabytes, hundreds of thousands of flows).
pub const LONG: Duration = Duration::from_secs(300);

/// Runs `fut`, panicking if it has not finished within `limit`.
///
/// The timer is polled first (`biased`), so a future that missed a wake-up
/// cannot be rescued by being polled one last time when the timer fires, as
/// it can be under `tokio::time::timeout`.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(limit) => panic!("did not finish within {limit:?}"),
        out = fut => out,
    }
}

/// Polls `cond` every few milliseconds until it holds, panicking after
/// `limit` with `what` in the message.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The names of threads on which a panic happened since the process started.
fn panicked_threads() -> &'static Mutex<HashSet<String>> {
    static PANICKED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    PANICKED.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name() {
                panicked_threads()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name.to_string());
            }
            previous(info);
        }));
        Mutex::new(HashSet::new())
    })
}

/// Starts recording panics by thread. Call at the start of a test that runs
/// on a current-thread runtime (the default of `#[tokio::test]`): every task
/// it spawns then runs on the test's own thread, so
/// [`assert_no_panics`] sees a panic in any of them — one tokio would
/// otherwise swallow.
pub fn watch_panics() {
    let _ = panicked_threads();
}

/// Fails if any code on this thread panicked since [`watch_panics`].
pub fn assert_no_panics() {
    let name = std::thread::current().name().unwrap_or("").to_string();
    let seen = panicked_threads()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&name);
    assert!(!seen, "a task of this test panicked (see the output above)");
}

/// The process-wide protocol registry (tcp, unix, ws, ...).
pub fn registry() -> &'static Registry {
    flow_protocols::default_registry()
}

/// A principal with a fresh key and a self-signed blessing `name`.
pub fn principal(name: &str) -> Principal {
    Principal::with_self_blessing(name).expect("self blessing")
}

/// Handshake parameters for `principal`, trusting everyone, with the
/// default connection configuration.
pub fn params(principal: &Principal) -> HandshakeParams {
    params_with(principal, Arc::new(AllowEveryone), ConnConfig::default())
}

/// Handshake parameters for `principal` with `authorizer` and `config`.
pub fn params_with(
    principal: &Principal,
    authorizer: Arc<dyn PeerAuthorizer>,
    config: ConnConfig,
) -> HandshakeParams {
    HandshakeParams {
        config,
        principal: principal.clone(),
        authorizer,
        local_endpoint: Endpoint::new("tcp", "").with_routing_id(RoutingId::random()),
        transport_max_frame: flow_protocols::MAX_FRAME_SIZE,
    }
}

/// Dials `addr` over tcp with the registry and runs the dialer's handshake.
pub async fn dial(addr: &str, mut params: HandshakeParams) -> Result<Conn> {
    let transport = registry().dial("tcp", addr, SHORT).await?;
    params.transport_max_frame = transport.max_frame_size();
    Conn::dial(transport, params, Endpoint::new("tcp", addr)).await
}

/// A tcp listener on loopback whose every connection runs the acceptor's
/// handshake; the outcomes queue up for [`TestServer::next`].
pub struct TestServer {
    addr: String,
    listener: Arc<dyn Listener>,
    outcomes: mpsc::UnboundedReceiver<Result<Conn>>,
    accept_loop: JoinHandle<()>,
}

impl TestServer {
    /// Listens on `127.0.0.1:0` and accepts with `params`.
    pub async fn start(params: HandshakeParams) -> TestServer {
        let listener: Arc<dyn Listener> = registry()
            .listen("tcp", "127.0.0.1:0")
            .await
            .expect("listen on loopback")
            .into();
        let addr = listener.local_addr();
        let (tx, outcomes) = mpsc::unbounded_channel();
        let accepting = listener.clone();
        let accept_loop = tokio::spawn(async move {
            while let Ok(transport) = accepting.accept().await {
                let mut params = params.clone();
                params.transport_max_frame = transport.max_frame_size();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Conn::accept(transport, params).await);
                });
            }
        });
        TestServer {
            addr,
            listener,
            outcomes,
            accept_loop,
        }
    }

    /// The address to dial.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The outcome of the next acceptor handshake to finish.
    pub async fn next(&mut self) -> Result<Conn> {
        within(SHORT, self.outcomes.recv())
            .await
            .expect("the accept loop ended")
    }

    /// Dials this server with `params`; returns both ends.
    pub async fn connect(&mut self, params: HandshakeParams) -> (Conn, Conn) {
        let addr = self.addr.clone();
        let dialer = within(SHORT, dial(&addr, params))
            .await
            .expect("dial the test server");
        let acceptor = self.next().await.expect("acceptor handshake");
        (dialer, acceptor)
    }

    /// Shows the server still serves: a fresh, well-behaved client connects,
    /// and a flow echoes through it.
    pub async fn assert_still_serves(&mut self) {
        let (dialer, acceptor) = self.connect(params(&principal("good-client"))).await;
        let echo = spawn_echo(acceptor.clone());
        let mut flow = dialer.open_flow(FlowOptions::default()).expect("open flow");
        within(SHORT, async {
            flow.write_msg_and_close(&[b"still ", b"serving"])
                .await
                .expect("write");
            assert_eq!(
                read_to_end(&mut flow).await.expect("read"),
                b"still serving"
            );
        })
        .await;
        dialer.close("done");
        echo.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.listener.close();
    }
}

/// An authenticated connection pair over tcp on loopback: (dialer, acceptor),
/// identities `alice` and `bob`, default configuration.
pub async fn conn_pair() -> (Conn, Conn) {
    conn_pair_with(ConnConfig::default(), ConnConfig::default()).await
}

/// [`conn_pair`] with a configuration for each side.
pub async fn conn_pair_with(dialer: ConnConfig, acceptor: ConnConfig) -> (Conn, Conn) {
    let bob = principal("bob");
    let mut server = TestServer::start(params_with(&bob, Arc::new(AllowEveryone), acceptor)).await;
    let alice = principal("alice");
    server
        .connect(params_with(&alice, Arc::new(AllowEveryone), dialer))
        .await
}

/// Echoes one flow: every chunk read is written back; when the peer
/// half-closes, half-closes back. Returns the bytes echoed.
pub async fn echo_flow(mut flow: Flow) -> Result<u64> {
    let mut echoed = 0u64;
    while let Some(chunk) = flow.read_msg().await? {
        flow.write_msg(&[&chunk]).await?;
        echoed += chunk.len() as u64;
    }
    flow.close_write();
    Ok(echoed)
}

/// Accepts every flow the peer opens on `conn` and echoes each in its own
/// task, until the connection closes.
pub fn spawn_echo(conn: Conn) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(flow) = conn.accept_flow().await {
            tokio::spawn(echo_flow(flow));
        }
    })
}

/// Reads `flow` until the peer half-closes it.
pub async fn read_to_end(flow: &mut Flow) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A deterministic pseudo-random byte stream (xorshift64*): both ends of a
/// test generate the same bytes from the same seed, so nothing large has to
/// be held in memory to check a transfer.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            // Never zero, and different seeds far apart.
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    /// The next 64 bits of the underlying generator.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut at = 0;
        while self.used < 8 && at < buf.len() {
            buf[at] = self.word[self.used];
            self.used += 1;
            at += 1;
        }
        let mut words = buf[at..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_u64().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Pattern::new(seed).fill(&mut out);
        out
    }
}

/// A running checksum (FNV-1a over little-endian 64-bit words, plus the
/// length) whose value does not depend on how the bytes were split.
#[derive(Debug, Clone)]
pub struct Checksum {
    hash: u64,
    pending: [u8; 8],
    npending: usize,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

impl Checksum {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// An empty checksum.
    pub fn new() -> Checksum {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            npending: 0,
            len: 0,
        }
    }

    fn mix(&mut self, word: u64) {
        self.hash = (self.hash ^ word).wrapping_mul(Self::PRIME);
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        let mut rest = data;
        if self.npending > 0 {
            let take = (8 - self.npending).min(rest.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&rest[..take]);
            self.npending += take;
            rest = &rest[take..];
            if self.npending < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.mix(u64::from_le_bytes(word));
        }
        let tail = words.remainder();
        self.pending[..tail.len()].copy_from_slice(tail);
        self.npending = tail.len();
    }

    /// The (length, hash) of everything added.
    pub fn finish(&self) -> (u64, u64) {
        let mut hash = self.hash;
        for &b in &self.pending[..self.npending] {
            hash = (hash ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        (self.len, hash ^ self.len)
    }
}

/// How a [`RawPeer`] reaches the server.
enum RawIo {
    /// A framed tcp connection from the registry.
    Framed(Box<dyn FrameReader>, Box<dyn FrameWriter>),
    /// A bare socket with hand-made length-prefixed framing, so the peer
    /// can also write broken frames.
    Stream(TcpStream),
}

/// A hand-written dialer: runs the dialer's handshake by hand, then speaks
/// raw messages in frames it seals itself (or raw bytes), to play a hostile
/// or broken peer against a real acceptor.
pub struct RawPeer {
    io: RawIo,
    /// This side's channel binding (Blessings, optional Discharges, Auth), which
    /// must lead the first sealed frame; tests may tamper with it first.
    pub binding: Vec<Message>,
    /// Seals this side's frames.
    pub sealer: FrameSealer,
    opener: FrameOpener,
}

/// The length prefix of a tcp frame.
const PREFIX_LEN: usize = 4;

impl RawPeer {
    /// Dials `addr` with the registry's tcp as `principal` and completes the
    /// dialer's handshake up to (not including) sending its binding.
    pub async fn connect(addr: &str, principal: &Principal) -> Result<RawPeer> {
        let transport = registry().dial("tcp", addr, SHORT).await?;
        let max = transport.max_frame_size();
        let (reader, writer) = transport.split();
        RawPeer::handshake(RawIo::Framed(reader, writer), addr, principal, max).await
    }

    /// Like [`RawPeer::connect`] over a bare socket with hand-made framing,
    /// so that [`RawPeer::send_bytes`] can write partial frames.
    pub async fn connect_stream(addr: &str, principal: &Principal) -> Result<RawPeer> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::network(format!("connect {addr}: {e}")))?;
        stream.set_nodelay(true).ok();
        RawPeer::handshake(
            RawIo::Stream(stream),
            addr,
            principal,
            flow_protocols::MAX_FRAME_SIZE,
        )
        .await
    }

    async fn handshake(
        mut io: RawIo,
        addr: &str,
        principal: &Principal,
        max_frame: usize,
    ) -> Result<RawPeer> {
        let mut hs = params(principal);
        hs.transport_max_frame = max_frame;
        let (mut dialer, hello) = Dialer::start(hs, Endpoint::new("tcp", addr), Instant::now())?;
        write_frame(&mut io, hello).await?;
        let answer = read_frame(&mut io).await?.ok_or_else(|| eof("answer"))?;
        dialer.on_response(answer, Instant::now())?;
        let binding = read_frame(&mut io).await?.ok_or_else(|| eof("binding"))?;
        let done = match dialer.on_binding(binding, SystemTime::now())? {
            flow::conn::handshake::DialerStep::Done(done) => *done,
            flow::conn::handshake::DialerStep::Reveal { .. } => {
                return Err(flow::Error::bad_state(
                    "the raw peer does not reveal itself to hidden acceptors",
                ));
            }
        };
        Ok(RawPeer {
            io,
            binding: done.initial_messages,
            sealer: done.sealer,
            opener: done.opener,
        })
    }

    /// Seals `plaintext` as the next frame.
    pub fn seal(&mut self, plaintext: &[u8]) -> Bytes {
        self.sealer.seal_to_bytes(plaintext).expect("seal")
    }

    /// Seals a frame whose first `encrypted_len` bytes of `plaintext` are
    /// encrypted and the rest sent in the clear (the passthrough layout).
    pub fn seal_partial(&mut self, plaintext: &[u8], encrypted_len: usize) -> Bytes {
        let mut frame = BytesMut::zeroed(FRAME_OVERHEAD);
        frame.extend_from_slice(plaintext);
        self.sealer.seal(&mut frame, encrypted_len).expect("seal");
        frame.freeze()
    }

    /// Seals `msgs` as the next frame.
    pub fn seal_msgs(&mut self, msgs: &[Message]) -> Bytes {
        let plain = encode(msgs);
        self.seal(&plain)
    }

    /// The first frame: the (possibly tampered) binding followed by `msgs`.
    pub fn first_frame(&mut self, msgs: &[Message]) -> Bytes {
        let mut all = self.binding.clone();
        all.extend_from_slice(msgs);
        self.seal_msgs(&all)
    }

    /// Writes one transport frame as is.
    pub async fn send_frame(&mut self, frame: Bytes) -> Result<()> {
        write_frame(&mut self.io, frame).await
    }

    /// Seals `msgs` into one frame and writes it.
    pub async fn send(&mut self, msgs: &[Message]) -> Result<()> {
        let frame = self.seal_msgs(msgs);
        self.send_frame(frame).await
    }

    /// Writes `bytes` straight to the socket, outside any framing (bare
    /// socket peers only).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.io {
            RawIo::Stream(s) => s
                .write_all(bytes)
                .await
                .map_err(|e| Error::network(e.to_string())),
            RawIo::Framed(..) => Err(Error::bad_state("send_bytes needs connect_stream")),
        }
    }

    /// Ends this side's writing (the server reads end of stream).
    pub async fn shutdown(&mut self) {
        match &mut self.io {
            RawIo::Stream(s) => {
                let _ = s.shutdown().await;
            }
            RawIo::Framed(_, w) => {
                let _ = w.close().await;
            }
        }
    }

    /// Reads and opens the next frame from the server; `None` at end of
    /// stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<Message>>> {
        let Some(frame) = read_frame(&mut self.io).await? else {
            return Ok(None);
        };
        let (plain, _) = self.opener.open(frame)?;
        Ok(Some(flow_message::decode_frame(plain)?))
    }

    /// Reads until the server's `TearDown` and returns its reason; `None` if
    /// the stream ends (or fails) without one.
    pub async fn teardown_reason(&mut self) -> Option<String> {
        loop {
            match self.recv().await {
                Ok(Some(msgs)) => {
                    for msg in msgs {
                        if let Message::TearDown(td) = msg {
                            return Some(td.reason);
                        }
                    }
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

async fn write_frame(io: &mut RawIo, frame: Bytes) -> Result<()> {
    match io {
        RawIo::Framed(_, w) => w.write_frames(&[frame.into()]).await,
        RawIo::Stream(s) => {
            let len = u32::try_from(frame.len()).expect("frame length");
            let mut out = Vec::with_capacity(PREFIX_LEN + frame.len());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&frame);
            s.write_all(&out)
                .await
                .map_err(|e| Error::network(e.to_string()))
        }
    }
}

async fn read_frame(io: &mut RawIo) -> Result<Option<BytesMut>> {
    match io {
        RawIo::Framed(r, _) => r.read_frame().await,
        RawIo::Stream(s) => {
            let mut prefix = [0u8; PREFIX_LEN];
            match s.read_exact(&mut prefix).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(Error::network(e.to_string())),
            }
            let mut frame = BytesMut::zeroed(u32::from_be_bytes(prefix) as usize);
            s.read_exact(&mut frame)
                .await
                .map_err(|e| Error::network(e.to_string()))?;
            Ok(Some(frame))
        }
    }
}

fn eof(what: &str) -> Error {
    Error::network(format!("server closed the connection before its {what}"))
}

/// The plaintext of a frame holding `msgs`.
pub fn encode(msgs: &[Message]) -> BytesMut {
    let mut buf = BytesMut::new();
    flow_message::encode_frame(msgs, &mut buf);
    buf
}

/// Asserts `err` is of `kind` and mentions `needle`.
#[track_caller]
pub fn assert_error(err: &Error, kind: ErrorKind, needle: &str) {
    assert_eq!(err.kind(), kind, "unexpected kind of error: {err}");
    assert!(
        err.message().contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}
