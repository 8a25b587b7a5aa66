//! Two multiplexers wired back to back with simulated time: deterministic
//! tests of every flow lifecycle, flow control, lame duck, health checks,
//! teardown and hostile input.

use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use flow_message::{Data, Flags, Message, OpenFlow, Release, ReleaseMsg};
use proptest::prelude::*;

use super::config::ConnConfig;
use super::state::*;
use crate::ErrorKind;
use crate::security::{Blessings, Discharges};

fn established(role: Role) -> Established {
    Established {
        role,
        version: 1,
        max_frame: 16 * 1024,
        max_recv_frame: 16 * 1024,
        peer_shared_tokens: ConnConfig::default().effective_shared_tokens(),
        rtt: Duration::from_millis(1),
        local_blessings: Blessings::empty(),
        local_discharges: Discharges::new(),
        remote_blessings: Blessings::empty(),
        remote_discharges: Discharges::new(),
    }
}

/// A connection in the acceptor's role, established now, with `config`.
fn acceptor(config: ConnConfig) -> ConnState {
    ConnState::new(config, established(Role::Acceptor), Instant::now())
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

struct Pair {
    a: ConnState,
    b: ConnState,
    now: Instant,
    /// Frames delivered, for tests that count them.
    frames: usize,
}

impl Pair {
    fn new() -> Self {
        Pair::with_config(ConnConfig::default())
    }

    fn with_config(config: ConnConfig) -> Self {
        Pair::with_frames(config, 16 * 1024)
    }

    fn with_frames(config: ConnConfig, max_frame: usize) -> Self {
        let now = Instant::now();
        let mut b_est = established(Role::Acceptor);
        b_est.max_frame = max_frame;
        b_est.max_recv_frame = max_frame;
        b_est.peer_shared_tokens = config.effective_shared_tokens();
        let mut a_est = established(Role::Dialer);
        a_est.max_frame = max_frame;
        a_est.max_recv_frame = max_frame;
        a_est.peer_shared_tokens = config.effective_shared_tokens();
        Pair {
            a: ConnState::new(config.clone(), a_est, now),
            b: ConnState::new(config, b_est, now),
            now,
            frames: 0,
        }
    }

    /// Moves frames both ways until both sides are quiet.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            let moved_a = transfer(&mut self.a, &mut self.b, self.now);
            let moved_b = transfer(&mut self.b, &mut self.a, self.now);
            self.frames += moved_a + moved_b;
            if moved_a + moved_b == 0 {
                return;
            }
        }
        panic!("connection never went quiet");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
    }
}

/// Sends every frame `from` has to `to`; returns how many.
fn transfer(from: &mut ConnState, to: &mut ConnState, now: Instant) -> usize {
    let mut count = 0;
    loop {
        let mut buf = BytesMut::new();
        let Some(built) = from.build_frame(now, &mut buf) else {
            return count;
        };
        count += 1;
        let mut frame = match built.own_buffer {
            Some(mut own) => {
                own.advance(super::FRAME_OVERHEAD);
                own
            }
            None => buf,
        };
        frame.extend_from_slice(&built.tail);
        let _ = to.handle_frame(now, frame.freeze(), built.encrypted_len);
    }
}

fn write_all(conn: &mut ConnState, id: FlowId, data: &[u8]) -> usize {
    match conn.poll_write(&mut cx(), id, &[data]) {
        Poll::Ready(Ok(n)) => n,
        Poll::Ready(Err(e)) => panic!("write failed: {e}"),
        Poll::Pending => 0,
    }
}

fn read_all(conn: &mut ConnState, id: FlowId) -> (Vec<u8>, bool) {
    read_all_at(conn, id, Instant::now())
}

fn read_all_at(conn: &mut ConnState, id: FlowId, now: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match conn.poll_read(&mut cx(), || now, id, usize::MAX) {
            Poll::Ready(Ok(Some(b))) => out.extend_from_slice(&b),
            Poll::Ready(Ok(None)) => return (out, true),
            Poll::Ready(Err(e)) => panic!("read failed: {e}"),
            Poll::Pending => return (out, false),
        }
    }
}

/// Opens a flow from `a` to `b` that keeps messages whole, sends `first`
/// on it and reads it at `b`: (flow at a, flow at b), both with credit.
fn open_whole_flow(p: &mut Pair, first: &[u8]) -> (FlowId, FlowId) {
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    p.a.disable_fragmentation(f).unwrap();
    write_all(&mut p.a, f, first);
    p.pump();
    let g = accept(&mut p.b).unwrap();
    p.pump();
    assert_eq!(read_all(&mut p.b, g).0, first);
    (f, g)
}

fn accept(conn: &mut ConnState) -> Option<FlowId> {
    match conn.poll_accept(&mut cx()) {
        Poll::Ready(Ok(id)) => Some(id),
        Poll::Ready(Err(e)) => panic!("accept failed: {e}"),
        Poll::Pending => None,
    }
}

#[test]
fn first_bytes_ride_in_open_flow_and_arrive_in_one_frame() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    assert_eq!(write_all(&mut p.a, f, b"hello"), 5);
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    let msgs = flow_message::decode_frame(buf.clone().freeze()).unwrap();
    assert!(matches!(&msgs[..], [Message::OpenFlow(o)] if &o.payload[..] == b"hello"));
    p.b.handle_frame(p.now, buf.freeze(), built.encrypted_len)
        .unwrap();
    let g = accept(&mut p.b).unwrap();
    assert_eq!(Some(g), p.a.wire_id(f));
    assert_eq!(read_all(&mut p.b, g), (b"hello".to_vec(), false));
}

#[test]
fn bidirectional_flows_from_both_sides() {
    let mut p = Pair::new();
    let fa = p.a.open_flow(FlowOptions::default()).unwrap();
    let fb = p.b.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, fa, b"from a");
    write_all(&mut p.b, fb, b"from b");
    p.pump();
    // Each side numbers its flows with its own parity.
    assert_ne!(p.a.wire_id(fa), p.b.wire_id(fb));
    let ga = accept(&mut p.b).unwrap();
    let gb = accept(&mut p.a).unwrap();
    assert_eq!(read_all(&mut p.b, ga).0, b"from a");
    assert_eq!(read_all(&mut p.a, gb).0, b"from b");
    // Replies on the accepted flows.
    write_all(&mut p.b, ga, b"reply to a");
    p.pump();
    assert_eq!(read_all(&mut p.a, fa).0, b"reply to a");
}

