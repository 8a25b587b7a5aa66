//! Feeds arbitrary decrypted frames to a connection's multiplexer
//! (`flow::conn::ConnState`) as the acceptor, right after a completed
//! handshake, interleaved with the operations an application performs
//! (accept, read, write, half-close, close, drop) and with the writer asking
//! for frames. Nothing may panic, and every frame the state machine builds
//! must decode.
//!
//! Input layout (everything past the end of the input is simply absent):
//!
//! ```text
//! [frame count: u8]
//! then per frame:
//!   [op: u8]          which flow operations run after the frame (bits)
//!   [len: u16 BE]     length of the frame's plaintext (clamped to what is left)
//!   [tail: u8]        < 0x80: all `len` bytes count as encrypted;
//!                     else encrypted_len = len * (tail - 0x80) / 127
//!   [plaintext: len bytes]
//! ```
//!
//! Seeds with well-formed messages are in `seeds/conn_frames/`:
//! `cargo fuzz run conn_frames corpus/conn_frames seeds/conn_frames`.
#![no_main]

use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flow::conn::{ConnConfig, ConnState, Established, FlowId, FlowOptions, Role};
use flow::security::{Blessings, Discharges};
use libfuzzer_sys::fuzz_target;

/// Flow handles the simulated application holds at most.
const MAX_HANDLES: usize = 64;
/// Frames one drain may take before the state machine counts as stuck.
const MAX_DRAIN: usize = 100_000;

/// Small limits, so that fuzzed input can reach every one of them.
fn config() -> ConnConfig {
    ConnConfig {
        max_frame: 16 * 1024,
        shared_tokens: 4096,
        initial_window: 8192,
        min_window: 1024,
        max_window: 64 * 1024,
        connection_budget: 64 * 1024,
        max_flows: 48,
        max_pending_accepts: 16,
        max_peer_credentials: 4,
        channel_timeout: Duration::from_secs(30),
        ..ConnConfig::default()
    }
}

fn established() -> Established {
    Established {
        role: Role::Acceptor,
        version: 1,
        max_frame: 16 * 1024,
        max_recv_frame: 16 * 1024,
        peer_shared_tokens: 4096,
        rtt: Duration::from_millis(1),
        local_blessings: Blessings::empty(),
        local_discharges: Discharges::new(),
        remote_blessings: Blessings::empty(),
        remote_discharges: Discharges::new(),
    }
}

/// Reads the input front to back.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

/// The simulated application and writer around one `ConnState`.
struct Harness {
    state: ConnState,
    now: Instant,
    handles: Vec<FlowId>,
    scratch: Vec<u8>,
}

impl Harness {
    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// Asks for frames until there are none; each must decode.
    fn drain(&mut self) {
        for _ in 0..MAX_DRAIN {
            let mut buf = BytesMut::new();
            let Some(built) = self.state.build_frame(self.now, &mut buf) else {
                return;
            };
            if buf.is_empty() {
                // The frame went into a buffer of its own (a whole chunk
                // sent without copying), which this target does not see.
                continue;
            }
            assert!(
                built.encrypted_len <= buf.len(),
                "encrypted_len {} beyond the frame's {} bytes",
                built.encrypted_len,
                buf.len()
            );
            let frame = buf.freeze();
            if let Err(e) = flow_message::decode_frame(frame.clone()) {
                panic!("built a frame that does not decode: {e}: {frame:?}");
            }
        }
        panic!("build_frame never ran dry");
    }

    fn accept_all(&mut self) {
        while self.handles.len() < MAX_HANDLES {
            match self.state.poll_accept(&mut Self::cx()) {
                Poll::Ready(Ok(id)) => self.handles.push(id),
                Poll::Ready(Err(_)) | Poll::Pending => return,
            }
        }
    }

