//! The flow `Manager`: listens, accepts, dials, caches and pins connections.
//!
//! Built by issue 5 on top of the connection and the protocol registry.
