//! The handshake: Noise NN for keys, then channel binding for identities.
//!
//! ```text
//! dialer   -> "FL" suite | Noise e            , payload: dialer Setup (cleartext)
//! acceptor -> Noise e, ee                      , payload: acceptor Setup (encrypted)
//! acceptor -> sealed frame: Blessings, [Discharges], Auth(key || sig(acceptor tag || h))
//! dialer   -> sealed frame: Blessings, [Discharges], Auth(key || sig(dialer tag || h)),
//!             then at once its first OpenFlow/Data (same frame when possible)
//! ```
//!
//! `h` is the Noise handshake hash, so each signature binds an identity to
//! this very channel. The dialer checks the acceptor's signature, blessings
//! and its `PeerAuthorizer` before revealing anything of its own. Like the
//! multiplexer, the handshake is sans-I/O: it is fed frames and times and
//! answers with frames.
//!
//! An acceptor may hide its blessings ([`ConnConfig::blessings_visible_to`]):
//! its binding then shows only its key, its `Setup` says so, and a dialer
//! willing to go first ([`ConnConfig::reveal_to_hidden_acceptors`]) sends its
//! binding during the handshake; the acceptor answers with a sealed frame of
//! its real blessings if the dialer may see them, or hangs up.
//!
//! Resuming ([`super::resumption`]): the dialer's Setup names a ticket from
//! its last connection to this acceptor; if the acceptor still holds it,
//! both `sig(...)` above become `HMAC(ticket secret, tag || h)`. Frame keys
//! are HKDF-SHA256 of Noise's raw split keys ("flow/v1 frame key").

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use flow_message::codec::Reader;
use flow_message::{Auth, BlessingsMsg, DischargesMsg, Message, Setup, VersionRange};

use super::cipher::{FRAME_OVERHEAD, FrameOpener, FrameSealer, Suite};
use super::config::ConnConfig;
use super::noise_dh::PreparedKey;
use super::resumption::{
    self, SECRET_LEN, TICKET_ID_LEN, Ticket, TicketId, binding_mac, verify_binding_mac,
};
use super::state::{CONN_BLESSINGS_KEY, Established, NO_DISCHARGES_KEY, Role};
use crate::auth::{AuthorizedPeer, PeerAuthorizer, PeerInfo};
use crate::naming::{Endpoint, RoutingId};
use crate::security::{
    Blessings, Discharges, PUBLIC_KEY_LEN, Principal, PublicKey, SIGNATURE_LEN, Signature,
};
use crate::{Error, ErrorKind, Result};

/// Protocol versions this build speaks.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };

/// First bytes of a dialer's first frame.
const MAGIC: &[u8; 2] = b"FL";
/// What the acceptor signs, before the handshake hash.
const ACCEPTOR_TAG: &[u8] = b"flow/v1 acceptor channel binding\0";
/// What the dialer signs, before the handshake hash.
const DIALER_TAG: &[u8] = b"flow/v1 dialer channel binding\0";
/// Largest Noise message.
const NOISE_MAX: usize = 65_535;
/// Smallest frame a peer may ask for.
const MIN_MTU: u64 = 4096;

/// What either side brings to a handshake.
#[derive(Clone)]
pub struct HandshakeParams {
    /// Limits and tunables.
    pub config: ConnConfig,
    /// This side's identity.
    pub principal: Principal,
    /// Decides whether to trust the peer and what blessings to show it.
    pub authorizer: Arc<dyn PeerAuthorizer>,
    /// This side's endpoint (its routing id and names).
    pub local_endpoint: Endpoint,
    /// Largest frame the transport carries.
    pub transport_max_frame: usize,
}

impl std::fmt::Debug for HandshakeParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeParams")
            .field("local_endpoint", &self.local_endpoint)
            .field("authorizer", &self.authorizer)
            .finish_non_exhaustive()
    }
}

/// A finished handshake: what the multiplexer starts from, the frame
/// ciphers, and who is on the other end.
#[derive(Debug)]
pub struct HandshakeDone {
    /// Start state for the multiplexer.
    pub established: Established,
    /// Messages this side must send first (the dialer's channel binding).
    pub initial_messages: Vec<Message>,
    /// Seals this side's frames.
    pub sealer: FrameSealer,
    /// Opens the peer's frames.
    pub opener: FrameOpener,
    /// This side's endpoint.
    pub local_endpoint: Endpoint,
    /// The peer's endpoint (its routing id as it announced it).
    pub remote_endpoint: Endpoint,
    /// The endpoint the dialer asked for (acceptor side; for proxies).
    pub requested_endpoint: Option<Endpoint>,
    /// The peer's names that this side's authorizer accepted.
    pub authorized: AuthorizedPeer,
    /// Plaintext that followed the dialer's binding in its frame (acceptor
    /// side), with the length of its encrypted part.
    pub leftover: Option<(Bytes, usize)>,
    /// Sealed frames to write before any other (the acceptor's revealed
    /// blessings).
    pub frames_to_send: Vec<Bytes>,
    /// The peer proved its key with a resumption ticket, not a signature.
    pub resumed: bool,
}