#[test]
fn half_close_then_reply_then_close() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"request");
    p.a.close_write(f);
    p.pump();
    let g = accept(&mut p.b).unwrap();
    assert_eq!(read_all(&mut p.b, g), (b"request".to_vec(), true));
    write_all(&mut p.b, g, b"response");
    p.b.close_write(g);
    p.pump();
    assert_eq!(read_all(&mut p.a, f), (b"response".to_vec(), true));
    assert!(p.a.poll_write(&mut cx(), f, &[b"x"]).is_ready());
    p.a.drop_flow(f);
    p.b.drop_flow(g);
    p.pump();
    assert_eq!(p.a.flow_count(), 0);
    assert_eq!(p.b.flow_count(), 0);
    assert!(p.a.is_idle() && p.b.is_idle());
}

#[test]
fn close_in_every_order_forgets_flows_on_both_sides() {
    // Which side closes first, whether the reader drained, and whether
    // handles drop before or after the peer's close.
    for order in 0..8u8 {
        let mut p = Pair::new();
        let f = p.a.open_flow(FlowOptions::default()).unwrap();
        write_all(&mut p.a, f, b"ping");
        p.pump();
        let g = accept(&mut p.b).unwrap();
        if order & 1 == 0 {
            read_all(&mut p.b, g);
        }
        let (first, first_id, second, second_id) = if order & 2 == 0 {
            (&mut p.a, f, &mut p.b, g)
        } else {
            (&mut p.b, g, &mut p.a, f)
        };
        if order & 4 == 0 {
            first.drop_flow(first_id);
            second.drop_flow(second_id);
        } else {
            first.close_flow(first_id);
            second.close_write(second_id);
            first.drop_flow(first_id);
            second.drop_flow(second_id);
        }
        p.pump();
        assert_eq!(p.a.flow_count(), 0, "order {order}");
        assert_eq!(p.b.flow_count(), 0, "order {order}");
        assert_eq!(p.a.window_total(), 0, "order {order}");
        assert_eq!(p.b.window_total(), 0, "order {order}");
    }
}

#[test]
fn dropped_unwritten_flow_sends_nothing() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    p.a.drop_flow(f);
    assert!(!p.a.wants_to_send());
    assert_eq!(p.a.flow_count(), 0);
}

#[test]
fn flush_opens_an_empty_flow() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    assert!(p.a.poll_flush(&mut cx(), f).is_pending());
    p.pump();
    assert!(p.a.poll_flush(&mut cx(), f).is_ready());
    assert!(accept(&mut p.b).is_some());
}

#[test]
fn slow_reader_stops_sender_at_the_window() {
    let mut p = Pair::new();
    let window = ConnConfig::default().initial_window as usize;
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    let chunk = vec![7u8; 4096];
    let mut sent = write_all(&mut p.a, f, &chunk);
    p.pump();
    // Until the flow is accepted only the first payload may go.
    assert_eq!(write_all(&mut p.a, f, &chunk), 0);
    let g = accept(&mut p.b).unwrap();
    p.pump();
    for _ in 0..1000 {
        let n = write_all(&mut p.a, f, &chunk);
        sent += n;
        p.pump();
        if n == 0 {
            break;
        }
    }
    assert_eq!(sent, window, "sender stopped exactly at the window");
    let (got, _) = read_all(&mut p.b, g);
    assert_eq!(got.len(), window);
    p.pump();
    // Reading released credit: the writer may go on.
    assert!(write_all(&mut p.a, f, &chunk) > 0);
}

#[test]
fn a_slow_flow_does_not_stall_another() {
    let mut p = Pair::new();
    let slow = p.a.open_flow(FlowOptions::default()).unwrap();
    let fast = p.a.open_flow(FlowOptions::default()).unwrap();
    let chunk = vec![1u8; 8192];
    while write_all(&mut p.a, slow, &chunk) > 0 {
        p.pump();
    }
    let mut got = 0;
    let mut sent = 0;
    let mut fast_in = None;
    for _ in 0..200 {
        sent += write_all(&mut p.a, fast, &chunk);
        p.pump();
        while let Some(id) = accept(&mut p.b) {
            if Some(id) == p.a.wire_id(fast) {
                fast_in = Some(id);
            }
        }
        if let Some(id) = fast_in {
            got += read_all(&mut p.b, id).0.len();
        }
    }
    assert!(sent > 190 * 8192, "the fast flow kept writing");
    assert_eq!(got, sent);
}

#[test]
fn shared_tokens_return_after_first_grant() {
    let config = ConnConfig {
        shared_tokens: 1000,
        ..ConnConfig::default()
    };
    let mut p = Pair::with_config(config);
    let f1 = p.a.open_flow(FlowOptions::default()).unwrap();
    assert_eq!(write_all(&mut p.a, f1, &[0u8; 5000]), 1000);
    let f2 = p.a.open_flow(FlowOptions::default()).unwrap();
    // The pool is spent until the first grant comes back, which happens
    // when the peer's application accepts the flow.
    // (f2 goes out as an empty OpenFlow to earn its own credit.)
    assert_eq!(write_all(&mut p.a, f2, &[0u8; 10]), 0);
    p.pump();
    assert_eq!(write_all(&mut p.a, f2, &[0u8; 10]), 0);
    assert_eq!(accept(&mut p.b), p.a.wire_id(f1));
    p.pump();
    // f1's first grant returned the pool: a new flow may borrow again.
    let f3 = p.a.open_flow(FlowOptions::default()).unwrap();
    assert_eq!(write_all(&mut p.a, f3, &[0u8; 10]), 10);
    // f2 gets its own credit once accepted.
    assert_eq!(accept(&mut p.b), p.a.wire_id(f2));
    p.pump();
    assert_eq!(write_all(&mut p.a, f2, &[0u8; 10]), 10);
}

#[test]
fn side_channels_do_not_keep_the_connection_busy() {
    let mut p = Pair::new();
    let f =
        p.a.open_flow(FlowOptions {
            side_channel: true,
            ..FlowOptions::default()
        })
        .unwrap();
    write_all(&mut p.a, f, b"hb");
    p.pump();
    assert!(p.a.is_idle());
    let g = accept(&mut p.b).unwrap();
    assert!(p.b.is_side_channel(g));
    assert!(p.b.is_idle());
    let busy = p.a.open_flow(FlowOptions::default()).unwrap();
    assert!(!p.a.is_idle());
    p.a.drop_flow(busy);
    assert!(p.a.is_idle());
}

