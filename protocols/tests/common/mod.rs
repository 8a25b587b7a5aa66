//! Helpers shared by the integration tests: making listener/conn pairs,
//! deterministic frame data, checksums.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use flow::transport::{Frame, FrameReader, FrameWriter, FramedConn, Listener};
use flow_protocols::{MAX_FRAME_SIZE, Registry};

/// Generous bound for anything that should happen promptly on loopback.
pub const PROMPT: Duration = Duration::from_secs(20);

/// Dial timeout used by the tests.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// One way of listening and dialing.
pub struct Case {
    pub listen_protocol: &'static str,
    pub listen_address: String,
    pub dial_protocol: &'static str,
    /// Keeps a temporary directory (unix sockets) alive for the test.
    _dir: Option<tempfile::TempDir>,
}

impl Case {
    /// A case over IP on loopback; `None` (skip) when the loopback address
    /// of that family is unusable on this machine.
    pub fn net(listen: &'static str, address: &str, dial: &'static str) -> Option<Case> {
        if std::net::TcpListener::bind(address).is_err() {
            eprintln!("skipping: cannot bind {address} here");
            return None;
        }
        Some(Case {
            listen_protocol: listen,
            listen_address: address.to_string(),
            dial_protocol: dial,
            _dir: None,
        })
    }

    /// A unix socket in a fresh temporary directory.
    pub fn unix() -> Option<Case> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("flow.sock");
        Some(Case {
            listen_protocol: "unix",
            listen_address: path.to_string_lossy().into_owned(),
            dial_protocol: "unix",
            _dir: Some(dir),
        })
    }

    /// A Linux abstract unix socket with a fresh name.
    pub fn unix_abstract() -> Option<Case> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        Some(Case {
            listen_protocol: "unix",
            listen_address: format!("@flow-test-{}-{}", std::process::id(), fresh()),
            dial_protocol: "unix",
            _dir: None,
        })
    }

    /// An in-process memory listener with a fresh name.
    pub fn memory() -> Option<Case> {
        Some(Case {
            listen_protocol: "memory",
            listen_address: String::new(),
            dial_protocol: "memory",
            _dir: None,
        })
    }

    /// Starts listening.
    pub async fn listen(&self, registry: &Registry) -> Box<dyn Listener> {
        registry
            .listen(self.listen_protocol, &self.listen_address)
            .await
            .unwrap_or_else(|e| panic!("listen {}: {e}", self.listen_address))
    }

    /// Dials `listener`.
    pub async fn dial(
        &self,
        registry: &Registry,
        listener: &dyn Listener,
    ) -> flow::Result<Box<dyn FramedConn>> {
        registry
            .dial(self.dial_protocol, &listener.local_addr(), DIAL_TIMEOUT)
            .await
    }

    /// A connected pair over the default registry, taken apart: the
    /// dialer's reader and writer, the acceptor's, and the listener (keep
    /// it open).
    pub async fn halves(&self) -> Halves {
        let registry = Registry::with_defaults();
        let Pair {
            listener,
            dialer,
            acceptor,
        } = self.pair(&registry).await;
        (
            dialer.reader,
            dialer.writer,
            acceptor.reader,
            acceptor.writer,
            listener,
        )
    }

    /// A listener and one connection between `dialer` and `acceptor`.
    ///
    /// The dialer speaks first, as flow's dialer does with its setup
    /// message: a `wsh` listener returns a raw tcp connection only once its
    /// first byte has arrived. The greeting is read and checked here.
    pub async fn pair(&self, registry: &Registry) -> Pair {
        let listener = self.listen(registry).await;
        let (dialer, acceptor) = tokio::join!(
            async {
                let conn = self
                    .dial(registry, &*listener)
                    .await
                    .unwrap_or_else(|e| panic!("dial: {e}"));
                let mut end = End::from(conn);
                write(&mut *end.writer, &[Bytes::from_static(GREETING)]).await;
                end
            },
            async {
                let conn = tokio::time::timeout(PROMPT, listener.accept())
                    .await
                    .expect("accept in time")
                    .unwrap_or_else(|e| panic!("accept: {e}"));
                let mut end = End::from(conn);
                let hello = read_n(&mut *end.reader, 1).await;
                assert_eq!(&hello[0][..], GREETING);
                end
            }
        );
        Pair {
            listener,
            dialer,
            acceptor,
        }
    }
}

/// What a dialer sends first in [`Case::pair`].
pub const GREETING: &[u8] = b"hello";

/// A listener and both ends of one connection.
pub struct Pair {
    pub listener: Box<dyn Listener>,
    pub dialer: End,
    pub acceptor: End,
}

