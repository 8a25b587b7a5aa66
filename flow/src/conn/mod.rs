//! The connection: an authenticated, encrypted channel multiplexing flows.
//!
//! - [`handshake`]: Noise NN plus channel binding of blessings (sans-I/O).
//! - [`state`]: the sans-I/O multiplexer (flow table, flow control, write
//!   scheduling, health checks, lame duck, teardown).
//! - `cipher`: sealing and opening frames in place after the handshake.
//! - `noise_dh`: X25519 from ring for the Noise handshake.
//! - `flow_control`: window and credit accounting.
//! - `driver`: the tokio reader and writer tasks; [`Conn`].
//! - `clock`: one thread running every connection's health-check clock.
//! - `flow`: the application's [`Flow`] handle.
//! - [`resumption`]: tickets letting a returning dialer skip signatures.
//! - [`config`]: tunables and limits.

mod chunk;
mod cipher;
mod clock;
pub mod config;
mod driver;
mod flow;
mod flow_control;
pub mod handshake;
mod noise_dh;
pub mod resumption;
pub mod state;

pub use cipher::{FRAME_OVERHEAD, FrameOpener, FrameSealer, Suite};
pub use config::ConnConfig;
pub use driver::Conn;
pub use flow::{Delivery, Flow, FlowReader, FlowWriter, MessageSender, MessageSink};
pub use handshake::{HandshakeDone, HandshakeParams};
pub use resumption::TicketStore;
pub use state::{
    BuiltFrame, CONN_BLESSINGS_KEY, ConnState, ConnStats, Established, FlowId, FlowOptions, Role,
};

#[cfg(test)]
mod driver_tests;
#[cfg(test)]
mod resumption_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod test_pipe;