#[test]
fn lame_duck_stops_new_flows_and_is_acknowledged() {
    let mut p = Pair::new();
    let existing = p.b.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.b, existing, b"before");
    p.a.enter_lame_duck();
    // b queued data on a flow it started before hearing of the lame duck.
    let racing = p.b.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.b, racing, b"racing");
    p.pump();
    assert!(p.a.is_lame_duck_acked());
    assert!(p.b.is_peer_lame_duck());
    assert!(p.a.error().is_none() && p.b.error().is_none());
    assert_eq!(
        p.b.open_flow(FlowOptions::default()).unwrap_err().kind(),
        ErrorKind::BadState
    );
    // Both flows opened before the ack arrived and work.
    assert!(accept(&mut p.a).is_some());
    assert!(accept(&mut p.a).is_some());
    p.pump();
    write_all(&mut p.b, existing, b" and after");
    p.pump();
    let existing_in_a = p.b.wire_id(existing).unwrap();
    assert_eq!(read_all(&mut p.a, existing_in_a).0, b"before and after");
}

#[test]
fn health_check_measures_rtt_and_silence_kills() {
    let config = ConnConfig {
        channel_timeout: Duration::from_secs(10),
        ..ConnConfig::default()
    };
    let mut p = Pair::with_config(config);
    p.advance(Duration::from_secs(5));
    assert!(
        p.a.wants_to_send(),
        "health check due after half the timeout"
    );
    p.pump();
    assert!(p.a.error().is_none());
    // The peer answered, so the clock restarted.
    p.advance(Duration::from_secs(9));
    assert!(p.a.error().is_none() && p.b.error().is_none());
    // Now the peer goes silent: nothing is delivered.
    p.advance(Duration::from_secs(1));
    let mut sink = BytesMut::new();
    while p.a.build_frame(p.now, &mut sink).is_some() {
        sink.clear();
    }
    p.advance(Duration::from_secs(10));
    let err = p.a.error().expect("closed by the health check");
    assert_eq!(err.kind(), ErrorKind::Network);
    assert!(p.a.poll_timeout().is_none());
}

#[test]
fn teardown_reason_reaches_the_peer_and_fails_its_flows() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"data");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    p.a.close("shutting down for maintenance");
    p.pump();
    assert!(p.a.is_finished());
    let err = p.b.error().unwrap().clone();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert!(
        err.message().contains("shutting down for maintenance"),
        "{err}"
    );
    // Bytes already received are still readable, then the error.
    assert!(
        matches!(p.b.poll_read(&mut cx(), || p.now, g, 100), Poll::Ready(Ok(Some(b))) if &b[..] == b"data")
    );
    assert!(matches!(
        p.b.poll_read(&mut cx(), || p.now, g, 100),
        Poll::Ready(Err(_))
    ));
    assert!(p.b.open_flow(FlowOptions::default()).is_err());
}

#[test]
fn closing_sends_the_ends_of_flows_shut_down_before_it_then_the_teardown() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"all of it");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    // Shut down, then close before the end was built into a frame.
    p.a.close_write(f);
    p.a.close("done");
    p.pump();
    assert!(p.b.error().is_some());
    assert!(
        matches!(p.b.poll_read(&mut cx(), || p.now, g, 100), Poll::Ready(Ok(Some(b))) if &b[..] == b"all of it")
    );
    // A clean end, not the teardown's error.
    assert!(matches!(
        p.b.poll_read(&mut cx(), || p.now, g, 100),
        Poll::Ready(Ok(None))
    ));
}

#[test]
fn whole_messages_keep_their_boundaries() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    p.a.disable_fragmentation(f).unwrap();
    let mut g = None;
    for msg in [&b"one"[..], b"two!", &[9u8; 3000]] {
        // Before the flow's own credit arrives (at accept) only one message
        // may ride in the OpenFlow: the next write waits.
        if write_all(&mut p.a, f, msg) == 0 {
            p.pump();
            g = accept(&mut p.b).or(g);
            p.pump();
            assert_eq!(write_all(&mut p.a, f, msg), msg.len());
        }
    }
    p.pump();
    let g = g.unwrap();
    let mut got = Vec::new();
    while let Poll::Ready(Ok(Some(b))) = p.b.poll_read(&mut cx(), || p.now, g, usize::MAX) {
        got.push(b.len());
    }
    assert_eq!(got, vec![3, 4, 3000]);
    let too_big = vec![0u8; p.a.max_message() + 1];
    assert!(
        matches!(p.a.poll_write(&mut cx(), f, &[&too_big]), Poll::Ready(Err(e)) if e.kind() == ErrorKind::BadArg)
    );
}

#[test]
fn a_sink_gets_waiting_then_new_messages_in_order_and_the_end_last() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    p.a.disable_fragmentation(f).unwrap();
    write_all(&mut p.a, f, b"one");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    p.pump();
    write_all(&mut p.a, f, b"two");
    p.pump();
    // "one" and "two" wait in the flow: they come back to be delivered
    // first.
    let (sink_id, waiting, ended) = p.b.attach_sink(g, false, || p.now).unwrap();
    assert_eq!(
        waiting,
        vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
    assert!(!ended);
    assert!(
        p.b.attach_sink(g, false, || p.now).is_none(),
        "attached twice"
    );
    // Later messages go to the sink, not to the reader.
    write_all(&mut p.a, f, b"three");
    p.a.close_write(f);
    p.pump();
    assert_eq!(
        p.b.take_sink_items().into_iter().collect::<Vec<_>>(),
        vec![
            SinkItem::Data(sink_id, Bytes::from_static(b"three"), false),
            SinkItem::End(sink_id)
        ]
    );
    assert!(p.b.take_sink_items().is_empty());
    // The reader sees the end only once it was delivered.
    assert!(p.b.poll_read(&mut cx(), || p.now, g, 100).is_pending());
    p.b.sink_ended(sink_id);
    assert!(matches!(
        p.b.poll_read(&mut cx(), || p.now, g, 100),
        Poll::Ready(Ok(None))
    ));
}

