//! Certificates: one link of a blessing chain.
//!
//! # Signature scheme
//!
//! Certificate `i` of a chain is signed by the key of certificate `i - 1`; the
//! root certificate (`i = 0`) is signed by its own key. The signature covers
//!
//! ```text
//! CERT_SIGNING_DOMAIN ("flow.cert.v1\0")
//! || bytes(signature of certificate i-1)      -- length-prefixed; empty for the root
//! || str(extension) || public_key (32 bytes) || varint(#caveats) || caveat*
//! ```
//!
//! where the last line is the certificate's canonical wire encoding without
//! its signature (see [`encoding`](super::encoding)). Because each signature
//! covers the previous one, which covers the one before, a certificate cannot
//! be moved to another chain or have its ancestors swapped.

use bytes::BytesMut;
use ed25519_dalek::{Signer, SigningKey};
use flow_message::codec::put_bytes;

use super::caveat::Caveat;
use super::encoding;
use super::keys::{PublicKey, Signature};
use super::pattern::validate_extension;
use crate::{Error, Result};

/// Domain separation prefix of the message a certificate signature covers.
pub const CERT_SIGNING_DOMAIN: &[u8] = b"flow.cert.v1\0";

/// One link of a blessing chain: the signer grants `extension` (appended to
/// the chain's name so far) to `public_key`, subject to `caveats`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Certificate {
    pub(crate) extension: String,
    pub(crate) public_key: PublicKey,
    pub(crate) caveats: Vec<Caveat>,
    pub(crate) signature: Signature,
}

impl Certificate {
    /// Assembles a certificate from its parts without checking the signature
    /// (that is [`Blessings::validate`](super::Blessings::validate)'s job).
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if the
    /// extension is not valid.
    pub fn from_parts(
        extension: impl Into<String>,
        public_key: PublicKey,
        caveats: Vec<Caveat>,
        signature: Signature,
    ) -> Result<Self> {
        let extension = extension.into();
        validate_extension(&extension)?;
        Ok(Certificate {
            extension,
            public_key,
            caveats,
            signature,
        })
    }

    /// The name component(s) this certificate adds.
    pub fn extension(&self) -> &str {
        &self.extension
    }

    /// The key the certificate is granted to.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The conditions on this certificate.
    pub fn caveats(&self) -> &[Caveat] {
        &self.caveats
    }

    /// The signature by the previous certificate's key (own key for a root).
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The exact bytes this certificate's signature covers, given the
    /// signature of the previous certificate (`None` for a root).
    pub fn signed_message(&self, previous: Option<&Signature>) -> Vec<u8> {
        signed_message(previous, &self.extension, &self.public_key, &self.caveats)
    }

    /// Signs a new certificate with `signer`, chained after `previous`.
    pub(crate) fn sign(
        signer: &SigningKey,
        previous: Option<&Signature>,
        extension: &str,
        public_key: PublicKey,
        caveats: Vec<Caveat>,
    ) -> Result<Self> {
        validate_extension(extension)?;
        let message = signed_message(previous, extension, &public_key, &caveats);
        let signature = Signature(signer.sign(&message).to_bytes());
        Ok(Certificate {
            extension: extension.to_owned(),
            public_key,
            caveats,
            signature,
        })
    }
}

fn signed_message(
    previous: Option<&Signature>,
    extension: &str,
    public_key: &PublicKey,
    caveats: &[Caveat],
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(CERT_SIGNING_DOMAIN);
    put_bytes(&mut buf, previous.map_or(&[][..], |s| s.as_bytes()));
    encoding::put_certificate_body(&mut buf, extension, public_key, caveats);
    buf.to_vec()
}

