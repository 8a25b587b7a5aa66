//! The conformance suite every registered transport runs over real sockets
//! (or in-process pipes for `memory`). A new transport is tested by adding
//! one line to the `conformance!` invocation at the bottom.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flow::ErrorKind;
use flow::transport::{Frame, FrameReader, FrameWriter};
use flow_protocols::{MAX_FRAME_SIZE, Registry};

/// Addresses are reported, the maximum is the crate's, and one frame goes
/// each way.
async fn dial_listen_accept(case: Case) {
    let registry = Registry::with_defaults();
    let Pair {
        listener,
        dialer,
        acceptor,
    } = case.pair(&registry).await;
    let local = listener.local_addr();
    assert!(!local.is_empty());
    assert!(!local.ends_with(":0"), "port 0 not replaced: {local}");
    for end in [&dialer, &acceptor] {
        assert_eq!(end.max_frame_size, MAX_FRAME_SIZE);
        assert!(!end.local.is_empty());
        assert!(!end.remote.is_empty());
    }
    let (mut dr, mut dw) = (dialer.reader, dialer.writer);
    let (mut ar, mut aw) = (acceptor.reader, acceptor.writer);
    write(&mut *dw, &[Bytes::from_static(b"ping")]).await;
    assert_eq!(&read_n(&mut *ar, 1).await[0][..], b"ping");
    write(&mut *aw, &[Bytes::from_static(b"pong")]).await;
    assert_eq!(&read_n(&mut *dr, 1).await[0][..], b"pong");
}

/// Sends `frames` from `w` to `r` (concurrently, so large writes cannot
/// stall) and checks they arrive intact and in order.
async fn round_trip(w: &mut dyn FrameWriter, r: &mut dyn FrameReader, frames: &[Bytes]) {
    let (_, got) = tokio::join!(write(w, frames), read_n(r, frames.len()));
    for (i, (sent, got)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent.len(), got.len(), "frame {i} length");
        assert!(sent[..] == got[..], "frame {i} contents");
    }
}

/// Frames of 0 bytes, 1 byte and the maximum size, one per call and all in
/// one call, in both directions.
async fn edge_sizes(case: Case) {
    let (mut dr, mut dw, mut ar, mut aw, _listener) = case.halves().await;
    let sizes = [0, 1, MAX_FRAME_SIZE, 0, 1, MAX_FRAME_SIZE - 1, 0];
    let frames: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| numbered(i, n))
        .collect();
    for frame in &frames {
        round_trip(&mut *dw, &mut *ar, std::slice::from_ref(frame)).await;
        round_trip(&mut *aw, &mut *dr, std::slice::from_ref(frame)).await;
    }
    round_trip(&mut *dw, &mut *ar, &frames).await;
    round_trip(&mut *aw, &mut *dr, &frames).await;
}

/// Thousands of small and medium frames in one vectored call.
async fn many_frames_in_one_write(case: Case) {
    let (mut dr, mut dw, mut ar, mut aw, _listener) = case.halves().await;
    let frames: Vec<Bytes> = (0..3000).map(|i| numbered(i, (i * 131) % 2000)).collect();
    round_trip(&mut *dw, &mut *ar, &frames).await;
    round_trip(&mut *aw, &mut *dr, &frames).await;
}

/// A frame over the maximum, in one part or in two that each fit, is
/// refused before anything is written; the connection stays usable.
async fn oversized_write_refused(case: Case) {
    let registry = Registry::with_defaults();
    let Pair {
        listener: _listener,
        dialer,
        acceptor,
    } = case.pair(&registry).await;
    let (_dr, mut dw) = (dialer.reader, dialer.writer);
    let (mut ar, _aw) = (acceptor.reader, acceptor.writer);
    let half = MAX_FRAME_SIZE / 2 + 1;
    let too_big = [
        Frame::from(Bytes::from(vec![7u8; MAX_FRAME_SIZE + 1])),
        Frame::with_tail(Bytes::from(vec![7u8; half]), Bytes::from(vec![8u8; half])),
    ];
    for frame in too_big {
        let frames = [Frame::from(&b"first"[..]), frame];
        let err = dw.write_frames(&frames).await.expect_err("too big");
        assert_eq!(err.kind(), ErrorKind::BadArg);
    }
    round_trip(&mut *dw, &mut *ar, &[Bytes::from_static(b"after")]).await;
}