#[test]
fn a_small_whole_message_through_an_idle_connection_is_framed_at_once() {
    let window = 16 * 1024;
    let mut p = Pair::with_config(ConnConfig {
        initial_window: window,
        min_window: window,
        max_window: window,
        contended_window: window,
        ..ConnConfig::default()
    });
    let mut buf = BytesMut::new();
    // Not yet open on the wire: the usual way (the OpenFlow) first.
    let early = p.a.open_flow(FlowOptions::default()).unwrap();
    p.a.disable_fragmentation(early).unwrap();
    assert!(
        p.a.build_message_frame(early, b"early", p.now, &mut buf)
            .is_none()
    );
    assert!(buf.is_empty());
    let (f, g) = open_whole_flow(&mut p, b"open");
    p.pump();
    let sent_before = p.a.stats().bytes_sent;
    let encrypted_len =
        p.a.build_message_frame(f, b"hello", p.now, &mut buf)
            .unwrap()
            .encrypted_len;
    assert_eq!(encrypted_len, buf.len());
    assert_eq!(p.a.stats().bytes_sent, sent_before + 5);
    p.b.handle_frame(p.now, buf.split().freeze(), encrypted_len)
        .unwrap();
    assert_eq!(read_all(&mut p.b, g).0, b"hello");
    // Something else waiting to go out: the usual way, in order behind it.
    let other = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, other, b"queued");
    assert!(
        p.a.build_message_frame(f, b"later", p.now, &mut buf)
            .is_none()
    );
    p.pump();
    assert!(
        p.a.build_message_frame(f, b"later", p.now, &mut buf)
            .is_some()
    );
    buf.clear();
    // More than the flow's credit: the usual way, which waits for it.
    let msg = [1u8; 6000];
    let mut fit = 0;
    while p.a.build_message_frame(f, &msg, p.now, &mut buf).is_some() {
        buf.clear();
        fit += 1;
        assert!(fit < 100, "credit never ran out");
    }
    assert!(buf.is_empty());
    assert_eq!(fit, 16 * 1024 / 6000);
    // A due round-trip probe goes out the usual way too.
    let later = p.now + Duration::from_secs(2);
    assert!(
        p.a.build_message_frame(f, b"probe", later, &mut buf)
            .is_none()
    );
}

/// How the sink in [`stream_to_sink`] deals with credit.
#[derive(Clone, Copy, PartialEq)]
enum SinkCredit {
    /// Attached to get credit back on arrival; reports nothing.
    OnArrival,
    /// Reports each message taken (`sink_took`).
    Reported,
    /// Takes nothing.
    Never,
}

/// Streams 16 KiB writes at a flow with a sink attached while nothing
/// reads it; returns (bytes written, bytes handed to the sink).
fn stream_to_sink(credit: SinkCredit) -> (usize, usize) {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"x");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    let on_arrival = credit == SinkCredit::OnArrival;
    p.b.attach_sink(g, on_arrival, || p.now).unwrap();
    p.pump();
    let chunk = vec![7u8; 16 * 1024];
    let (mut written, mut handed) = (1, 0);
    for _ in 0..2000 {
        written += write_all(&mut p.a, f, &chunk);
        p.pump();
        for item in p.b.take_sink_items() {
            if let SinkItem::Data(id, data, _) = item {
                handed += data.len();
                if credit == SinkCredit::Reported {
                    p.b.sink_took(id, data.len() as u64, || p.now);
                }
            }
        }
    }
    // Everything written reached the sink ("x" went before it).
    assert_eq!(handed + 1, written);
    (written, handed)
}

#[test]
fn a_sink_keeps_the_sender_going_past_one_window() {
    // Credit returns as the sink takes messages, or as they arrive for a
    // sink that takes everything: far more than a window goes through
    // while nothing reads the flow.
    for credit in [SinkCredit::Reported, SinkCredit::OnArrival] {
        let (written, _) = stream_to_sink(credit);
        assert!(written > 16 * 1024 * 1024, "{written}");
    }
}

#[test]
fn a_sink_that_takes_nothing_stops_the_sender_after_one_window() {
    // Messages handed to the sink but not (yet) taken hold their credit.
    let (written, _) = stream_to_sink(SinkCredit::Never);
    assert!(written <= 4 * 1024 * 1024, "{written}");
}

#[test]
fn refused_messages_go_back_to_the_reader_in_order_and_a_sink_can_return() {
    let mut p = Pair::new();
    let (f, g) = open_whole_flow(&mut p, b"0");
    let (sink_id, _, _) = p.b.attach_sink(g, false, || p.now).unwrap();
    for msg in [&b"1"[..], b"2", b"3"] {
        assert_eq!(write_all(&mut p.a, f, msg), 1);
    }
    p.pump();
    let items = p.b.take_sink_items();
    assert_eq!(items.len(), 3);
    // The sink takes "1" and refuses "2": "2" goes back, and "3", still in
    // the deliverer's hands, after it.
    p.b.sink_took(sink_id, 1, || p.now);
    let mut items = items.into_iter().skip(1).map(|item| match item {
        SinkItem::Data(_, data, _) => data,
        SinkItem::End(_) => panic!("no end was sent"),
    });
    p.b.sink_refused(sink_id, items.next());
    assert_eq!(p.b.return_to_reader(sink_id, items.next().unwrap()), Ok(()));
    // Detached: a later message waits behind them for the reader too.
    assert_eq!(write_all(&mut p.a, f, b"4"), 1);
    p.pump();
    assert!(p.b.take_sink_items().is_empty());
    let mut got = Vec::new();
    while let Poll::Ready(Ok(Some(chunk))) = p.b.poll_read(&mut cx(), || p.now, g, 100) {
        got.push(chunk);
    }
    let expected: Vec<Bytes> = [&b"2"[..], b"3", b"4"].map(Bytes::copy_from_slice).into();
    assert_eq!(got, expected);
    // Caught up, the reader attaches a sink again; a message a deliverer
    // still holds then goes to it, not behind it.
    assert!(p.b.attach_sink(g, false, || p.now).is_some());
    assert_eq!(
        p.b.return_to_reader(sink_id, Bytes::from_static(b"6")),
        Err(Bytes::from_static(b"6"))
    );
}

/// A flow with a sink attached whose last two messages, "w" then "y" and
/// the end, were just taken for delivery: (pair, flow at b, items).
fn end_in_flight() -> (Pair, FlowId, Vec<SinkItem>) {
    let mut p = Pair::new();
    let (f, g) = open_whole_flow(&mut p, b"open");
    p.b.attach_sink(g, false, || p.now).unwrap();
    assert_eq!(write_all(&mut p.a, f, b"w"), 1);
    assert_eq!(write_all(&mut p.a, f, b"y"), 1);
    p.a.close_write(f);
    p.pump();
    let items: Vec<_> = p.b.take_sink_items().into_iter().collect();
    assert_eq!(items.len(), 3);
    (p, g, items)
}

