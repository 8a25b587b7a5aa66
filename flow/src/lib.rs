//! flow: many independent, ordered, flow-controlled, authenticated byte
//! streams ("flows") multiplexed over one encrypted connection.
//!
//! This crate holds the public types every other piece shares: [`Error`],
//! [`naming`] (routing ids and endpoints) and [`security`] (principals,
//! blessings, caveats, authorizers).

pub mod auth;
pub mod conn;
pub mod error;

pub use error::{Error, ErrorKind, Result};
pub use flow_message as message;
pub mod naming;
pub mod security;
pub mod transport;
