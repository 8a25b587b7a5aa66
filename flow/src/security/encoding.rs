//! Compact binary wire encoding of caveats, certificates, blessings and
//! discharges, built on the [`flow_message::codec`] primitives.
//!
//! ```text
//! Blessings   = varint(#chains) Chain*               -- 0 chains: no blessings
//! Chain       = varint(#certs >= 1) Certificate*     -- root first
//! Certificate = str(extension) public_key[32] varint(#caveats) Caveat* signature[64]
//! Caveat      = varint(type) bytes(payload)
//!   type 1 Expiry:        varint(unix seconds)
//!   type 2 PeerBlessings: varint(#patterns) str(pattern)*
//!   type 3 ThirdParty:    id[16] discharger_key[32] str(location)
//!   other  Unknown:       kept as is
//! Discharges  = varint(#discharges) Discharge*       -- distinct caveat ids
//! Discharge   = caveat_id[16] discharger_key[32] u8(has_expiry: 0|1)
//!               [varint(unix seconds)] signature[64]
//! ```
//!
//! `str` and `bytes` are length-prefixed (varint). Every value has exactly one
//! encoding, so `decode(b) == Ok(v)` implies `encode(v) == b`.
//!
//! Decoding checks structure (key points, name and pattern syntax, non-empty
//! chains, one key per blessings, no duplicate chains or discharges, the
//! limits [`MAX_CHAIN_LEN`] and [`MAX_CERTIFICATES`]) but not signatures:
//! that is [`Blessings::validate`]'s job. It never panics and sizes every
//! allocation by what the input can hold.

use bytes::{BufMut, Bytes, BytesMut};
use flow_message::codec::{Reader, put_bytes, put_str, put_varint};
use flow_message::{DecodeError, DecodeErrorKind};
use std::time::SystemTime;

use super::blessings::{Blessings, MAX_CERTIFICATES, MAX_CHAIN_LEN};
use super::caveat::{
    CAVEAT_EXPIRY, CAVEAT_ID_LEN, CAVEAT_PEER_BLESSINGS, CAVEAT_THIRD_PARTY, Caveat, CaveatId,
    ThirdPartyCaveat, from_unix_secs, unix_secs,
};
use super::certificate::Certificate;
use super::discharge::{Discharge, Discharges};
use super::keys::{PUBLIC_KEY_LEN, PublicKey, SIGNATURE_LEN, Signature};
use super::pattern::{BlessingPattern, validate_extension};

/// Smallest encoded caveat: type and an empty payload.
const MIN_CAVEAT_LEN: usize = 2;
/// Smallest encoded certificate: a one-byte extension, key, no caveats,
/// signature.
const MIN_CERT_LEN: usize = 2 + PUBLIC_KEY_LEN + 1 + SIGNATURE_LEN;
/// Smallest encoded chain: count and one certificate.
const MIN_CHAIN_LEN: usize = 1 + MIN_CERT_LEN;
/// Smallest encoded discharge: no expiry.
const MIN_DISCHARGE_LEN: usize = CAVEAT_ID_LEN + PUBLIC_KEY_LEN + 1 + SIGNATURE_LEN;
/// Smallest encoded pattern: a one-byte string.
const MIN_PATTERN_LEN: usize = 2;

// ---- encoding ----

/// Appends the signed part of a certificate.
pub(crate) fn put_certificate_body(
    buf: &mut BytesMut,
    extension: &str,
    public_key: &PublicKey,
    caveats: &[Caveat],
) {
    put_str(buf, extension);
    buf.put_slice(public_key.as_bytes());
    put_varint(buf, caveats.len() as u64);
    for caveat in caveats {
        caveat.encode(buf);
    }
}

/// Appends the signed part of a discharge.
pub(crate) fn put_discharge_body(
    buf: &mut BytesMut,
    caveat_id: CaveatId,
    discharger_key: &PublicKey,
    expiry: Option<SystemTime>,
) {
    buf.put_slice(&caveat_id.0);
    buf.put_slice(discharger_key.as_bytes());
    match expiry {
        None => buf.put_u8(0),
        Some(at) => {
            buf.put_u8(1);
            put_varint(buf, unix_secs(at));
        }
    }
}