fn poll_once(p: &mut Pair, g: FlowId) -> Poll<Option<Bytes>> {
    match p.b.poll_read(&mut cx(), || p.now, g, 100) {
        Poll::Ready(Ok(chunk)) => Poll::Ready(chunk),
        Poll::Ready(Err(e)) => panic!("read failed: {e}"),
        Poll::Pending => Poll::Pending,
    }
}

#[test]
fn the_end_waits_for_messages_a_deliverer_still_holds() {
    let (mut p, g, _) = end_in_flight();
    // "w" is refused and comes back; "y" and the end are still in the
    // deliverer's hands.
    p.b.sink_refused(g, [Bytes::from_static(b"w")]);
    assert_eq!(
        poll_once(&mut p, g),
        Poll::Ready(Some(Bytes::from_static(b"w")))
    );
    assert_eq!(poll_once(&mut p, g), Poll::Pending, "the end came before y");
    assert_eq!(p.b.return_to_reader(g, Bytes::from_static(b"y")), Ok(()));
    assert_eq!(
        poll_once(&mut p, g),
        Poll::Ready(Some(Bytes::from_static(b"y")))
    );
    assert_eq!(poll_once(&mut p, g), Poll::Pending);
    p.b.end_returned(g);
    assert_eq!(poll_once(&mut p, g), Poll::Ready(None));
}

#[test]
fn a_sink_attached_again_gets_the_end_after_messages_still_held() {
    let (mut p, g, _) = end_in_flight();
    p.b.sink_refused(g, [Bytes::from_static(b"w")]);
    assert_eq!(
        poll_once(&mut p, g),
        Poll::Ready(Some(Bytes::from_static(b"w")))
    );
    // Caught up, the reader attaches a sink again: the end is not reported
    // to it yet, "y" goes to it, then the end.
    let (_, waiting, ended) = p.b.attach_sink(g, false, || p.now).unwrap();
    assert!(waiting.is_empty());
    assert!(!ended, "the end was reported before y");
    assert_eq!(
        p.b.return_to_reader(g, Bytes::from_static(b"y")),
        Err(Bytes::from_static(b"y"))
    );
    assert_eq!(poll_once(&mut p, g), Poll::Pending);
    p.b.sink_ended(g);
    assert_eq!(poll_once(&mut p, g), Poll::Ready(None));
}

#[test]
fn a_flow_not_yet_opened_on_the_wire_gets_no_sink() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    // Its id is provisional: the peer's messages will carry another.
    assert!(p.a.attach_sink(f, false, || p.now).is_none());
    write_all(&mut p.a, f, b"now open");
    p.pump();
    assert!(p.a.attach_sink(f, false, || p.now).is_some());
}

#[test]
fn a_sink_on_a_flow_the_peer_already_ended_reports_it() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"last");
    p.a.close_write(f);
    p.pump();
    let g = accept(&mut p.b).unwrap();
    let (_, waiting, ended) = p.b.attach_sink(g, false, || p.now).unwrap();
    assert_eq!(waiting, vec![Bytes::from_static(b"last")]);
    assert!(ended);
}

#[test]
fn passthrough_payloads_travel_outside_the_encrypted_part() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"open");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    p.pump();
    p.a.set_passthrough(f).unwrap();
    write_all(&mut p.a, f, b"sealed elsewhere");
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    assert_eq!(&buf[built.encrypted_len..], b"sealed elsewhere");
    p.b.handle_frame(p.now, buf.freeze(), built.encrypted_len)
        .unwrap();
    assert_eq!(read_all(&mut p.b, g).0, b"opensealed elsewhere");
}

// ----- Hostile input ----------------------------------------------------

fn frame(msgs: &[Message]) -> Bytes {
    let mut buf = BytesMut::new();
    flow_message::encode_frame(msgs, &mut buf);
    buf.freeze()
}

fn inject(conn: &mut ConnState, msgs: &[Message]) -> crate::Result<()> {
    let f = frame(msgs);
    let len = f.len();
    conn.handle_frame(Instant::now(), f, len)
}

fn open_msg(id: u64, payload: &'static [u8]) -> Message {
    Message::OpenFlow(OpenFlow {
        id,
        initial_tokens: 1 << 20,
        blessings_key: CONN_BLESSINGS_KEY,
        discharge_key: 0,
        flags: Flags::NONE,
        payload: Bytes::from_static(payload),
    })
}

fn data_msg(id: u64, payload: Bytes) -> Message {
    Message::Data(Data {
        id,
        flags: Flags::NONE,
        payload,
    })
}

fn assert_violation(conn: &ConnState, result: crate::Result<()>, needle: &str) {
    let err = result.expect_err("hostile input accepted");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(
        err.message().contains(needle),
        "{err} should mention {needle:?}"
    );
    assert!(conn.is_closed());
    // The reason goes to the peer in a TearDown.
    assert!(conn.wants_to_send());
}

#[test]
fn data_beyond_credit_closes_the_connection() {
    let mut conn = acceptor(ConnConfig::default());
    // A flow not yet accepted has no credit beyond its first payload.
    inject(&mut conn, &[open_msg(2, b"x")]).unwrap();
    let r = inject(&mut conn, &[data_msg(2, Bytes::from_static(b"y"))]);
    assert_violation(&conn, r, "credit");

    // An accepted flow has its window, and not a byte more.
    let config = ConnConfig {
        initial_window: 40_000,
        ..ConnConfig::default()
    };
    let mut conn = acceptor(config);
    inject(&mut conn, &[open_msg(2, b"")]).unwrap();
    assert!(conn.poll_accept(&mut cx()).is_ready());
    let piece = Bytes::from(vec![0u8; 10_000]);
    for _ in 0..4 {
        inject(&mut conn, &[data_msg(2, piece.clone())]).unwrap();
    }
    let r = inject(&mut conn, &[data_msg(2, Bytes::from_static(b"z"))]);
    assert_violation(&conn, r, "credit");
}

#[test]
fn frames_over_the_announced_size_close_the_connection() {
    let mut conn = acceptor(ConnConfig::default());
    let big = Bytes::from(vec![0u8; 20_000]);
    let r = inject(&mut conn, &[open_msg(2, b""), data_msg(2, big)]);
    assert_violation(&conn, r, "announced");
}

