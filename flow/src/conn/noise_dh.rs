//! X25519 for the Noise handshake from `ring`.
//!
//! snow's own X25519 (curve25519-dalek without precomputed tables) makes a
//! key pair with a variable-base multiplication and runs its ladder on the
//! portable backend; ring's base-point tables and assembly do a key pair
//! plus an agreement in about 60 µs against about 85 here (`RESULTS.md`,
//! "Resumption"). Four of those sit on the critical path of every
//! connection setup.
//!
//! ring never exports a private key and uses each for one agreement only,
//! which is exactly what an ephemeral key in Noise NN is: this `Dh` serves
//! `e` and nothing else. Setting a private key (a static `s`, or a fixed
//! ephemeral key) leaves it without one, so a later agreement fails with
//! [`snow::Error::Dh`] instead of silently using another key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// Bytes of an X25519 key and shared secret.
const KEY_LEN: usize = 32;

/// An X25519 key pair made before the handshake that uses it (an acceptor
/// makes one while it waits for the dialer's hello, off the critical path).
pub(crate) struct PreparedKey {
    private: EphemeralPrivateKey,
    public: [u8; KEY_LEN],
}

impl PreparedKey {
    /// A fresh key pair.
    pub(crate) fn generate() -> Result<PreparedKey, snow::Error> {
        // ring draws from the operating system itself.
        let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
            .map_err(|_| snow::Error::Rng)?;
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(
            private
                .compute_public_key()
                .map_err(|_| snow::Error::Rng)?
                .as_ref(),
        );
        Ok(PreparedKey { private, public })
    }

    /// The public half.
    pub(crate) fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// A key pair made ahead by [`PreparedKey::make_spare`] if a fresh one
    /// waits (each is handed out once), else a new one.
    pub(crate) fn spare_or_new() -> Result<PreparedKey, snow::Error> {
        let spare = take_fresh(
            &mut SPARES.lock().unwrap_or_else(PoisonError::into_inner),
            Instant::now(),
        );
        spare.map_or_else(PreparedKey::generate, Ok)
    }

    /// Makes a key pair for a later handshake of this process, unless
    /// enough wait already. Called while a handshake waits for its peer,
    /// so the next one finds its key made.
    pub(crate) fn make_spare() {
        let waiting = SPARES.lock().unwrap_or_else(PoisonError::into_inner).len();
        if waiting >= SPARE_KEYS {
            return;
        }
        // Made outside the lock: it takes tens of microseconds.
        if let Ok(key) = PreparedKey::generate() {
            let mut spares = SPARES.lock().unwrap_or_else(PoisonError::into_inner);
            if spares.len() < SPARE_KEYS {
                spares.push((key, Instant::now()));
            }
        }
    }
}

/// Most key pairs made ahead at once.
const SPARE_KEYS: usize = 4;

/// A key pair made ahead is dropped rather than used after this long.
const SPARE_MAX_AGE: Duration = Duration::from_secs(30);

/// Key pairs made ahead, with when each was made.
static SPARES: Mutex<Vec<(PreparedKey, Instant)>> = Mutex::new(Vec::new());

/// The newest key of `spares` made within [`SPARE_MAX_AGE`] of `now`,
/// dropping any older ones.
fn take_fresh(spares: &mut Vec<(PreparedKey, Instant)>, now: Instant) -> Option<PreparedKey> {
    spares.retain(|(_, made)| now.saturating_duration_since(*made) < SPARE_MAX_AGE);
    spares.pop().map(|(key, _)| key)
}

/// The resolver the handshake builds its Noise state with: X25519 from
/// [`EphemeralX25519`] (using `prepared` for the first key pair it is asked
/// to make), ciphers and hashes from snow's ring resolver, the rest from
/// snow's default one.
pub(crate) fn resolver(prepared: Option<PreparedKey>) -> snow::resolvers::BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(EphemeralX25519Resolver {
            prepared: Arc::new(Mutex::new(prepared)),
        }),
        Box::new(FallbackResolver::new(
            Box::new(RingResolver),
            Box::new(DefaultResolver),
        )),
    ))
}

struct EphemeralX25519Resolver {
    /// Shared by every key this resolver makes: the first to generate a
    /// key pair takes it.
    prepared: Arc<Mutex<Option<PreparedKey>>>,
}

impl CryptoResolver for EphemeralX25519Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(EphemeralX25519 {
                prepared: self.prepared.clone(),
                ..EphemeralX25519::default()
            })),
            _ => None,
        }
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// A one-shot X25519 key pair held by ring.
#[derive(Default)]
struct EphemeralX25519 {
    /// Taken by the one agreement it may take part in.
    private: Mutex<Option<EphemeralPrivateKey>>,
    public: [u8; KEY_LEN],
    /// A key pair made in advance, used instead of generating one.
    prepared: Arc<Mutex<Option<PreparedKey>>>,
}

