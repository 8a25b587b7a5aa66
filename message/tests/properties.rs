//! Property tests of the wire format: every message round-trips, frames of
//! several messages round-trip, and arbitrary bytes never panic the decoder.

use bytes::{Bytes, BytesMut};
use flow_message::codec::Reader;
use flow_message::{
    Auth, BlessingsMsg, Data, DecodeErrorKind, DischargesMsg, Flags, FrameMessages, Message,
    OpenFlow, ProxyErrorResponse, ProxyResponse, Release, ReleaseMsg, Setup, SetupOption, TearDown,
    VersionRange, decode_frame, encode_frame, option,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        1 => vec(any::<u8>(), 0..4096).prop_map(Bytes::from),
    ]
}

fn varint() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..200, any::<u64>(), Just(u64::MAX)]
}

fn flags() -> impl Strategy<Value = Flags> {
    varint().prop_map(Flags::from_bits)
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        (any::<u32>(), any::<u32>()),
        proptest::option::of(varint()),
        proptest::option::of(varint()),
        proptest::option::of(varint()),
        proptest::option::of(".{0,40}"),
        (
            proptest::option::of(".{0,40}"),
            any::<bool>(),
            proptest::option::of(payload()),
        ),
        vec(
            (option::FIRST_UNKNOWN_OPTION..u64::MAX, payload())
                .prop_map(|(id, value)| SetupOption { id, value }),
            0..4,
        ),
    )
        .prop_map(
            |(
                (a, b),
                mtu,
                shared_tokens,
                initial_window,
                remote,
                (local, hidden_blessings, ticket),
                unknown_options,
            )| Setup {
                versions: VersionRange {
                    min: a.min(b),
                    max: a.max(b),
                },
                mtu,
                shared_tokens,
                initial_window,
                peer_remote_endpoint: remote,
                peer_local_endpoint: local,
                hidden_blessings,
                ticket,
                unknown_options,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        setup().prop_map(|s| Message::Setup(Box::new(s))),
        (varint(), varint(), payload()).prop_map(|(b, d, sig)| Message::Auth(Auth {
            blessings_key: b,
            discharge_key: d,
            channel_binding: sig,
        })),
        (varint(), varint(), varint(), varint(), flags(), payload()).prop_map(
            |(id, initial_tokens, blessings_key, discharge_key, flags, payload)| {
                Message::OpenFlow(OpenFlow {
                    id,
                    initial_tokens,
                    blessings_key,
                    discharge_key,
                    flags,
                    payload,
                })
            }
        ),
        (varint(), flags(), payload()).prop_map(|(id, flags, payload)| Message::Data(Data {
            id,
            flags,
            payload
        })),
        vec((varint(), varint()), 0..20).prop_map(|r| Message::Release(ReleaseMsg {
            releases: r
                .into_iter()
                .map(|(flow_id, tokens)| Release { flow_id, tokens })
                .collect(),
        })),
        Just(Message::HealthCheckRequest),
        Just(Message::HealthCheckResponse),
        ".{0,60}".prop_map(|reason| Message::TearDown(TearDown { reason })),
        Just(Message::EnterLameDuck),
        Just(Message::AckLameDuck),
        Just(Message::ProxyServerRequest),
        Just(Message::MultiProxyRequest),
        vec(".{0,60}", 0..5)
            .prop_map(|endpoints| Message::ProxyResponse(ProxyResponse { endpoints })),
        ".{0,60}".prop_map(|error| Message::ProxyErrorResponse(ProxyErrorResponse { error })),
        (varint(), payload())
            .prop_map(|(key, bytes)| Message::Blessings(BlessingsMsg { key, bytes })),
        (varint(), varint(), payload()).prop_map(|(key, blessings_key, bytes)| {
            Message::Discharges(DischargesMsg {
                key,
                blessings_key,
                bytes,
            })
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        prop_assert_eq!(buf.len(), msg.encoded_len());
        let mut r = Reader::new(buf.freeze(), "test");
        let decoded = Message::decode(&mut r).unwrap();
        prop_assert!(r.is_empty());
        prop_assert_eq!(decoded, msg);
    }

    #[test]
    fn frames_round_trip(msgs in vec(message(), 1..8)) {
        let mut buf = BytesMut::new();
        encode_frame(&msgs, &mut buf);
        prop_assert_eq!(decode_frame(buf.freeze()).unwrap(), msgs);
    }

    #[test]
    fn every_truncation_is_an_error(msg in message()) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let full = buf.freeze();
        for cut in 0..full.len() {
            let mut r = Reader::new(full.slice(..cut), "test");
            prop_assert!(Message::decode(&mut r).is_err(), "prefix of {} bytes decoded", cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        let frame = Bytes::from(bytes);
        let _ = decode_frame(frame.clone());
        for msg in FrameMessages::new(frame) {
            if msg.is_err() { break; }
        }
    }

    #[test]
    fn mutated_frames_never_panic(msgs in vec(message(), 1..4), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut buf = BytesMut::new();
        encode_frame(&msgs, &mut buf);
        let mut raw = buf.to_vec();
        for (at, byte) in flips {
            let i = at.index(raw.len());
            raw[i] = byte;
        }
        let _ = decode_frame(Bytes::from(raw));
    }
}

#[test]
fn payloads_are_slices_of_the_frame() {
    let msg = Message::Data(Data {
        id: 9,
        flags: Flags::CLOSE,
        payload: Bytes::from_static(b"hello, flow"),
    });
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    let frame = buf.freeze();
    let range = frame.as_ptr_range();
    let Message::Data(data) = &decode_frame(frame.clone()).unwrap()[0] else {
        panic!("not data")
    };
    assert!(range.contains(&data.payload.as_ptr()), "payload was copied");
}

#[test]
fn errors_name_message_and_field() {
    // Data{id: 1, flags: 0, payload length 10} with only 2 payload bytes.
    let err = decode_frame(Bytes::from_static(&[0x04, 1, 0, 10, b'a', b'b'])).unwrap_err();
    assert_eq!((err.message, err.field), ("Data", "payload"));
    assert!(matches!(
        err.kind,
        DecodeErrorKind::LengthPastEnd {
            declared: 10,
            available: 2
        }
    ));

    let err = decode_frame(Bytes::from_static(&[0x77])).unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::UnknownType(0x77));

    let err = decode_frame(Bytes::new()).unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::EmptyFrame);

    // OpenFlow whose id varint declares more than 9 bytes.
    let err = decode_frame(Bytes::from_static(&[0x03, 0xf0, 1, 2, 3])).unwrap_err();
    assert_eq!(
        (err.message, err.field, err.kind),
        ("OpenFlow", "id", DecodeErrorKind::VarintTooLong)
    );

    // Release claiming a billion entries in three bytes must not allocate them.
    let err = decode_frame(Bytes::from_static(&[
        0x05, 0xfc, 0x3b, 0x9a, 0xca, 0x00, 1, 1,
    ]))
    .unwrap_err();
    assert_eq!((err.message, err.field), ("Release", "count"));
}

#[test]
fn setup_keeps_unknown_options_and_rejects_duplicates() {
    let setup = Setup {
        versions: VersionRange { min: 1, max: 3 },
        mtu: Some(65_535),
        shared_tokens: None,
        initial_window: Some(1 << 18),
        peer_remote_endpoint: Some("@1@tcp@127.0.0.1:1@@@@@".into()),
        peer_local_endpoint: None,
        hidden_blessings: true,
        ticket: Some(Bytes::from_static(&[7; 16])),
        unknown_options: vec![SetupOption {
            id: 1000,
            value: Bytes::from_static(b"future"),
        }],
    };
    let mut buf = BytesMut::new();
    Message::Setup(Box::new(setup.clone())).encode(&mut buf);
    assert_eq!(
        decode_frame(buf.freeze()).unwrap(),
        vec![Message::Setup(Box::new(setup))]
    );

    // Two MTU options.
    let raw = [
        0x01,
        1,
        1,
        2,
        option::MTU as u8,
        1,
        5,
        option::MTU as u8,
        1,
        6,
    ];
    let err = decode_frame(Bytes::copy_from_slice(&raw)).unwrap_err();
    assert_eq!(
        (err.message, err.field, err.kind),
        ("Setup", "mtu", DecodeErrorKind::Duplicate)
    );

    // min > max.
    let err = decode_frame(Bytes::from_static(&[0x01, 3, 1, 0])).unwrap_err();
    assert_eq!(err.field, "max_version");
}

#[test]
fn version_ranges_negotiate_newest_common() {
    let a = VersionRange { min: 1, max: 5 };
    assert_eq!(a.common(VersionRange { min: 3, max: 9 }), Some(5));
    assert_eq!(a.common(VersionRange { min: 6, max: 9 }), None);
}