#[test]
fn first_payloads_of_unaccepted_flows_are_bounded_by_the_shared_tokens() {
    let config = ConnConfig {
        shared_tokens: 100,
        ..ConnConfig::default()
    };
    let mut conn = acceptor(config);
    inject(&mut conn, &[open_msg(2, &[1; 60])]).unwrap();
    // 60 in use: 40 left until the first flow is accepted.
    let r = inject(&mut conn, &[open_msg(4, &[1; 60])]);
    assert_violation(&conn, r, "shared tokens");

    let mut conn = acceptor(ConnConfig {
        shared_tokens: 100,
        ..ConnConfig::default()
    });
    inject(&mut conn, &[open_msg(2, &[1; 60])]).unwrap();
    assert!(conn.poll_accept(&mut cx()).is_ready());
    // Accepting returned the tokens.
    inject(&mut conn, &[open_msg(4, &[1; 60])]).unwrap();
}

#[test]
fn unknown_and_duplicate_flow_ids_close_the_connection() {
    let mut conn = acceptor(ConnConfig::default());
    let r = inject(&mut conn, &[data_msg(40, Bytes::from_static(b"x"))]);
    assert_violation(&conn, r, "unknown flow");

    let mut conn = acceptor(ConnConfig::default());
    inject(&mut conn, &[open_msg(4, b"")]).unwrap();
    let r = inject(&mut conn, &[open_msg(4, b"")]);
    assert_violation(&conn, r, "opened twice");

    let mut conn = acceptor(ConnConfig::default());
    let r = inject(&mut conn, &[open_msg(3, b"")]);
    assert_violation(&conn, r, "our ids");

    let mut conn = acceptor(ConnConfig::default());
    let r = inject(
        &mut conn,
        &[Message::Release(ReleaseMsg {
            releases: vec![Release {
                flow_id: 99,
                tokens: 1,
            }],
        })],
    );
    assert_violation(&conn, r, "unknown flow");
}

#[test]
fn open_flow_flood_past_the_limit_closes_the_connection() {
    let config = ConnConfig {
        max_pending_accepts: 10,
        ..ConnConfig::default()
    };
    let mut conn = acceptor(config);
    for i in 1..=10 {
        inject(&mut conn, &[open_msg(i * 2, b"")]).unwrap();
    }
    let r = inject(&mut conn, &[open_msg(22, b"")]);
    assert_violation(&conn, r, "waiting to be accepted");

    let config = ConnConfig {
        max_flows: 5,
        ..ConnConfig::default()
    };
    let mut conn = acceptor(config);
    for i in 1..=5 {
        inject(&mut conn, &[open_msg(i * 2, b"")]).unwrap();
    }
    let r = inject(&mut conn, &[open_msg(12, b"")]);
    assert_violation(&conn, r, "flows open");
}

#[test]
fn garbage_and_misplaced_messages_close_the_connection() {
    let mut conn = acceptor(ConnConfig::default());
    let r = conn.handle_frame(Instant::now(), Bytes::from_static(&[0x7f, 1, 2]), 3);
    assert_violation(&conn, r, "unknown type");

    let mut conn = acceptor(ConnConfig::default());
    let r = inject(&mut conn, &[Message::ProxyServerRequest]);
    assert_violation(&conn, r, "unexpected ProxyServerRequest");

    // Cleartext tail that is not a passthrough payload.
    let mut conn = acceptor(ConnConfig::default());
    let f = frame(&[open_msg(2, b""), data_msg(2, Bytes::from_static(b"abc"))]);
    let r = conn.handle_frame(Instant::now(), f.clone(), f.len() - 3);
    assert_violation(&conn, r, "unencrypted");

    // OpenFlow carrying more than the shared tokens.
    let config = ConnConfig {
        shared_tokens: 2,
        ..ConnConfig::default()
    };
    let mut conn = acceptor(config);
    let r = inject(&mut conn, &[open_msg(2, b"abc")]);
    assert_violation(&conn, r, "shared tokens");

    // Data after the flow's CLOSE.
    let mut conn = acceptor(ConnConfig::default());
    inject(
        &mut conn,
        &[Message::Data(Data {
            id: 2,
            flags: Flags::CLOSE,
            payload: Bytes::new(),
        })],
    )
    .unwrap_err();
}

#[test]
fn hostile_input_never_panics_after_setup() {
    // A cheap, always-on cousin of the fuzz target.
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        let mut conn = acceptor(ConnConfig::default());
        for _ in 0..4 {
            let len = (rng_state % 64) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                bytes.push((rng_state % 20) as u8);
            }
            let enc = (rng_state as usize) % (len + 1);
            let _ = conn.handle_frame(Instant::now(), Bytes::from(bytes), enc);
            let mut out = BytesMut::new();
            let _ = conn.build_frame(Instant::now(), &mut out);
        }
    }
}

// ----- Random operation sequences ----------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open(bool),
    Write(usize, usize),
    Read(usize, usize),
    CloseWrite(usize),
    Drop(usize),
    Pump(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => any::<bool>().prop_map(Op::Open),
        6 => (0usize..8, 1usize..20_000).prop_map(|(f, n)| Op::Write(f, n)),
        6 => (0usize..8, 1usize..30_000).prop_map(|(f, n)| Op::Read(f, n)),
        1 => (0usize..8).prop_map(Op::CloseWrite),
        1 => (0usize..8).prop_map(Op::Drop),
        3 => any::<u8>().prop_map(Op::Pump),
    ]
}

