//! Resumption: a returning dialer proves itself with a shared secret from
//! its last connection instead of signatures.
//!
//! A dialer that keeps tickets says so in its hello (the `ticket` option:
//! empty, or a ticket to redeem). The acceptor then issues one: a random
//! id, sent inside its (encrypted) `Setup`, and a secret both sides derive
//! from that connection's keys and the id. Each side remembers the ticket
//! with the key the peer proved in that handshake: the acceptor under the
//! id, the dialer under its own key and the peer it reached. When the
//! dialer comes back it names the ticket in its hello with a proof that it
//! holds the secret ([`binder`], over the hello's ephemeral key); if the
//! acceptor still holds the ticket and the proof checks out, both sides
//! bind the new channel with an HMAC under the secret instead of an
//! ed25519 signature, and each checks that the peer's blessings are for
//! the key recorded with the ticket. Blessings, discharges and authorizers
//! are checked exactly as in a full handshake. A ticket is good for one
//! connection (the acceptor forgets it when it is redeemed, the dialer when
//! it names it); the resumed connection issues the next. An unknown,
//! expired or unproven ticket costs nothing: the acceptor signs as usual
//! and the dialer follows.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ring::{hkdf, hmac};
use zeroize::Zeroize;

use crate::security::PublicKey;
use crate::{Error, Result};

/// Bytes of a ticket's id.
pub const TICKET_ID_LEN: usize = 16;
/// Bytes of a ticket's secret and of a binding MAC.
pub const SECRET_LEN: usize = 32;

/// What the secret of a ticket is derived with (HKDF info).
const SECRET_INFO: &[u8] = b"flow/v1 resumption secret";
/// What a direction's frame key is derived with (HKDF info).
const FRAME_KEY_INFO: &[u8] = b"flow/v1 frame key";

/// A ticket's id, as it travels in `Setup`.
pub type TicketId = [u8; TICKET_ID_LEN];

/// A ticket as either side keeps it.
#[derive(Clone)]
pub struct Ticket {
    /// The id the dialer names.
    pub id: TicketId,
    /// The secret shared by the two ends of the connection that issued it.
    pub secret: [u8; SECRET_LEN],
    /// The key the peer proved when the ticket was issued.
    pub peer_key: PublicKey,
    /// When the ticket stops being honoured.
    pub expires: Instant,
    /// Named once already and not redeemed (dialer side): a second miss
    /// drops it, so a ticket the acceptor forgot cannot come back forever.
    pub returned: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Copies of the secret do not outlive the tickets holding them.
        self.secret.zeroize();
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Ticket")
            .field("peer_key", &self.peer_key)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// A new random ticket id.
pub fn new_ticket_id() -> TicketId {
    rand::random()
}

/// The ticket secret for `id` on the connection whose raw Noise split keys
/// are `initiator_key` and `responder_key` (HKDF-SHA256, the id as salt).
/// The frame ciphers use keys derived from the same raw keys under another
/// label ([`frame_key`]): knowing those does not give this.
pub fn derive_secret(
    initiator_key: &[u8],
    responder_key: &[u8],
    id: &TicketId,
) -> Result<[u8; SECRET_LEN]> {
    hkdf_sha256(id, &[initiator_key, responder_key].concat(), SECRET_INFO)
}

/// The frame cipher key for one direction, from that direction's raw Noise
/// split key.
pub fn frame_key(raw_key: &[u8]) -> Result<[u8; SECRET_LEN]> {
    hkdf_sha256(&[], raw_key, FRAME_KEY_INFO)
}

fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> Result<[u8; SECRET_LEN]> {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            SECRET_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = [0u8; SECRET_LEN];
    prk.expand(&[info], Len)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| Error::bad_state("key derivation failed"))?;
    Ok(out)
}

/// The MAC binding a channel (`tag || hash`) under a ticket's secret.
pub fn binding_mac(secret: &[u8; SECRET_LEN], tag: &[u8], hash: &[u8]) -> [u8; SECRET_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(tag);
    ctx.update(hash);
    let mut mac = [0u8; SECRET_LEN];
    mac.copy_from_slice(ctx.sign().as_ref());
    mac
}

/// Whether `mac` binds `tag || hash` under `secret` (constant time).
pub fn verify_binding_mac(secret: &[u8; SECRET_LEN], tag: &[u8], hash: &[u8], mac: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &[tag, hash].concat(), mac).is_ok()
}

