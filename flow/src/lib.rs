//! flow: many independent, ordered, flow-controlled, authenticated byte
//! streams ("flows") multiplexed over one encrypted connection.
//!
//! This crate holds the public types every other piece shares: [`Error`],
//! [`naming`] (routing ids and endpoints) and [`security`] (principals,
//! blessings, caveats, authorizers).

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

pub mod auth;
pub mod conn;
pub mod error;

pub use error::{Error, ErrorKind, Result};
pub use flow_message as message;
pub mod naming;
pub mod security;
pub mod transport;