/// One direction of a flow as the test sees it.
struct Tracked {
    /// Opened by `a` (true) or `b`.
    by_a: bool,
    id: FlowId,
    written: Vec<u8>,
    read: Vec<u8>,
    write_closed: bool,
    dropped: bool,
    eof: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every byte written is read exactly once and in order per flow; no
    /// side ever exceeds its credit (that would close the connection);
    /// windows stay within the budget.
    #[test]
    fn random_operations_deliver_every_byte_in_order(ops in proptest::collection::vec(op(), 1..120)) {
        let config = ConnConfig {
            initial_window: 32 * 1024,
            min_window: 4 * 1024,
            max_window: 128 * 1024,
        contended_window: 12 * 1024,
            connection_budget: 256 * 1024,
            shared_tokens: 8 * 1024,
            ..ConnConfig::default()
        };
        let mut p = Pair::with_config(config.clone());
        let mut flows: Vec<Tracked> = Vec::new();
        let mut counter = 0u8;
        for op in ops {
            match op {
                Op::Open(by_a) => {
                    let side = if by_a { &mut p.a } else { &mut p.b };
                    if let Ok(id) = side.open_flow(FlowOptions::default()) {
                        flows.push(Tracked { by_a, id, written: Vec::new(), read: Vec::new(), write_closed: false, dropped: false, eof: false });
                    }
                }
                Op::Write(i, n) => {
                    if let Some(t) = flows.get_mut(i)
                        && !t.write_closed && !t.dropped
                    {
                        let data: Vec<u8> = (0..n).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                        let side = if t.by_a { &mut p.a } else { &mut p.b };
                        let w = write_all(side, t.id, &data);
                        t.written.extend_from_slice(&data[..w]);
                    }
                }
                Op::Read(i, n) => {
                    if let Some(t) = flows.get_mut(i)
                        && !t.dropped
                    {
                        // The reader is the other side; it must have accepted.
                        let wire = if t.by_a { p.a.wire_id(t.id) } else { p.b.wire_id(t.id) };
                        let side = if t.by_a { &mut p.b } else { &mut p.a };
                        while accept(side).is_some() {}
                        let Some(wire) = wire else { continue };
                        if let Poll::Ready(r) = side.poll_read(&mut cx(), || p.now, wire, n) {
                            match r.unwrap() {
                                Some(b) => t.read.extend_from_slice(&b),
                                None => t.eof = true,
                            }
                        }
                    }
                }
                Op::CloseWrite(i) => {
                    if let Some(t) = flows.get_mut(i)
                        && !t.dropped
                    {
                        let side = if t.by_a { &mut p.a } else { &mut p.b };
                        side.close_write(t.id);
                        t.write_closed = true;
                    }
                }
                Op::Drop(i) => {
                    if let Some(t) = flows.get_mut(i) {
                        let side = if t.by_a { &mut p.a } else { &mut p.b };
                        side.drop_flow(t.id);
                        t.dropped = true;
                    }
                }
                Op::Pump(n) => {
                    for _ in 0..(n % 4) {
                        transfer(&mut p.a, &mut p.b, p.now);
                        transfer(&mut p.b, &mut p.a, p.now);
                    }
                }
            }
            prop_assert!(p.a.error().is_none(), "a failed: {:?}", p.a.error());
            prop_assert!(p.b.error().is_none(), "b failed: {:?}", p.b.error());
            let bound = config.connection_budget + 16 * (config.min_window + config.shared_tokens);
            prop_assert!(p.a.window_total() <= bound);
            prop_assert!(p.b.window_total() <= bound);
        }
        // Drain everything: the reader reads until nothing moves.
        for _ in 0..200 {
            p.pump();
            let mut progress = false;
            for t in flows.iter_mut().filter(|t| !t.dropped) {
                let wire = if t.by_a { p.a.wire_id(t.id) } else { p.b.wire_id(t.id) };
                let side = if t.by_a { &mut p.b } else { &mut p.a };
                while accept(side).is_some() {}
                let Some(wire) = wire else { continue };
                let (bytes, eof) = read_all(side, wire);
                progress |= !bytes.is_empty();
                t.read.extend_from_slice(&bytes);
                t.eof |= eof;
            }
            if !progress { break; }
        }
        for t in flows.iter().filter(|t| !t.dropped) {
            // Whatever was read is exactly a prefix of what was written, and
            // a flow whose writer was not dropped delivers everything.
            prop_assert!(t.written.starts_with(&t.read), "flow {} reordered or duplicated bytes", t.id);
            prop_assert_eq!(t.read.len(), t.written.len(), "flow {} lost bytes", t.id);
            if t.write_closed {
                prop_assert!(t.eof, "flow {} never saw its CLOSE", t.id);
            }
        }
    }
}

#[test]
fn rtt_is_sampled_while_data_flows() {
    let mut p = Pair::new();
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"first");
    p.pump();
    accept(&mut p.b).unwrap();
    p.pump();
    let frames_before = p.a.stats().messages_sent;
    // A second later, with data to send, a probe rides along.
    p.now += Duration::from_millis(1500);
    write_all(&mut p.a, f, b"second");
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    let msgs = flow_message::decode_frame(buf.clone().freeze()).unwrap();
    assert!(msgs.contains(&Message::HealthCheckRequest), "{msgs:?}");
    assert!(p.a.stats().messages_sent > frames_before);
    p.b.handle_frame(p.now, buf.freeze(), built.encrypted_len)
        .unwrap();
    // The answer comes back 3 ms later.
    p.now += Duration::from_millis(3);
    transfer(&mut p.b, &mut p.a, p.now);
    assert_eq!(p.a.rtt(), Duration::from_millis(3));
}

#[test]
fn the_clock_never_looks_later_than_a_deadline_that_moves_earlier() {
    let mut p = Pair::new();
    let timeout = ConnConfig::default().channel_timeout;
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"first");
    p.pump();
    accept(&mut p.b).unwrap();
    p.pump();
    // A round-trip probe goes out with data: while it is unanswered the
    // deadline is a whole channel timeout after the last frame.
    p.now += Duration::from_millis(1500);
    write_all(&mut p.a, f, b"second");
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    p.b.handle_frame(p.now, buf.freeze(), built.encrypted_len)
        .unwrap();
    assert_eq!(
        p.a.poll_timeout(),
        Some(p.now - Duration::from_millis(1500) + timeout)
    );
    // The clock looks at this moment and picks its next look.
    let check = p.a.next_check(p.now).unwrap();
    // The answer arrives: the deadline moves earlier than a full timeout
    // after the last frame, but not earlier than the clock's next look.
    p.now += Duration::from_millis(3);
    transfer(&mut p.b, &mut p.a, p.now);
    let deadline = p.a.poll_timeout().unwrap();
    assert!(deadline < p.now - Duration::from_millis(1503) + timeout);
    assert!(check <= deadline, "{check:?} > {deadline:?}");
}