impl Caveat {
    /// Appends the wire encoding.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.kind());
        let mut payload = BytesMut::new();
        match self {
            Caveat::Expiry(at) => put_varint(&mut payload, unix_secs(*at)),
            Caveat::PeerBlessings(patterns) => {
                put_varint(&mut payload, patterns.len() as u64);
                for p in patterns {
                    put_str(&mut payload, p.as_str());
                }
            }
            Caveat::ThirdParty(tp) => {
                payload.put_slice(&tp.id.0);
                payload.put_slice(tp.discharger_key.as_bytes());
                put_str(&mut payload, &tp.discharger_location);
            }
            Caveat::Unknown { bytes, .. } => payload.put_slice(bytes),
        }
        put_bytes(buf, &payload);
    }

    /// Decodes one caveat that must take all of `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "Caveat");
        let caveat = Caveat::read(&mut r)?;
        r.finish("end")?;
        Ok(caveat)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let saved = r.context();
        r.set_context("Caveat");
        let kind = r.varint("type")?;
        let payload = r.bytes("payload")?;
        let caveat = match kind {
            CAVEAT_EXPIRY => {
                let mut p = Reader::new(payload, "ExpiryCaveat");
                let secs = p.varint("unix_seconds")?;
                let at = from_unix_secs(secs)
                    .ok_or_else(|| p.error("unix_seconds", DecodeErrorKind::OutOfRange(secs)))?;
                p.finish("end")?;
                Caveat::Expiry(at)
            }
            CAVEAT_PEER_BLESSINGS => {
                let mut p = Reader::new(payload, "PeerBlessingsCaveat");
                let n = p.count("patterns", MIN_PATTERN_LEN)?;
                let mut patterns = Vec::with_capacity(n);
                for _ in 0..n {
                    let text = p.string("pattern")?;
                    let pattern = BlessingPattern::new(text)
                        .map_err(|_| p.error("pattern", DecodeErrorKind::Invalid))?;
                    patterns.push(pattern);
                }
                p.finish("end")?;
                Caveat::PeerBlessings(patterns)
            }
            CAVEAT_THIRD_PARTY => {
                let mut p = Reader::new(payload, "ThirdPartyCaveat");
                let id = CaveatId(p.array("id")?);
                let discharger_key = read_key(&mut p, "discharger_key")?;
                let discharger_location = p.string("discharger_location")?;
                p.finish("end")?;
                Caveat::ThirdParty(ThirdPartyCaveat {
                    id,
                    discharger_key,
                    discharger_location,
                })
            }
            _ => Caveat::Unknown {
                kind,
                bytes: payload,
            },
        };
        r.set_context(saved);
        Ok(caveat)
    }
}

impl Certificate {
    /// Appends the wire encoding.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_certificate_body(buf, &self.extension, &self.public_key, &self.caveats);
        buf.put_slice(self.signature.as_bytes());
    }

    /// Decodes one certificate that must take all of `bytes`.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "Certificate");
        let cert = Certificate::read(&mut r)?;
        r.finish("end")?;
        Ok(cert)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let saved = r.context();
        r.set_context("Certificate");
        let extension = r.string("extension")?;
        if validate_extension(&extension).is_err() {
            return Err(r.error("extension", DecodeErrorKind::Invalid));
        }
        let public_key = read_key(r, "public_key")?;
        let n = r.count("caveats", MIN_CAVEAT_LEN)?;
        let mut caveats = Vec::with_capacity(n);
        for _ in 0..n {
            caveats.push(Caveat::read(r)?);
        }
        r.set_context("Certificate");
        let signature = Signature(r.array("signature")?);
        r.set_context(saved);
        Ok(Certificate {
            extension,
            public_key,
            caveats,
            signature,
        })
    }
}