fn noise_builder(suite: Suite, prepared: Option<PreparedKey>) -> Result<snow::Builder<'static>> {
    let params = suite
        .noise_pattern()
        .parse()
        .map_err(|e| Error::with_source(ErrorKind::BadState, "noise pattern", e))?;
    Ok(snow::Builder::with_resolver(
        params,
        super::noise_dh::resolver(prepared),
    ))
}

fn noise_err(what: &str, err: snow::Error) -> Error {
    Error::with_source(
        ErrorKind::Auth,
        format!("noise handshake failed: {what}"),
        err,
    )
}

/// `ticket` is the Setup's ticket option: a dialer's ticket to redeem (or
/// empty, asking for one), an acceptor's new ticket.
fn local_setup(
    params: &HandshakeParams,
    remote: Option<&Endpoint>,
    ticket: Option<&[u8]>,
) -> Setup {
    let hidden_blessings = remote.is_none() && params.config.blessings_visible_to.is_some();
    Setup {
        hidden_blessings,
        versions: SUPPORTED_VERSIONS,
        mtu: Some(receive_mtu(params) as u64),
        shared_tokens: Some(params.config.effective_shared_tokens()),
        initial_window: Some(params.config.initial_window),
        peer_remote_endpoint: remote.map(ToString::to_string),
        peer_local_endpoint: Some(params.local_endpoint.to_string()),
        ticket: ticket.map(Bytes::copy_from_slice),
        unknown_options: Vec::new(),
    }
}

fn receive_mtu(params: &HandshakeParams) -> usize {
    params
        .config
        .max_frame
        .min(params.transport_max_frame.saturating_sub(FRAME_OVERHEAD))
}

fn encode_setup(setup: Setup) -> BytesMut {
    let mut buf = BytesMut::new();
    Message::Setup(Box::new(setup)).encode(&mut buf);
    buf
}

fn decode_setup(payload: Bytes) -> Result<Setup> {
    let mut r = Reader::new(payload, "Setup");
    match Message::decode(&mut r) {
        Ok(Message::Setup(setup)) if r.is_empty() => Ok(*setup),
        Ok(other) => Err(Error::bad_arg(format!(
            "handshake expected Setup, got {}",
            other.name()
        ))),
        Err(e) => Err(e.into()),
    }
}

fn parse_endpoint(s: Option<&String>, field: &str) -> Result<Option<Endpoint>> {
    match s {
        None => Ok(None),
        Some(s) => Endpoint::parse(s)
            .map(Some)
            .map_err(|e| e.context(format!("peer's setup {field}"))),
    }
}

/// Bytes of the Noise ephemeral key at the start of the dialer's hello.
const NOISE_E_LEN: usize = 32;
/// Bytes of the tag on an encrypted Noise payload.
const NOISE_TAG_LEN: usize = 16;

/// Room for a Noise NN message carrying `payload_len` bytes: the ephemeral
/// key and the payload with its tag (the first message has none; a few
/// bytes spare are cheaper than a 64 KiB buffer zeroed per handshake).
fn noise_message_len(payload_len: usize) -> usize {
    (NOISE_E_LEN + payload_len + NOISE_TAG_LEN).min(NOISE_MAX)
}

/// Whether `frame` is a dialer's first handshake frame.
pub fn is_hello(frame: &[u8]) -> bool {
    frame.len() > MAGIC.len() && &frame[..MAGIC.len()] == MAGIC
}

/// Reads the dialer's `Setup` from its first handshake frame without
/// taking part in the handshake: it travels in the clear, so a proxy can
/// learn the endpoint the dialer wants (`peer_remote_endpoint`) and route
/// the frame, untouched, to it.
pub fn peek_hello(frame: &[u8]) -> Result<Setup> {
    if !is_hello(frame) {
        return Err(Error::bad_arg("not a flow handshake (bad magic)"));
    }
    let start = MAGIC.len() + 1 + NOISE_E_LEN;
    if frame.len() < start {
        return Err(Error::bad_arg("handshake hello is truncated"));
    }
    decode_setup(Bytes::copy_from_slice(&frame[start..]))
}

/// The endpoint a dialer's first handshake frame asks for.
pub fn requested_endpoint(frame: &[u8]) -> Result<Endpoint> {
    let setup = peek_hello(frame)?;
    match parse_endpoint(setup.peer_remote_endpoint.as_ref(), "remote endpoint")? {
        Some(ep) => Ok(ep),
        None => Err(Error::bad_arg("handshake hello names no endpoint")),
    }
}

/// Settles version and frame size from the two setups.
fn negotiate(params: &HandshakeParams, peer: &Setup) -> Result<(u32, usize)> {
    let version = SUPPORTED_VERSIONS.common(peer.versions).ok_or_else(|| {
        Error::bad_arg(format!(
            "no common protocol version: this side speaks {}..={}, the peer {}..={}",
            SUPPORTED_VERSIONS.min, SUPPORTED_VERSIONS.max, peer.versions.min, peer.versions.max
        ))
    })?;
    let peer_mtu = peer.mtu.unwrap_or(MIN_MTU);
    if peer_mtu < MIN_MTU {
        return Err(Error::bad_arg(format!(
            "peer accepts frames of only {peer_mtu} bytes (at least {MIN_MTU} needed)"
        )));
    }
    let local_limit = params.transport_max_frame.saturating_sub(FRAME_OVERHEAD);
    let max_frame = usize::try_from(peer_mtu)
        .unwrap_or(usize::MAX)
        .min(local_limit);
    Ok((version, max_frame))
}

