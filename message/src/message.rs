//! The messages of the flow wire protocol and their encoding.
//!
//! Each message is a type byte followed by its fields; every field is a
//! varint, length-prefixed bytes, or a length-prefixed string (see
//! [`crate::codec`]). Messages are self-delimiting, so a frame is simply one or
//! more messages back to back.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{MAX_VARINT_LEN, Reader, bytes_len, put_bytes, put_str, put_varint, varint_len};
use crate::error::{DecodeError, DecodeErrorKind};

/// Largest header of a `Data` message: its type byte and three varints.
const DATA_HEADER_MAX: usize = 1 + 3 * MAX_VARINT_LEN;

/// Type bytes of the messages.
pub mod kind {
    /// [`super::Setup`].
    pub const SETUP: u8 = 0x01;
    /// [`super::Auth`].
    pub const AUTH: u8 = 0x02;
    /// [`super::OpenFlow`].
    pub const OPEN_FLOW: u8 = 0x03;
    /// [`super::Data`].
    pub const DATA: u8 = 0x04;
    /// [`super::Release`].
    pub const RELEASE: u8 = 0x05;
    /// `HealthCheckRequest`.
    pub const HEALTH_CHECK_REQUEST: u8 = 0x06;
    /// `HealthCheckResponse`.
    pub const HEALTH_CHECK_RESPONSE: u8 = 0x07;
    /// [`super::TearDown`].
    pub const TEAR_DOWN: u8 = 0x08;
    /// `EnterLameDuck`.
    pub const ENTER_LAME_DUCK: u8 = 0x09;
    /// `AckLameDuck`.
    pub const ACK_LAME_DUCK: u8 = 0x0a;
    /// `ProxyServerRequest`.
    pub const PROXY_SERVER_REQUEST: u8 = 0x0b;
    /// `MultiProxyRequest`.
    pub const MULTI_PROXY_REQUEST: u8 = 0x0c;
    /// [`super::ProxyResponse`].
    pub const PROXY_RESPONSE: u8 = 0x0d;
    /// [`super::ProxyErrorResponse`].
    pub const PROXY_ERROR_RESPONSE: u8 = 0x0e;
    /// [`super::BlessingsMsg`].
    pub const BLESSINGS: u8 = 0x0f;
    /// [`super::DischargesMsg`].
    pub const DISCHARGES: u8 = 0x10;
}

/// Per-message flags of [`OpenFlow`] and [`Data`].
///
/// Unknown bits are carried through unchanged, so a newer peer's flags
/// survive a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u64);

impl Flags {
    /// No flag set.
    pub const NONE: Flags = Flags(0);
    /// The sender half-closes the flow after this payload.
    pub const CLOSE: Flags = Flags(1);
    /// The flow is a side channel: it does not keep the connection busy.
    pub const SIDE_CHANNEL: Flags = Flags(1 << 1);
    /// The payload is already end-to-end encrypted; a proxy forwards it as is.
    pub const PASSTHROUGH: Flags = Flags(1 << 2);

    /// Flags from raw bits.
    pub const fn from_bits(bits: u64) -> Flags {
        Flags(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags plus `other`.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// These flags without `other`.
    #[must_use]
    pub const fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        self.with(rhs)
    }
}

/// An inclusive range of protocol versions a side speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u32,
    /// Newest version spoken.
    pub max: u32,
}

impl VersionRange {
    /// The newest version both ranges contain, if any.
    pub fn common(self, other: VersionRange) -> Option<u32> {
        let max = self.max.min(other.max);
        (max >= self.min.max(other.min)).then_some(max)
    }
}

/// A setup option this version does not interpret, kept as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupOption {
    /// The option's id.
    pub id: u64,
    /// The option's raw value.
    pub value: Bytes,
}

