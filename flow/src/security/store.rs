//! The blessing store: which of its blessings a principal presents to whom.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::blessings::Blessings;
use super::keys::PublicKey;
use super::pattern::BlessingPattern;
use crate::{Error, Result};

#[derive(Clone, Default)]
struct Inner {
    default: Blessings,
    peers: BTreeMap<BlessingPattern, Blessings>,
}

/// The blessings a principal holds, and to whom it presents them.
///
/// Every blessing in the store is for the owner's key. Safe to share between
/// threads (an internal lock); every method takes `&self`.
pub struct BlessingStore {
    key: PublicKey,
    inner: RwLock<Inner>,
}

impl BlessingStore {
    /// An empty store for blessings of `key`.
    pub fn new(key: PublicKey) -> Self {
        BlessingStore {
            key,
            inner: RwLock::new(Inner::default()),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // Updates are single assignments, so a poisoned lock is consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn check_key(&self, blessings: &Blessings) -> Result<()> {
        match blessings.public_key() {
            Some(key) if key != self.key => Err(Error::bad_arg(format!(
                "blessings {blessings} are for key {key}, not this principal's key {}",
                self.key
            ))),
            _ => Ok(()),
        }
    }

    /// The key of the principal owning the store.
    pub fn public_key(&self) -> PublicKey {
        self.key
    }

    /// Presents `blessings` to peers with a name matching `for_peers`
    /// (replacing what was set for that pattern; empty blessings remove the
    /// entry). Returns the blessings previously set for the pattern (empty
    /// if none).
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if the
    /// blessings are for another key.
    pub fn set(&self, blessings: Blessings, for_peers: BlessingPattern) -> Result<Blessings> {
        self.check_key(&blessings)?;
        let mut inner = self.write();
        let previous = if blessings.is_empty() {
            inner.peers.remove(&for_peers)
        } else {
            inner.peers.insert(for_peers, blessings)
        };
        Ok(previous.unwrap_or_default())
    }

    /// The blessings to present to a peer with `peer_names`: the union of
    /// every entry whose pattern any of the names matches (`...` entries
    /// match even no names). Entries that would push the union past
    /// [`MAX_CERTIFICATES`](super::MAX_CERTIFICATES) are left out.
    pub fn for_peer<S: AsRef<str>>(&self, peer_names: &[S]) -> Blessings {
        let inner = self.read();
        let mut out = Blessings::empty();
        for (pattern, blessings) in &inner.peers {
            if pattern.matched_by(peer_names)
                && let Ok(joined) = Blessings::union(&[out.clone(), blessings.clone()])
            {
                out = joined;
            }
        }
        out
    }

    /// The blessings used when no peer is concerned (for example, to name
    /// oneself in endpoints).
    pub fn default_blessings(&self) -> Blessings {
        self.read().default.clone()
    }

    /// Sets the default blessings, returning the previous ones.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if the
    /// blessings are for another key.
    pub fn set_default(&self, blessings: Blessings) -> Result<Blessings> {
        self.check_key(&blessings)?;
        Ok(std::mem::replace(&mut self.write().default, blessings))
    }

    /// A snapshot of the per-peer entries, ordered by pattern.
    pub fn peer_blessings(&self) -> Vec<(BlessingPattern, Blessings)> {
        self.read()
            .peers
            .iter()
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect()
    }

    /// Replaces the whole content (used when loading credentials).
    pub(crate) fn replace(
        &self,
        default: Blessings,
        peers: Vec<(BlessingPattern, Blessings)>,
    ) -> Result<()> {
        self.check_key(&default)?;
        let mut map = BTreeMap::new();
        for (pattern, blessings) in peers {
            self.check_key(&blessings)?;
            if !blessings.is_empty() {
                map.insert(pattern, blessings);
            }
        }
        *self.write() = Inner {
            default,
            peers: map,
        };
        Ok(())
    }
}

impl Clone for BlessingStore {
    /// A snapshot of the store.
    fn clone(&self) -> Self {
        BlessingStore {
            key: self.key,
            inner: RwLock::new(self.read().clone()),
        }
    }
}

impl fmt::Debug for BlessingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.read();
        f.debug_struct("BlessingStore")
            .field("key", &self.key)
            .field("default", &inner.default)
            .field("peers", &inner.peers)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::security::Principal;

    fn pat(s: &str) -> BlessingPattern {
        s.parse().unwrap()
    }

    #[test]
    fn for_peer_selects_matching_entries() {
        let p = Principal::new();
        let store = BlessingStore::new(p.public_key());
        let everyone = p.bless_self("public", vec![]).unwrap();
        let for_alice = p.bless_self("alice-friend", vec![]).unwrap();
        let for_bob = p.bless_self("bob-friend", vec![]).unwrap();
        assert!(store.set(everyone.clone(), pat("...")).unwrap().is_empty());
        store.set(for_alice.clone(), pat("alice")).unwrap();
        store.set(for_bob.clone(), pat("bob:$")).unwrap();

        let names = |b: Blessings| {
            let mut n = b.names();
            n.sort();
            n
        };
        assert_eq!(names(store.for_peer::<&str>(&[])), ["public"]);
        assert_eq!(
            names(store.for_peer(&["alice:phone"])),
            ["alice-friend", "public"]
        );
        assert_eq!(names(store.for_peer(&["bob"])), ["bob-friend", "public"]);
        assert_eq!(names(store.for_peer(&["bob:phone"])), ["public"]);
        assert_eq!(
            names(store.for_peer(&["bob", "alice"])),
            ["alice-friend", "bob-friend", "public"]
        );

        // Replacing returns the previous; empty removes.
        let prev = store.set(for_bob.clone(), pat("alice")).unwrap();
        assert_eq!(prev, for_alice);
        let prev = store.set(Blessings::empty(), pat("...")).unwrap();
        assert_eq!(prev, everyone);
        assert!(store.for_peer::<&str>(&[]).is_empty());
        assert_eq!(store.peer_blessings().len(), 2);
    }

    #[test]
    fn refuses_blessings_for_other_keys() {
        let p = Principal::new();
        let q = Principal::new();
        let store = BlessingStore::new(p.public_key());
        let theirs = q.bless_self("q", vec![]).unwrap();
        assert_eq!(
            store.set(theirs.clone(), pat("...")).unwrap_err().kind(),
            ErrorKind::BadArg
        );
        assert_eq!(
            store.set_default(theirs).unwrap_err().kind(),
            ErrorKind::BadArg
        );
        let mine = p.bless_self("p", vec![]).unwrap();
        assert!(store.set_default(mine.clone()).unwrap().is_empty());
        assert_eq!(store.default_blessings(), mine);
        assert_eq!(store.set_default(Blessings::empty()).unwrap(), mine);
        assert_eq!(store.public_key(), p.public_key());
    }
}