impl Blessings {
    /// Appends the wire encoding.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.chains().len() as u64);
        for chain in self.chains() {
            put_varint(buf, chain.len() as u64);
            for cert in chain {
                cert.encode(buf);
            }
        }
    }

    /// The wire encoding as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes blessings that must take all of `bytes`. Signatures are not
    /// checked.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "Blessings");
        let blessings = Blessings::read(&mut r)?;
        r.finish("end")?;
        Ok(blessings)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let saved = r.context();
        r.set_context("Blessings");
        let n = r.count("chains", MIN_CHAIN_LEN)?;
        let mut chains: Vec<Vec<Certificate>> = Vec::with_capacity(n);
        let mut key: Option<PublicKey> = None;
        let mut total = 0usize;
        for _ in 0..n {
            r.set_context("Blessings");
            let len = r.count("certificates", MIN_CERT_LEN)?;
            if len == 0 {
                return Err(r.error("certificates", DecodeErrorKind::Invalid));
            }
            if len > MAX_CHAIN_LEN {
                return Err(r.error("certificates", DecodeErrorKind::OutOfRange(len as u64)));
            }
            total += len;
            if total > MAX_CERTIFICATES {
                return Err(r.error("certificates", DecodeErrorKind::OutOfRange(total as u64)));
            }
            let mut chain = Vec::with_capacity(len);
            for _ in 0..len {
                chain.push(Certificate::read(r)?);
            }
            r.set_context("Blessings");
            let last = chain.last().map(|c| c.public_key);
            match (key, last) {
                (None, Some(k)) => key = Some(k),
                (Some(k), Some(l)) if k != l => {
                    return Err(r.error("public_key", DecodeErrorKind::Invalid));
                }
                _ => {}
            }
            if chains.contains(&chain) {
                return Err(r.error("chains", DecodeErrorKind::Duplicate));
            }
            chains.push(chain);
        }
        r.set_context(saved);
        Ok(Blessings::from_chains_unchecked(chains))
    }
}

impl Discharge {
    /// Appends the wire encoding.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_discharge_body(buf, self.caveat_id, &self.discharger_key, self.expiry);
        buf.put_slice(self.signature.as_bytes());
    }

    /// Decodes one discharge that must take all of `bytes`. The signature
    /// is not checked.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "Discharge");
        let discharge = Discharge::read(&mut r)?;
        r.finish("end")?;
        Ok(discharge)
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Self, DecodeError> {
        let saved = r.context();
        r.set_context("Discharge");
        let caveat_id = CaveatId(r.array("caveat_id")?);
        let discharger_key = read_key(r, "discharger_key")?;
        let expiry = match r.u8("has_expiry")? {
            0 => None,
            1 => {
                let secs = r.varint("expiry")?;
                let at = from_unix_secs(secs)
                    .ok_or_else(|| r.error("expiry", DecodeErrorKind::OutOfRange(secs)))?;
                Some(at)
            }
            other => {
                return Err(r.error("has_expiry", DecodeErrorKind::OutOfRange(other.into())));
            }
        };
        let signature = Signature(r.array("signature")?);
        r.set_context(saved);
        Ok(Discharge {
            caveat_id,
            discharger_key,
            expiry,
            signature,
        })
    }
}

impl Discharges {
    /// Appends the wire encoding.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.len() as u64);
        for d in self.iter() {
            d.encode(buf);
        }
    }

    /// The wire encoding as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes a set of discharges that must take all of `bytes`.
    /// Signatures are not checked.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes, "Discharges");
        let n = r.count("discharges", MIN_DISCHARGE_LEN)?;
        let mut out = Discharges::new();
        for _ in 0..n {
            let d = Discharge::read(&mut r)?;
            if out.add(d).is_some() {
                return Err(r.error("caveat_id", DecodeErrorKind::Duplicate));
            }
        }
        r.finish("end")?;
        Ok(out)
    }
}

