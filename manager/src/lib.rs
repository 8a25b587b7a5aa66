//! The flow `Manager`: what applications hold to get flows.
//!
//! A [`Manager`] listens ([`Manager::listen`]), accepts flows from every
//! listener and connection ([`Manager::accept`]), dials with a connection
//! cache shared by concurrent dials ([`Manager::dial`],
//! [`Manager::dial_cached`]), pins connections it must keep
//! ([`Manager::pin`]), closes idle ones, and shuts down gracefully
//! ([`Manager::close`]). [`Manager::status`] tells what it listens on and
//! what failed.

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
mod backoff;
mod cache;
mod control_wire;
mod dial_any;
mod flow_conn;
mod manager;
mod pin;
pub mod proxy;
mod proxy_listen;
mod status;

pub use dial_any::HAPPY_EYEBALLS_STAGGER;
pub use flow_conn::{FlowConn, ProxyProtocol};
pub use manager::{DIAL_FAILURE_MEMORY, ListenHandle, Manager, ManagerBuilder};
pub use pin::{PinOptions, PinnedConn};
pub use proxy_listen::{ProxyKeeper, ProxyListenHandle};
pub use status::ListenStatus;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