/// What a dialer's proof of a ticket's secret is made with (HMAC label).
const BINDER_LABEL: &[u8] = b"flow/v1 ticket binder";

/// A dialer's proof that it holds `secret`, over the ephemeral key of the
/// very hello that names the ticket: an observer who saw a ticket id
/// cannot make an acceptor spend it.
pub fn binder(secret: &[u8; SECRET_LEN], ephemeral_key: &[u8]) -> [u8; SECRET_LEN] {
    binding_mac(secret, BINDER_LABEL, ephemeral_key)
}

/// Whether `proof` is [`binder`]`(secret, ephemeral_key)` (constant time).
pub fn verify_binder(secret: &[u8; SECRET_LEN], ephemeral_key: &[u8], proof: &[u8]) -> bool {
    verify_binding_mac(secret, BINDER_LABEL, ephemeral_key, proof)
}

/// Tickets a dialer keeps per endpoint; it names the oldest.
const HELD_PER_ENDPOINT: usize = 4;
/// Tickets an acceptor keeps per peer key: one peer making many
/// connections cannot push everyone else's tickets out.
const ISSUED_PER_PEER: usize = HELD_PER_ENDPOINT;

/// The tickets a side has issued (as acceptor) and holds (as dialer),
/// bounded in number and age. Share one store (it sits in
/// [`ConnConfig::resumption`](super::ConnConfig::resumption)) among the
/// connections that should resume each other.
///
/// An acceptor honours a ticket only once the connection that issued it
/// has verified the dialer; a dialer reconnecting at once may get there
/// first. So a dialer keeps a few tickets per endpoint, names the oldest,
/// and takes back one the acceptor did not redeem.
pub struct TicketStore {
    capacity: usize,
    lifetime: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    issued: Bounded<TicketId, Ticket>,
    /// The ids issued to each peer key, oldest first (may name tickets
    /// already redeemed or forgotten).
    issued_to: HashMap<PublicKey, VecDeque<TicketId>>,
    held: Bounded<String, VecDeque<Ticket>>,
}

/// A map forgetting its oldest keys past a capacity.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    /// Keys in insertion order; may name entries already taken.
    order: VecDeque<K>,
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    /// The entry for `key`, made with `make` (forgetting the oldest keys
    /// to stay within `capacity`) if there is none; `None` if `capacity`
    /// is 0.
    fn entry(&mut self, key: K, capacity: usize, make: impl FnOnce() -> V) -> Option<&mut V> {
        if capacity == 0 {
            return None;
        }
        if !self.map.contains_key(&key) {
            while self.map.len() >= capacity {
                match self.order.pop_front() {
                    Some(oldest) => {
                        self.map.remove(&oldest);
                    }
                    None => break,
                }
            }
            // Keys of taken entries linger in `order`; drop them before
            // they outnumber the live ones.
            if self.order.len() >= 2 * capacity {
                let map = &self.map;
                self.order.retain(|k| map.contains_key(k));
            }
            self.order.push_back(key.clone());
            self.map.insert(key.clone(), make());
        }
        self.map.get_mut(&key)
    }
}