/// Ids of the setup options this version interprets. Ids from
/// [`FIRST_UNKNOWN_OPTION`](option::FIRST_UNKNOWN_OPTION) up are free for extensions.
pub mod option {
    /// Largest frame the sender accepts ([`super::Setup::mtu`]).
    pub const MTU: u64 = 1;
    /// Shared tokens the sender grants ([`super::Setup::shared_tokens`]).
    pub const SHARED_TOKENS: u64 = 2;
    /// The endpoint the sender means to reach.
    pub const PEER_REMOTE_ENDPOINT: u64 = 3;
    /// The sender's own endpoint.
    pub const PEER_LOCAL_ENDPOINT: u64 = 4;
    /// Initial per-flow receive window the sender grants.
    pub const INITIAL_WINDOW: u64 = 5;
    /// The sender (an acceptor) shows its blessings only after the dialer's
    /// ([`super::Setup::hidden_blessings`]); empty value.
    pub const HIDDEN_BLESSINGS: u64 = 6;
    /// A resumption ticket ([`super::Setup::ticket`]).
    pub const TICKET: u64 = 7;
    /// First id not interpreted by this version.
    pub const FIRST_UNKNOWN_OPTION: u64 = 64;
}

/// First message of each side: what it speaks and what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Protocol versions the sender speaks.
    pub versions: VersionRange,
    /// Largest frame the sender accepts, in bytes.
    pub mtu: Option<u64>,
    /// Bytes of shared credit the sender grants for first writes on new flows.
    pub shared_tokens: Option<u64>,
    /// Initial receive window the sender grants each new flow, in bytes.
    pub initial_window: Option<u64>,
    /// The endpoint the sender means to reach (string form).
    pub peer_remote_endpoint: Option<String>,
    /// The sender's own endpoint (string form).
    pub peer_local_endpoint: Option<String>,
    /// The sender (an acceptor) hides its blessings until the dialer has
    /// shown its own and is allowed to see them.
    pub hidden_blessings: bool,
    /// A resumption ticket's id: from a dialer, the ticket it redeems, or
    /// empty to ask for one; from an acceptor, a new ticket it issues for
    /// the next connection (only to a dialer that sent the option).
    pub ticket: Option<Bytes>,
    /// Options this version does not interpret, kept in the order received.
    /// Their ids must not be those of the known options.
    pub unknown_options: Vec<SetupOption>,
}

/// Binds the sender's identity to the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Key of the sender's blessings (sent in a [`BlessingsMsg`]).
    pub blessings_key: u64,
    /// Key of the sender's discharges (0: none).
    pub discharge_key: u64,
    /// The sender's public key, then its proof over (role tag ||
    /// handshake hash): an ed25519 signature (96 bytes in all), or, on a
    /// resumed handshake, an HMAC under the ticket's secret (64 bytes).
    pub channel_binding: Bytes,
}

/// Opens a flow, optionally carrying its first payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFlow {
    /// The new flow's id.
    pub id: u64,
    /// Receive window the opener grants the acceptor on this flow.
    pub initial_tokens: u64,
    /// Key of the blessings the opener presents on this flow.
    pub blessings_key: u64,
    /// Key of the discharges the opener presents on this flow (0: none).
    pub discharge_key: u64,
    /// Flags.
    pub flags: Flags,
    /// First bytes of the flow (may be empty).
    pub payload: Bytes,
}

/// Bytes of one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// The flow's id.
    pub id: u64,
    /// Flags.
    pub flags: Flags,
    /// The bytes.
    pub payload: Bytes,
}

/// One flow's returned credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The flow.
    pub flow_id: u64,
    /// Bytes of credit granted back.
    pub tokens: u64,
}

/// Credit granted back for one or more flows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseMsg {
    /// The flows and their credit.
    pub releases: Vec<Release>,
}

/// The sender is closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TearDown {
    /// Why, for the peer's error.
    pub reason: String,
}

/// A proxy's endpoints for the server that asked to listen through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResponse {
    /// Endpoints, string form.
    pub endpoints: Vec<String>,
}