/// Reads a 32-byte public key, rejecting bytes that are not a curve point.
pub(crate) fn read_key(r: &mut Reader, field: &'static str) -> Result<PublicKey, DecodeError> {
    let raw: [u8; PUBLIC_KEY_LEN] = r.array(field)?;
    PublicKey::from_bytes(&raw).map_err(|_| r.error(field, DecodeErrorKind::Invalid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Principal;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn encode_blessings(b: &Blessings) -> Bytes {
        b.to_bytes()
    }

    fn sample() -> (Blessings, Discharges) {
        let alice = Principal::from_secret_key(&[1; 32]);
        let bob = Principal::from_secret_key(&[2; 32]);
        let discharger = Principal::from_secret_key(&[3; 32]);
        let a = alice.bless_self("alice", vec![]).unwrap();
        let tp = ThirdPartyCaveat::new(discharger.public_key(), "/disch");
        let caveats = vec![
            Caveat::expiry(UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
            Caveat::peer_blessings([BlessingPattern::new("srv:$").unwrap()]),
            Caveat::ThirdParty(tp.clone()),
            Caveat::Unknown {
                kind: 300,
                bytes: Bytes::from_static(b"later"),
            },
        ];
        let b = alice.bless(bob.public_key(), &a, "bob", caveats).unwrap();
        let d = discharger
            .mint_discharge(&tp, Some(UNIX_EPOCH + Duration::from_secs(5)))
            .unwrap();
        let d2 = discharger
            .mint_discharge(&ThirdPartyCaveat::new(discharger.public_key(), ""), None)
            .unwrap();
        (b, [d, d2].into_iter().collect())
    }

    #[test]
    fn round_trips() {
        let (b, ds) = sample();
        let bytes = encode_blessings(&b);
        assert_eq!(Blessings::decode(bytes.clone()).unwrap(), b);
        assert_eq!(
            Blessings::decode(Blessings::empty().to_bytes()).unwrap(),
            Blessings::empty()
        );
        assert_eq!(Discharges::decode(ds.to_bytes()).unwrap(), ds);
        for d in ds.iter() {
            let mut buf = BytesMut::new();
            d.encode(&mut buf);
            assert_eq!(&Discharge::decode(buf.freeze()).unwrap(), d);
        }
        for cert in &b.chains()[0] {
            let mut buf = BytesMut::new();
            cert.encode(&mut buf);
            assert_eq!(&Certificate::decode(buf.freeze()).unwrap(), cert);
            for c in cert.caveats() {
                let mut buf = BytesMut::new();
                c.encode(&mut buf);
                assert_eq!(&Caveat::decode(buf.freeze()).unwrap(), c);
            }
        }
    }

    #[test]
    fn typed_errors() {
        let (b, _) = sample();
        let bytes = encode_blessings(&b);

        let err = Blessings::decode(bytes.slice(..bytes.len() - 1)).unwrap_err();
        assert_eq!(
            (err.message, err.kind),
            ("Certificate", DecodeErrorKind::Truncated)
        );

        let mut extra = BytesMut::from(&bytes[..]);
        extra.put_u8(0);
        let err = Blessings::decode(extra.freeze()).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::TrailingBytes(1));

        // An empty chain.
        let mut empty_chain = vec![1u8, 0];
        empty_chain.resize(2 + MIN_CHAIN_LEN, 0);
        let err = Blessings::decode(Bytes::from(empty_chain)).unwrap_err();
        assert_eq!(
            (err.message, err.field, err.kind),
            ("Blessings", "certificates", DecodeErrorKind::Invalid)
        );
        // A chain count the input cannot hold.
        let err = Blessings::decode(Bytes::from_static(&[1, 0])).unwrap_err();
        assert_eq!(
            (err.field, err.kind),
            ("chains", DecodeErrorKind::OutOfRange(1))
        );

        // A huge chain count is refused before allocating.
        let err =
            Blessings::decode(Bytes::from_static(&[0xfc, 0xff, 0xff, 0xff, 0xff])).unwrap_err();
        assert!(matches!(err.kind, DecodeErrorKind::OutOfRange(_)));

        // A bad extension: "a@b".
        let alice = Principal::from_secret_key(&[1; 32]);
        let mut buf = BytesMut::new();
        put_str(&mut buf, "a@b");
        buf.put_slice(alice.public_key().as_bytes());
        put_varint(&mut buf, 0);
        buf.put_slice(&[0; 64]);
        let err = Certificate::decode(buf.freeze()).unwrap_err();
        assert_eq!(
            (err.message, err.field, err.kind),
            ("Certificate", "extension", DecodeErrorKind::Invalid)
        );

        // A key that is not a curve point.
        let bad_key = (2u8..=255)
            .map(|y| {
                let mut k = [0u8; 32];
                k[0] = y;
                k
            })
            .find(|k| PublicKey::from_bytes(k).is_err())
            .unwrap();
        let mut buf = BytesMut::new();
        put_str(&mut buf, "a");
        buf.put_slice(&bad_key);
        put_varint(&mut buf, 0);
        buf.put_slice(&[0; 64]);
        let err = Certificate::decode(buf.freeze()).unwrap_err();
        assert_eq!(
            (err.field, err.kind),
            ("public_key", DecodeErrorKind::Invalid)
        );

        // Duplicate chains.
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 2);
        for _ in 0..2 {
            put_varint(&mut buf, b.chains()[0].len() as u64);
            for c in &b.chains()[0] {
                c.encode(&mut buf);
            }
        }
        let err = Blessings::decode(buf.freeze()).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::Duplicate);

        // Chains for different keys.
        let other = Principal::from_secret_key(&[9; 32])
            .bless_self("o", vec![])
            .unwrap();
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 2);
        for bl in [&b, &other] {
            put_varint(&mut buf, bl.chains()[0].len() as u64);
            for c in &bl.chains()[0] {
                c.encode(&mut buf);
            }
        }
        let err = Blessings::decode(buf.freeze()).unwrap_err();
        assert_eq!(
            (err.field, err.kind),
            ("public_key", DecodeErrorKind::Invalid)
        );

        // Bad pattern in a peer caveat.
        let mut payload = BytesMut::new();
        put_varint(&mut payload, 1);
        put_str(&mut payload, "a b");
        let mut buf = BytesMut::new();
        put_varint(&mut buf, CAVEAT_PEER_BLESSINGS);
        put_bytes(&mut buf, &payload);
        let err = Caveat::decode(buf.freeze()).unwrap_err();
        assert_eq!(
            (err.message, err.field, err.kind),
            ("PeerBlessingsCaveat", "pattern", DecodeErrorKind::Invalid)
        );

        // Expiry beyond what SystemTime holds.
        let mut payload = BytesMut::new();
        put_varint(&mut payload, u64::MAX);
        let mut buf = BytesMut::new();
        put_varint(&mut buf, CAVEAT_EXPIRY);
        put_bytes(&mut buf, &payload);
        let err = Caveat::decode(buf.freeze()).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::OutOfRange(u64::MAX));

        // Discharge flag must be 0 or 1.
        let (_, ds) = sample();
        let mut buf = BytesMut::new();
        ds.iter().next().unwrap().encode(&mut buf);
        buf[48] = 7;
        let err = Discharge::decode(buf.freeze()).unwrap_err();
        assert_eq!(err.field, "has_expiry");

        // Duplicate discharges.
        let d = ds.iter().next().unwrap();
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 2);
        d.encode(&mut buf);
        d.encode(&mut buf);
        let err = Discharges::decode(buf.freeze()).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::Duplicate);
    }

    #[test]
    fn decoded_tampered_blessings_fail_validation() {
        let (b, _) = sample();
        let bytes = encode_blessings(&b).to_vec();
        // Flip a bit in the last signature byte.
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let decoded = Blessings::decode(Bytes::from(tampered)).unwrap();
        let roots = crate::security::BlessingRoots::new();
        roots.add(b.chains()[0][0].public_key, BlessingPattern::all());
        let out = decoded.validate(&crate::security::ValidationContext::new(&roots));
        assert!(
            out.rejected[0]
                .reason
                .contains("bad signature in certificate 1")
        );
    }

    fn arb_pattern() -> impl Strategy<Value = BlessingPattern> {
        prop_oneof![
            Just(BlessingPattern::all()),
            ("[a-z]{1,5}(:[a-z0-9]{1,4}){0,2}", any::<bool>()).prop_map(|(name, exact)| {
                if exact {
                    BlessingPattern::exact(&name).unwrap()
                } else {
                    BlessingPattern::prefix(&name).unwrap()
                }
            }),
        ]
    }

    fn arb_caveat() -> impl Strategy<Value = Caveat> {
        prop_oneof![
            (0u64..(1 << 40)).prop_map(|s| Caveat::Expiry(UNIX_EPOCH + Duration::from_secs(s))),
            prop::collection::vec(arb_pattern(), 0..3).prop_map(Caveat::PeerBlessings),
            (any::<[u8; 16]>(), any::<u8>(), ".{0,10}").prop_map(|(id, seed, location)| {
                Caveat::ThirdParty(ThirdPartyCaveat {
                    id: CaveatId(id),
                    discharger_key: Principal::from_secret_key(&[seed; 32]).public_key(),
                    discharger_location: location,
                })
            }),
            (4u64.., prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(kind, bytes)| {
                Caveat::Unknown {
                    kind,
                    bytes: Bytes::from(bytes),
                }
            }),
        ]
    }

    /// One chain: (root seed, [(extension, caveats, next seed)]), ending at
    /// the shared final key.
    type ChainSpec = (u8, Vec<(String, Vec<Caveat>)>);

    fn arb_chain() -> impl Strategy<Value = ChainSpec> {
        (
            any::<u8>(),
            prop::collection::vec(
                (
                    "[a-z0-9][a-z0-9._-]{0,5}(:[a-z]{1,3}){0,1}",
                    prop::collection::vec(arb_caveat(), 0..3),
                ),
                1..4,
            ),
        )
    }

    fn build(final_seed: u8, specs: &[ChainSpec]) -> Blessings {
        let holder = Principal::from_secret_key(&[final_seed; 32]).public_key();
        let mut all = Vec::new();
        for (root_seed, links) in specs {
            let mut signer = Principal::from_secret_key(&[*root_seed; 32]);
            let (first_ext, first_caveats) = &links[0];
            let mut b = signer.bless_self(first_ext, first_caveats.clone()).unwrap();
            for (i, (ext, caveats)) in links.iter().enumerate().skip(1) {
                let next = Principal::from_secret_key(&[root_seed.wrapping_add(i as u8); 32]);
                b = signer
                    .bless(next.public_key(), &b, ext, caveats.clone())
                    .unwrap();
                signer = next;
            }
            // Finally hand it to the holder.
            b = signer.bless(holder, &b, "h", vec![]).unwrap();
            all.push(b);
        }
        Blessings::union(&all).unwrap()
    }

    fn decode_all(bytes: &[u8]) {
        let b = Bytes::copy_from_slice(bytes);
        if let Ok(v) = Blessings::decode(b.clone()) {
            assert_eq!(v.to_bytes(), b);
        }
        if let Ok(v) = Certificate::decode(b.clone()) {
            let mut buf = BytesMut::new();
            v.encode(&mut buf);
            assert_eq!(buf.freeze(), b);
        }
        if let Ok(v) = Caveat::decode(b.clone()) {
            let mut buf = BytesMut::new();
            v.encode(&mut buf);
            assert_eq!(buf.freeze(), b);
        }
        if let Ok(v) = Discharge::decode(b.clone()) {
            let mut buf = BytesMut::new();
            v.encode(&mut buf);
            assert_eq!(buf.freeze(), b);
        }
        if let Ok(v) = Discharges::decode(b.clone()) {
            assert_eq!(v.to_bytes(), b);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn blessings_round_trip(final_seed: u8, specs in prop::collection::vec(arb_chain(), 1..3)) {
            let b = build(final_seed, &specs);
            let bytes = b.to_bytes();
            let decoded = Blessings::decode(bytes.clone()).unwrap();
            prop_assert_eq!(&decoded, &b);
            prop_assert_eq!(decoded.to_bytes(), bytes);
            prop_assert_eq!(decoded.names(), b.names());
        }

        #[test]
        fn caveat_round_trip(caveat in arb_caveat()) {
            let mut buf = BytesMut::new();
            caveat.encode(&mut buf);
            prop_assert_eq!(Caveat::decode(buf.freeze()).unwrap(), caveat);
        }

        #[test]
        fn mutated_encodings_never_panic(
            specs in prop::collection::vec(arb_chain(), 1..2),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let b = build(7, &specs);
            let mut bytes = b.to_bytes().to_vec();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            decode_all(&bytes);
            let cut = cut.index(bytes.len() + 1);
            decode_all(&bytes[..cut]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            decode_all(&bytes);
        }
    }
}