/// The Blessings, Discharges and Auth messages binding `principal` to the
/// channel whose handshake hash is `hash`: its key and a signature over
/// `tag || hash`, or, resuming with `ticket`, an HMAC of the same under
/// the ticket's secret.
fn binding_messages(
    principal: &Principal,
    blessings: &Blessings,
    discharges: &Discharges,
    tag: &[u8],
    hash: &[u8],
    ticket: Option<&Ticket>,
) -> Vec<Message> {
    let mut binding = BytesMut::with_capacity(PUBLIC_KEY_LEN + SIGNATURE_LEN);
    binding.put_slice(principal.public_key().as_bytes());
    match ticket {
        Some(ticket) => binding.put_slice(&binding_mac(&ticket.secret, tag, hash)),
        None => binding.put_slice(principal.sign(&[tag, hash].concat()).as_bytes()),
    }
    let mut msgs = vec![Message::Blessings(BlessingsMsg {
        key: CONN_BLESSINGS_KEY,
        bytes: blessings.to_bytes(),
    })];
    let discharge_key = if discharges.is_empty() {
        NO_DISCHARGES_KEY
    } else {
        msgs.push(Message::Discharges(DischargesMsg {
            key: CONN_BLESSINGS_KEY,
            blessings_key: CONN_BLESSINGS_KEY,
            bytes: discharges.to_bytes(),
        }));
        CONN_BLESSINGS_KEY
    };
    msgs.push(Message::Auth(Auth {
        blessings_key: CONN_BLESSINGS_KEY,
        discharge_key,
        channel_binding: binding.freeze(),
    }));
    msgs
}

/// A peer's identity as proven by its binding messages.
struct PeerIdentity {
    key: PublicKey,
    blessings: Blessings,
    discharges: Discharges,
    /// The key was proven with a ticket's secret.
    resumed: bool,
}

/// Reads the peer's Blessings, [Discharges] and Auth from the front of `r`
/// and checks its proof over `tag || hash`: a signature, or an HMAC under
/// `ticket`'s secret when this side resumes with it.
fn read_binding(
    r: &mut Reader,
    tag: &[u8],
    hash: &[u8],
    ticket: Option<&Ticket>,
) -> Result<PeerIdentity> {
    let mut blessings = None;
    let mut discharges = Discharges::new();
    loop {
        if r.is_empty() {
            return Err(Error::auth("peer's channel binding is missing"));
        }
        let msg = Message::decode(r)?;
        match msg {
            Message::Blessings(b) if blessings.is_none() && b.key == CONN_BLESSINGS_KEY => {
                blessings = Some(Blessings::decode(b.bytes)?);
            }
            Message::Discharges(d) if d.key == CONN_BLESSINGS_KEY => {
                discharges = Discharges::decode(d.bytes)?;
            }
            Message::Auth(auth) => {
                let Some(blessings) = blessings else {
                    return Err(Error::auth("peer sent Auth before its blessings"));
                };
                if auth.blessings_key != CONN_BLESSINGS_KEY {
                    return Err(Error::auth("peer's Auth names unknown blessings"));
                }
                let (key, resumed) =
                    verify_binding(&auth.channel_binding, &blessings, tag, hash, ticket)?;
                return Ok(PeerIdentity {
                    key,
                    blessings,
                    discharges,
                    resumed,
                });
            }
            other => {
                return Err(Error::auth(format!(
                    "unexpected {} during the handshake",
                    other.name()
                )));
            }
        }
    }
}

/// Checks a channel binding; returns the key it proves and whether a
/// ticket (rather than a signature) proved it.
fn verify_binding(
    binding: &[u8],
    blessings: &Blessings,
    tag: &[u8],
    hash: &[u8],
    ticket: Option<&Ticket>,
) -> Result<(PublicKey, bool)> {
    let bad_length = || {
        Error::auth(format!(
            "channel binding of {} bytes (want {} with a signature, {} with a ticket)",
            binding.len(),
            PUBLIC_KEY_LEN + SIGNATURE_LEN,
            PUBLIC_KEY_LEN + SECRET_LEN
        ))
    };
    let (key, proof) = binding
        .split_first_chunk::<PUBLIC_KEY_LEN>()
        .ok_or_else(bad_length)?;
    let key = PublicKey::from_bytes(key)?;
    let resumed = match (proof.len(), ticket) {
        (SIGNATURE_LEN, _) => {
            let mut sig = [0u8; SIGNATURE_LEN];
            sig.copy_from_slice(proof);
            key.verify(&[tag, hash].concat(), &Signature(sig))
                .map_err(|_| Error::auth("peer's channel binding signature does not verify"))?;
            false
        }
        (SECRET_LEN, Some(ticket)) => {
            if key != ticket.peer_key {
                return Err(Error::auth(format!(
                    "peer resumed as key {key}, but the ticket was issued for {}",
                    ticket.peer_key
                )));
            }
            if !verify_binding_mac(&ticket.secret, tag, hash, proof) {
                return Err(Error::auth("peer's resumption MAC does not verify"));
            }
            true
        }
        (SECRET_LEN, None) => {
            return Err(Error::auth(
                "peer bound the channel with a ticket this side does not resume with",
            ));
        }
        _ => return Err(bad_length()),
    };
    check_blessings_key(blessings, &key)?;
    Ok((key, resumed))
}

