//! Public keys and signatures: thin newtypes over ed25519.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use ed25519_dalek::VerifyingKey;

use crate::{Error, Result};

/// Length in bytes of an encoded [`PublicKey`].
pub const PUBLIC_KEY_LEN: usize = 32;

/// Length in bytes of a [`Signature`].
pub const SIGNATURE_LEN: usize = 64;

/// An ed25519 public key: the identity a principal proves by signing.
///
/// Equality, hashing and ordering use the 32-byte compressed encoding;
/// [`Display`](fmt::Display) and [`FromStr`] use lowercase hex.
#[derive(Clone, Copy)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses the 32-byte compressed encoding of a key.
    ///
    /// Fails with [`ErrorKind::BadArg`](crate::ErrorKind::BadArg) if the bytes
    /// are not a point on the curve.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<Self> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| Error::bad_arg("public key is not a valid ed25519 point"))
    }

    /// The 32-byte compressed encoding.
    pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0.to_bytes()
    }

    /// The 32-byte compressed encoding, borrowed.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.0.as_bytes()
    }

    /// Checks that `signature` is this key's signature of `message`.
    ///
    /// Uses ed25519 strict verification (no malleable or small-order
    /// signatures). Fails with [`ErrorKind::Auth`](crate::ErrorKind::Auth).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<()> {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0
            .verify_strict(message, &sig)
            .map_err(|_| Error::auth(format!("signature does not verify with key {self}")))
    }

    pub(crate) fn from_verifying_key(key: VerifyingKey) -> Self {
        PublicKey(key)
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for PublicKey {}

impl Hash for PublicKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = Error;

    /// Parses 64 hex digits.
    fn from_str(s: &str) -> Result<Self> {
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        hex::decode_to_slice(s, &mut bytes)
            .map_err(|e| Error::bad_arg(format!("public key {s:?} is not 64 hex digits: {e}")))?;
        PublicKey::from_bytes(&bytes)
    }
}

/// An ed25519 signature (64 bytes).
///
/// A signature is only data: whether it is valid depends on the key and the
/// message, see [`PublicKey::verify`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl Signature {
    /// The 64 bytes.
    pub fn to_bytes(&self) -> [u8; SIGNATURE_LEN] {
        self.0
    }

    /// The 64 bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }
}

impl From<[u8; SIGNATURE_LEN]> for Signature {
    fn from(bytes: [u8; SIGNATURE_LEN]) -> Self {
        Signature(bytes)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn verify_accepts_good_and_rejects_bad() {
        let sk = key(1);
        let pk = PublicKey::from_verifying_key(sk.verifying_key());
        let sig = Signature(sk.sign(b"hello").to_bytes());
        pk.verify(b"hello", &sig).unwrap();
        let err = pk.verify(b"hellp", &sig).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
        let mut bad = sig;
        bad.0[3] ^= 1;
        assert_eq!(
            pk.verify(b"hello", &bad).unwrap_err().kind(),
            ErrorKind::Auth
        );
        let other = PublicKey::from_verifying_key(key(2).verifying_key());
        assert!(other.verify(b"hello", &sig).is_err());
    }

    #[test]
    fn hex_round_trip_and_ordering() {
        let a = PublicKey::from_verifying_key(key(1).verifying_key());
        let b = PublicKey::from_verifying_key(key(2).verifying_key());
        let text = a.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PublicKey>().unwrap(), a);
        assert_ne!(a, b);
        assert_eq!(a.cmp(&b), a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(PublicKey::from_bytes(&a.to_bytes()).unwrap(), a);
        assert_eq!(
            "zz".parse::<PublicKey>().unwrap_err().kind(),
            ErrorKind::BadArg
        );
    }
}
