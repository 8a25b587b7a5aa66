//! Frame encryption after the handshake.
//!
//! The Noise handshake (crate `snow`) yields one key per direction; frames are
//! then sealed in place with ring's AEAD, avoiding the copy a separate output
//! buffer would cost. A sealed frame is
//!
//! ```text
//! [encrypted length: u32 big-endian][tag: 16][ciphertext][cleartext tail]
//! ```
//!
//! where the tail, if any, is one passthrough payload that is already
//! end-to-end encrypted (its `Data` header is inside the ciphertext). With the
//! tag before the ciphertext, the decrypted plaintext and the tail sit side by
//! side, so the receiver hands out payloads without copying. Nonces count
//! frames per direction; a direction that would wrap fails instead.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::{Error, Result};

/// Bytes a sealed frame adds in front of the plaintext.
pub const FRAME_OVERHEAD: usize = 4 + 16;

/// The AEAD both sides use, chosen by the dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// AES-256-GCM: fastest where the CPU has AES instructions.
    AesGcm,
    /// ChaCha20-Poly1305: fastest without them.
    ChaChaPoly,
}

impl Suite {
    /// The faster suite on this CPU.
    pub fn preferred() -> Suite {
        if has_aes_instructions() {
            Suite::AesGcm
        } else {
            Suite::ChaChaPoly
        }
    }

    /// The Noise protocol name run with this suite.
    pub fn noise_pattern(self) -> &'static str {
        match self {
            Suite::AesGcm => "Noise_NN_25519_AESGCM_BLAKE2s",
            Suite::ChaChaPoly => "Noise_NN_25519_ChaChaPoly_BLAKE2s",
        }
    }

    /// The suite's id on the wire.
    pub fn id(self) -> u8 {
        match self {
            Suite::AesGcm => 1,
            Suite::ChaChaPoly => 2,
        }
    }

    /// The suite with wire id `id`.
    pub fn from_id(id: u8) -> Option<Suite> {
        match id {
            1 => Some(Suite::AesGcm),
            2 => Some(Suite::ChaChaPoly),
            _ => None,
        }
    }

    fn key(self, key: &[u8; 32]) -> Result<LessSafeKey> {
        let alg = match self {
            Suite::AesGcm => &AES_256_GCM,
            Suite::ChaChaPoly => &CHACHA20_POLY1305,
        };
        let unbound = UnboundKey::new(alg, key)
            .map_err(|_| Error::auth("could not build the frame cipher key"))?;
        Ok(LessSafeKey::new(unbound))
    }
}