/// Blessings presented for `key` must be for `key` and well signed.
fn check_blessings_key(blessings: &Blessings, key: &PublicKey) -> Result<()> {
    if let Some(bkey) = blessings.public_key()
        && bkey != *key
    {
        return Err(Error::auth(format!(
            "peer presented blessings for key {bkey} but holds key {key}"
        )));
    }
    blessings.verify_signatures()
}

fn authorize(
    params: &HandshakeParams,
    remote_endpoint: &Endpoint,
    peer: &PeerIdentity,
    wall: SystemTime,
) -> Result<AuthorizedPeer> {
    params.authorizer.authorize_peer(&PeerInfo {
        principal: &params.principal,
        local_endpoint: &params.local_endpoint,
        remote_endpoint,
        remote_blessings: &peer.blessings,
        remote_discharges: &peer.discharges,
        now: wall,
    })
}

/// The frame ciphers of a finished Noise handshake (keyed from the raw
/// split keys under one label), and the secret of the ticket `offered` on
/// it (if any; under another).
fn split_keys(
    noise: &mut snow::HandshakeState,
    suite: Suite,
    role: Role,
    offered: Option<TicketId>,
) -> Result<(FrameSealer, FrameOpener, Option<OfferedTicket>)> {
    let (initiator_key, responder_key) = noise.dangerously_get_raw_split();
    let offered = match offered {
        Some(id) => Some(OfferedTicket {
            id,
            secret: resumption::derive_secret(&initiator_key, &responder_key, &id)?,
        }),
        None => None,
    };
    let (send, recv) = match role {
        Role::Dialer => (initiator_key, responder_key),
        Role::Acceptor => (responder_key, initiator_key),
    };
    Ok((
        FrameSealer::new(suite, &resumption::frame_key(&send)?)?,
        FrameOpener::new(suite, &resumption::frame_key(&recv)?)?,
        offered,
    ))
}

/// A ticket issued on this connection, kept once the peer's key is known.
struct OfferedTicket {
    id: TicketId,
    secret: [u8; SECRET_LEN],
}

impl Drop for OfferedTicket {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl OfferedTicket {
    fn into_ticket(self, peer_key: PublicKey, expires: Instant) -> Ticket {
        Ticket {
            id: self.id,
            secret: self.secret,
            peer_key,
            expires,
            returned: false,
        }
    }
}

/// Where a dialer whose key is `local` keeps the tickets of the peer with
/// routing id `rid` at `remote`'s address. (A ticket proves only the key
/// it was issued to: principals sharing a store must not take each
/// other's.)
pub(crate) fn ticket_key(local: &PublicKey, remote: &Endpoint, rid: RoutingId) -> String {
    format!(
        "{local} -> {}/{}@{rid}",
        remote.protocol(),
        remote.address()
    )
}

/// The ticket option of a dialer's hello.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TicketAsk {
    /// Absent: the dialer keeps no tickets.
    Absent,
    /// Empty: a dialer asking for a ticket.
    New,
    /// A ticket to redeem, with the dialer's proof of its secret
    /// ([`resumption::binder`]); a new ticket is asked for too.
    Redeem(TicketId, [u8; SECRET_LEN]),
}

fn ticket_ask(setup: &Setup) -> Result<TicketAsk> {
    match setup.ticket.as_deref() {
        None => Ok(TicketAsk::Absent),
        Some([]) => Ok(TicketAsk::New),
        Some(bytes) => match bytes.split_first_chunk::<TICKET_ID_LEN>() {
            Some((id, proof)) if proof.len() == SECRET_LEN => {
                let mut binder = [0u8; SECRET_LEN];
                binder.copy_from_slice(proof);
                Ok(TicketAsk::Redeem(*id, binder))
            }
            _ => Err(bad_ticket_length(bytes.len(), TICKET_ID_LEN + SECRET_LEN)),
        },
    }
}

fn bad_ticket_length(len: usize, want: usize) -> Error {
    Error::bad_arg(format!(
        "peer's resumption ticket has {len} bytes (want {want})"
    ))
}

/// The ticket an acceptor's `Setup` issues, if any.
fn ticket_offered(setup: &Setup) -> Result<Option<TicketId>> {
    match setup.ticket.as_deref() {
        None => Ok(None),
        Some(bytes) => TicketId::try_from(bytes)
            .map(Some)
            .map_err(|_| bad_ticket_length(bytes.len(), TICKET_ID_LEN)),
    }
}

/// The dialing side of a handshake.
pub struct Dialer {
    params: HandshakeParams,
    remote: Endpoint,
    suite: Suite,
    noise: snow::HandshakeState,
    sent_at: Instant,
    /// The ticket named in the hello.
    resume: Option<Ticket>,
    /// Filled by [`Dialer::on_response`].
    answer: Option<DialerAnswer>,
}