/// Checks every signature of `chain`. Fails with
/// [`ErrorKind::Auth`](crate::ErrorKind::Auth) naming the first certificate
/// (0-based, the root is 0) whose signature does not verify.
///
/// A chain that verified once is remembered (by a SHA-256 digest of every
/// certificate's signed message and signature), so a peer presenting the
/// same blessings again — on every connection — costs no signature checks.
pub(crate) fn verify_chain(chain: &[Certificate]) -> Result<()> {
    let mut previous: Option<&Certificate> = None;
    let mut messages = Vec::with_capacity(chain.len());
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for cert in chain {
        let message = cert.signed_message(previous.map(|p| &p.signature));
        digest.update(&(message.len() as u64).to_be_bytes());
        digest.update(&message);
        digest.update(cert.signature.as_bytes());
        messages.push(message);
        previous = Some(cert);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.finish().as_ref());
    if verified_chains::contains(&key) {
        return Ok(());
    }
    let mut previous: Option<&Certificate> = None;
    for (i, (cert, message)) in chain.iter().zip(&messages).enumerate() {
        let signer = previous.map_or(&cert.public_key, |p| &p.public_key);
        signer.verify(message, &cert.signature).map_err(|_| {
            Error::auth(format!(
                "bad signature in certificate {i} ({:?})",
                cert.extension
            ))
        })?;
        previous = Some(cert);
    }
    verified_chains::insert(key);
    Ok(())
}

/// Digests of chains whose signatures verified, process-wide, bounded.
mod verified_chains {
    use std::collections::{HashSet, VecDeque};
    use std::sync::{Mutex, PoisonError};

    /// Chains remembered; the oldest is forgotten first.
    const CAPACITY: usize = 4096;

    struct Cache {
        set: HashSet<[u8; 32]>,
        order: VecDeque<[u8; 32]>,
    }

    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

    pub(super) fn contains(key: &[u8; 32]) -> bool {
        let cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        cache.as_ref().is_some_and(|c| c.set.contains(key))
    }

    pub(super) fn insert(key: [u8; 32]) {
        let mut guard = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = guard.get_or_insert_with(|| Cache {
            set: HashSet::new(),
            order: VecDeque::new(),
        });
        if cache.set.insert(key) {
            cache.order.push_back(key);
            if cache.order.len() > CAPACITY
                && let Some(old) = cache.order.pop_front()
            {
                cache.set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn pk(sk: &SigningKey) -> PublicKey {
        PublicKey::from_verifying_key(sk.verifying_key())
    }

    #[test]
    fn a_remembered_chain_does_not_vouch_for_a_tampered_copy() {
        let (a, b) = (key(11), key(12));
        let root = Certificate::sign(&a, None, "carol", pk(&a), vec![]).unwrap();
        let leaf = Certificate::sign(&a, Some(&root.signature), "tv", pk(&b), vec![]).unwrap();
        let good = vec![root.clone(), leaf.clone()];
        verify_chain(&good).unwrap();
        verify_chain(&good).unwrap();
        // Same signatures, another extension: must be checked, and fail.
        let mut forged = leaf.clone();
        forged.extension = "radio".into();
        let err = verify_chain(&[root, forged]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
    }

    #[test]
    fn chain_signatures_verify_and_bind_ancestors() {
        let (a, b, c) = (key(1), key(2), key(3));
        let root = Certificate::sign(&a, None, "alice", pk(&a), vec![]).unwrap();
        let second = Certificate::sign(&a, Some(&root.signature), "phone", pk(&b), vec![]).unwrap();
        let third = Certificate::sign(&b, Some(&second.signature), "app", pk(&c), vec![]).unwrap();
        verify_chain(&[root.clone(), second.clone(), third.clone()]).unwrap();

        // The same extension under another root does not verify.
        let other_root = Certificate::sign(
            &a,
            None,
            "alice",
            pk(&a),
            vec![Caveat::Unknown {
                kind: 99,
                bytes: bytes::Bytes::new(),
            }],
        )
        .unwrap();
        let err = verify_chain(&[other_root, second.clone()]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
        assert!(err.message().contains("certificate 1"), "{err}");

        let mut tampered = third;
        tampered.extension = "app2".into();
        let err = verify_chain(&[root, second, tampered]).unwrap_err();
        assert!(err.message().contains("certificate 2"), "{err}");
    }

    #[test]
    fn from_parts_validates_extension() {
        let a = key(1);
        let sig = Signature([0; 64]);
        assert!(Certificate::from_parts("a:b", pk(&a), vec![], sig).is_ok());
        let err = Certificate::from_parts("a@b", pk(&a), vec![], sig).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadArg);
        assert!(Certificate::sign(&a, None, "", pk(&a), vec![]).is_err());
    }
}