impl TicketStore {
    /// A store keeping at most `capacity` tickets issued (as acceptor;
    /// the oldest go first) and tickets for at most `capacity` peers (as
    /// dialer, a few each), each honoured for `lifetime` after it is
    /// issued.
    pub fn new(capacity: usize, lifetime: Duration) -> TicketStore {
        TicketStore {
            capacity,
            lifetime,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// How long a ticket is honoured.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acceptor: remembers a ticket issued to a dialer.
    pub fn insert_issued(&self, ticket: Ticket) {
        let capacity = self.capacity;
        let (id, peer) = (ticket.id, ticket.peer_key);
        let mut guard = self.inner();
        let inner = &mut *guard;
        // Ids are random: a new one is never taken already.
        if inner.issued.entry(id, capacity, move || ticket).is_none() {
            return;
        }
        let live = &mut inner.issued.map;
        let ids = inner.issued_to.entry(peer).or_default();
        ids.retain(|id| live.contains_key(id));
        ids.push_back(id);
        while ids.len() > ISSUED_PER_PEER {
            if let Some(oldest) = ids.pop_front() {
                live.remove(&oldest);
            }
        }
        // Peers whose tickets all went linger here; drop them before they
        // outnumber the tickets.
        if inner.issued_to.len() > 2 * capacity {
            inner.issued_to.retain(|_, ids| {
                ids.retain(|id| live.contains_key(id));
                !ids.is_empty()
            });
        }
    }

    /// Acceptor: takes the ticket a dialer names, if it is known, alive,
    /// and `proven` says the dialer holds its secret; a ticket named
    /// without that proof stays (so naming it costs its holder nothing).
    pub fn redeem(
        &self,
        id: &TicketId,
        now: Instant,
        proven: impl FnOnce(&Ticket) -> bool,
    ) -> Option<Ticket> {
        let mut inner = self.inner();
        let map = &mut inner.issued.map;
        let ticket = map.get(id)?;
        if ticket.expires <= now {
            map.remove(id);
            return None;
        }
        if !proven(ticket) {
            return None;
        }
        map.remove(id)
    }

    /// Dialer: remembers a ticket the acceptor at `endpoint` issued (the
    /// newest of a few kept per endpoint).
    pub fn insert_held(&self, endpoint: String, ticket: Ticket) {
        let capacity = self.capacity;
        if let Some(held) = self.inner().held.entry(endpoint, capacity, VecDeque::new) {
            held.push_back(ticket);
            if held.len() > HELD_PER_ENDPOINT {
                held.pop_front();
            }
        }
    }

    /// Dialer: takes the oldest live ticket held for `endpoint`.
    pub fn take_held(&self, endpoint: &str, now: Instant) -> Option<Ticket> {
        let mut inner = self.inner();
        let held = inner.held.map.get_mut(endpoint)?;
        while let Some(ticket) = held.pop_front() {
            if ticket.expires > now {
                return Some(ticket);
            }
        }
        None
    }

    /// Dialer: puts back a ticket the acceptor did not redeem (it may not
    /// have confirmed it yet); it is named first next time, and dropped if
    /// it misses again.
    pub fn return_held(&self, endpoint: String, mut ticket: Ticket) {
        if ticket.returned {
            return;
        }
        ticket.returned = true;
        let capacity = self.capacity;
        if let Some(held) = self.inner().held.entry(endpoint, capacity, VecDeque::new)
            && held.len() < HELD_PER_ENDPOINT
        {
            held.push_front(ticket);
        }
    }

    /// Tickets issued, and tickets held, now (including expired ones not
    /// yet dropped).
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner();
        (
            inner.issued.map.len(),
            inner.held.map.values().map(VecDeque::len).sum(),
        )
    }
}

impl Default for TicketStore {
    /// 4,096 tickets issued and tickets for 4,096 peers, each honoured for
    /// an hour.
    fn default() -> Self {
        TicketStore::new(4096, Duration::from_secs(3600))
    }
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (issued, held) = self.len();
        f.debug_struct("TicketStore")
            .field("capacity", &self.capacity)
            .field("lifetime", &self.lifetime)
            .field("issued", &issued)
            .field("held", &held)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Principal;

    fn ticket(id: u8, expires: Instant) -> Ticket {
        Ticket {
            id: [id; TICKET_ID_LEN],
            secret: [id; SECRET_LEN],
            peer_key: Principal::new().public_key(),
            expires,
            returned: false,
        }
    }

    #[test]
    fn a_ticket_is_redeemed_once_and_not_after_it_expires() {
        let store = TicketStore::new(8, Duration::from_secs(60));
        let now = Instant::now();
        store.insert_issued(ticket(1, now + Duration::from_secs(60)));
        store.insert_issued(ticket(2, now + Duration::from_secs(1)));
        assert!(store.redeem(&[1; TICKET_ID_LEN], now, |_| true).is_some());
        assert!(store.redeem(&[1; TICKET_ID_LEN], now, |_| true).is_none());
        let later = now + Duration::from_secs(2);
        assert!(store.redeem(&[2; TICKET_ID_LEN], later, |_| true).is_none());
        assert_eq!(store.len(), (0, 0));
        // Without the proof, a live ticket is neither redeemed nor spent.
        store.insert_issued(ticket(3, now + Duration::from_secs(60)));
        assert!(store.redeem(&[3; TICKET_ID_LEN], now, |_| false).is_none());
        assert!(store.redeem(&[3; TICKET_ID_LEN], now, |_| true).is_some());
    }

