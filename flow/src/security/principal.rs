//! Principals: a signing key with the blessings it holds and the roots it
//! trusts.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use ed25519_dalek::{Signer, SigningKey};

use super::blessings::Blessings;
use super::caveat::{Caveat, ThirdPartyCaveat, round_to_secs};
use super::certificate::Certificate;
use super::discharge::{self, Discharge};
use super::keys::{PublicKey, Signature};
use super::pattern::{BlessingPattern, validate_name};
use super::roots::BlessingRoots;
use super::store::BlessingStore;
use crate::{Error, Result};

/// Length in bytes of a principal's secret key.
pub const SECRET_KEY_LEN: usize = 32;

struct Inner {
    key: SigningKey,
    public: PublicKey,
    store: BlessingStore,
    roots: BlessingRoots,
}

/// An identity: an ed25519 signing key, the [`BlessingStore`] of blessings
/// it holds and the [`BlessingRoots`] it trusts.
///
/// Cheap to clone: clones share the key, store and roots (an `Arc` inside),
/// so one principal can serve many connections; the store and roots lock
/// internally.
#[derive(Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

impl Principal {
    /// A principal with a fresh random key, no blessings and no roots.
    pub fn new() -> Self {
        Principal::from_signing_key(SigningKey::generate(&mut rand::rng()))
    }

    /// A principal with the given 32-byte ed25519 secret key (any 32 bytes
    /// are a valid key), no blessings and no roots.
    pub fn from_secret_key(secret: &[u8; SECRET_KEY_LEN]) -> Self {
        Principal::from_signing_key(SigningKey::from_bytes(secret))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let public = PublicKey::from_verifying_key(key.verifying_key());
        Principal {
            inner: Arc::new(Inner {
                key,
                public,
                store: BlessingStore::new(public),
                roots: BlessingRoots::new(),
            }),
        }
    }

    /// A fresh principal blessed by itself as `name`, presenting that
    /// blessing by default and to every peer, and trusting its own root for
    /// `name` and its extensions. Handy for tests and tools.
    pub fn with_self_blessing(name: &str) -> Result<Self> {
        let principal = Principal::new();
        principal.init_self_blessing(name)?;
        Ok(principal)
    }

    pub(crate) fn init_self_blessing(&self, name: &str) -> Result<Blessings> {
        let blessings = self.bless_self(name, Vec::new())?;
        self.inner.store.set_default(blessings.clone())?;
        self.inner
            .store
            .set(blessings.clone(), BlessingPattern::all())?;
        self.add_to_roots(&blessings)?;
        Ok(blessings)
    }