impl Dh for EphemeralX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, _privkey: &[u8]) {
        // ring cannot import a private key: forget any key instead, so
        // that an agreement with the key snow meant to set fails.
        *self
            .private
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.public = [0; KEY_LEN];
    }

    fn generate(&mut self, _rng: &mut dyn Random) -> Result<(), snow::Error> {
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let key = match prepared {
            Some(key) => key,
            None => PreparedKey::generate()?,
        };
        self.public = key.public;
        *self
            .private
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Some(key.private);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        // Never leaves ring.
        &[]
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let private = self
            .private
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(snow::Error::Dh)?;
        // snow hands over keys and output in buffers sized for its largest
        // curve: use the first 32 bytes of each.
        let pubkey = pubkey.get(..KEY_LEN).ok_or(snow::Error::Dh)?;
        let out = out.get_mut(..KEY_LEN).ok_or(snow::Error::Dh)?;
        agreement::agree_ephemeral(
            private,
            &UnparsedPublicKey::new(&X25519, pubkey),
            |secret| out.copy_from_slice(secret),
        )
        .map_err(|_| snow::Error::Dh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoRandom;
    impl Random for NoRandom {
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), snow::Error> {
            Err(snow::Error::Rng)
        }
    }

    #[test]
    fn two_key_pairs_agree_once_each() {
        let (mut a, mut b) = (EphemeralX25519::default(), EphemeralX25519::default());
        a.generate(&mut NoRandom).unwrap();
        b.generate(&mut NoRandom).unwrap();
        assert_ne!(a.pubkey(), b.pubkey());
        // As snow calls it: keys and output in 56-byte buffers.
        let (mut ab, mut ba) = ([0u8; 56], [0u8; 56]);
        let mut b_public = [0u8; 56];
        b_public[..KEY_LEN].copy_from_slice(b.pubkey());
        a.dh(&b_public, &mut ab).unwrap();
        b.dh(a.pubkey(), &mut ba).unwrap();
        assert_eq!(ab, ba);
        assert_eq!(ab[KEY_LEN..], [0; 56 - KEY_LEN]);
        assert_ne!(ab[..KEY_LEN], [0; KEY_LEN]);
        // One agreement per key.
        assert!(a.dh(b.pubkey(), &mut ab).is_err());
    }

    #[test]
    fn agrees_with_snows_own_x25519() {
        let mut ours = EphemeralX25519::default();
        ours.generate(&mut NoRandom).unwrap();
        let mut rng = DefaultResolver.resolve_rng().unwrap();
        let mut theirs = DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        theirs.generate(&mut *rng).unwrap();
        let (mut a, mut b) = ([0u8; 56], [0u8; 56]);
        ours.dh(theirs.pubkey(), &mut a).unwrap();
        theirs.dh(ours.pubkey(), &mut b).unwrap();
        assert_eq!(a[..KEY_LEN], b[..KEY_LEN]);
    }

    #[test]
    fn a_noise_handshake_with_snows_own_x25519_agrees() {
        let params: snow::params::NoiseParams =
            "Noise_NN_25519_ChaChaPoly_BLAKE2s".parse().unwrap();
        let mut ours = snow::Builder::with_resolver(params.clone(), resolver(None))
            .build_initiator()
            .unwrap();
        let mut theirs = snow::Builder::with_resolver(params, Box::new(DefaultResolver))
            .build_responder()
            .unwrap();
        let (mut wire, mut plain) = ([0u8; 128], [0u8; 128]);
        let n = ours.write_message(b"hello", &mut wire).unwrap();
        theirs.read_message(&wire[..n], &mut plain).unwrap();
        let n = theirs.write_message(b"answer", &mut wire).unwrap();
        let m = ours.read_message(&wire[..n], &mut plain).unwrap();
        assert_eq!(&plain[..m], b"answer");
        assert_eq!(ours.get_handshake_hash(), theirs.get_handshake_hash());
        assert_eq!(
            ours.dangerously_get_raw_split(),
            theirs.dangerously_get_raw_split()
        );
    }

    #[test]
    fn spare_keys_are_handed_out_once_and_never_stale() {
        let now = Instant::now();
        let made = |age: Duration| (PreparedKey::generate().unwrap(), now - age);
        let mut spares = vec![
            made(SPARE_MAX_AGE + Duration::from_secs(1)),
            made(Duration::from_secs(1)),
            made(Duration::ZERO),
        ];
        let newest = *spares[2].0.public();
        let fresh = *spares[1].0.public();
        assert_eq!(take_fresh(&mut spares, now).unwrap().public(), &newest);
        assert_eq!(take_fresh(&mut spares, now).unwrap().public(), &fresh);
        // The stale one is dropped, not handed out.
        assert!(take_fresh(&mut spares, now).is_none());
        assert!(spares.is_empty());
    }

    #[test]
    fn a_spare_key_made_ahead_is_a_working_key_pair() {
        PreparedKey::make_spare();
        // Other tests may take it first; then this makes a fresh one.
        let key = PreparedKey::spare_or_new().unwrap();
        let other = PreparedKey::generate().unwrap();
        let a = agreement::agree_ephemeral(
            key.private,
            &UnparsedPublicKey::new(&X25519, other.public),
            |k| k.to_vec(),
        )
        .unwrap();
        let b = agreement::agree_ephemeral(
            other.private,
            &UnparsedPublicKey::new(&X25519, key.public),
            |k| k.to_vec(),
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_prepared_key_pair_is_the_one_used_and_only_once() {
        let prepared = PreparedKey::generate().unwrap();
        let public = prepared.public;
        let resolver = EphemeralX25519Resolver {
            prepared: Arc::new(Mutex::new(Some(prepared))),
        };
        let mut first = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut second = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        first.generate(&mut NoRandom).unwrap();
        second.generate(&mut NoRandom).unwrap();
        assert_eq!(first.pubkey(), public);
        assert_ne!(second.pubkey(), public);
    }

    #[test]
    fn a_set_key_is_refused_rather_than_misused() {
        let (mut key, mut peer) = (EphemeralX25519::default(), EphemeralX25519::default());
        key.generate(&mut NoRandom).unwrap();
        peer.generate(&mut NoRandom).unwrap();
        key.set(&[1; KEY_LEN]);
        let mut out = [0u8; KEY_LEN];
        assert!(key.dh(peer.pubkey(), &mut out).is_err());
    }
}
