//! Naming: routing ids and endpoints.
//!
//! A [`RoutingId`] names a connection manager: 16 random bytes, or
//! [`RoutingId::NULL`] for a dial-only manager (and, inside an endpoint, for
//! "unknown, learn it in the handshake").
//!
//! An [`Endpoint`] says how to reach a manager: protocol, address, routing id,
//! the route of proxy hops still to cross (first hop first; each hop pops
//! one, see [`Endpoint::pop_route`]) and the blessing names the manager is
//! expected to present. Its string form is
//!
//! ```text
//! @1@<protocol>@<address>@<route>@<routing id>@<blessing names>@@
//! ```
//!
//! where `<route>` is the hop ids in hex joined by `,`, `<routing id>` is 32
//! hex characters, `<blessing names>` are joined by `,`, empty lists are empty
//! fields, and `%`, `@` and `,` inside protocol, address and names are written
//! `%25`, `%40` and `%2C`. Every endpoint round-trips exactly through
//! `to_string()` and `parse()`. Parsing also accepts the shorthand
//! `PROTOCOL/ADDRESS` (for example `tcp/127.0.0.1:8100` or `unix//tmp/sock`),
//! whose routing id is null. Blessing names are never empty strings. See
//! [`Endpoint`] for the details.

mod endpoint;
mod routing_id;

pub use endpoint::Endpoint;
pub use routing_id::RoutingId;