/// Frames of every shape: head and tail, head only, an empty tail given,
/// tail only, empty, a large tail, the maximum in two parts. Every part
/// says which it is.
fn frames_of_every_shape() -> Vec<Frame> {
    let half = MAX_FRAME_SIZE / 2;
    vec![
        Frame::with_tail(numbered(0, 16), numbered(1, 100)),
        Frame::from(numbered(2, 50)),
        Frame::with_tail(numbered(3, 10), Bytes::new()),
        Frame::with_tail(Bytes::new(), numbered(4, 30)),
        Frame::default(),
        Frame::with_tail(numbered(5, 24), numbered(6, 64 * 1024)),
        Frame::with_tail(numbered(7, 3), numbered(8, 5000)),
        Frame::with_tail(numbered(9, half), numbered(10, MAX_FRAME_SIZE - half)),
        Frame::with_tail(numbered(11, 7), numbered(12, 9)),
    ]
}

/// Sends `frames` from `w` to `r`, first offering them without waiting
/// when `w` takes frames so (the rest, and anything kept of a frame taken
/// in part, then go by `write_frames`); checks each arrives as one frame,
/// head then tail, in order.
async fn round_trip_frames(
    w: &mut dyn FrameWriter,
    r: &mut dyn FrameReader,
    frames: &[Frame],
    try_first: bool,
) {
    let send = async {
        let mut taken = 0;
        if try_first && w.writes_without_waiting() {
            taken = w.try_write_frames(frames).expect("try write");
        }
        // Writes what a try kept even when it took every frame.
        write_frames(w, &frames[taken..]).await;
        assert!(!w.has_pending(), "bytes left pending");
    };
    let (_, got) = tokio::join!(send, read_n(r, frames.len()));
    for (i, (sent, got)) in frames.iter().zip(&got).enumerate() {
        assert_eq!(sent.len(), got.len(), "frame {i} length");
        assert!(joined(sent) == got[..], "frame {i} contents");
    }
}

/// Frames with tails arrive whole (head then tail, as one frame) one per
/// call and mixed in one call, in both directions, through `write_frames`
/// and through `try_write_frames`.
async fn frames_with_tails_arrive_whole(case: Case) {
    let (mut dr, mut dw, mut ar, mut aw, _listener) = case.halves().await;
    let frames = frames_of_every_shape();
    for frame in &frames {
        let one = std::slice::from_ref(frame);
        round_trip_frames(&mut *dw, &mut *ar, one, false).await;
        round_trip_frames(&mut *aw, &mut *dr, one, false).await;
    }
    for try_first in [false, true] {
        round_trip_frames(&mut *dw, &mut *ar, &frames, try_first).await;
        round_trip_frames(&mut *aw, &mut *dr, &frames, try_first).await;
        round_trip_frames(&mut *dw, &mut *ar, &frames[..5], try_first).await;
        round_trip_frames(&mut *aw, &mut *dr, &frames[..5], try_first).await;
    }
}

/// Sends `total` bytes in frames of mixed sizes, in batches of varying
/// length, and returns the checksum of what was sent.
async fn send_mixed(writer: &mut dyn FrameWriter, seed: u64, total: u64) -> Checksum {
    let data = pool(seed);
    let mut rng = Rng::new(seed ^ 0xABCD);
    let mut sum = Checksum::default();
    let mut batch = Vec::new();
    while sum.bytes < total {
        batch.clear();
        for _ in 0..1 + rng.below(48) {
            let len = match rng.below(10) {
                0..=5 => rng.below(257),
                6..=8 => 256 + rng.below(16 * 1024),
                _ => MAX_FRAME_SIZE - rng.below(MAX_FRAME_SIZE / 2),
            };
            let frame = cut(&data, &mut rng, len);
            sum.add(&frame);
            batch.push(frame);
        }
        write(writer, &batch).await;
    }
    sum
}