#[test]
fn a_busy_second_flow_shrinks_a_bulk_flows_window() {
    let config = ConnConfig {
        initial_window: 64 * 1024,
        max_window: 1024 * 1024,
        contended_window: 64 * 1024,
        ..ConnConfig::default()
    };
    let mut p = Pair::with_config(config);
    let bulk = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, bulk, b"start");
    p.pump();
    let bulk_in = accept(&mut p.b).unwrap();
    p.pump();
    // Alone, the bulk flow's window grows as it is read quickly.
    let chunk = vec![0u8; 16 * 1024];
    let mut window_alone = 0;
    for _ in 0..400 {
        while write_all(&mut p.a, bulk, &chunk) > 0 {}
        p.pump();
        read_all_at(&mut p.b, bulk_in, p.now);
        p.pump();
        window_alone = window_alone.max(p.b.window_total());
    }
    assert!(window_alone > 256 * 1024, "window grew to {window_alone}");
    // A second flow starts receiving: the bulk window comes back down.
    let ping = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, ping, b"ping");
    p.pump();
    let ping_in = accept(&mut p.b).unwrap();
    for _ in 0..50 {
        write_all(&mut p.a, ping, b"ping");
        while write_all(&mut p.a, bulk, &chunk) > 0 {}
        p.pump();
        read_all_at(&mut p.b, ping_in, p.now);
        read_all_at(&mut p.b, bulk_in, p.now);
        p.pump();
    }
    let total = p.b.window_total();
    assert!(
        total <= 64 * 1024 + ConnConfig::default().initial_window,
        "windows still total {total} with two busy flows"
    );
    assert!(p.a.error().is_none() && p.b.error().is_none());
}

/// A pair with 64 KiB frames and one flow, open both ways, that carried
/// "open".
fn pair_with_an_open_flow() -> (Pair, FlowId, FlowId) {
    let mut p = Pair::with_frames(ConnConfig::default(), 64 * 1024);
    let f = p.a.open_flow(FlowOptions::default()).unwrap();
    write_all(&mut p.a, f, b"open");
    p.pump();
    let g = accept(&mut p.b).unwrap();
    p.pump();
    (p, f, g)
}

#[test]
fn big_passthrough_payloads_go_out_in_frames_of_their_own_unencrypted() {
    let (mut p, f, g) = pair_with_an_open_flow();
    p.a.set_passthrough(f).unwrap();
    let sealed = vec![0x5a; 10_000];
    assert_eq!(write_all(&mut p.a, f, &sealed), sealed.len());
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    let own = built.own_buffer.expect("a frame of its own");
    let frame = &own[super::FRAME_OVERHEAD..];
    // Only the Data header is to be encrypted; the payload follows as is.
    assert!(built.encrypted_len < 16);
    assert_eq!(&frame[built.encrypted_len..], &sealed[..]);
    let mut own = own;
    own.advance(super::FRAME_OVERHEAD);
    p.b.handle_frame(p.now, own.freeze(), built.encrypted_len)
        .unwrap();
    assert_eq!(read_all(&mut p.b, g).0.len(), 4 + sealed.len());
}

/// Queues `msg` on flow `id` as a held chunk (as `MessageSender::try_send_bytes`
/// does), after taking its credit.
fn queue_held(conn: &mut ConnState, id: FlowId, msg: &Bytes) {
    let n = match conn.reserve_write(&mut cx(), id, msg.len()) {
        Poll::Ready(Ok(n)) => n,
        other => panic!("no credit for the message: {other:?}"),
    };
    assert_eq!(n, msg.len());
    conn.commit_write(id, super::chunk::Chunk::Held(msg.clone()));
}

#[test]
fn held_passthrough_payloads_follow_their_header_without_a_copy() {
    let (mut p, f, g) = pair_with_an_open_flow();
    p.a.set_passthrough(f).unwrap();
    let sealed = Bytes::from(vec![0x5a; 10_000]);
    queue_held(&mut p.a, f, &sealed);
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    let head = built.own_buffer.expect("a frame of its own");
    // The head is the sealer's room and the Data header, all of it to be
    // encrypted; the payload is the very buffer queued.
    assert_eq!(head.len() - super::FRAME_OVERHEAD, built.encrypted_len);
    assert_eq!(built.tail.as_ptr(), sealed.as_ptr());
    assert_eq!(built.tail.len(), sealed.len());
    let mut frame = head;
    frame.advance(super::FRAME_OVERHEAD);
    frame.extend_from_slice(&built.tail);
    p.b.handle_frame(p.now, frame.freeze(), built.encrypted_len)
        .unwrap();
    let (got, _) = read_all(&mut p.b, g);
    assert_eq!(&got[4..], &sealed[..]);
}

#[test]
fn held_payloads_of_encrypted_flows_are_sealed_with_their_frame() {
    let (mut p, f, g) = pair_with_an_open_flow();
    let big = Bytes::from(vec![0x33; 10_000]);
    let small = Bytes::from_static(b"small");
    queue_held(&mut p.a, f, &big);
    queue_held(&mut p.a, f, &small);
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    // Not passthrough: nothing may travel in the clear.
    assert!(built.tail.is_empty());
    let mut frame = built.own_buffer.expect("a frame of its own");
    assert_eq!(built.encrypted_len, frame.len() - super::FRAME_OVERHEAD);
    frame.advance(super::FRAME_OVERHEAD);
    p.b.handle_frame(p.now, frame.freeze(), built.encrypted_len)
        .unwrap();
    p.pump();
    let (got, _) = read_all(&mut p.b, g);
    let mut want = b"open".to_vec();
    want.extend_from_slice(&big);
    want.extend_from_slice(&small);
    assert_eq!(got, want);
}

#[test]
fn a_sink_is_handed_a_small_payload_apart_from_its_big_frame() {
    let mut p = Pair::new();
    let (f, g) = open_whole_flow(&mut p, b"x");
    let (other, other_in) = open_whole_flow(&mut p, b"y");
    p.b.attach_sink(g, false, || p.now).unwrap();
    p.pump();
    // One frame: 6,000 bytes for a flow without a sink, then 100 for the
    // sink's (which may keep it long after, as a relay does).
    write_all(&mut p.a, other, &[5u8; 6_000]);
    write_all(&mut p.a, f, &[6u8; 100]);
    let mut buf = BytesMut::new();
    let built = p.a.build_frame(p.now, &mut buf).unwrap();
    assert!(built.own_buffer.is_none());
    let frame = buf.freeze();
    let range = frame.as_ptr_range();
    p.b.handle_frame(p.now, frame.clone(), built.encrypted_len)
        .unwrap();
    let items: Vec<_> = p.b.take_sink_items().into_iter().collect();
    let [SinkItem::Data(id, data, _)] = &items[..] else {
        panic!("expected one message for the sink: {items:?}");
    };
    assert_eq!(*id, g);
    assert_eq!(&data[..], &[6u8; 100]);
    // A copy: it does not keep the frame's 6 KB alive.
    assert!(!range.contains(&data.as_ptr()));
    // The big payload stays a slice of the frame.
    assert_eq!(read_all(&mut p.b, other_in).0.len(), 6_000);
}
