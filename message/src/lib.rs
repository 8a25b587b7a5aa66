//! Wire format of the flow transport.
//!
//! Pure data: no I/O and no async. [`Message`] is every message of the
//! protocol; a frame is one or more messages back to back ([`encode_frame`],
//! [`decode_frame`], [`FrameMessages`]). Encoding appends into a caller's
//! [`bytes::BytesMut`]; decoding takes [`bytes::Bytes`] and hands out payloads
//! as slices of it.
//!
//! Decoding never panics and never allocates more than the input justifies:
//! every malformed input gives a [`DecodeError`] naming the message and field.
//! [`codec`] holds the primitives (varints, length-prefixed bytes, a checked
//! reader) that other wire structures, such as blessings, build on.

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

pub mod codec;
mod error;
mod frame;
mod message;

pub use error::{DecodeError, DecodeErrorKind};
pub use frame::{FrameMessages, decode_frame, encode_frame};
pub use message::{
    Auth, BlessingsMsg, Data, DischargesMsg, Flags, Message, OpenFlow, ProxyErrorResponse,
    ProxyResponse, Release, ReleaseMsg, Setup, SetupOption, TearDown, VersionRange, kind, option,
};