/// 64 MiB each way at once in mixed frame sizes, checked by checksum; then
/// both sides close and each sees the other's end of stream.
async fn big_transfer_both_ways(case: Case) {
    const TOTAL: u64 = 64 << 20;
    let (mut dr, mut dw, mut ar, mut aw, _listener) = case.halves().await;
    // Frame counts are not known up front: each sender reports its checksum
    // over a channel and the reader stops at that many frames.
    let (dsum_tx, dsum_rx) = tokio::sync::oneshot::channel();
    let (asum_tx, asum_rx) = tokio::sync::oneshot::channel();
    let dialer_sends = tokio::spawn(async move {
        let sum = send_mixed(&mut *dw, 1, TOTAL).await;
        let _ = dsum_tx.send(sum);
        dw
    });
    let acceptor_sends = tokio::spawn(async move {
        let sum = send_mixed(&mut *aw, 2, TOTAL).await;
        let _ = asum_tx.send(sum);
        aw
    });
    let acceptor_reads = tokio::spawn(async move {
        let got = receive_all_until(&mut *ar, dsum_rx).await;
        (ar, got)
    });
    let dialer_reads = tokio::spawn(async move {
        let got = receive_all_until(&mut *dr, asum_rx).await;
        (dr, got)
    });
    let mut dw = dialer_sends.await.expect("dialer sender");
    let mut aw = acceptor_sends.await.expect("acceptor sender");
    let (mut ar, (sent_by_dialer, got_by_acceptor)) =
        acceptor_reads.await.expect("acceptor reader");
    let (mut dr, (sent_by_acceptor, got_by_dialer)) = dialer_reads.await.expect("dialer reader");
    assert_eq!(sent_by_dialer, got_by_acceptor);
    assert_eq!(sent_by_acceptor, got_by_dialer);
    assert!(got_by_acceptor.bytes >= TOTAL);

    dw.close().await.expect("dialer close");
    expect_end(&mut *ar).await;
    aw.close().await.expect("acceptor close");
    expect_end(&mut *dr).await;
}

/// Reads frames while waiting for the sender's checksum, then reads up to
/// the count it gives; returns (sent, received).
async fn receive_all_until(
    reader: &mut dyn FrameReader,
    sent: tokio::sync::oneshot::Receiver<Checksum>,
) -> (Checksum, Checksum) {
    let mut got = Checksum::default();
    let mut sent = std::pin::pin!(sent);
    let expected = loop {
        tokio::select! {
            biased;
            sum = &mut sent => break sum.expect("sender finished"),
            frame = tokio::time::timeout(PROMPT, reader.read_frame()) => match frame {
                Ok(Ok(Some(frame))) => got.add(&frame),
                Ok(Ok(None)) => panic!("stream ended after {} frames", got.frames),
                Ok(Err(e)) => panic!("read after {} frames: {e}", got.frames),
                Err(_) => panic!("stalled after {} frames", got.frames),
            },
        }
    };
    while got.frames < expected.frames {
        match tokio::time::timeout(PROMPT, reader.read_frame()).await {
            Ok(Ok(Some(frame))) => got.add(&frame),
            Ok(Ok(None)) => panic!("stream ended after {} frames", got.frames),
            Ok(Err(e)) => panic!("read after {} frames: {e}", got.frames),
            Err(_) => panic!("stalled after {} frames", got.frames),
        }
    }
    (expected, got)
}

/// Closing the dialer's writer is seen by the acceptor's reader, after the
/// frames written before it.
async fn close_by_dialer_is_seen(case: Case) {
    let registry = Registry::with_defaults();
    let Pair {
        listener: _listener,
        dialer,
        acceptor,
    } = case.pair(&registry).await;
    let (_dr, mut dw) = (dialer.reader, dialer.writer);
    let (mut ar, _aw) = (acceptor.reader, acceptor.writer);
    write(&mut *dw, &[Bytes::from_static(b"last words")]).await;
    dw.close().await.expect("close");
    assert_eq!(&read_n(&mut *ar, 1).await[0][..], b"last words");
    expect_end(&mut *ar).await;
    expect_end(&mut *ar).await;
}