struct DialerAnswer {
    setup: Setup,
    version: u32,
    max_frame: usize,
    rtt: Duration,
    hash: Vec<u8>,
    sealer: FrameSealer,
    opener: FrameOpener,
    /// The acceptor's new ticket and when it expires.
    offered: Option<(OfferedTicket, Instant)>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("remote", &self.remote)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl HandshakeParams {
    /// Where this side, dialing `remote`, keeps tickets of the peer with
    /// routing id `rid` there.
    fn held_key(&self, remote: &Endpoint, rid: RoutingId) -> String {
        ticket_key(&self.principal.public_key(), remote, rid)
    }
}

impl Dialer {
    /// Starts a handshake to `remote`; returns the first frame to send.
    pub fn start(
        params: HandshakeParams,
        remote: Endpoint,
        now: Instant,
    ) -> Result<(Dialer, Bytes)> {
        let suite = Suite::preferred();
        let resume =
            params.config.resumption.as_ref().and_then(|store| {
                store.take_held(&params.held_key(&remote, remote.routing_id()), now)
            });
        let key =
            PreparedKey::spare_or_new().map_err(|e| noise_err("making the ephemeral key", e))?;
        // With a store, the hello always carries the option: empty to ask
        // for a ticket (an acceptor issues tickets only to dialers that
        // keep them), or a ticket to redeem with a proof of its secret over
        // this hello's ephemeral key.
        let ticket = match (&params.config.resumption, &resume) {
            (Some(_), Some(t)) => {
                let proof = resumption::binder(&t.secret, key.public());
                Some([&t.id[..], &proof[..]].concat())
            }
            (Some(_), None) => Some(Vec::new()),
            (None, _) => None,
        };
        let mut noise = noise_builder(suite, Some(key))?
            .build_initiator()
            .map_err(|e| noise_err("initiator", e))?;
        let payload = encode_setup(local_setup(&params, Some(&remote), ticket.as_deref()));
        let mut frame = vec![0u8; MAGIC.len() + 1 + noise_message_len(payload.len())];
        frame[..2].copy_from_slice(MAGIC);
        frame[2] = suite.id();
        let n = noise
            .write_message(&payload, &mut frame[3..])
            .map_err(|e| noise_err("writing the first message", e))?;
        frame.truncate(3 + n);
        Ok((
            Dialer {
                params,
                remote,
                suite,
                noise,
                sent_at: now,
                resume,
                answer: None,
            },
            Bytes::from(frame),
        ))
    }

    /// Takes the acceptor's Noise answer.
    pub fn on_response(&mut self, frame: BytesMut, now: Instant) -> Result<()> {
        if self.answer.is_some() {
            return Err(Error::bad_state("handshake response received twice"));
        }
        let mut payload = vec![0u8; frame.len()];
        let n = self
            .noise
            .read_message(&frame, &mut payload)
            .map_err(|e| noise_err("reading the acceptor's answer", e))?;
        payload.truncate(n);
        let setup = decode_setup(Bytes::from(payload))?;
        let (version, max_frame) = negotiate(&self.params, &setup)?;
        let hash = self.noise.get_handshake_hash().to_vec();
        let offered = match &self.params.config.resumption {
            Some(_) => ticket_offered(&setup)?,
            None => None,
        };
        let (sealer, opener, offered) =
            split_keys(&mut self.noise, self.suite, Role::Dialer, offered)?;
        let lifetime = self
            .params
            .config
            .resumption
            .as_ref()
            .map_or(Duration::ZERO, |store| store.lifetime());
        self.answer = Some(DialerAnswer {
            offered: offered.map(|t| (t, now + lifetime)),
            setup,
            version,
            max_frame,
            rtt: now.saturating_duration_since(self.sent_at),
            hash,
            sealer,
            opener,
        });
        Ok(())
    }