/// A proxy refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyErrorResponse {
    /// Why.
    pub error: String,
}

/// Blessings sent once per connection and referred to by `key` afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlessingsMsg {
    /// The key later messages use.
    pub key: u64,
    /// The encoded blessings.
    pub bytes: Bytes,
}

/// Discharges sent once per connection and referred to by `key` afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DischargesMsg {
    /// The key later messages use.
    pub key: u64,
    /// Key of the blessings these discharges go with.
    pub blessings_key: u64,
    /// The encoded discharges.
    pub bytes: Bytes,
}

/// Any message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Setup`] (boxed: it is rare and large, and every other
    /// message would be as large otherwise).
    Setup(Box<Setup>),
    /// See [`Auth`].
    Auth(Auth),
    /// See [`OpenFlow`].
    OpenFlow(OpenFlow),
    /// See [`Data`].
    Data(Data),
    /// See [`ReleaseMsg`].
    Release(ReleaseMsg),
    /// Asks the peer to answer at once, to measure RTT and liveness.
    HealthCheckRequest,
    /// Answers a [`Message::HealthCheckRequest`].
    HealthCheckResponse,
    /// See [`TearDown`].
    TearDown(TearDown),
    /// The sender will open no more flows and asks the peer to do the same.
    EnterLameDuck,
    /// The peer has stopped opening flows.
    AckLameDuck,
    /// Asks a proxy to listen on the sender's behalf.
    ProxyServerRequest,
    /// Asks a proxy to listen on behalf of another proxy (a chain).
    MultiProxyRequest,
    /// See [`ProxyResponse`].
    ProxyResponse(ProxyResponse),
    /// See [`ProxyErrorResponse`].
    ProxyErrorResponse(ProxyErrorResponse),
    /// See [`BlessingsMsg`].
    Blessings(BlessingsMsg),
    /// See [`DischargesMsg`].
    Discharges(DischargesMsg),
}

fn opt_len(id: u64, value_len: usize) -> usize {
    varint_len(id) + bytes_len(value_len)
}

fn put_varint_option(buf: &mut BytesMut, id: u64, value: u64) {
    put_varint(buf, id);
    put_varint(buf, varint_len(value) as u64);
    put_varint(buf, value);
}

fn put_bytes_option(buf: &mut BytesMut, id: u64, value: &[u8]) {
    put_varint(buf, id);
    put_bytes(buf, value);
}

impl Setup {
    fn option_count(&self) -> usize {
        usize::from(self.mtu.is_some())
            + usize::from(self.shared_tokens.is_some())
            + usize::from(self.initial_window.is_some())
            + usize::from(self.peer_remote_endpoint.is_some())
            + usize::from(self.peer_local_endpoint.is_some())
            + usize::from(self.hidden_blessings)
            + usize::from(self.ticket.is_some())
            + self.unknown_options.len()
    }

    fn encoded_len(&self) -> usize {
        let mut len = varint_len(self.versions.min.into())
            + varint_len(self.versions.max.into())
            + varint_len(self.option_count() as u64);
        for (id, v) in [
            (option::MTU, self.mtu),
            (option::SHARED_TOKENS, self.shared_tokens),
            (option::INITIAL_WINDOW, self.initial_window),
        ] {
            if let Some(v) = v {
                len += opt_len(id, varint_len(v));
            }
        }
        for (id, s) in [
            (option::PEER_REMOTE_ENDPOINT, &self.peer_remote_endpoint),
            (option::PEER_LOCAL_ENDPOINT, &self.peer_local_endpoint),
        ] {
            if let Some(s) = s {
                len += opt_len(id, s.len());
            }
        }
        if self.hidden_blessings {
            len += opt_len(option::HIDDEN_BLESSINGS, 0);
        }
        if let Some(t) = &self.ticket {
            len += opt_len(option::TICKET, t.len());
        }
        for o in &self.unknown_options {
            len += opt_len(o.id, o.value.len());
        }
        len
    }