#[cfg(target_arch = "x86_64")]
fn has_aes_instructions() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn has_aes_instructions() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn has_aes_instructions() -> bool {
    false
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn next_nonce(counter: &mut u64) -> Result<Nonce> {
    if *counter == u64::MAX {
        return Err(Error::network(
            "frame counter exhausted: the connection must be replaced",
        ));
    }
    let n = nonce(*counter);
    *counter += 1;
    Ok(n)
}

/// Seals outgoing frames of one direction.
pub struct FrameSealer {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSealer")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl FrameSealer {
    /// A sealer with `key` from the handshake.
    pub fn new(suite: Suite, key: &[u8; 32]) -> Result<Self> {
        Ok(FrameSealer {
            key: suite.key(key)?,
            counter: 0,
        })
    }

    /// Seals a frame in place: `frame` is [`FRAME_OVERHEAD`] bytes of room
    /// for the sealer, then the body, whose first `encrypted_len` bytes are
    /// encrypted and the rest left as is.
    pub fn seal(&mut self, frame: &mut [u8], encrypted_len: usize) -> Result<()> {
        let len =
            u32::try_from(encrypted_len).map_err(|_| Error::bad_arg("frame too large to seal"))?;
        let (header, body) = frame
            .split_at_mut_checked(FRAME_OVERHEAD)
            .ok_or_else(|| Error::bad_arg("frame shorter than its sealed header"))?;
        let encrypted = body
            .get_mut(..encrypted_len)
            .ok_or_else(|| Error::bad_arg("frame shorter than its encrypted part"))?;
        let nonce = next_nonce(&mut self.counter)?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), encrypted)
            .map_err(|_| Error::network("frame encryption failed"))?;
        let (length, tag_room) = header.split_at_mut(4);
        length.copy_from_slice(&len.to_be_bytes());
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Seals `plaintext` into a new frame (for the handshake's few frames).
    pub fn seal_to_bytes(&mut self, plaintext: &[u8]) -> Result<Bytes> {
        let mut frame = BytesMut::with_capacity(FRAME_OVERHEAD + plaintext.len());
        frame.put_bytes(0, FRAME_OVERHEAD);
        frame.put_slice(plaintext);
        self.seal(&mut frame, plaintext.len())?;
        Ok(frame.freeze())
    }
}

/// Opens incoming frames of one direction.
pub struct FrameOpener {
    key: LessSafeKey,
    counter: u64,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameOpener")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl FrameOpener {
    /// An opener with `key` from the handshake.
    pub fn new(suite: Suite, key: &[u8; 32]) -> Result<Self> {
        Ok(FrameOpener {
            key: suite.key(key)?,
            counter: 0,
        })
    }

    /// Authenticates and decrypts `frame` in place. Returns the plaintext
    /// followed by any cleartext tail, and the length of the plaintext.
    pub fn open(&mut self, mut frame: BytesMut) -> Result<(Bytes, usize)> {
        if frame.len() < FRAME_OVERHEAD {
            return Err(Error::auth(format!(
                "frame of {} bytes is too short to be sealed",
                frame.len()
            )));
        }
        let encrypted_len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        if encrypted_len > frame.len() - FRAME_OVERHEAD {
            return Err(Error::auth(format!(
                "sealed frame claims {encrypted_len} encrypted bytes but has {}",
                frame.len() - FRAME_OVERHEAD
            )));
        }
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&frame[4..FRAME_OVERHEAD]);
        let nonce = next_nonce(&mut self.counter)?;
        let end = FRAME_OVERHEAD + encrypted_len;
        self.key
            .open_in_place_separate_tag(
                nonce,
                Aad::empty(),
                Tag::from(tag),
                &mut frame[FRAME_OVERHEAD..end],
                0..,
            )
            .map_err(|_| Error::auth("frame failed authentication"))?;
        frame.advance(FRAME_OVERHEAD);
        Ok((frame.freeze(), encrypted_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn pair(suite: Suite) -> (FrameSealer, FrameOpener) {
        let key = [7u8; 32];
        (
            FrameSealer::new(suite, &key).unwrap(),
            FrameOpener::new(suite, &key).unwrap(),
        )
    }

    #[test]
    fn sealing_a_frame_too_short_fails_and_spends_no_nonce() {
        let (mut sealer, mut opener) = pair(Suite::AesGcm);
        // No room for the length and tag; a body shorter than what is to
        // be encrypted.
        assert!(sealer.seal(&mut [0u8; 5], 0).is_err());
        assert!(sealer.seal(&mut [0u8; FRAME_OVERHEAD + 3], 4).is_err());
        // The next frame still opens with the first nonce.
        let frame = sealer.seal_to_bytes(b"next").unwrap();
        let (plain, _) = opener.open(BytesMut::from(&frame[..])).unwrap();
        assert_eq!(&plain[..], b"next");
    }

    #[test]
    fn frames_round_trip_with_both_suites_and_tails() {
        for suite in [Suite::AesGcm, Suite::ChaChaPoly] {
            let (mut sealer, mut opener) = pair(suite);
            let mut header = BytesMut::new();
            header.put_bytes(0, FRAME_OVERHEAD);
            header.put_slice(b"secret part");
            header.put_slice(b"tail");
            sealer.seal(&mut header, 11).unwrap();
            assert!(!header.windows(6).any(|w| w == b"secret"));
            let (plain, enc) = opener.open(header).unwrap();
            assert_eq!(&plain[..], b"secret parttail");
            assert_eq!(enc, 11);
            let again = sealer.seal_to_bytes(b"second").unwrap();
            let (plain, _) = opener.open(BytesMut::from(&again[..])).unwrap();
            assert_eq!(&plain[..], b"second");
        }
    }

    #[test]
    fn tampering_replay_and_short_frames_fail() {
        let (mut sealer, mut opener) = pair(Suite::preferred());
        let frame = sealer.seal_to_bytes(b"hello").unwrap();
        let mut bad = BytesMut::from(&frame[..]);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(opener.open(bad).unwrap_err().kind(), ErrorKind::Auth);

        let (mut sealer, mut opener) = pair(Suite::preferred());
        let frame = sealer.seal_to_bytes(b"hello").unwrap();
        opener.open(BytesMut::from(&frame[..])).unwrap();
        // The same frame again has the wrong nonce.
        assert!(opener.open(BytesMut::from(&frame[..])).is_err());
        assert!(opener.open(BytesMut::from(&[0u8; 5][..])).is_err());
        let mut lying = BytesMut::from(&frame[..]);
        lying[0] = 0xff;
        assert!(opener.open(lying).is_err());
    }
}
