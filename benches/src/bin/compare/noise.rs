//! The libp2p secure channel, assembled from crates: Noise XX over TCP with
//! each side's static Diffie-Hellman key signed by an ed25519 identity key,
//! then transport messages framed as libp2p-noise frames them.
//!
//! - Pattern `Noise_XX_25519_ChaChaPoly_SHA256`, the one libp2p-noise runs
//!   (snow with its ring resolver for ChaCha20-Poly1305 and SHA-256).
//! - Every Noise message travels behind a 2-byte big-endian length, so a
//!   message is at most 65,535 bytes; the payload of a transport message is
//!   at most 65,535 − 16 bytes.
//! - The handshake payload (second message from the responder, third from
//!   the initiator) carries the ed25519 public key and its signature over
//!   `"noise-libp2p-static-key:" || static DH public key`, which the peer
//!   checks. libp2p wraps these two fields in protobuf; here they are a
//!   fixed 96-byte layout, which costs the same to check.
//! - Writes are gathered into one plaintext buffer and sealed into a message
//!   when it is full or on flush; reads decrypt one whole message and hand it
//!   out, as libp2p-noise does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The Noise protocol libp2p uses.
pub(crate) const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_SHA256";

/// Largest Noise message (the 2-byte length prefix bounds it).
const MAX_MESSAGE: usize = 65_535;
/// Room for one handshake message (the largest is about 300 bytes).
const HANDSHAKE_MESSAGE: usize = 4096;

/// AEAD tag added to every transport message.
const TAG: usize = 16;

/// Largest plaintext one transport message carries.
const MAX_PLAINTEXT: usize = MAX_MESSAGE - TAG;

/// Sealed bytes held back before a write waits for the socket.
const WRITE_BACKLOG: usize = 128 * 1024;

/// What the identity key signs, before the static DH key.
const SIGNATURE_PREFIX: &[u8] = b"noise-libp2p-static-key:";

/// Length of the handshake payload: ed25519 public key, then signature.
const PAYLOAD_LEN: usize = 32 + 64;

/// One side's long-lived keys: an ed25519 identity and a static X25519 key
/// signed by it (made once, as libp2p makes them once per transport).
pub(crate) struct Identity {
    static_private: Vec<u8>,
    payload: Vec<u8>,
}

impl Identity {
    /// A fresh identity.
    pub(crate) fn generate() -> io::Result<Identity> {
        let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let builder = snow::Builder::new(params()?);
        let keys = builder.generate_keypair().map_err(noise_error)?;
        let mut to_sign = SIGNATURE_PREFIX.to_vec();
        to_sign.extend_from_slice(&keys.public);
        let signature = signing.sign(&to_sign);
        let mut payload = Vec::with_capacity(PAYLOAD_LEN);
        payload.extend_from_slice(signing.verifying_key().as_bytes());
        payload.extend_from_slice(&signature.to_bytes());
        Ok(Identity {
            static_private: keys.private,
            payload,
        })
    }
}

fn params() -> io::Result<snow::params::NoiseParams> {
    PATTERN
        .parse()
        .map_err(|e: snow::Error| io::Error::other(format!("noise pattern: {e}")))
}

fn noise_error(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("noise: {e}"))
}

async fn send_message(tcp: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "noise message too long"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    tcp.write_all(&framed).await
}

async fn receive_message(tcp: &mut TcpStream, into: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len).await?;
    into.resize(usize::from(u16::from_be_bytes(len)), 0);
    tcp.read_exact(into).await?;
    Ok(())
}

/// Checks a peer's handshake payload against the static key it used.
fn verify_payload(payload: &[u8], remote_static: &[u8]) -> io::Result<VerifyingKey> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if payload.len() != PAYLOAD_LEN {
        return Err(bad("handshake payload has the wrong length"));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&payload[..32]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&payload[32..]);
    let key = VerifyingKey::from_bytes(&key).map_err(|_| bad("bad identity key"))?;
    let mut signed = SIGNATURE_PREFIX.to_vec();
    signed.extend_from_slice(remote_static);
    key.verify(&signed, &Signature::from_bytes(&signature))
        .map_err(|_| bad("identity signature does not verify"))?;
    Ok(key)
}

