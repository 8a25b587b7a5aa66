//! Trusted roots: which root keys a verifier believes, for which names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::keys::PublicKey;
use super::pattern::BlessingPattern;
use crate::{Error, Result};

type Map = BTreeMap<PublicKey, BTreeSet<BlessingPattern>>;

/// A set of `(root key, pattern)` entries, each saying: a chain whose root
/// certificate has this key may carry names matching this pattern.
///
/// Safe to share between threads (an internal lock); every method takes
/// `&self`. Cloning takes a snapshot.
#[derive(Default)]
pub struct BlessingRoots {
    entries: RwLock<Map>,
}

impl BlessingRoots {
    /// An empty set: nothing is trusted.
    pub fn new() -> Self {
        BlessingRoots::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Map> {
        // A panic elsewhere cannot leave the map half-updated: every update is
        // a single insert or remove. So a poisoned lock is still usable.
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Map> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Trusts `key` as the root of names matching `pattern`. Returns whether
    /// the entry is new.
    pub fn add(&self, key: PublicKey, pattern: BlessingPattern) -> bool {
        self.write().entry(key).or_default().insert(pattern)
    }

    /// Stops trusting `key` for `pattern`. Returns whether it was trusted.
    pub fn remove(&self, key: &PublicKey, pattern: &BlessingPattern) -> bool {
        let mut map = self.write();
        let Some(patterns) = map.get_mut(key) else {
            return false;
        };
        let removed = patterns.remove(pattern);
        if patterns.is_empty() {
            map.remove(key);
        }
        removed
    }

    /// Checks that `key` is trusted as the root of `name`.
    ///
    /// Fails with [`ErrorKind::NotTrusted`](crate::ErrorKind::NotTrusted):
    /// the chain may be perfectly well signed, but this verifier does not
    /// trust its root for that name, which retrying will not change.
    pub fn recognized(&self, key: &PublicKey, name: &str) -> Result<()> {
        let map = self.read();
        let trusted = map
            .get(key)
            .is_some_and(|patterns| patterns.iter().any(|p| p.matches(name)));
        if trusted {
            Ok(())
        } else {
            Err(Error::not_trusted(format!(
                "root key {key} not recognized for {name}"
            )))
        }
    }

    /// A snapshot of every entry, ordered by key then pattern.
    pub fn entries(&self) -> Vec<(PublicKey, BlessingPattern)> {
        self.read()
            .iter()
            .flat_map(|(key, patterns)| patterns.iter().map(|p| (*key, p.clone())))
            .collect()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.read().values().map(BTreeSet::len).sum()
    }

    /// Whether nothing is trusted.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Replaces all entries with `entries`.
    pub(crate) fn replace(&self, entries: Vec<(PublicKey, BlessingPattern)>) {
        let mut map = Map::new();
        for (key, pattern) in entries {
            map.entry(key).or_default().insert(pattern);
        }
        *self.write() = map;
    }
}

impl Clone for BlessingRoots {
    fn clone(&self) -> Self {
        BlessingRoots {
            entries: RwLock::new(self.read().clone()),
        }
    }
}

impl fmt::Debug for BlessingRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries()
                    .iter()
                    .map(|(k, p)| (k.to_string(), p.as_str().to_owned())),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::security::Principal;

    #[test]
    fn recognition() {
        let alice = Principal::new().public_key();
        let bob = Principal::new().public_key();
        let roots = BlessingRoots::new();
        assert!(roots.is_empty());
        assert!(roots.add(alice, BlessingPattern::prefix("alice").unwrap()));
        assert!(!roots.add(alice, BlessingPattern::prefix("alice").unwrap()));
        assert!(roots.add(bob, BlessingPattern::exact("bob").unwrap()));
        assert_eq!(roots.len(), 2);

        roots.recognized(&alice, "alice").unwrap();
        roots.recognized(&alice, "alice:phone").unwrap();
        let err = roots.recognized(&alice, "alicia").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotTrusted);
        assert_eq!(
            err.message(),
            format!("root key {alice} not recognized for alicia")
        );
        assert!(roots.recognized(&alice, "bob").is_err());
        roots.recognized(&bob, "bob").unwrap();
        assert!(roots.recognized(&bob, "bob:phone").is_err());

        let snapshot = roots.clone();
        assert!(roots.remove(&bob, &BlessingPattern::exact("bob").unwrap()));
        assert!(!roots.remove(&bob, &BlessingPattern::exact("bob").unwrap()));
        assert!(roots.recognized(&bob, "bob").is_err());
        snapshot.recognized(&bob, "bob").unwrap();
        assert_eq!(roots.entries().len(), 1);
        assert_eq!(snapshot.entries().len(), 2);

        roots.add(bob, BlessingPattern::all());
        roots.recognized(&bob, "anyone:at:all").unwrap();
        assert!(format!("{roots:?}").contains("..."));
    }
}
