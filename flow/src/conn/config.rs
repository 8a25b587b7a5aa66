//! Tunables and limits of a connection.

use std::sync::Arc;
use std::time::Duration;

use super::resumption::TicketStore;
use crate::security::BlessingPattern;

/// How a connection behaves and what it lets a peer do.
///
/// The defaults suit a general-purpose service; every limit is one the peer
/// cannot grow: going over it closes that connection with a typed error.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// Largest frame this side accepts, in bytes of plaintext. The smaller of
    /// the two sides' values (and the transport's limit) is used.
    pub max_frame: usize,
    /// Bytes of shared credit granted to the peer for the payloads of new
    /// flows (sent inside `OpenFlow`, before the flow is accepted and gets
    /// credit of its own). At most `min_window` is granted, so a flow's
    /// first payload never exceeds the smallest window it can be given.
    pub shared_tokens: u64,
    /// Receive window a new flow starts with, in bytes.
    pub initial_window: u64,
    /// Smallest window a flow is given when the connection budget is spent.
    pub min_window: u64,
    /// Largest window auto-tuning may grow a flow to.
    pub max_window: u64,
    /// Largest window a flow keeps while another flow on the connection is
    /// receiving data too: it bounds what one bulk flow queues ahead of the
    /// others' small messages (latency under load).
    pub contended_window: u64,
    /// Bound on the sum of the receive windows of accepted flows, in bytes.
    /// Once it is spent, flows get `min_window` each; flows not yet accepted
    /// hold only their first payloads, bounded together by the shared
    /// tokens. So this side buffers at most `connection_budget +
    /// accepted flows x min_window + shared tokens` for the connection.
    pub connection_budget: u64,
    /// Most flows open at once on the connection (both directions).
    pub max_flows: usize,
    /// Most flows opened by the peer and not yet accepted by the application.
    pub max_pending_accepts: usize,
    /// Most distinct blessings or discharges the peer may send on the
    /// connection.
    pub max_peer_credentials: usize,
    /// Silence after which the connection is declared dead; a health check is
    /// sent after half of it.
    pub channel_timeout: Duration,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Acceptor: when set, only dialers holding a blessing that matches one
    /// of these patterns see this side's blessings. The acceptor shows just
    /// its public key until the dialer has shown its own blessings, and
    /// refuses dialers that do not match.
    pub blessings_visible_to: Option<Vec<BlessingPattern>>,
    /// Dialer: show this side's blessings first to an acceptor that hides
    /// its own until it sees them (its authorizer still runs before any flow
    /// is opened). Off by default: a dialer normally authorizes the acceptor
    /// before revealing anything.
    pub reveal_to_hidden_acceptors: bool,
    /// Tickets for resuming: connections sharing a store (clones of one
    /// config share it) issue tickets as acceptors and redeem them as
    /// dialers, so a dialer returning to an endpoint binds the new channel
    /// with a secret from the last connection instead of signatures (see
    /// [`super::resumption`]). `None` turns resumption off: every handshake
    /// signs. An acceptor hiding its blessings never issues tickets.
    pub resumption: Option<Arc<TicketStore>>,
}

impl ConnConfig {
    /// The shared tokens actually granted: `shared_tokens`, at most
    /// `min_window`.
    pub fn effective_shared_tokens(&self) -> u64 {
        self.shared_tokens.min(self.min_window)
    }
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_frame: 64 * 1024,
            shared_tokens: 32 * 1024,
            initial_window: 256 * 1024,
            min_window: 32 * 1024,
            max_window: 16 * 1024 * 1024,
            contended_window: 512 * 1024,
            connection_budget: 64 * 1024 * 1024,
            max_flows: 1 << 17,
            max_pending_accepts: 4096,
            max_peer_credentials: 64,
            channel_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            blessings_visible_to: None,
            reveal_to_hidden_acceptors: false,
            resumption: Some(Arc::new(TicketStore::default())),
        }
    }
}