    /// Takes the acceptor's sealed binding frame; checks and authorizes the
    /// acceptor and prepares this side's binding. An acceptor hiding its
    /// blessings gets this side's binding at once (if allowed) and the
    /// handshake goes on with [`DialerStep::Reveal`].
    pub fn on_binding(self, frame: BytesMut, wall: SystemTime) -> Result<DialerStep> {
        let Some(mut answer) = self.answer else {
            return Err(Error::bad_state("handshake binding before the response"));
        };
        let (plain, _) = answer.opener.open(frame)?;
        let mut r = Reader::new(plain, "Frame");
        let peer = read_binding(&mut r, ACCEPTOR_TAG, &answer.hash, self.resume.as_ref())?;
        // Resume only if the acceptor did (it may have forgotten the
        // ticket, or not confirmed it yet: then it is still good later).
        let resume = match self.resume {
            Some(ticket) if !peer.resumed => {
                if let Some(store) = &self.params.config.resumption {
                    store.return_held(
                        self.params.held_key(&self.remote, self.remote.routing_id()),
                        ticket,
                    );
                }
                None
            }
            resume => resume,
        };
        if !r.is_empty() {
            return Err(Error::auth("acceptor sent more than its binding"));
        }
        let announced =
            parse_endpoint(answer.setup.peer_local_endpoint.as_ref(), "local endpoint")?;
        let remote_endpoint = match announced {
            // Keep the address we dialed; learn the routing id and names.
            Some(ep) => self
                .remote
                .clone()
                .with_routing_id(ep.routing_id())
                .with_blessing_names(ep.blessing_names().iter().cloned())?,
            None => self.remote.clone(),
        };
        if answer.setup.hidden_blessings {
            if !self.params.config.reveal_to_hidden_acceptors {
                return Err(Error::not_trusted(format!(
                    "{remote_endpoint} hides its blessings until it sees this side's, \
                     and this side does not reveal itself first (reveal_to_hidden_acceptors is off)"
                )));
            }
            let (blessings, discharges) = self
                .params
                .authorizer
                .blessings_for_peer(&self.params.principal, &[])?;
            let binding = binding_messages(
                &self.params.principal,
                &blessings,
                &discharges,
                DIALER_TAG,
                &answer.hash,
                resume.as_ref(),
            );
            let mut plain = BytesMut::new();
            flow_message::encode_frame(&binding, &mut plain);
            let frame = answer.sealer.seal_to_bytes(&plain)?;
            return Ok(DialerStep::Reveal {
                frame,
                wait: Box::new(DialerRevealWait {
                    params: self.params,
                    answer,
                    remote_endpoint,
                    acceptor_key: peer.key,
                    blessings,
                    discharges,
                }),
            });
        }
        let authorized = authorize(&self.params, &remote_endpoint, &peer, wall)?;
        let (blessings, discharges) = self
            .params
            .authorizer
            .blessings_for_peer(&self.params.principal, &authorized.names)?;
        let initial_messages = binding_messages(
            &self.params.principal,
            &blessings,
            &discharges,
            DIALER_TAG,
            &answer.hash,
            resume.as_ref(),
        );
        if let (Some(store), Some((ticket, expires))) =
            (&self.params.config.resumption, answer.offered.take())
        {
            // Under the peer it reached: dialing a proxied endpoint first
            // reaches the proxy, whose ticket must not be taken for the
            // server's. A shorthand endpoint (no routing id) keeps its key,
            // so dialing it again finds the ticket.
            let rid = if self.remote.routing_id().is_null() {
                self.remote.routing_id()
            } else {
                remote_endpoint.routing_id()
            };
            store.insert_held(
                self.params.held_key(&self.remote, rid),
                ticket.into_ticket(peer.key, expires),
            );
        }
        Ok(DialerStep::Done(Box::new(dialer_done(
            self.params,
            answer,
            remote_endpoint,
            peer,
            authorized,
            (blessings, discharges),
            initial_messages,
        ))))
    }
}

fn dialer_done(
    params: HandshakeParams,
    answer: DialerAnswer,
    remote_endpoint: Endpoint,
    peer: PeerIdentity,
    authorized: AuthorizedPeer,
    (blessings, discharges): (Blessings, Discharges),
    initial_messages: Vec<Message>,
) -> HandshakeDone {
    HandshakeDone {
        established: Established {
            role: Role::Dialer,
            version: answer.version,
            max_frame: answer.max_frame,
            max_recv_frame: receive_mtu(&params),
            peer_shared_tokens: answer.setup.shared_tokens.unwrap_or(0),
            rtt: answer.rtt,
            local_blessings: blessings,
            local_discharges: discharges,
            remote_blessings: peer.blessings,
            remote_discharges: peer.discharges,
        },
        initial_messages,
        sealer: answer.sealer,
        opener: answer.opener,
        local_endpoint: params.local_endpoint.clone(),
        remote_endpoint,
        requested_endpoint: None,
        authorized,
        leftover: None,
        frames_to_send: Vec::new(),
        resumed: peer.resumed,
    }
}

/// What the dialer does after the acceptor's binding.
#[derive(Debug)]
pub enum DialerStep {
    /// The handshake is complete.
    Done(Box<HandshakeDone>),
    /// The acceptor hides its blessings: send `frame` (this side's binding)
    /// and hand the acceptor's next frame to `wait`.
    Reveal {
        /// This side's sealed binding.
        frame: Bytes,
        /// Waits for the acceptor's blessings.
        wait: Box<DialerRevealWait>,
    },
}

/// A dialer that showed its blessings to a hiding acceptor and waits for
/// the acceptor's.
pub struct DialerRevealWait {
    params: HandshakeParams,
    answer: DialerAnswer,
    remote_endpoint: Endpoint,
    acceptor_key: PublicKey,
    blessings: Blessings,
    discharges: Discharges,
}

impl std::fmt::Debug for DialerRevealWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialerRevealWait")
            .field("remote", &self.remote_endpoint)
            .finish_non_exhaustive()
    }
}

