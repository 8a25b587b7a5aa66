//! Protocol registry and transports for flow connections.
//!
//! Every way a flow connection can travel sits behind one [`Registry`], which
//! maps protocol names to implementations of [`flow::transport::Protocol`]:
//!
//! | names | transport | frame format |
//! | --- | --- | --- |
//! | `tcp`, `tcp4`, `tcp6` | [`tcp::TcpProtocol`] | 4-byte big-endian length, then the frame |
//! | `ws`, `ws4`, `ws6` | [`ws::WsProtocol`] | one binary WebSocket message per frame |
//! | `wsh`, `wsh4`, `wsh6` | [`wsh::WshProtocol`] | either of the above, told apart by the first byte |
//! | `unix` | [`unix::UnixProtocol`] | as tcp |
//! | `memory` | [`memory::MemoryProtocol`] | frames handed over as `Bytes` |
//!
//! Every transport carries frames of at most [`MAX_FRAME_SIZE`] bytes and
//! reports that number from [`FramedConn::max_frame_size`].
//!
//! Listeners of the socket transports accept in a background task per
//! listener: transient accept failures (out of file descriptors, a peer that
//! went away) are retried with backoff, and per-connection handshakes
//! (WebSocket upgrade, `wsh` sniffing) run concurrently under a timeout, so
//! a slow or silent peer never holds up other connections.
//!
//! [`FramedConn::max_frame_size`]: flow::transport::FramedConn::max_frame_size

// Peer input must never panic this code: no unwrap, expect or panic
// outside tests (a peer's bad bytes get a typed error instead).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::unreachable
    )
)]

mod accept;
mod framing;
pub mod memory;
pub mod pressure;
mod registry;
pub mod tcp;
#[cfg(unix)]
pub mod unix;
pub mod ws;
pub mod wsh;

use std::time::Duration;

pub use registry::{Registry, default_registry};

/// The largest frame any transport of this crate carries: 1 MiB.
///
/// With the 4-byte big-endian length prefix of the stream transports, the
/// first byte of every valid raw frame is therefore `0x00`, which is how a
/// `wsh` listener tells raw framing from an HTTP request (whose first byte is
/// an upper-case ASCII letter).
pub const MAX_FRAME_SIZE: usize = 1 << 20;

/// How long a listener gives one accepted connection to finish its
/// transport-level handshake (WebSocket upgrade, `wsh` sniffing) before
/// dropping it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// A raw frame's length prefix must never start with an HTTP method's first
// letter: see `wsh`.
const _: () = assert!(MAX_FRAME_SIZE >> 24 < b'A' as usize);
const _: () = assert!(MAX_FRAME_SIZE <= u32::MAX as usize);
