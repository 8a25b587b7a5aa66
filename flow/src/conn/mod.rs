//! The connection: an authenticated, encrypted channel multiplexing flows.
//!
//! - [`state`]: the sans-I/O multiplexer (flow table, flow control, write
//!   scheduling, health checks, lame duck, teardown).
//! - `flow_control`: window and credit accounting.
//! - [`config`]: tunables and limits.

pub mod config;
mod flow_control;
pub mod state;

pub use config::ConnConfig;
pub use state::{
    BuiltFrame, CONN_BLESSINGS_KEY, ConnState, ConnStats, Established, FlowId, FlowOptions, Role,
};
#[cfg(test)]
mod state_tests;