/// Runs the XX handshake over `tcp` as initiator or responder; returns the
/// secured stream and the peer's verified identity key.
pub(crate) async fn handshake(
    mut tcp: TcpStream,
    identity: &Identity,
    initiator: bool,
) -> io::Result<(NoiseStream, VerifyingKey)> {
    let builder = snow::Builder::new(params()?)
        .local_private_key(&identity.static_private)
        .map_err(noise_error)?;
    let mut state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(noise_error)?;
    // XX messages with the identity payload stay well under a kilobyte.
    let mut out = vec![0u8; HANDSHAKE_MESSAGE];
    let mut message = Vec::new();
    let mut payload = vec![0u8; HANDSHAKE_MESSAGE];
    let peer_payload_len;
    if initiator {
        // -> e
        let n = state.write_message(&[], &mut out).map_err(noise_error)?;
        send_message(&mut tcp, &out[..n]).await?;
        // <- e, ee, s, es + responder's identity
        receive_message(&mut tcp, &mut message).await?;
        peer_payload_len = state
            .read_message(&message, &mut payload)
            .map_err(noise_error)?;
        // -> s, se + our identity
        let n = state
            .write_message(&identity.payload, &mut out)
            .map_err(noise_error)?;
        send_message(&mut tcp, &out[..n]).await?;
    } else {
        receive_message(&mut tcp, &mut message).await?;
        state
            .read_message(&message, &mut payload)
            .map_err(noise_error)?;
        let n = state
            .write_message(&identity.payload, &mut out)
            .map_err(noise_error)?;
        send_message(&mut tcp, &out[..n]).await?;
        receive_message(&mut tcp, &mut message).await?;
        peer_payload_len = state
            .read_message(&message, &mut payload)
            .map_err(noise_error)?;
    }
    let remote_static = state
        .get_remote_static()
        .ok_or_else(|| io::Error::other("no remote static key after XX"))?
        .to_vec();
    let peer = verify_payload(&payload[..peer_payload_len], &remote_static)?;
    let transport = state.into_transport_mode().map_err(noise_error)?;
    Ok((NoiseStream::new(tcp, transport), peer))
}

/// A TCP stream secured by Noise transport messages; `AsyncRead +
/// AsyncWrite` over the plaintext.
pub(crate) struct NoiseStream {
    tcp: TcpStream,
    noise: snow::TransportState,
    /// Raw bytes read from the socket, not yet a whole message.
    raw: BytesMut,
    /// The last decrypted message (its first `plain_len` bytes) and how
    /// much of it was handed out.
    plain: Vec<u8>,
    plain_len: usize,
    plain_pos: usize,
    /// Plaintext written and not yet sealed.
    pending: Vec<u8>,
    /// Sealed, framed messages not yet written to the socket.
    sealed: Vec<u8>,
    sealed_pos: usize,
}

impl NoiseStream {
    fn new(tcp: TcpStream, noise: snow::TransportState) -> NoiseStream {
        NoiseStream {
            tcp,
            noise,
            raw: BytesMut::with_capacity(2 * (MAX_MESSAGE + 2)),
            plain: vec![0u8; MAX_MESSAGE],
            plain_len: 0,
            plain_pos: 0,
            pending: Vec::with_capacity(MAX_PLAINTEXT),
            sealed: Vec::with_capacity(WRITE_BACKLOG + MAX_MESSAGE + 2),
            sealed_pos: 0,
        }
    }

    /// Decrypts the next whole message in `raw`, if there is one.
    fn open_next(&mut self) -> io::Result<bool> {
        if self.raw.len() < 2 {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([self.raw[0], self.raw[1]]));
        if self.raw.len() < 2 + len {
            return Ok(false);
        }
        self.plain_len = self
            .noise
            .read_message(&self.raw[2..2 + len], &mut self.plain)
            .map_err(noise_error)?;
        self.plain_pos = 0;
        self.raw.advance(2 + len);
        Ok(true)
    }

    /// Seals the pending plaintext into one framed message.
    fn seal_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let start = self.sealed.len();
        self.sealed.resize(start + 2 + self.pending.len() + TAG, 0);
        let n = self
            .noise
            .write_message(&self.pending, &mut self.sealed[start + 2..])
            .map_err(noise_error)?;
        self.sealed.truncate(start + 2 + n);
        let len = u16::try_from(n).map_err(|_| io::Error::other("sealed message too long"))?;
        self.sealed[start..start + 2].copy_from_slice(&len.to_be_bytes());
        self.pending.clear();
        Ok(())
    }

    /// Writes sealed bytes to the socket until none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sealed_pos < self.sealed.len() {
            let n =
                ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.sealed[self.sealed_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sealed_pos += n;
        }
        self.sealed.clear();
        self.sealed_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for NoiseStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain_len {
                let n = buf.remaining().min(this.plain_len - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            this.raw.reserve(MAX_MESSAGE + 2);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.tcp),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                if this.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a noise message",
                )));
            }
        }
    }
}

impl AsyncWrite for NoiseStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() == MAX_PLAINTEXT {
            this.seal_pending()?;
        }
        if this.sealed.len() - this.sealed_pos >= WRITE_BACKLOG {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_PLAINTEXT - this.pending.len());
        this.pending.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.seal_pending()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
