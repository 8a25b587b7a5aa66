//! The connection cache: established connections by routing id and by
//! (protocol, address), with pin counts and least-recently-used eviction.
//!
//! Closed connections are dropped lazily, on lookup and by the reaper, so no
//! task watches each connection.

use std::collections::HashMap;
use std::time::Instant;

use flow::conn::Conn;
use flow::naming::{Endpoint, RoutingId};

/// How a connection was made, for the cache's address index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AddrKey {
    pub(crate) protocol: String,
    pub(crate) address: String,
}

impl AddrKey {
    pub(crate) fn of(ep: &Endpoint) -> Self {
        AddrKey {
            protocol: ep.protocol().to_string(),
            address: ep.address().to_string(),
        }
    }
}

struct Entry {
    conn: Conn,
    addrs: Vec<AddrKey>,
    rid: RoutingId,
    pins: usize,
}

/// Every connection the manager holds.
#[derive(Default)]
pub(crate) struct ConnCache {
    entries: HashMap<u64, Entry>,
    next_id: u64,
}

impl ConnCache {
    /// Adds `conn`, reachable at `addrs` and by the peer's routing id.
    pub(crate) fn insert(&mut self, conn: Conn, addrs: Vec<AddrKey>) {
        if self.entries.values().any(|e| e.conn == conn) {
            return;
        }
        let rid = conn.remote_endpoint().routing_id();
        self.next_id += 1;
        self.entries.insert(
            self.next_id,
            Entry {
                conn,
                addrs,
                rid,
                pins: 0,
            },
        );
    }

    /// Open connections usable for new flows to `remote`: the peer's routing
    /// id matches (when `remote` names one), or the connection was made to
    /// one of `addrs`.
    pub(crate) fn candidates(&mut self, remote: &Endpoint, addrs: &[AddrKey]) -> Vec<Conn> {
        self.entries.retain(|_, e| !e.conn.is_closed());
        let rid = remote.routing_id();
        self.entries
            .values()
            .filter(|e| !e.conn.is_peer_lame_duck())
            .filter(|e| {
                if !rid.is_null() {
                    e.rid == rid
                } else {
                    e.addrs.iter().any(|a| addrs.contains(a))
                }
            })
            .map(|e| e.conn.clone())
            .collect()
    }

    /// Changes the pin count of `conn` by `delta`.
    pub(crate) fn pin(&mut self, conn: &Conn, delta: isize) {
        if let Some(e) = self.entries.values_mut().find(|e| e.conn == *conn) {
            e.pins = e.pins.saturating_add_signed(delta);
        }
    }

    /// Whether `conn` is pinned.
    pub(crate) fn is_pinned(&self, conn: &Conn) -> bool {
        self.entries.values().any(|e| e.conn == *conn && e.pins > 0)
    }

    /// Unpinned idle connections unused since before `cutoff`; they leave
    /// the cache.
    pub(crate) fn take_expired(&mut self, cutoff: Instant) -> Vec<Conn> {
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pins == 0 && e.conn.is_idle() && e.conn.last_used() < cutoff)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.entries.remove(&id).map(|e| e.conn))
            .collect()
    }

    /// Up to `n` unpinned idle connections, least recently used first; they
    /// leave the cache.
    pub(crate) fn take_lru_idle(&mut self, n: usize) -> Vec<Conn> {
        let mut idle: Vec<(Instant, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.pins == 0 && e.conn.is_idle())
            .map(|(id, e)| (e.conn.last_used(), *id))
            .collect();
        idle.sort();
        idle.into_iter()
            .take(n)
            .filter_map(|(_, id)| self.entries.remove(&id).map(|e| e.conn))
            .collect()
    }

    /// Drops closed connections.
    pub(crate) fn sweep(&mut self) {
        self.entries.retain(|_, e| !e.conn.is_closed());
    }

    /// Every connection.
    pub(crate) fn all(&self) -> Vec<Conn> {
        self.entries.values().map(|e| e.conn.clone()).collect()
    }
}