/// Closing the acceptor's writer is seen by the dialer's reader.
async fn close_by_acceptor_is_seen(case: Case) {
    let registry = Registry::with_defaults();
    let Pair {
        listener: _listener,
        dialer,
        acceptor,
    } = case.pair(&registry).await;
    let (mut dr, _dw) = (dialer.reader, dialer.writer);
    let (_ar, mut aw) = (acceptor.reader, acceptor.writer);
    write(&mut *aw, &[Bytes::new(), Bytes::from_static(b"bye")]).await;
    aw.close().await.expect("close");
    let frames = read_n(&mut *dr, 2).await;
    assert!(frames[0].is_empty());
    assert_eq!(&frames[1][..], b"bye");
    expect_end(&mut *dr).await;
}

/// Many connections at once to one listener are all accepted and kept
/// apart.
async fn concurrent_dials(case: Case) {
    const CONNS: usize = 16;
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    // Each dialer speaks first (see `Case::pair`).
    let dials = futures::future::join_all((0..CONNS).map(|i| {
        let case = &case;
        let registry = &registry;
        let listener = &listener;
        async move {
            let conn = case.dial(registry, &**listener).await.expect("dial");
            let (_r, mut w) = conn.split();
            write(&mut *w, &[numbered(i, 64)]).await;
            w
        }
    }));
    let accepts = async {
        let mut seen = Vec::new();
        for _ in 0..CONNS {
            let conn = tokio::time::timeout(PROMPT, listener.accept())
                .await
                .expect("accept in time")
                .expect("accept");
            let (mut r, _w) = conn.split();
            let frame = read_n(&mut *r, 1).await.remove(0);
            seen.push(frame[0] as usize);
        }
        seen
    };
    let (_writers, mut seen) = tokio::join!(dials, accepts);
    seen.sort_unstable();
    assert_eq!(seen, (0..CONNS).collect::<Vec<_>>());
}

/// Closing the listener fails a pending accept promptly, and later ones.
async fn close_fails_pending_accept(case: Case) {
    let registry = Registry::with_defaults();
    let listener = std::sync::Arc::new(case.listen(&registry).await);
    let pending = tokio::spawn({
        let listener = listener.clone();
        async move { listener.accept().await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    listener.close();
    let result = tokio::time::timeout(PROMPT, pending)
        .await
        .expect("pending accept ends promptly")
        .expect("task");
    assert_eq!(result.expect_err("closed").kind(), ErrorKind::BadState);
    let later = listener.accept().await.map(drop).expect_err("still closed");
    assert_eq!(later.kind(), ErrorKind::BadState);
}

/// Dialing a closed listener fails.
async fn dial_after_close_fails(case: Case) {
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    let address = listener.local_addr();
    listener.close();
    let err = registry
        .dial(case.dial_protocol, &address, DIAL_TIMEOUT)
        .await
        .map(drop)
        .expect_err("listener is closed");
    assert_eq!(err.kind(), ErrorKind::DialFailed, "{err}");
    assert!(
        err.message().contains(address.trim_start_matches('@')),
        "{err}"
    );
}

macro_rules! conformance {
    ($($name:ident => $case:expr;)*) => {$(
        mod $name {
            use super::*;

            fn case() -> Option<Case> {
                $case
            }

            conformance!(@tests dial_listen_accept, edge_sizes, many_frames_in_one_write,
                oversized_write_refused, frames_with_tails_arrive_whole,
                big_transfer_both_ways, close_by_dialer_is_seen,
                close_by_acceptor_is_seen, concurrent_dials, close_fails_pending_accept,
                dial_after_close_fails);
        }
    )*};
    (@tests $($test:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            if let Some(case) = case() {
                super::$test(case).await;
            }
        }
    )*};
}

conformance! {
    tcp => Case::net("tcp", "127.0.0.1:0", "tcp");
    tcp4 => Case::net("tcp4", "127.0.0.1:0", "tcp4");
    tcp6 => Case::net("tcp6", "[::1]:0", "tcp6");
    ws => Case::net("ws", "127.0.0.1:0", "ws");
    ws6 => Case::net("ws6", "[::1]:0", "ws6");
    wsh_raw => Case::net("wsh", "127.0.0.1:0", "wsh");
    wsh_websocket => Case::net("wsh", "127.0.0.1:0", "ws");
    wsh4_tcp4 => Case::net("wsh4", "127.0.0.1:0", "tcp4");
    unix => Case::unix();
    unix_abstract => Case::unix_abstract();
    memory => Case::memory();
}
