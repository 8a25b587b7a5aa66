//! Who listens through the proxy: registrations by routing id, bound to
//! the key that first claimed each id, under the proxy's limits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use flow::conn::Conn;
use flow::naming::RoutingId;
use flow::security::PublicKey;
use tokio::sync::watch;

use super::route::{Hop, Kind};
use super::{ProxyLimits, Refusal, Refused};

/// What a registration's connection must tell: whether it still stands.
pub(crate) trait Alive {
    /// Whether the connection is open.
    fn alive(&self) -> bool;
}

impl Alive for Conn {
    fn alive(&self) -> bool {
        !self.is_closed()
    }
}

/// One server or downstream proxy listening through this proxy.
pub(crate) struct Registration<C> {
    /// Tells registrations apart across replacements of one routing id.
    pub(crate) id: u64,
    pub(crate) rid: RoutingId,
    pub(crate) kind: Kind,
    /// The key that owns `rid` while this registration stands.
    pub(crate) key: PublicKey,
    /// The connection that carried the control flow; tunnels open on it.
    pub(crate) conn: C,
    /// Tunnels open to this registrant now.
    pub(crate) flows: Arc<AtomicUsize>,
    /// Set to a reason to end the registration (its control flow answers
    /// the reason and closes).
    end: watch::Sender<Option<String>>,
}

impl<C> Registration<C> {
    /// Ends the registration: its control flow tells the registrant
    /// `reason` and closes.
    pub(crate) fn end(&self, reason: String) {
        self.end.send_replace(Some(reason));
    }

    /// Resolves with the reason once the registration is ended.
    pub(crate) fn ended(&self) -> watch::Receiver<Option<String>> {
        self.end.subscribe()
    }
}

/// A request to register.
pub(crate) struct Claim<C> {
    pub(crate) rid: RoutingId,
    pub(crate) kind: Kind,
    pub(crate) key: PublicKey,
    pub(crate) conn: C,
}

/// Registrations by routing id.
pub(crate) struct Registry<C> {
    by_rid: HashMap<RoutingId, Arc<Registration<C>>>,
    next_id: u64,
}

