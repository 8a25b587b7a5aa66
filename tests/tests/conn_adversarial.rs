//! A hostile or broken dialer against a real acceptor over TCP.
//!
//! The dialer is [`RawPeer`]: it runs the dialer's handshake by hand, then
//! seals its own frames (or writes raw bytes). Each case checks that the
//! acceptor's connection closes with the expected typed error (and, where
//! the connection got that far, that the `TearDown` carrying the reason
//! reaches the peer), that nothing panicked, and that the same listener
//! still serves a well-behaved client afterwards.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flow::ErrorKind;
use flow::auth::AllowEveryone;
use flow::conn::ConnConfig;
use flow::message::{BlessingsMsg, Data, Flags, Message, OpenFlow, Release, ReleaseMsg, TearDown};
use flow_tests::*;

/// The acceptor's configuration: defaults, with a small accept queue.
fn config() -> ConnConfig {
    ConnConfig {
        max_pending_accepts: 4,
        ..ConnConfig::default()
    }
}

async fn server(config: ConnConfig) -> TestServer {
    TestServer::start(params_with(
        &principal("server"),
        Arc::new(AllowEveryone),
        config,
    ))
    .await
}

fn open_flow(id: u64, payload: &[u8]) -> Message {
    Message::OpenFlow(OpenFlow {
        id,
        initial_tokens: 256 * 1024,
        blessings_key: 1,
        discharge_key: 1,
        flags: Flags::NONE,
        payload: Bytes::copy_from_slice(payload),
    })
}