impl DialerRevealWait {
    /// Takes the acceptor's sealed blessings; checks and authorizes them.
    pub fn on_reveal(mut self, frame: BytesMut, wall: SystemTime) -> Result<HandshakeDone> {
        let (plain, _) = self.answer.opener.open(frame)?;
        let mut r = Reader::new(plain, "Frame");
        let mut blessings = None;
        let mut discharges = Discharges::new();
        while !r.is_empty() {
            match Message::decode(&mut r)? {
                Message::Blessings(b) if b.key == CONN_BLESSINGS_KEY && blessings.is_none() => {
                    blessings = Some(Blessings::decode(b.bytes)?);
                }
                Message::Discharges(d) if d.key == CONN_BLESSINGS_KEY => {
                    discharges = Discharges::decode(d.bytes)?;
                }
                Message::TearDown(td) => {
                    return Err(Error::not_trusted(format!(
                        "the acceptor refused to show its blessings: {}",
                        td.reason
                    )));
                }
                other => {
                    return Err(Error::auth(format!(
                        "unexpected {} instead of the acceptor's blessings",
                        other.name()
                    )));
                }
            }
        }
        let blessings = blessings.ok_or_else(|| Error::auth("acceptor revealed no blessings"))?;
        check_blessings_key(&blessings, &self.acceptor_key)?;
        let peer = PeerIdentity {
            key: self.acceptor_key,
            blessings,
            discharges,
            resumed: false,
        };
        let authorized = authorize(&self.params, &self.remote_endpoint, &peer, wall)?;
        Ok(dialer_done(
            self.params,
            self.answer,
            self.remote_endpoint,
            peer,
            authorized,
            (self.blessings, self.discharges),
            Vec::new(),
        ))
    }
}

/// The accepting side of a handshake.
pub struct Acceptor {
    params: HandshakeParams,
    /// Its ephemeral key pair, made while the hello is on its way.
    prepared: Option<PreparedKey>,
    answered: Option<AcceptorAnswer>,
}

struct AcceptorAnswer {
    setup: Setup,
    version: u32,
    max_frame: usize,
    hash: Vec<u8>,
    sent_at: Instant,
    sealer: FrameSealer,
    opener: FrameOpener,
    blessings: Blessings,
    discharges: Discharges,
    /// The ticket the dialer redeemed.
    resume: Option<Ticket>,
    /// The ticket issued on this connection.
    offered: Option<OfferedTicket>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("local", &self.params.local_endpoint)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// A handshake waiting for a dialer's first frame. It makes its
    /// ephemeral key pair now, so that a driver creating it as soon as the
    /// transport is accepted does that work while the dialer is still
    /// making its own.
    pub fn new(params: HandshakeParams) -> Acceptor {
        Acceptor {
            params,
            // Without one, the handshake makes a key pair when it needs it.
            prepared: PreparedKey::spare_or_new().ok(),
            answered: None,
        }
    }

    /// Takes the dialer's first frame; returns the Noise answer and the
    /// sealed binding frame, to send together.
    pub fn on_hello(&mut self, frame: BytesMut, now: Instant) -> Result<[Bytes; 2]> {
        if self.answered.is_some() {
            return Err(Error::bad_state("handshake hello received twice"));
        }
        if !is_hello(&frame) {
            return Err(Error::bad_arg("not a flow handshake (bad magic)"));
        }
        let suite = Suite::from_id(frame[2])
            .ok_or_else(|| Error::bad_arg(format!("unknown cipher suite {}", frame[2])))?;
        let mut noise = noise_builder(suite, self.prepared.take())?
            .build_responder()
            .map_err(|e| noise_err("responder", e))?;
        let mut payload = vec![0u8; frame.len()];
        let n = noise
            .read_message(&frame[3..], &mut payload)
            .map_err(|e| noise_err("reading the dialer's hello", e))?;
        payload.truncate(n);
        let setup = decode_setup(Bytes::from(payload))?;
        let (version, max_frame) = negotiate(&self.params, &setup)?;
        // An acceptor hiding its blessings neither issues nor redeems
        // tickets: its binding must not prove anything before the dialer's.
        let store = match &self.params.config.blessings_visible_to {
            None => self.params.config.resumption.as_ref(),
            Some(_) => None,
        };
        let asked = ticket_ask(&setup)?;
        // The Noise message began with the dialer's ephemeral key.
        let ephemeral_key = frame
            .get(MAGIC.len() + 1..MAGIC.len() + 1 + NOISE_E_LEN)
            .ok_or_else(|| Error::bad_arg("handshake hello is truncated"))?;
        let resume = match (store, asked) {
            (Some(store), TicketAsk::Redeem(id, proof)) => store.redeem(&id, now, |ticket| {
                resumption::verify_binder(&ticket.secret, ephemeral_key, &proof)
            }),
            _ => None,
        };
        // Only to a dialer that keeps tickets: one that never redeems them
        // would only push others' out of the store.
        let offered = match (store, asked) {
            (Some(_), TicketAsk::New | TicketAsk::Redeem(..)) => Some(resumption::new_ticket_id()),
            _ => None,
        };
        let our_setup = encode_setup(local_setup(
            &self.params,
            None,
            offered.as_ref().map(|id| &id[..]),
        ));
        let mut answer = vec![0u8; noise_message_len(our_setup.len())];
        let n = noise
            .write_message(&our_setup, &mut answer)
            .map_err(|e| noise_err("writing the answer", e))?;
        answer.truncate(n);
        let hash = noise.get_handshake_hash().to_vec();
        let (mut sealer, opener, offered) = split_keys(&mut noise, suite, Role::Acceptor, offered)?;
        let (blessings, discharges) = self
            .params
            .authorizer
            .blessings_for_peer(&self.params.principal, &[])?;
        let binding = if self.params.config.blessings_visible_to.is_some() {
            // Only the key for now: the blessings wait for the dialer's.
            binding_messages(
                &self.params.principal,
                &Blessings::empty(),
                &Discharges::new(),
                ACCEPTOR_TAG,
                &hash,
                None,
            )
        } else {
            binding_messages(
                &self.params.principal,
                &blessings,
                &discharges,
                ACCEPTOR_TAG,
                &hash,
                resume.as_ref(),
            )
        };
        let mut plain = BytesMut::new();
        flow_message::encode_frame(&binding, &mut plain);
        let binding_frame = sealer.seal_to_bytes(&plain)?;
        self.answered = Some(AcceptorAnswer {
            setup,
            version,
            max_frame,
            hash,
            sent_at: now,
            sealer,
            opener,
            blessings,
            discharges,
            resume,
            offered,
        });
        Ok([Bytes::from(answer), binding_frame])
    }