    /// The principal's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public
    }

    /// Signs `message` as is.
    ///
    /// Callers must separate their domains (prefix a tag of their own) so a
    /// signature made for one purpose cannot be replayed for another. The
    /// prefixes `flow.cert.` and `flow.discharge.` are taken by certificates
    /// and discharges.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.inner.key.sign(message).to_bytes())
    }

    /// Blessings naming this principal `name`, in a single self-signed
    /// certificate carrying `caveats`.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if `name`
    /// is not a valid blessing name.
    pub fn bless_self(&self, name: &str, caveats: Vec<Caveat>) -> Result<Blessings> {
        validate_name(name)?;
        let cert = Certificate::sign(&self.inner.key, None, name, self.inner.public, caveats)?;
        Blessings::from_chains(vec![vec![cert]])
    }

    /// Blesses `grantee` by extending every chain of `with` (which must be
    /// this principal's own blessings) with `extension`, under `caveats`.
    /// An empty caveat list means the blessing is unconstrained.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if `with`
    /// is empty or for another key, `extension` is invalid, or a chain would
    /// exceed [`MAX_CHAIN_LEN`](super::MAX_CHAIN_LEN).
    pub fn bless(
        &self,
        grantee: PublicKey,
        with: &Blessings,
        extension: &str,
        caveats: Vec<Caveat>,
    ) -> Result<Blessings> {
        match with.public_key() {
            None => return Err(Error::bad_arg("cannot bless with empty blessings")),
            Some(key) if key != self.inner.public => {
                return Err(Error::bad_arg(format!(
                    "cannot bless with blessings {with} of key {key}: they are not this \
                     principal's ({})",
                    self.inner.public
                )));
            }
            Some(_) => {}
        }
        let mut chains = Vec::with_capacity(with.chains().len());
        for chain in with.chains() {
            let previous = chain.last().map(|c| &c.signature);
            let cert = Certificate::sign(
                &self.inner.key,
                previous,
                extension,
                grantee,
                caveats.clone(),
            )?;
            let mut extended = Vec::with_capacity(chain.len() + 1);
            extended.extend_from_slice(chain);
            extended.push(cert);
            chains.push(extended);
        }
        Blessings::from_chains(chains)
    }

    /// Mints a discharge for `caveat`, valid until `expiry` (rounded down to
    /// a whole second) or forever.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) unless this
    /// principal is the caveat's discharger. Deciding whether the caveat's
    /// condition holds is the caller's business.
    pub fn mint_discharge(
        &self,
        caveat: &ThirdPartyCaveat,
        expiry: Option<SystemTime>,
    ) -> Result<Discharge> {
        if caveat.discharger_key != self.inner.public {
            return Err(Error::bad_arg(format!(
                "third-party caveat {} names discharger {}, not this principal ({})",
                caveat.id, caveat.discharger_key, self.inner.public
            )));
        }
        let expiry = expiry.map(round_to_secs);
        let message = discharge::signed_message(caveat.id, &self.inner.public, expiry);
        Ok(Discharge {
            caveat_id: caveat.id,
            discharger_key: self.inner.public,
            expiry,
            signature: self.sign(&message),
        })
    }

    /// Trusts the root key of every chain of `blessings` for the root
    /// certificate's name and its extensions.
    pub fn add_to_roots(&self, blessings: &Blessings) -> Result<()> {
        for chain in blessings.chains() {
            if let Some(root) = chain.first() {
                let pattern = BlessingPattern::prefix(&root.extension)?;
                self.inner.roots.add(root.public_key, pattern);
            }
        }
        Ok(())
    }

    /// The blessings this principal holds.
    pub fn blessing_store(&self) -> &BlessingStore {
        &self.inner.store
    }

    /// The roots this principal trusts.
    pub fn roots(&self) -> &BlessingRoots {
        &self.inner.roots
    }

    /// The default blessings (shorthand for the store's).
    pub fn default_blessings(&self) -> Blessings {
        self.inner.store.default_blessings()
    }

    /// The secret key bytes, for saving credentials.
    pub(crate) fn secret_key_bytes(&self) -> [u8; SECRET_KEY_LEN] {
        self.inner.key.to_bytes()
    }
}

impl Default for Principal {
    fn default() -> Self {
        Principal::new()
    }
}

impl fmt::Debug for Principal {
    /// Shows the public key and default names, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("public_key", &self.inner.public)
            .field("default_blessings", &self.default_blessings().names())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::security::ValidationContext;

    #[test]
    fn keys_and_signatures() {
        let p = Principal::new();
        let q = Principal::from_secret_key(&p.secret_key_bytes());
        assert_eq!(p.public_key(), q.public_key());
        let sig = p.sign(b"msg");
        p.public_key().verify(b"msg", &sig).unwrap();
        assert_ne!(Principal::new().public_key(), p.public_key());
        let clone = p.clone();
        assert_eq!(clone.public_key(), p.public_key());
        assert!(!format!("{p:?}").contains(&hex::encode(p.secret_key_bytes())));
    }

    #[test]
    fn self_blessed_principal_is_consistent() {
        let p = Principal::with_self_blessing("server").unwrap();
        let b = p.default_blessings();
        assert_eq!(b.names(), ["server"]);
        assert_eq!(p.blessing_store().for_peer::<&str>(&[]), b);
        let out = b.validate(&ValidationContext::new(p.roots()));
        assert_eq!(out.valid, ["server"]);
        assert!(Principal::with_self_blessing("bad name").is_err());
    }

    #[test]
    fn bless_self_validates_name() {
        let p = Principal::new();
        for bad in ["", "a@b", "a::b", "..."] {
            assert_eq!(
                p.bless_self(bad, vec![]).unwrap_err().kind(),
                ErrorKind::BadArg,
                "{bad:?}"
            );
        }
        let b = p.bless_self("a:b", vec![]).unwrap();
        assert!(p.bless(p.public_key(), &b, "c$", vec![]).is_err());
    }
}