impl<C> Default for Registry<C> {
    fn default() -> Self {
        Registry {
            by_rid: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<C: Alive> Registry<C> {
    /// Registers `claim`, or says why not. The first key to claim a
    /// routing id owns it while its connection stands: a claim by another
    /// key is refused; a claim by the same key replaces the old
    /// registration, which is returned (for the caller to end).
    #[allow(clippy::type_complexity)]
    pub(crate) fn register(
        &mut self,
        claim: Claim<C>,
        limits: &ProxyLimits,
    ) -> Result<(Arc<Registration<C>>, Option<Arc<Registration<C>>>), Refused> {
        // Registrations whose connection has gone own nothing any more.
        self.by_rid.retain(|_, r| r.conn.alive());
        let replacing = match self.by_rid.get(&claim.rid) {
            Some(existing) if existing.key != claim.key => {
                return Err(Refused::new(
                    Refusal::RoutingIdTaken,
                    format!(
                        "routing id {} is registered by another key ({})",
                        claim.rid, existing.key
                    ),
                ));
            }
            Some(_) => 1,
            None => 0,
        };
        let others = self.by_rid.len() - replacing;
        if others >= limits.max_servers {
            return Err(Refused::new(
                Refusal::TooManyServers,
                format!(
                    "at most {} servers may listen through this proxy",
                    limits.max_servers
                ),
            ));
        }
        let same_key = self
            .by_rid
            .values()
            .filter(|r| r.key == claim.key && r.rid != claim.rid)
            .count();
        if same_key >= limits.max_servers_per_identity {
            return Err(Refused::new(
                Refusal::TooManyForIdentity,
                format!(
                    "key {} already has {same_key} registrations (at most {})",
                    claim.key, limits.max_servers_per_identity
                ),
            ));
        }
        self.next_id += 1;
        let registration = Arc::new(Registration {
            id: self.next_id,
            rid: claim.rid,
            kind: claim.kind,
            key: claim.key,
            conn: claim.conn,
            flows: Arc::new(AtomicUsize::new(0)),
            end: watch::channel(None).0,
        });
        let replaced = self.by_rid.insert(claim.rid, registration.clone());
        Ok((registration, replaced))
    }

    /// Removes registration `id` of `rid`, unless it was replaced since.
    pub(crate) fn unregister(&mut self, rid: RoutingId, id: u64) {
        if self.by_rid.get(&rid).is_some_and(|r| r.id == id) {
            self.by_rid.remove(&rid);
        }
    }

    /// The live registration `hop` names, of the right kind.
    pub(crate) fn lookup(&self, hop: Hop) -> Option<Arc<Registration<C>>> {
        let (rid, kind) = match hop {
            Hop::Proxy(rid) => (rid, Kind::Proxy),
            Hop::Server(rid) => (rid, Kind::Server),
        };
        self.by_rid
            .get(&rid)
            .filter(|r| r.kind == kind && r.conn.alive())
            .cloned()
    }

    /// Live registrations: (servers, proxies).
    pub(crate) fn counts(&self) -> (usize, usize) {
        self.by_rid
            .values()
            .filter(|r| r.conn.alive())
            .fold((0, 0), |(s, p), r| match r.kind {
                Kind::Server => (s + 1, p),
                Kind::Proxy => (s, p + 1),
            })
    }
}

/// A tunnel's place in its registrant's count; freed on drop.
pub(crate) struct FlowSlot(Arc<AtomicUsize>);

impl FlowSlot {
    /// Takes a slot of `flows` if fewer than `max` are taken.
    pub(crate) fn take(flows: &Arc<AtomicUsize>, max: usize) -> Option<FlowSlot> {
        flows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| FlowSlot(flows.clone()))
    }
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use flow::security::Principal;

    use super::*;

    #[derive(Clone)]
    struct Fake(Arc<AtomicBool>);

    impl Fake {
        fn up() -> Fake {
            Fake(Arc::new(AtomicBool::new(true)))
        }
        fn down(&self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }

    impl Alive for Fake {
        fn alive(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn claim(rid: RoutingId, key: PublicKey, conn: &Fake) -> Claim<Fake> {
        Claim {
            rid,
            kind: Kind::Server,
            key,
            conn: conn.clone(),
        }
    }

    fn key() -> PublicKey {
        Principal::new().public_key()
    }

    #[test]
    fn the_first_key_owns_a_routing_id_while_connected() {
        let limits = ProxyLimits::default();
        let mut reg = Registry::default();
        let rid = RoutingId::random();
        let (owner, other) = (key(), key());
        let first_conn = Fake::up();
        let (first, replaced) = reg
            .register(claim(rid, owner, &first_conn), &limits)
            .unwrap();
        assert!(replaced.is_none());

        let refused = reg
            .register(claim(rid, other, &Fake::up()), &limits)
            .err()
            .unwrap();
        assert_eq!(refused.reason, Refusal::RoutingIdTaken);
        assert_eq!(reg.lookup(Hop::Server(rid)).unwrap().id, first.id);

        // The owner reconnecting takes it back and the old one is handed
        // out to be ended.
        let (second, replaced) = reg
            .register(claim(rid, owner, &Fake::up()), &limits)
            .unwrap();
        assert_eq!(replaced.unwrap().id, first.id);
        assert_eq!(reg.lookup(Hop::Server(rid)).unwrap().id, second.id);
        // The old registration going away does not remove the new one.
        reg.unregister(rid, first.id);
        assert_eq!(reg.lookup(Hop::Server(rid)).unwrap().id, second.id);

        // Once the owner's connection is gone, another key may claim it.
        second.conn.down();
        assert!(reg.lookup(Hop::Server(rid)).is_none());
        let (third, _) = reg
            .register(claim(rid, other, &Fake::up()), &limits)
            .unwrap();
        assert_eq!(third.key, other);
    }

    #[test]
    fn limits_refuse_with_their_reason() {
        let limits = ProxyLimits {
            max_servers: 3,
            max_servers_per_identity: 2,
            ..ProxyLimits::default()
        };
        let mut reg = Registry::default();
        let k = key();
        reg.register(claim(RoutingId::random(), k, &Fake::up()), &limits)
            .unwrap();
        let kept_rid = RoutingId::random();
        reg.register(claim(kept_rid, k, &Fake::up()), &limits)
            .unwrap();
        let refused = reg
            .register(claim(RoutingId::random(), k, &Fake::up()), &limits)
            .err()
            .unwrap();
        assert_eq!(refused.reason, Refusal::TooManyForIdentity);
        // Re-registering an id it holds is no new registration.
        reg.register(claim(kept_rid, k, &Fake::up()), &limits)
            .unwrap();

        reg.register(claim(RoutingId::random(), key(), &Fake::up()), &limits)
            .unwrap();
        let refused = reg
            .register(claim(RoutingId::random(), key(), &Fake::up()), &limits)
            .err()
            .unwrap();
        assert_eq!(refused.reason, Refusal::TooManyServers);
        assert_eq!(reg.counts(), (3, 0));
    }

    #[test]
    fn lookups_check_the_kind() {
        let limits = ProxyLimits::default();
        let mut reg = Registry::default();
        let rid = RoutingId::random();
        let c = Claim {
            rid,
            kind: Kind::Proxy,
            key: key(),
            conn: Fake::up(),
        };
        reg.register(c, &limits).unwrap();
        assert!(reg.lookup(Hop::Server(rid)).is_none());
        assert!(reg.lookup(Hop::Proxy(rid)).is_some());
        assert_eq!(reg.counts(), (0, 1));
    }

    #[test]
    fn flow_slots_are_bounded_and_freed() {
        let flows = Arc::new(AtomicUsize::new(0));
        let a = FlowSlot::take(&flows, 2).unwrap();
        let _b = FlowSlot::take(&flows, 2).unwrap();
        assert!(FlowSlot::take(&flows, 2).is_none());
        drop(a);
        assert!(FlowSlot::take(&flows, 2).is_some());
        assert_eq!(flows.load(Ordering::SeqCst), 1);
    }
}