fn data(id: u64, flags: Flags, payload: &[u8]) -> Message {
    Message::Data(Data {
        id,
        flags,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// What the raw peer sends after its handshake.
struct Attack {
    /// Plaintext appended after the binding in the first sealed frame.
    first: Bytes,
    /// Later frames, sealed whole, one per entry (already sealed frames go
    /// in `raw`).
    later: Vec<Bytes>,
    /// Frames written as they are, after `later`.
    raw: Vec<Bytes>,
}

impl Attack {
    fn msgs(first: &[Message], later: &[&[Message]]) -> Attack {
        Attack {
            first: encode(first).freeze(),
            later: later.iter().map(|m| encode(m).freeze()).collect(),
            raw: Vec::new(),
        }
    }
}

/// Runs `attack` against a fresh server with `config`; expects the
/// acceptor's connection to close with `kind` mentioning `needle`, the
/// peer to read a `TearDown` whose reason mentions `needle`, no panic, and
/// the server to keep serving.
async fn expect_close(config: ConnConfig, attack: Attack, kind: ErrorKind, needle: &str) {
    watch_panics();
    let mut srv = server(config).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .expect("raw handshake");
    let mut first = encode(&peer.binding);
    first.extend_from_slice(&attack.first);
    let frame = peer.seal(&first);
    peer.send_frame(frame).await.expect("send binding");
    let conn = srv.next().await.expect("the acceptor's handshake");
    for plain in &attack.later {
        let frame = peer.seal(plain);
        // The server may hang up at the violation; stop writing then.
        if peer.send_frame(frame).await.is_err() {
            break;
        }
    }
    for frame in attack.raw {
        if peer.send_frame(frame).await.is_err() {
            break;
        }
    }
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, kind, needle);
    assert_eq!(conn.close_reason().map(|e| e.kind()), Some(kind));
    let reason = within(SHORT, peer.teardown_reason()).await;
    assert!(
        reason.as_deref().is_some_and(|r| r.contains(needle)),
        "the peer's TearDown reason {reason:?} does not mention {needle:?}"
    );
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn data_beyond_credit_is_a_violation() {
    // The window is 256 KiB and nobody reads: 9 x 32 KiB is over it.
    let chunk = vec![0x5a; 32 * 1024];
    let frames: Vec<Vec<Message>> = (0..9).map(|_| vec![data(2, Flags::NONE, &chunk)]).collect();
    let later: Vec<&[Message]> = frames.iter().map(Vec::as_slice).collect();
    expect_close(
        config(),
        Attack::msgs(&[open_flow(2, b"")], &later),
        ErrorKind::BadArg,
        "credit",
    )
    .await;
}

#[tokio::test]
async fn data_for_an_unknown_flow_is_a_violation() {
    expect_close(
        config(),
        Attack::msgs(&[], &[&[data(42, Flags::NONE, b"x")]]),
        ErrorKind::BadArg,
        "unknown flow 42",
    )
    .await;
}

#[tokio::test]
async fn a_duplicate_flow_id_is_a_violation() {
    expect_close(
        config(),
        Attack::msgs(&[open_flow(2, b"a")], &[&[open_flow(2, b"b")]]),
        ErrorKind::BadArg,
        "opened twice",
    )
    .await;
}

#[tokio::test]
async fn a_flow_id_of_the_acceptors_parity_is_a_violation() {
    expect_close(
        config(),
        Attack::msgs(&[], &[&[open_flow(3, b"")]]),
        ErrorKind::BadArg,
        "one of our ids",
    )
    .await;
}

#[tokio::test]
async fn a_flood_of_open_flows_past_the_accept_limit_is_a_violation() {
    // Nobody accepts; the limit is 4.
    let flood: Vec<Message> = (1..=6).map(|i| open_flow(2 * i, b"")).collect();
    expect_close(
        config(),
        Attack::msgs(&[], &[&flood]),
        ErrorKind::BadArg,
        "waiting to be accepted",
    )
    .await;
}

#[tokio::test]
async fn a_first_payload_beyond_the_shared_tokens_is_a_violation() {
    let config = ConnConfig {
        shared_tokens: 1024,
        ..config()
    };
    expect_close(
        config,
        Attack::msgs(&[], &[&[open_flow(2, &[1; 2000])]]),
        ErrorKind::BadArg,
        "shared tokens",
    )
    .await;
}

#[tokio::test]
async fn data_after_close_is_a_violation() {
    expect_close(
        config(),
        Attack::msgs(
            // The flow is not accepted, so it has no credit: the CLOSE
            // comes empty.
            &[open_flow(2, b"")],
            &[
                &[data(2, Flags::CLOSE, b"")],
                &[data(2, Flags::NONE, b"more")],
            ],
        ),
        ErrorKind::BadArg,
        "after its CLOSE",
    )
    .await;
}

#[tokio::test]
async fn a_release_for_an_unknown_flow_is_a_violation() {
    let release = Message::Release(ReleaseMsg {
        releases: vec![Release {
            flow_id: 9,
            tokens: 100,
        }],
    });
    expect_close(
        config(),
        Attack::msgs(&[], &[&[release]]),
        ErrorKind::BadArg,
        "release for unknown flow",
    )
    .await;
}

#[tokio::test]
async fn a_second_auth_is_a_violation() {
    let auth = Message::Auth(flow::message::Auth {
        blessings_key: 1,
        discharge_key: 0,
        channel_binding: Bytes::from_static(&[0; 96]),
    });
    expect_close(
        config(),
        Attack::msgs(&[], &[&[auth]]),
        ErrorKind::BadArg,
        "unexpected Auth",
    )
    .await;
}

#[tokio::test]
async fn an_unsolicited_lame_duck_ack_is_a_violation() {
    expect_close(
        config(),
        Attack::msgs(&[], &[&[Message::AckLameDuck]]),
        ErrorKind::BadArg,
        "AckLameDuck",
    )
    .await;
}

#[tokio::test]
async fn flow_blessings_for_another_key_fail_authentication() {
    let victim = principal("victim");
    let blessings = Message::Blessings(BlessingsMsg {
        key: 2,
        bytes: victim.default_blessings().to_bytes(),
    });
    expect_close(
        config(),
        Attack::msgs(&[], &[&[blessings]]),
        ErrorKind::Auth,
        "key other than the connection's",
    )
    .await;
}

#[tokio::test]
async fn a_truncated_message_in_a_later_frame_is_a_violation() {
    let mut truncated = encode(&[data(2, Flags::NONE, &[3; 100])]);
    truncated.truncate(truncated.len() - 10);
    expect_close(
        config(),
        Attack {
            first: encode(&[open_flow(2, b"")]).freeze(),
            later: vec![truncated.freeze()],
            raw: Vec::new(),
        },
        ErrorKind::BadArg,
        "Data.payload",
    )
    .await;
}

#[tokio::test]
async fn a_truncated_message_after_the_binding_is_a_violation() {
    // Same, inside the first frame: the bytes after the binding take
    // another path (the handshake's leftover).
    let mut first = encode(&[open_flow(2, b"")]);
    let mut truncated = encode(&[data(2, Flags::NONE, &[3; 100])]);
    truncated.truncate(truncated.len() - 10);
    first.extend_from_slice(&truncated);
    expect_close(
        config(),
        Attack {
            first: first.freeze(),
            later: Vec::new(),
            raw: Vec::new(),
        },
        ErrorKind::BadArg,
        "Data.payload",
    )
    .await;
}

#[tokio::test]
async fn a_frame_with_a_truncated_header_is_a_violation() {
    // An OpenFlow cut inside its varints.
    let mut cut = encode(&[open_flow(2, b"")]);
    cut.truncate(3);
    expect_close(
        config(),
        Attack {
            first: Bytes::new(),
            later: vec![cut.freeze()],
            raw: Vec::new(),
        },
        ErrorKind::BadArg,
        "OpenFlow",
    )
    .await;
}

#[tokio::test]
async fn an_empty_frame_is_a_violation() {
    expect_close(
        config(),
        Attack {
            first: Bytes::new(),
            later: vec![Bytes::new()],
            raw: Vec::new(),
        },
        ErrorKind::BadArg,
        "empty frame",
    )
    .await;
}

#[tokio::test]
async fn cleartext_outside_a_passthrough_payload_is_a_violation() {
    // A Data message without PASSTHROUGH whose payload travels in the
    // frame's cleartext tail.
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.seal_msgs(&{
        let mut m = peer.binding.clone();
        m.push(open_flow(2, b""));
        m
    });
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let plain = encode(&[data(2, Flags::NONE, b"sneaky payload")]);
    let header = Data::header_len(2, Flags::NONE, 14);
    let frame = peer.seal_partial(&plain, header);
    peer.send_frame(frame).await.unwrap();
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::BadArg, "unencrypted bytes");
    let reason = within(SHORT, peer.teardown_reason()).await;
    assert!(reason.is_some_and(|r| r.contains("unencrypted bytes")));
    srv.assert_still_serves().await;
    assert_no_panics();
}

/// Runs the raw handshake, lets `tamper` alter the binding, sends it, and
/// expects the acceptor's handshake to fail with `kind` mentioning `needle`
/// (the peer then sees the connection end without a `TearDown`).
async fn expect_handshake_refused(
    tamper: impl FnOnce(&mut Vec<Message>),
    kind: ErrorKind,
    needle: &str,
) {
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    tamper(&mut peer.binding);
    let frame = peer.first_frame(&[open_flow(2, b"hello?")]);
    peer.send_frame(frame).await.unwrap();
    let err = srv.next().await.unwrap_err();
    assert_error(&err, kind, needle);
    assert_eq!(within(SHORT, peer.teardown_reason()).await, None);
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn a_bad_channel_binding_signature_fails_authentication() {
    expect_handshake_refused(
        |binding| {
            for msg in binding.iter_mut() {
                if let Message::Auth(auth) = msg {
                    let mut b = auth.channel_binding.to_vec();
                    // Past the 32-byte key: a bit of the signature.
                    b[40] ^= 0x01;
                    auth.channel_binding = b.into();
                }
            }
        },
        ErrorKind::Auth,
        "signature does not verify",
    )
    .await;
}

#[tokio::test]
async fn blessings_for_another_key_fail_authentication() {
    let victim = principal("victim");
    expect_handshake_refused(
        move |binding| {
            for msg in binding.iter_mut() {
                if let Message::Blessings(b) = msg {
                    b.bytes = victim.default_blessings().to_bytes();
                }
            }
        },
        ErrorKind::Auth,
        "holds key",
    )
    .await;
}

#[tokio::test]
async fn a_missing_binding_fails_authentication() {
    // Blessings but no Auth: the binding ends early.
    expect_handshake_refused(
        |binding| binding.retain(|m| !matches!(m, Message::Auth(_))),
        ErrorKind::Auth,
        "",
    )
    .await;
}

#[tokio::test]
async fn a_ticket_binding_without_a_ticket_fails_authentication() {
    // key || 32 bytes reads as a resumption MAC, but the acceptor redeemed
    // no ticket from this dialer.
    expect_handshake_refused(
        |binding| {
            for msg in binding.iter_mut() {
                if let Message::Auth(auth) = msg {
                    auth.channel_binding = auth.channel_binding.slice(..64);
                }
            }
        },
        ErrorKind::Auth,
        "ticket",
    )
    .await;
}

#[tokio::test]
async fn a_channel_binding_of_the_wrong_length_fails_authentication() {
    expect_handshake_refused(
        |binding| {
            for msg in binding.iter_mut() {
                if let Message::Auth(auth) = msg {
                    auth.channel_binding = auth.channel_binding.slice(..70);
                }
            }
        },
        ErrorKind::Auth,
        "channel binding of 70 bytes",
    )
    .await;
}

/// Garbage after the handshake: a frame that fails authentication.
fn garbage_frame() -> Bytes {
    let mut frame = Vec::new();
    frame.extend_from_slice(&64u32.to_be_bytes());
    frame.extend(Pattern::bytes(7, 16 + 64));
    Bytes::from(frame)
}

#[tokio::test]
async fn garbage_after_the_handshake_closes_the_connection() {
    // What holds today: the connection closes, the peer is told, the
    // server goes on. (The error's kind: see the next test.)
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.first_frame(&[]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    peer.send_frame(garbage_frame()).await.unwrap();
    let err = within(SHORT, conn.closed()).await;
    assert!(
        err.message().contains("failed authentication"),
        "unexpected error {err:?}"
    );
    let reason = within(SHORT, peer.teardown_reason()).await;
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("failed authentication")),
        "TearDown reason {reason:?}"
    );
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn garbage_after_the_handshake_is_an_auth_error() {
    expect_close(
        config(),
        Attack {
            first: Bytes::new(),
            later: Vec::new(),
            raw: vec![garbage_frame()],
        },
        ErrorKind::Auth,
        "failed authentication",
    )
    .await;
}

#[tokio::test]
async fn a_replayed_frame_fails_authentication() {
    // A valid frame sent twice: the second has the wrong nonce.
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.first_frame(&[]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let ping = peer.seal_msgs(&[Message::HealthCheckRequest]);
    peer.send_frame(ping.clone()).await.unwrap();
    peer.send_frame(ping).await.unwrap();
    let err = within(SHORT, conn.closed()).await;
    assert!(
        err.message().contains("failed authentication"),
        "unexpected error {err:?}"
    );
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn half_a_transport_frame_then_eof_is_a_network_error() {
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(
        SHORT,
        RawPeer::connect_stream(srv.addr(), &principal("mallory")),
    )
    .await
    .unwrap();
    let frame = peer.first_frame(&[open_flow(2, b"")]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    // A prefix announcing 1000 bytes, 500 of them, and the end.
    let mut half = 1000u32.to_be_bytes().to_vec();
    half.extend(Pattern::bytes(3, 500));
    peer.send_bytes(&half).await.unwrap();
    peer.shutdown().await;
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Network, "inside a frame");
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn end_of_stream_after_the_handshake_is_a_network_error() {
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.first_frame(&[open_flow(2, b"abc")]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let mut flow = within(SHORT, conn.accept_flow()).await.unwrap();
    assert_eq!(&flow.read_msg().await.unwrap().unwrap()[..], b"abc");
    peer.shutdown().await;
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Network, "closed the connection");
    // The flow's reader sees the failure, not a clean end.
    let read = within(SHORT, flow.read_msg()).await;
    assert_eq!(read.unwrap_err().kind(), ErrorKind::Network);
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn a_silent_peer_is_declared_dead_after_the_channel_timeout() {
    watch_panics();
    let config = ConnConfig {
        channel_timeout: Duration::from_millis(400),
        ..config()
    };
    let mut srv = server(config).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.first_frame(&[]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    // The peer never answers the health check it is sent.
    let mut saw_health_check = false;
    let mut reason = None;
    within(SHORT, async {
        while let Ok(Some(msgs)) = peer.recv().await {
            for msg in msgs {
                match msg {
                    Message::HealthCheckRequest => saw_health_check = true,
                    Message::TearDown(TearDown { reason: r }) => reason = Some(r),
                    _ => {}
                }
            }
        }
    })
    .await;
    assert!(saw_health_check, "no health check was sent");
    assert!(reason.is_some_and(|r| r.contains("channel timeout")));
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Network, "sent nothing");
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn a_frame_over_the_announced_size_is_refused() {
    // The acceptor announced frames of at most 64 KiB in its setup; a
    // 512 KiB frame (well within the transport's 1 MiB) breaks that promise.
    let big = vec![0u8; 512 * 1024];
    let config = ConnConfig {
        initial_window: 1 << 20,
        ..config()
    };
    expect_close(
        config,
        Attack::msgs(&[open_flow(2, b"")], &[&[data(2, Flags::NONE, &big)]]),
        ErrorKind::BadArg,
        "frame",
    )
    .await;
}

#[tokio::test]
async fn several_hostile_peers_at_once_leave_a_good_client_alone() {
    // Hostile peers and a good client on one listener, concurrently.
    watch_panics();
    let mut srv = server(config()).await;
    let mut hostile = Vec::new();
    for i in 0..8u64 {
        let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
            .await
            .unwrap();
        let frame = peer.first_frame(&[]);
        peer.send_frame(frame).await.unwrap();
        let conn = srv.next().await.unwrap();
        peer.send(&[data(100 + 2 * i, Flags::NONE, b"?")])
            .await
            .unwrap();
        hostile.push((peer, conn));
    }
    srv.assert_still_serves().await;
    for (_peer, conn) in hostile {
        let err = within(SHORT, conn.closed()).await;
        assert_error(&err, ErrorKind::BadArg, "unknown flow");
    }
    assert_no_panics();
}

/// Opens a flow from a raw peer granting `initial_tokens` of credit, then
/// neither reads its socket nor sends anything. The acceptor's application
/// writes up to `total` bytes into the flow (yielding between writes).
/// Returns the acceptor's connection, the writer (its error and the bytes
/// it got into the flow), and the server and peer to keep alive.
async fn stop_reading_peer(
    initial_tokens: u64,
    total: usize,
) -> (
    flow::conn::Conn,
    tokio::task::JoinHandle<(Option<flow::Error>, usize)>,
    TestServer,
    RawPeer,
) {
    let config = ConnConfig {
        channel_timeout: Duration::from_millis(500),
        ..config()
    };
    let mut srv = server(config).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let open = Message::OpenFlow(OpenFlow {
        id: 2,
        initial_tokens,
        blessings_key: 1,
        discharge_key: 1,
        flags: Flags::NONE,
        payload: Bytes::new(),
    });
    let frame = peer.first_frame(&[open]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let mut flow = within(SHORT, conn.accept_flow()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 1 << 20];
        let mut written = 0;
        while written < total {
            if let Err(e) = flow.write_msg(&[&chunk]).await {
                return (Some(e), written);
            }
            written += chunk.len();
            tokio::task::yield_now().await;
        }
        (None, written)
    });
    (conn, writer, srv, peer)
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_declared_dead_while_writes_block() {
    // A window of 4 MiB: the acceptor's writer blocks in the kernel (or on
    // credit) and the channel timeout must still close the connection.
    watch_panics();
    let (conn, writer, mut srv, peer) = stop_reading_peer(4 << 20, 64 << 20).await;
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Network, "sent nothing");
    let (write_err, written) = within(SHORT, writer).await.unwrap();
    let write_err = write_err.expect("the writer must fail, not finish");
    assert_eq!(write_err.kind(), ErrorKind::Network, "{write_err}");
    assert!(
        written <= 4 << 20,
        "{written} bytes written on a 4 MiB credit"
    );
    drop(peer);
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn a_huge_grant_from_a_peer_that_stops_reading_does_not_buffer_without_bound() {
    // The peer grants a terabyte. Writes must still be held back by
    // something local (a bounded send queue, or credit capped by this
    // side's own limits) instead of queueing in memory without end.
    watch_panics();
    let (conn, writer, mut srv, peer) = stop_reading_peer(1 << 40, 256 << 20).await;
    let (write_err, written) = within(SHORT, writer).await.unwrap();
    assert!(
        written <= 64 << 20,
        "{written} bytes queued for a peer that reads nothing (writer result: {write_err:?})"
    );
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Network, "sent nothing");
    drop(peer);
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn a_peers_teardown_reason_reaches_the_acceptor() {
    watch_panics();
    let mut srv = server(config()).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &principal("mallory")))
        .await
        .unwrap();
    let frame = peer.first_frame(&[open_flow(2, b"hi")]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let mut flow = within(SHORT, conn.accept_flow()).await.unwrap();
    peer.send(&[Message::TearDown(TearDown {
        reason: "shutting down for the night".into(),
    })])
    .await
    .unwrap();
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::Aborted, "shutting down for the night");
    // The accepted flow fails with the peer's reason (after any bytes it
    // had buffered), rather than ending cleanly.
    let mut seen = Vec::new();
    let end = within(SHORT, async {
        loop {
            match flow.read_msg().await {
                Ok(Some(b)) => seen.extend_from_slice(&b),
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await;
    let end = end.expect("the flow must fail, not end cleanly");
    assert_eq!(seen, b"hi");
    assert_error(&end, ErrorKind::Aborted, "shutting down for the night");
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn an_unknown_message_type_is_a_violation() {
    expect_close(
        config(),
        Attack {
            first: Bytes::new(),
            later: vec![Bytes::from_static(&[0x7f, 0, 0])],
            raw: Vec::new(),
        },
        ErrorKind::BadArg,
        "unknown type",
    )
    .await;
}

#[tokio::test]
async fn too_many_peer_credentials_are_a_violation() {
    let config = ConnConfig {
        max_peer_credentials: 3,
        ..config()
    };
    // The peer's blessings must be for its own key: mint several from the
    // raw peer's principal.
    watch_panics();
    let mallory = principal("mallory");
    let mut srv = server(config).await;
    let mut peer = within(SHORT, RawPeer::connect(srv.addr(), &mallory))
        .await
        .unwrap();
    let frame = peer.first_frame(&[]);
    peer.send_frame(frame).await.unwrap();
    let conn = srv.next().await.unwrap();
    let msgs: Vec<Message> = (2..=5)
        .map(|key| {
            Message::Blessings(BlessingsMsg {
                key,
                bytes: mallory
                    .bless_self(&format!("m{key}"), Vec::new())
                    .unwrap()
                    .to_bytes(),
            })
        })
        .collect();
    peer.send(&msgs).await.unwrap();
    let err = within(SHORT, conn.closed()).await;
    assert_error(&err, ErrorKind::BadArg, "too many blessings");
    let reason = within(SHORT, peer.teardown_reason()).await;
    assert!(reason.is_some_and(|r| r.contains("too many blessings")));
    srv.assert_still_serves().await;
    assert_no_panics();
}

#[tokio::test]
async fn an_open_flow_naming_unknown_blessings_is_a_violation() {
    let open = Message::OpenFlow(OpenFlow {
        id: 2,
        initial_tokens: 1000,
        blessings_key: 7,
        discharge_key: 1,
        flags: Flags::NONE,
        payload: Bytes::new(),
    });
    expect_close(
        config(),
        Attack::msgs(&[], &[&[open]]),
        ErrorKind::BadArg,
        "unknown blessings 7",
    )
    .await;
}