/// Both ends of a connected pair, split, and its listener (see
/// [`Case::halves`]).
pub type Halves = (
    Box<dyn FrameReader>,
    Box<dyn FrameWriter>,
    Box<dyn FrameReader>,
    Box<dyn FrameWriter>,
    Box<dyn Listener>,
);

/// One end of a connection, split.
pub struct End {
    pub reader: Box<dyn FrameReader>,
    pub writer: Box<dyn FrameWriter>,
    pub local: String,
    pub remote: String,
    pub max_frame_size: usize,
}

impl From<Box<dyn FramedConn>> for End {
    fn from(conn: Box<dyn FramedConn>) -> End {
        let local = conn.local_addr();
        let remote = conn.remote_addr();
        let max_frame_size = conn.max_frame_size();
        let (reader, writer) = conn.split();
        End {
            reader,
            writer,
            local,
            remote,
            max_frame_size,
        }
    }
}

fn fresh() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// xorshift64*: deterministic, fast, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes to cut frames from: twice the maximum frame, random.
pub fn pool(seed: u64) -> Bytes {
    let mut rng = Rng::new(seed);
    let mut data = Vec::with_capacity(2 * MAX_FRAME_SIZE);
    while data.len() < 2 * MAX_FRAME_SIZE {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    Bytes::from(data)
}

/// A frame of `len` bytes cut from `pool` at a place chosen by `rng`.
pub fn cut(pool: &Bytes, rng: &mut Rng, len: usize) -> Bytes {
    let start = rng.below(pool.len() - len + 1);
    pool.slice(start..start + len)
}

/// A frame of `len` bytes that says which frame it is.
pub fn numbered(index: usize, len: usize) -> Bytes {
    let mut data = Vec::with_capacity(len);
    let tag = (index as u64).to_le_bytes();
    while data.len() < len {
        let room = (len - data.len()).min(tag.len());
        data.extend_from_slice(&tag[..room]);
    }
    Bytes::from(data)
}

/// A frame's bytes as the reader must see them: head, then tail.
pub fn joined(frame: &Frame) -> Vec<u8> {
    let mut bytes = frame.head().to_vec();
    bytes.extend_from_slice(frame.tail());
    bytes
}

/// An order-sensitive checksum of a sequence of frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub frames: u64,
    pub bytes: u64,
    pub hash: u64,
}

impl Checksum {
    pub fn add(&mut self, frame: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01B3;
        let mut h = 0xCBF2_9CE4_8422_2325 ^ frame.len() as u64;
        let words = frame.chunks_exact(8);
        let tail = words.remainder();
        for word in words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
        }
        for &b in tail {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
        self.frames += 1;
        self.bytes += frame.len() as u64;
        self.hash = self.hash.rotate_left(7).wrapping_mul(PRIME) ^ h;
    }
}

/// Reads exactly `n` frames, failing the test on error or early end.
pub async fn read_n(reader: &mut dyn FrameReader, n: usize) -> Vec<bytes::BytesMut> {
    let mut frames = Vec::with_capacity(n);
    for i in 0..n {
        match tokio::time::timeout(PROMPT, reader.read_frame()).await {
            Ok(Ok(Some(frame))) => frames.push(frame),
            Ok(Ok(None)) => panic!("stream ended after {i} of {n} frames"),
            Ok(Err(e)) => panic!("read frame {i} of {n}: {e}"),
            Err(_) => panic!("frame {i} of {n} did not arrive in time"),
        }
    }
    frames
}

/// Asserts the next read is a clean end of stream.
pub async fn expect_end(reader: &mut dyn FrameReader) {
    match tokio::time::timeout(PROMPT, reader.read_frame()).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(frame))) => panic!("expected end of stream, got a frame of {}", frame.len()),
        Ok(Err(e)) => panic!("expected end of stream, got {e}"),
        Err(_) => panic!("end of stream not seen in time"),
    }
}

/// Writes `frames` (each a frame without a tail) in one call, failing the
/// test on error.
pub async fn write(writer: &mut dyn FrameWriter, frames: &[Bytes]) {
    let frames: Vec<Frame> = frames.iter().cloned().map(Frame::from).collect();
    write_frames(writer, &frames).await;
}

/// Writes `frames` in one call, failing the test on error.
pub async fn write_frames(writer: &mut dyn FrameWriter, frames: &[Frame]) {
    tokio::time::timeout(PROMPT, writer.write_frames(frames))
        .await
        .expect("write in time")
        .unwrap_or_else(|e| panic!("write: {e}"));
}