    fn read_some(&mut self, max: usize) {
        for &id in self.handles.iter().take(8) {
            // Read until the flow has nothing more for now.
            for _ in 0..64 {
                match self.state.poll_read(&mut Self::cx(), || self.now, id, max) {
                    Poll::Ready(Ok(Some(chunk))) => {
                        assert!(chunk.len() <= max, "read {} > max {max}", chunk.len());
                    }
                    _ => break,
                }
            }
        }
    }

    fn write(&mut self, pick: usize, len: usize) {
        if self.handles.is_empty() {
            return;
        }
        let id = self.handles[pick % self.handles.len()];
        self.scratch.resize(len, 0xab);
        let half = len / 2;
        let bufs: [&[u8]; 2] = [&self.scratch[..half], &self.scratch[half..]];
        if let Poll::Ready(Ok(n)) = self.state.poll_write(&mut Self::cx(), id, &bufs) {
            assert!(n <= len, "wrote {n} of {len} bytes");
        }
        let _ = self.state.poll_flush(&mut Self::cx(), id);
    }

    fn open_local(&mut self, len: usize) {
        if self.handles.len() >= MAX_HANDLES {
            return;
        }
        let opts = FlowOptions {
            side_channel: len % 3 == 0,
            blessings: None,
        };
        if let Ok(id) = self.state.open_flow(opts) {
            self.handles.push(id);
            self.write(self.handles.len() - 1, len);
        }
    }

    fn remove(&mut self, pick: usize) -> Option<FlowId> {
        if self.handles.is_empty() {
            return None;
        }
        Some(self.handles.swap_remove(pick % self.handles.len()))
    }

    /// Runs the operations `op` selects.
    fn operate(&mut self, op: u8) {
        let pick = op as usize;
        if op & 0x01 != 0 {
            self.accept_all();
        }
        if op & 0x02 != 0 {
            self.read_some(1 + pick * 257);
        }
        if op & 0x04 != 0 {
            self.write(pick, pick * 97);
        }
        if op & 0x08 != 0 {
            self.drain();
        }
        if op & 0x10 != 0 {
            self.open_local(pick * 31);
        }
        if op & 0x20 != 0
            && let Some(&id) = self.handles.get(pick % self.handles.len().max(1))
        {
            self.state.close_write(id);
        }
        if op & 0x40 != 0
            && let Some(&id) = self.handles.get((pick / 3) % self.handles.len().max(1))
        {
            self.state.close_flow(id);
        }
        if op & 0x80 != 0
            && let Some(id) = self.remove(pick / 5)
        {
            self.state.drop_flow(id);
        }
        // Time moves on; 0xff jumps past the channel timeout.
        let step = if op == 0xff {
            Duration::from_secs(60)
        } else {
            Duration::from_millis(u64::from(op >> 4) * 1000)
        };
        self.now += step;
        if let Some(deadline) = self.state.poll_timeout() {
            if deadline <= self.now {
                self.state.handle_timeout(self.now);
            }
        }
        let stats = self.state.stats();
        assert_eq!(stats.flows_open as usize, self.state.flow_count());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data };
    let Some(count) = input.u8() else {
        return;
    };
    let now = Instant::now();
    let mut h = Harness {
        state: ConnState::new(config(), established(), now),
        now,
        handles: Vec::new(),
        scratch: Vec::new(),
    };
    for _ in 0..count {
        let (Some(op), Some(len), Some(tail)) = (input.u8(), input.u16(), input.u8()) else {
            break;
        };
        let plain = input.take(len as usize);
        let len = plain.len();
        let encrypted_len = if tail < 0x80 {
            len
        } else {
            len * usize::from(tail - 0x80) / 127
        };
        let _ = h
            .state
            .handle_frame(h.now, Bytes::copy_from_slice(plain), encrypted_len);
        h.operate(op);
    }
    // The application lets go of everything; the connection must wind down.
    h.drain();
    for id in std::mem::take(&mut h.handles) {
        h.state.drop_flow(id);
    }
    h.drain();
    h.state.close("fuzz input done");
    h.drain();
    assert!(h.state.is_finished(), "closed connection not finished");
});