    fn encode_fields(&self, buf: &mut BytesMut) {
        put_varint(buf, self.versions.min.into());
        put_varint(buf, self.versions.max.into());
        put_varint(buf, self.option_count() as u64);
        if let Some(v) = self.mtu {
            put_varint_option(buf, option::MTU, v);
        }
        if let Some(v) = self.shared_tokens {
            put_varint_option(buf, option::SHARED_TOKENS, v);
        }
        if let Some(s) = &self.peer_remote_endpoint {
            put_bytes_option(buf, option::PEER_REMOTE_ENDPOINT, s.as_bytes());
        }
        if let Some(s) = &self.peer_local_endpoint {
            put_bytes_option(buf, option::PEER_LOCAL_ENDPOINT, s.as_bytes());
        }
        if let Some(v) = self.initial_window {
            put_varint_option(buf, option::INITIAL_WINDOW, v);
        }
        if self.hidden_blessings {
            put_bytes_option(buf, option::HIDDEN_BLESSINGS, &[]);
        }
        if let Some(t) = &self.ticket {
            put_bytes_option(buf, option::TICKET, t);
        }
        for o in &self.unknown_options {
            put_bytes_option(buf, o.id, &o.value);
        }
    }

    fn decode_fields(r: &mut Reader) -> Result<Setup, DecodeError> {
        let min = r.varint_u32("min_version")?;
        let max = r.varint_u32("max_version")?;
        if min > max {
            return Err(r.error("max_version", DecodeErrorKind::OutOfRange(max.into())));
        }
        let mut setup = Setup {
            versions: VersionRange { min, max },
            mtu: None,
            shared_tokens: None,
            initial_window: None,
            peer_remote_endpoint: None,
            peer_local_endpoint: None,
            hidden_blessings: false,
            ticket: None,
            unknown_options: Vec::new(),
        };
        // Each option takes at least two bytes: its id and an empty value.
        let count = r.count("options", 2)?;
        for _ in 0..count {
            let id = r.varint("option_id")?;
            let value = r.bytes("option_value")?;
            match id {
                option::MTU => set_once(r, &mut setup.mtu, varint_value(r, value, "mtu")?, "mtu")?,
                option::SHARED_TOKENS => set_once(
                    r,
                    &mut setup.shared_tokens,
                    varint_value(r, value, "shared_tokens")?,
                    "shared_tokens",
                )?,
                option::INITIAL_WINDOW => set_once(
                    r,
                    &mut setup.initial_window,
                    varint_value(r, value, "initial_window")?,
                    "initial_window",
                )?,
                option::PEER_REMOTE_ENDPOINT => set_once(
                    r,
                    &mut setup.peer_remote_endpoint,
                    string_value(r, value, "peer_remote_endpoint")?,
                    "peer_remote_endpoint",
                )?,
                option::PEER_LOCAL_ENDPOINT => set_once(
                    r,
                    &mut setup.peer_local_endpoint,
                    string_value(r, value, "peer_local_endpoint")?,
                    "peer_local_endpoint",
                )?,
                option::HIDDEN_BLESSINGS => {
                    if setup.hidden_blessings {
                        return Err(r.error("hidden_blessings", DecodeErrorKind::Duplicate));
                    }
                    if !value.is_empty() {
                        return Err(r.error(
                            "hidden_blessings",
                            DecodeErrorKind::TrailingBytes(value.len()),
                        ));
                    }
                    setup.hidden_blessings = true;
                }
                option::TICKET => set_once(r, &mut setup.ticket, value, "ticket")?,
                _ => setup.unknown_options.push(SetupOption { id, value }),
            }
        }
        Ok(setup)
    }
}

fn set_once<T>(
    r: &Reader,
    slot: &mut Option<T>,
    value: T,
    field: &'static str,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(r.error(field, DecodeErrorKind::Duplicate));
    }
    *slot = Some(value);
    Ok(())
}