    #[test]
    fn the_store_keeps_at_most_its_capacity_forgetting_the_oldest() {
        let store = TicketStore::new(4, Duration::from_secs(60));
        let now = Instant::now();
        let expires = now + Duration::from_secs(60);
        for i in 0..10 {
            store.insert_issued(ticket(i, expires));
            store.insert_held(format!("ep{i}"), ticket(i, expires));
        }
        assert_eq!(store.len(), (4, 4));
        assert!(store.redeem(&[5; TICKET_ID_LEN], now, |_| true).is_none());
        assert!(store.redeem(&[6; TICKET_ID_LEN], now, |_| true).is_some());
        assert!(store.take_held("ep5", now).is_none());
        assert!(store.take_held("ep9", now).is_some());
        // A few per endpoint, the oldest named first, the newest kept.
        for i in 0..6 {
            store.insert_held("many".into(), ticket(i, expires));
        }
        let first = store.take_held("many", now).unwrap();
        assert_eq!(first.id, [2; TICKET_ID_LEN]);
        store.return_held("many".into(), first);
        let again = store.take_held("many", now).unwrap();
        assert_eq!(again.id, [2; TICKET_ID_LEN]);
        store.return_held("many".into(), again);
        let ids: Vec<u8> = std::iter::from_fn(|| store.take_held("many", now))
            .map(|t| t.id[0])
            .collect();
        assert_eq!(ids, [3, 4, 5], "a ticket missing twice is dropped");
        // Taking and issuing forever keeps the bookkeeping bounded too.
        for i in 0..1000u32 {
            let id = (i % 200) as u8;
            store.insert_issued(ticket(id, expires));
            store.redeem(&[id; TICKET_ID_LEN], now, |_| true);
        }
        assert!(store.inner().issued.order.len() <= 8);
    }

    #[test]
    fn one_peer_cannot_push_the_others_tickets_out() {
        let store = TicketStore::new(8, Duration::from_secs(60));
        let now = Instant::now();
        let expires = now + Duration::from_secs(60);
        let quiet = ticket(1, expires);
        store.insert_issued(quiet);
        let noisy = Principal::new().public_key();
        for i in 10..100u8 {
            store.insert_issued(Ticket {
                peer_key: noisy,
                ..ticket(i, expires)
            });
        }
        assert_eq!(store.len().0, 1 + ISSUED_PER_PEER);
        assert!(store.redeem(&[1; TICKET_ID_LEN], now, |_| true).is_some());
        assert!(store.redeem(&[99; TICKET_ID_LEN], now, |_| true).is_some());
        assert!(store.redeem(&[10; TICKET_ID_LEN], now, |_| true).is_none());
        // Many peers, one ticket each: the index stays bounded too.
        for i in 0..200u8 {
            store.insert_issued(ticket(i, expires));
        }
        assert!(store.inner().issued_to.len() <= 2 * 8 + 1);
    }

    #[test]
    fn the_mac_binds_tag_hash_and_secret() {
        let derive = |a: u8, b: u8, id: u8| derive_secret(&[a; 32], &[b; 32], &[id; 16]).unwrap();
        let secret = derive(1, 2, 3);
        assert_ne!(secret, derive(1, 2, 4));
        assert_ne!(secret, derive(2, 1, 3));
        // The frame keys come from the same raw keys under another label.
        let frame = frame_key(&[1; 32]).unwrap();
        assert_ne!(frame, [1; 32]);
        assert_ne!(frame, secret);
        assert_ne!(frame, frame_key(&[2; 32]).unwrap());
        let mac = binding_mac(&secret, b"tag", b"hash");
        assert!(verify_binding_mac(&secret, b"tag", b"hash", &mac));
        assert!(!verify_binding_mac(&secret, b"tag", b"hasi", &mac));
        assert!(!verify_binding_mac(&secret, b"taf", b"hash", &mac));
        assert!(!verify_binding_mac(&[0; SECRET_LEN], b"tag", b"hash", &mac));
        let proof = binder(&secret, &[7; 32]);
        assert!(verify_binder(&secret, &[7; 32], &proof));
        assert!(!verify_binder(&secret, &[8; 32], &proof));
        assert_ne!(proof, binding_mac(&secret, b"tag", &[7; 32]));
    }
}