    /// Takes the dialer's sealed binding frame; checks the dialer and runs
    /// this side's authorizer. What followed the binding in the frame is
    /// returned in [`HandshakeDone::leftover`].
    pub fn on_binding(
        self,
        frame: BytesMut,
        now: Instant,
        wall: SystemTime,
        remote_addr: &str,
    ) -> Result<HandshakeDone, Refusal> {
        let Some(mut answer) = self.answered else {
            return Err(Error::bad_state("handshake binding before the hello").into());
        };
        let (plain, encrypted_len) = answer.opener.open(frame)?;
        let mut r = Reader::new(plain.clone(), "Frame");
        let peer = read_binding(&mut r, DIALER_TAG, &answer.hash, answer.resume.as_ref())?;
        let consumed = r.position();
        let announced =
            parse_endpoint(answer.setup.peer_local_endpoint.as_ref(), "local endpoint")?;
        let requested = parse_endpoint(
            answer.setup.peer_remote_endpoint.as_ref(),
            "remote endpoint",
        )?;
        let remote_endpoint = match announced {
            Some(ep) if ep.address().is_empty() => ep.with_address(remote_addr),
            Some(ep) => ep,
            None => Endpoint::new("", remote_addr),
        };
        let authorized = match authorize(&self.params, &remote_endpoint, &peer, wall) {
            Ok(a) => a,
            Err(error) => return Err(Refusal::with_goodbye(error, &mut answer.sealer)),
        };
        let leftover = (consumed < plain.len()).then(|| {
            (
                plain.slice(consumed..),
                encrypted_len.saturating_sub(consumed),
            )
        });
        let mut frames_to_send = Vec::new();
        if let Some(patterns) = &self.params.config.blessings_visible_to {
            if !patterns.iter().any(|p| p.matched_by(&authorized.names)) {
                let error = Error::not_trusted(format!(
                    "{remote_endpoint} (names {:?}) may not see this side's blessings",
                    authorized.names
                ));
                return Err(Refusal::with_goodbye(error, &mut answer.sealer));
            }
            let mut msgs = vec![Message::Blessings(BlessingsMsg {
                key: CONN_BLESSINGS_KEY,
                bytes: answer.blessings.to_bytes(),
            })];
            if !answer.discharges.is_empty() {
                msgs.push(Message::Discharges(DischargesMsg {
                    key: CONN_BLESSINGS_KEY,
                    blessings_key: CONN_BLESSINGS_KEY,
                    bytes: answer.discharges.to_bytes(),
                }));
            }
            let mut plain = BytesMut::new();
            flow_message::encode_frame(&msgs, &mut plain);
            frames_to_send.push(answer.sealer.seal_to_bytes(&plain)?);
        }
        if let (Some(store), Some(ticket)) = (&self.params.config.resumption, answer.offered) {
            store.insert_issued(ticket.into_ticket(peer.key, now + store.lifetime()));
        }
        Ok(HandshakeDone {
            established: Established {
                role: Role::Acceptor,
                version: answer.version,
                max_frame: answer.max_frame,
                max_recv_frame: receive_mtu(&self.params),
                peer_shared_tokens: answer.setup.shared_tokens.unwrap_or(0),
                rtt: now.saturating_duration_since(answer.sent_at),
                local_blessings: answer.blessings,
                local_discharges: answer.discharges,
                remote_blessings: peer.blessings,
                remote_discharges: peer.discharges,
            },
            initial_messages: Vec::new(),
            sealer: answer.sealer,
            opener: answer.opener,
            local_endpoint: self.params.local_endpoint.clone(),
            remote_endpoint,
            requested_endpoint: requested,
            authorized,
            leftover,
            frames_to_send,
            resumed: peer.resumed,
        })
    }
}

/// An acceptor's refusal of a dialer, with a sealed `TearDown` telling the
/// dialer why when the keys were already agreed.
#[derive(Debug)]
pub struct Refusal {
    /// Why the handshake failed.
    pub error: Error,
    /// The sealed `TearDown` to send the dialer, if any.
    pub goodbye: Option<Bytes>,
}

impl Refusal {
    fn with_goodbye(error: Error, sealer: &mut FrameSealer) -> Refusal {
        let mut plain = BytesMut::new();
        Message::TearDown(flow_message::TearDown {
            reason: error.message().to_string(),
        })
        .encode(&mut plain);
        let goodbye = sealer.seal_to_bytes(&plain).ok();
        Refusal { error, goodbye }
    }
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Refusal {
            error,
            goodbye: None,
        }
    }
}