fn varint_value(r: &Reader, value: Bytes, field: &'static str) -> Result<u64, DecodeError> {
    let mut inner = Reader::new(value, r.context());
    let v = inner.varint(field)?;
    inner.finish(field)?;
    Ok(v)
}

fn string_value(r: &Reader, value: Bytes, field: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(value.to_vec()).map_err(|_| r.error(field, DecodeErrorKind::InvalidUtf8))
}

impl Data {
    /// Appends the header of a `Data` message whose payload of `payload_len`
    /// bytes the caller appends right after. Lets a sender place payloads
    /// without building a [`Data`] first.
    #[inline]
    pub fn encode_header(id: u64, flags: Flags, payload_len: usize, buf: &mut BytesMut) {
        // Gathered on the stack and appended at once: one capacity check
        // and one copy instead of one per field (a header per frame sent).
        let mut head = [0u8; DATA_HEADER_MAX];
        let mut rest: &mut [u8] = &mut head;
        rest.put_u8(kind::DATA);
        put_varint(&mut rest, id);
        put_varint(&mut rest, flags.bits());
        put_varint(&mut rest, payload_len as u64);
        let len = DATA_HEADER_MAX - rest.len();
        buf.put_slice(head.get(..len).unwrap_or(&head));
    }

    /// Bytes the header of a `Data` message takes.
    #[inline]
    pub fn header_len(id: u64, flags: Flags, payload_len: usize) -> usize {
        1 + varint_len(id) + varint_len(flags.bits()) + varint_len(payload_len as u64)
    }
}

impl OpenFlow {
    /// Appends the header of an `OpenFlow` message whose payload of
    /// `payload_len` bytes the caller appends right after.
    #[inline]
    pub fn encode_header(&self, payload_len: usize, buf: &mut BytesMut) {
        buf.put_u8(kind::OPEN_FLOW);
        put_varint(buf, self.id);
        put_varint(buf, self.initial_tokens);
        put_varint(buf, self.blessings_key);
        put_varint(buf, self.discharge_key);
        put_varint(buf, self.flags.bits());
        put_varint(buf, payload_len as u64);
    }

    /// Bytes the header of this `OpenFlow` takes for a payload of
    /// `payload_len` bytes.
    #[inline]
    pub fn header_len(&self, payload_len: usize) -> usize {
        1 + varint_len(self.id)
            + varint_len(self.initial_tokens)
            + varint_len(self.blessings_key)
            + varint_len(self.discharge_key)
            + varint_len(self.flags.bits())
            + varint_len(payload_len as u64)
    }
}

