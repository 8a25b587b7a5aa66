//! Protocol registry and transports for flow connections.
//!
//! The transports (tcp, ws, wsh, unix, memory) arrive with issue 4; the
//! traits they implement live in [`flow::registry`].