impl Message {
    /// The message's name, as used in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Setup(_) => "Setup",
            Message::Auth(_) => "Auth",
            Message::OpenFlow(_) => "OpenFlow",
            Message::Data(_) => "Data",
            Message::Release(_) => "Release",
            Message::HealthCheckRequest => "HealthCheckRequest",
            Message::HealthCheckResponse => "HealthCheckResponse",
            Message::TearDown(_) => "TearDown",
            Message::EnterLameDuck => "EnterLameDuck",
            Message::AckLameDuck => "AckLameDuck",
            Message::ProxyServerRequest => "ProxyServerRequest",
            Message::MultiProxyRequest => "MultiProxyRequest",
            Message::ProxyResponse(_) => "ProxyResponse",
            Message::ProxyErrorResponse(_) => "ProxyErrorResponse",
            Message::Blessings(_) => "Blessings",
            Message::Discharges(_) => "Discharges",
        }
    }

    /// The message's type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Setup(_) => kind::SETUP,
            Message::Auth(_) => kind::AUTH,
            Message::OpenFlow(_) => kind::OPEN_FLOW,
            Message::Data(_) => kind::DATA,
            Message::Release(_) => kind::RELEASE,
            Message::HealthCheckRequest => kind::HEALTH_CHECK_REQUEST,
            Message::HealthCheckResponse => kind::HEALTH_CHECK_RESPONSE,
            Message::TearDown(_) => kind::TEAR_DOWN,
            Message::EnterLameDuck => kind::ENTER_LAME_DUCK,
            Message::AckLameDuck => kind::ACK_LAME_DUCK,
            Message::ProxyServerRequest => kind::PROXY_SERVER_REQUEST,
            Message::MultiProxyRequest => kind::MULTI_PROXY_REQUEST,
            Message::ProxyResponse(_) => kind::PROXY_RESPONSE,
            Message::ProxyErrorResponse(_) => kind::PROXY_ERROR_RESPONSE,
            Message::Blessings(_) => kind::BLESSINGS,
            Message::Discharges(_) => kind::DISCHARGES,
        }
    }

    /// Bytes [`Message::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Message::Setup(m) => m.encoded_len(),
            Message::Auth(m) => {
                varint_len(m.blessings_key)
                    + varint_len(m.discharge_key)
                    + bytes_len(m.channel_binding.len())
            }
            Message::OpenFlow(m) => m.header_len(m.payload.len()) - 1 + m.payload.len(),
            Message::Data(m) => {
                Data::header_len(m.id, m.flags, m.payload.len()) - 1 + m.payload.len()
            }
            Message::Release(m) => {
                varint_len(m.releases.len() as u64)
                    + m.releases
                        .iter()
                        .map(|r| varint_len(r.flow_id) + varint_len(r.tokens))
                        .sum::<usize>()
            }
            Message::HealthCheckRequest
            | Message::HealthCheckResponse
            | Message::EnterLameDuck
            | Message::AckLameDuck
            | Message::ProxyServerRequest
            | Message::MultiProxyRequest => 0,
            Message::TearDown(m) => bytes_len(m.reason.len()),
            Message::ProxyResponse(m) => {
                varint_len(m.endpoints.len() as u64)
                    + m.endpoints
                        .iter()
                        .map(|e| bytes_len(e.len()))
                        .sum::<usize>()
            }
            Message::ProxyErrorResponse(m) => bytes_len(m.error.len()),
            Message::Blessings(m) => varint_len(m.key) + bytes_len(m.bytes.len()),
            Message::Discharges(m) => {
                varint_len(m.key) + varint_len(m.blessings_key) + bytes_len(m.bytes.len())
            }
        }
    }

    /// Appends the message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        match self {
            Message::OpenFlow(m) => {
                m.encode_header(m.payload.len(), buf);
                buf.put_slice(&m.payload);
                return;
            }
            Message::Data(m) => {
                Data::encode_header(m.id, m.flags, m.payload.len(), buf);
                buf.put_slice(&m.payload);
                return;
            }
            _ => {}
        }
        buf.put_u8(self.kind());
        match self {
            Message::Setup(m) => m.encode_fields(buf),
            Message::Auth(m) => {
                put_varint(buf, m.blessings_key);
                put_varint(buf, m.discharge_key);
                put_bytes(buf, &m.channel_binding);
            }
            Message::Release(m) => {
                put_varint(buf, m.releases.len() as u64);
                for r in &m.releases {
                    put_varint(buf, r.flow_id);
                    put_varint(buf, r.tokens);
                }
            }
            Message::TearDown(m) => put_str(buf, &m.reason),
            Message::ProxyResponse(m) => {
                put_varint(buf, m.endpoints.len() as u64);
                for e in &m.endpoints {
                    put_str(buf, e);
                }
            }
            Message::ProxyErrorResponse(m) => put_str(buf, &m.error),
            Message::Blessings(m) => {
                put_varint(buf, m.key);
                put_bytes(buf, &m.bytes);
            }
            Message::Discharges(m) => {
                put_varint(buf, m.key);
                put_varint(buf, m.blessings_key);
                put_bytes(buf, &m.bytes);
            }
            Message::OpenFlow(_)
            | Message::Data(_)
            | Message::HealthCheckRequest
            | Message::HealthCheckResponse
            | Message::EnterLameDuck
            | Message::AckLameDuck
            | Message::ProxyServerRequest
            | Message::MultiProxyRequest => {}
        }
    }

    /// Decodes one message from the front of `r`, leaving the rest.
    /// Payloads are slices of the reader's buffer, not copies.
    pub fn decode(r: &mut Reader) -> Result<Message, DecodeError> {
        r.set_context("Frame");
        let kind = r.u8("type")?;
        let msg = match kind {
            kind::SETUP => {
                r.set_context("Setup");
                Message::Setup(Box::new(Setup::decode_fields(r)?))
            }
            kind::AUTH => {
                r.set_context("Auth");
                Message::Auth(Auth {
                    blessings_key: r.varint("blessings_key")?,
                    discharge_key: r.varint("discharge_key")?,
                    channel_binding: r.bytes("channel_binding")?,
                })
            }
            kind::OPEN_FLOW => {
                r.set_context("OpenFlow");
                Message::OpenFlow(OpenFlow {
                    id: r.varint("id")?,
                    initial_tokens: r.varint("initial_tokens")?,
                    blessings_key: r.varint("blessings_key")?,
                    discharge_key: r.varint("discharge_key")?,
                    flags: Flags(r.varint("flags")?),
                    payload: r.bytes("payload")?,
                })
            }
            kind::DATA => {
                r.set_context("Data");
                Message::Data(Data {
                    id: r.varint("id")?,
                    flags: Flags(r.varint("flags")?),
                    payload: r.bytes("payload")?,
                })
            }
            kind::RELEASE => {
                r.set_context("Release");
                let count = r.count("count", 2)?;
                let mut releases = Vec::with_capacity(count);
                for _ in 0..count {
                    releases.push(Release {
                        flow_id: r.varint("flow_id")?,
                        tokens: r.varint("tokens")?,
                    });
                }
                Message::Release(ReleaseMsg { releases })
            }
            kind::HEALTH_CHECK_REQUEST => Message::HealthCheckRequest,
            kind::HEALTH_CHECK_RESPONSE => Message::HealthCheckResponse,
            kind::TEAR_DOWN => {
                r.set_context("TearDown");
                Message::TearDown(TearDown {
                    reason: r.string("reason")?,
                })
            }
            kind::ENTER_LAME_DUCK => Message::EnterLameDuck,
            kind::ACK_LAME_DUCK => Message::AckLameDuck,
            kind::PROXY_SERVER_REQUEST => Message::ProxyServerRequest,
            kind::MULTI_PROXY_REQUEST => Message::MultiProxyRequest,
            kind::PROXY_RESPONSE => {
                r.set_context("ProxyResponse");
                let count = r.count("count", 1)?;
                let mut endpoints = Vec::with_capacity(count);
                for _ in 0..count {
                    endpoints.push(r.string("endpoint")?);
                }
                Message::ProxyResponse(ProxyResponse { endpoints })
            }
            kind::PROXY_ERROR_RESPONSE => {
                r.set_context("ProxyErrorResponse");
                Message::ProxyErrorResponse(ProxyErrorResponse {
                    error: r.string("error")?,
                })
            }
            kind::BLESSINGS => {
                r.set_context("Blessings");
                Message::Blessings(BlessingsMsg {
                    key: r.varint("key")?,
                    bytes: r.bytes("bytes")?,
                })
            }
            kind::DISCHARGES => {
                r.set_context("Discharges");
                Message::Discharges(DischargesMsg {
                    key: r.varint("key")?,
                    blessings_key: r.varint("blessings_key")?,
                    bytes: r.bytes("bytes")?,
                })
            }
            other => return Err(r.error("type", DecodeErrorKind::UnknownType(other))),
        };
        Ok(msg)
    }
}
