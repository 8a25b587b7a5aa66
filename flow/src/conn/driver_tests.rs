//! The handshake and driver over an in-memory pipe: identities, authorizer
//! decisions, flows end to end, deadlines and closing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::test_pipe::{holding_pipe, pipe, pipe_with, refusable_pipe, tail_recording_pipe};
use super::*;
use crate::auth::{AllowEveryone, AuthorizedPeer, PatternAuthorizer, PeerAuthorizer, PeerInfo};
use crate::naming::{Endpoint, RoutingId};
use crate::security::{BlessingPattern, Blessings, Discharges, Principal};
use crate::transport::FramedConn;
use crate::{ErrorKind, Result};

fn params(principal: &Principal, authorizer: Arc<dyn PeerAuthorizer>) -> HandshakeParams {
    HandshakeParams {
        config: ConnConfig::default(),
        principal: principal.clone(),
        authorizer,
        local_endpoint: Endpoint::new("test", "local").with_routing_id(RoutingId::random()),
        transport_max_frame: 1 << 20,
    }
}

async fn connect(
    dialer: HandshakeParams,
    acceptor: HandshakeParams,
) -> (Result<Conn>, Result<Conn>) {
    connect_over(pipe(), dialer, acceptor).await
}

/// Dials over one end of `ends` and accepts over the other.
async fn connect_over(
    (a, b): (Box<dyn FramedConn>, Box<dyn FramedConn>),
    dialer: HandshakeParams,
    acceptor: HandshakeParams,
) -> (Result<Conn>, Result<Conn>) {
    let remote = Endpoint::new("test", "acceptor");
    tokio::join!(Conn::dial(a, dialer, remote), Conn::accept(b, acceptor))
}

/// Runs `fut`, failing the test if it has not finished within two seconds.
/// (Unlike `tokio::time::timeout`, a missed wake-up cannot hide behind the
/// timer polling the future one last time.)
async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(Duration::from_secs(2)) => panic!("did not finish in time"),
        out = fut => out,
    }
}

async fn pair() -> (Conn, Conn) {
    pair_over(pipe()).await
}

/// alice dialing bob over `ends`, each allowing everyone.
async fn pair_over(ends: (Box<dyn FramedConn>, Box<dyn FramedConn>)) -> (Conn, Conn) {
    let alice = Principal::with_self_blessing("alice").unwrap();
    let bob = Principal::with_self_blessing("bob").unwrap();
    let (d, a) = connect_over(
        ends,
        params(&alice, Arc::new(AllowEveryone)),
        params(&bob, Arc::new(AllowEveryone)),
    )
    .await;
    (d.unwrap(), a.unwrap())
}

#[tokio::test]
async fn handshake_binds_identities_both_ways() {
    let root = Principal::with_self_blessing("acme").unwrap();
    let server = Principal::new();
    let blessed = root
        .bless(
            server.public_key(),
            &root.default_blessings(),
            "server",
            Vec::new(),
        )
        .unwrap();
    server
        .blessing_store()
        .set_default(blessed.clone())
        .unwrap();
    server
        .blessing_store()
        .set(blessed, BlessingPattern::all())
        .unwrap();
    let client = Principal::with_self_blessing("client").unwrap();
    client.add_to_roots(&root.default_blessings()).unwrap();
    server.add_to_roots(&client.default_blessings()).unwrap();

    let (d, a) = connect(
        params(
            &client,
            Arc::new(PatternAuthorizer::new([BlessingPattern::parse(
                "acme:server",
            )
            .unwrap()])),
        ),
        params(&server, Arc::new(AllowEveryone)),
    )
    .await;
    let (d, a) = (d.unwrap(), a.unwrap());
    assert_eq!(d.authorized_peer().names, vec!["acme:server".to_string()]);
    assert_eq!(a.authorized_peer().names, vec!["client".to_string()]);
    assert_eq!(
        d.remote_blessings().names(),
        vec!["acme:server".to_string()]
    );
    assert_eq!(a.remote_blessings().names(), vec!["client".to_string()]);
    assert_eq!(d.version(), 1);
    // The dialer learned the acceptor's routing id from its setup.
    assert!(!d.remote_endpoint().routing_id().is_null());
    assert_eq!(a.requested_endpoint().unwrap().address(), "acceptor");
}

#[tokio::test]
async fn reconnecting_resumes_and_the_authorizers_still_decide() {
    let alice = Principal::with_self_blessing("alice").unwrap();
    let bob = Principal::with_self_blessing("bob").unwrap();
    // Clones of one config share its ticket store.
    let dialer = params(&alice, Arc::new(AllowEveryone));
    let acceptor = params(&bob, Arc::new(AllowEveryone));
    let (d, a) = connect(dialer.clone(), acceptor.clone()).await;
    let (d, a) = (d.unwrap(), a.unwrap());
    assert!(!d.resumed() && !a.resumed());
    drop((d, a));

    let (d, a) = connect(dialer.clone(), acceptor.clone()).await;
    let (d, a) = (d.unwrap(), a.unwrap());
    assert!(d.resumed() && a.resumed());
    assert_eq!(d.remote_blessings().names(), vec!["bob".to_string()]);
    assert_eq!(a.remote_blessings().names(), vec!["alice".to_string()]);
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_all(b"resumed").await.unwrap();
    let mut accepted = within(a.accept_flow()).await.unwrap();
    let mut got = [0u8; 7];
    accepted.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"resumed");
    drop((flow, accepted, d, a));

    // A ticket does not outlive the dialer's trust: its authorizer runs on
    // a resumed handshake as on any other.
    let mut picky = dialer.clone();
    picky.authorizer = Arc::new(PatternAuthorizer::new([
        BlessingPattern::parse("carol").unwrap()
    ]));
    let (d, _a) = connect(picky, acceptor.clone()).await;
    let err = d.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
}

#[tokio::test]
async fn untrusted_acceptor_is_refused_before_the_dialer_reveals_itself() {
    let alice = Principal::with_self_blessing("alice").unwrap();
    let mallory = Principal::with_self_blessing("mallory").unwrap();
    let (d, a) = connect(
        params(
            &alice,
            Arc::new(PatternAuthorizer::new([
                BlessingPattern::parse("bob").unwrap()
            ])),
        ),
        params(&mallory, Arc::new(AllowEveryone)),
    )
    .await;
    let err = d.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
    assert!(err.message().contains("mallory"), "{err}");
    // The acceptor never saw the dialer's binding.
    assert!(a.is_err());
}

/// Presents blessings of a principal other than the one signing.
#[derive(Debug)]
struct BorrowedBlessings(Blessings);

impl PeerAuthorizer for BorrowedBlessings {
    fn authorize_peer(&self, peer: &PeerInfo<'_>) -> Result<AuthorizedPeer> {
        Ok(peer.validate())
    }
    fn blessings_for_peer(&self, _: &Principal, _: &[String]) -> Result<(Blessings, Discharges)> {
        Ok((self.0.clone(), Discharges::new()))
    }
}

#[tokio::test]
async fn blessings_for_another_key_fail_authentication() {
    let alice = Principal::with_self_blessing("alice").unwrap();
    let bob = Principal::with_self_blessing("bob").unwrap();
    let victim = Principal::with_self_blessing("victim").unwrap();
    let (d, a) = connect(
        params(
            &alice,
            Arc::new(BorrowedBlessings(victim.default_blessings())),
        ),
        params(&bob, Arc::new(AllowEveryone)),
    )
    .await;
    let err = a.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.message().contains("holds key"), "{err}");
    drop(d);
}

#[tokio::test]
async fn handshake_times_out_when_nobody_answers() {
    let (a, _b) = pipe();
    let alice = Principal::with_self_blessing("alice").unwrap();
    let mut p = params(&alice, Arc::new(AllowEveryone));
    p.config.handshake_timeout = Duration::from_millis(50);
    let err = Conn::dial(a, p, Endpoint::new("test", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
}

#[tokio::test]
async fn flows_echo_both_ways_with_io_traits() {
    let (d, a) = pair().await;
    let server = tokio::spawn(async move {
        // Echo every accepted flow until the peer half-closes it.
        for _ in 0..3 {
            let flow = a.accept_flow().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = flow.into_split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
        a
    });
    for i in 0..3u8 {
        let mut flow = d.open_flow(FlowOptions::default()).unwrap();
        let payload = vec![i; 100_000 + i as usize];
        flow.write_all(&payload).await.unwrap();
        flow.shutdown().await.unwrap();
        let mut back = Vec::new();
        flow.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, payload);
        assert_eq!(flow.remote_blessings().names(), vec!["bob".to_string()]);
    }
    let a = server.await.unwrap();
    // The acceptor can open flows back over the same connection.
    let mut back = a.open_flow(FlowOptions::default()).unwrap();
    back.write_msg_and_close(&[b"hello ", b"dialer"])
        .await
        .unwrap();
    let mut got = d.accept_flow().await.unwrap();
    let mut text = Vec::new();
    while let Some(chunk) = got.read_msg().await.unwrap() {
        text.extend_from_slice(&chunk);
    }
    assert_eq!(text, b"hello dialer");
}

#[tokio::test]
async fn deadline_fails_pending_and_later_reads() {
    let (d, a) = pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"x"]).await.unwrap();
    let _accepted = a.accept_flow().await.unwrap();
    flow.set_deadline(Some(Instant::now() + Duration::from_millis(30)));
    let err = flow.read_msg().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    let err = flow.write_msg(&[b"y"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    flow.set_deadline(None);
    flow.write_msg(&[b"z"]).await.unwrap();
}

#[tokio::test]
async fn closing_the_connection_reaches_the_peer_with_its_reason() {
    let (d, a) = pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"x"]).await.unwrap();
    let mut accepted = a.accept_flow().await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"x");
    d.close("going away");
    let reason = a.closed().await;
    assert_eq!(reason.kind(), ErrorKind::Aborted);
    assert!(reason.message().contains("going away"), "{reason}");
    let err = accepted.read_msg().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert!(d.open_flow(FlowOptions::default()).is_err());
}

#[tokio::test]
async fn a_dialer_closing_at_once_still_completes_its_handshake() {
    let alice = Principal::with_self_blessing("alice").unwrap();
    let bob = Principal::with_self_blessing("bob").unwrap();
    let (a_end, b_end) = pipe();
    let dial = async {
        let conn = Conn::dial(
            a_end,
            params(&alice, Arc::new(AllowEveryone)),
            Endpoint::new("test", "acceptor"),
        )
        .await
        .unwrap();
        // Before the writer task has sent the channel binding.
        conn.close("done already");
        conn
    };
    let (_d, a) = tokio::join!(
        dial,
        Conn::accept(b_end, params(&bob, Arc::new(AllowEveryone)))
    );
    let a = a.expect("the acceptor sees the binding, then the TearDown");
    assert_eq!(a.remote_blessings().names(), vec!["alice".to_string()]);
    let reason = within(a.closed()).await;
    assert!(reason.message().contains("done already"), "{reason}");
}

#[tokio::test]
async fn flow_closed_resolves_when_both_sides_are_done() {
    let (d, a) = pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg_and_close(&[b"bye"]).await.unwrap();
    let accepted = a.accept_flow().await.unwrap();
    accepted.close_write();
    within(flow.closed()).await;
    assert!(d.is_idle() || !d.is_closed());
}

#[tokio::test]
async fn lame_duck_then_idle_then_close() {
    let (d, a) = pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"work"]).await.unwrap();
    let accepted = a.accept_flow().await.unwrap();
    a.enter_lame_duck();
    within(a.lame_duck_acked()).await;
    assert!(d.is_peer_lame_duck());
    assert_eq!(
        d.open_flow(FlowOptions::default()).unwrap_err().kind(),
        ErrorKind::BadState
    );
    drop(flow);
    drop(accepted);
    within(a.idle()).await;
    a.close("drained");
    let reason = d.closed().await;
    assert!(reason.message().contains("drained"));
}

fn hiding(principal: &Principal, visible_to: &str) -> HandshakeParams {
    let mut p = params(principal, Arc::new(AllowEveryone));
    p.config.blessings_visible_to = Some(vec![BlessingPattern::parse(visible_to).unwrap()]);
    p
}

fn revealing(principal: &Principal, authorizer: Arc<dyn PeerAuthorizer>) -> HandshakeParams {
    let mut p = params(principal, authorizer);
    p.config.reveal_to_hidden_acceptors = true;
    p
}

#[tokio::test]
async fn hidden_acceptor_shows_its_blessings_only_to_allowed_dialers() {
    let server = Principal::with_self_blessing("server").unwrap();
    let alice = Principal::with_self_blessing("alice").unwrap();
    server.add_to_roots(&alice.default_blessings()).unwrap();
    alice.add_to_roots(&server.default_blessings()).unwrap();
    let want_server = Arc::new(PatternAuthorizer::new([
        BlessingPattern::parse("server").unwrap()
    ]));
    let (d, a) = connect(revealing(&alice, want_server), hiding(&server, "alice")).await;
    let (d, a) = (d.unwrap(), a.unwrap());
    assert_eq!(d.remote_blessings().names(), vec!["server".to_string()]);
    assert_eq!(d.authorized_peer().names, vec!["server".to_string()]);
    assert_eq!(a.authorized_peer().names, vec!["alice".to_string()]);
    // Flows work as usual.
    let mut f = d.open_flow(FlowOptions::default()).unwrap();
    f.write_msg_and_close(&[b"hi"]).await.unwrap();
    let mut g = a.accept_flow().await.unwrap();
    assert_eq!(&g.read_msg().await.unwrap().unwrap()[..], b"hi");
}

#[tokio::test]
async fn hidden_acceptor_hangs_up_on_others() {
    let server = Principal::with_self_blessing("server").unwrap();
    let mallory = Principal::with_self_blessing("mallory").unwrap();
    server.add_to_roots(&mallory.default_blessings()).unwrap();
    let (d, a) = connect(
        revealing(&mallory, Arc::new(AllowEveryone)),
        hiding(&server, "alice"),
    )
    .await;
    let err = a.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
    let err = d.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
}

#[tokio::test]
async fn dialers_do_not_reveal_first_unless_told_to() {
    let server = Principal::with_self_blessing("server").unwrap();
    let alice = Principal::with_self_blessing("alice").unwrap();
    let (d, _a) = connect(
        params(&alice, Arc::new(AllowEveryone)),
        hiding(&server, "alice"),
    )
    .await;
    let err = d.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
    assert!(err.message().contains("hides its blessings"), "{err}");
}

#[tokio::test]
async fn revealed_blessings_still_face_the_dialers_authorizer() {
    let server = Principal::with_self_blessing("server").unwrap();
    let alice = Principal::with_self_blessing("alice").unwrap();
    server.add_to_roots(&alice.default_blessings()).unwrap();
    alice.add_to_roots(&server.default_blessings()).unwrap();
    let want_other = Arc::new(PatternAuthorizer::new([
        BlessingPattern::parse("other").unwrap()
    ]));
    let (d, _a) = connect(revealing(&alice, want_other), hiding(&server, "alice")).await;
    let err = d.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
    assert!(err.message().contains("server"), "{err}");
}

#[test]
fn a_proxy_can_read_the_requested_endpoint_from_the_hello() {
    use super::handshake::{Dialer, is_hello, peek_hello, requested_endpoint};
    let alice = Principal::with_self_blessing("alice").unwrap();
    let target = Endpoint::new("tcp", "10.0.0.1:9")
        .with_routing_id(RoutingId::random())
        .with_route([RoutingId::random()]);
    let (_d, hello) = Dialer::start(
        params(&alice, Arc::new(AllowEveryone)),
        target.clone(),
        Instant::now(),
    )
    .unwrap();
    assert!(is_hello(&hello));
    assert_eq!(requested_endpoint(&hello).unwrap(), target);
    assert_eq!(peek_hello(&hello).unwrap().versions.min, 1);
    assert!(peek_hello(b"garbage").is_err());
    assert!(peek_hello(&hello[..10]).is_err());
}

/// A connected pair over a pipe of `capacity` frames each way whose
/// writers take frames without waiting.
async fn pair_sending_inline(capacity: usize) -> (Conn, Conn) {
    pair_over(pipe_with(capacity, true)).await
}

#[tokio::test(flavor = "current_thread")]
async fn over_a_transport_that_never_waits_the_writing_task_sends_its_frames() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"first"]).await.unwrap();
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"first");
    let before = dialer.stats().messages_sent;
    // On this one-thread runtime the writer task cannot run before this
    // task yields: if the message is in a frame already, this task built
    // and sent it.
    flow.write_msg(&[b"second"]).await.unwrap();
    assert!(dialer.stats().messages_sent > before);
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"second");
}

/// Records what a flow's sink is given.
#[derive(Default)]
struct Recorder(parking_lot::Mutex<Vec<bytes::Bytes>>);

impl crate::transport::FrameSink for Recorder {
    fn deliver(&self, frame: bytes::Bytes) {
        self.0.lock().push(frame);
    }
}

#[tokio::test]
async fn dropping_a_flow_forgets_its_sink() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"open"]).await.unwrap();
    let accepted = within(acceptor.accept_flow()).await.unwrap();
    let sink = Arc::new(Recorder::default());
    let (reader, writer) = accepted.into_split();
    assert!(reader.attach_frame_sink(sink.clone()));
    assert_eq!(Arc::strong_count(&sink), 2);
    // The peer never ends the flow; the handles go: the connection keeps
    // nothing of the sink (which may hold other flows open).
    drop((reader, writer));
    assert_eq!(Arc::strong_count(&sink), 1);
}

/// Takes messages while it has room, refuses them after.
struct Gate {
    taken: parking_lot::Mutex<Vec<bytes::Bytes>>,
    room: std::sync::atomic::AtomicUsize,
}

impl super::MessageSink for Gate {
    fn offer(&self, frame: bytes::Bytes) -> super::Delivery {
        use std::sync::atomic::Ordering;
        if self
            .room
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return super::Delivery::Refused(frame);
        }
        self.taken.lock().push(frame);
        super::Delivery::Taken
    }
}

#[tokio::test]
async fn what_a_sink_refuses_comes_out_of_the_reader_in_order_and_the_sink_can_return() {
    use std::sync::atomic::Ordering;
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.disable_fragmentation().unwrap();
    flow.write_msg(&[&0u32.to_be_bytes()]).await.unwrap();
    let accepted = within(acceptor.accept_flow()).await.unwrap();
    let (mut reader, _writer) = accepted.into_split();
    assert_eq!(
        &within(reader.read_msg()).await.unwrap().unwrap()[..],
        0u32.to_be_bytes()
    );
    let gate = Arc::new(Gate {
        taken: parking_lot::Mutex::new(Vec::new()),
        room: 10.into(),
    });
    assert!(reader.attach_sink(gate.clone()));
    // Far more than a window: a refused message holds its credit, so the
    // writer goes on only as the reader (or the sink, with room again)
    // takes them.
    const COUNT: u32 = 20_000;
    let writing = tokio::spawn(async move {
        for i in 1..COUNT {
            flow.write_msg(&[&i.to_be_bytes(), &[0; 60]]).await.unwrap();
        }
        flow.close_write();
        flow
    });
    let mut got = vec![0u32];
    let mut attached_again = 0;
    while let Some(msg) = within(reader.read_msg()).await.unwrap() {
        got.push(u32::from_be_bytes(msg[..4].try_into().unwrap()));
        // Caught up with what came back: give the sink room, attach it again.
        if got.len() % 1000 == 0 {
            gate.room.store(500, Ordering::SeqCst);
            if reader.attach_sink(gate.clone()) {
                attached_again += 1;
            }
        }
    }
    let _flow = within(writing).await.unwrap();
    // Everything arrived once, in order, through the sink or the reader.
    let mut all: Vec<u32> = got.clone();
    all.extend(
        gate.taken
            .lock()
            .iter()
            .map(|m| u32::from_be_bytes(m[..4].try_into().unwrap())),
    );
    all.sort_unstable();
    assert_eq!(all, (0..COUNT).collect::<Vec<_>>());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reader out of order");
    let taken = gate.taken.lock();
    assert!(
        taken.len() >= 10 && attached_again > 0,
        "{} {attached_again}",
        taken.len()
    );
    assert!(
        taken.windows(2).all(|w| w[0][..4] < w[1][..4]),
        "sink out of order"
    );
}

#[tokio::test]
async fn a_flow_sink_gets_every_message_in_order_and_the_reader_the_end_after() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.disable_fragmentation().unwrap();
    // Until the acceptor accepts, only the first message may go.
    flow.write_msg(&[&[0; 10]]).await.unwrap();
    let accepted = within(acceptor.accept_flow()).await.unwrap();
    for i in 1..3u8 {
        within(flow.write_msg(&[&[i; 10]])).await.unwrap();
    }
    let (mut reader, _writer) = accepted.into_split();
    // Let the first messages arrive and wait in the flow.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let sink = Arc::new(Recorder::default());
    assert!(reader.attach_frame_sink(sink.clone()));
    for i in 3..200u8 {
        within(flow.write_msg(&[&[i; 10]])).await.unwrap();
    }
    flow.close_write();
    // The reader returns the end only after the last message reached the
    // sink.
    assert!(within(reader.read_msg()).await.unwrap().is_none());
    let got = sink.0.lock().clone();
    assert_eq!(got.len(), 200);
    for (i, msg) in got.iter().enumerate() {
        assert_eq!(&msg[..], &[i as u8; 10][..]);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_shut_down_flow_s_end_leaves_with_the_next_write_in_one_frame() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut first = dialer.open_flow(FlowOptions::default()).unwrap();
    first.write_msg(&[b"one"]).await.unwrap();
    let mut first_in = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(&first_in.read_msg().await.unwrap().unwrap()[..], b"one");
    // Everything written is in frames, so shutting down just queues the
    // end (a close of the connection would still send it); on this
    // one-thread runtime nothing sends it before this task yields.
    let frames = dialer.stats().frames_sent;
    first.shutdown().await.unwrap();
    assert_eq!(dialer.stats().frames_sent, frames);
    // The next write takes it along, in the same frame.
    let mut second = dialer.open_flow(FlowOptions::default()).unwrap();
    second.write_msg(&[b"two"]).await.unwrap();
    assert_eq!(dialer.stats().frames_sent, frames + 1);
    assert!(within(first_in.read_msg()).await.unwrap().is_none());
    let mut second_in = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(&second_in.read_msg().await.unwrap().unwrap()[..], b"two");
}

#[tokio::test(flavor = "current_thread")]
async fn a_shut_down_flow_s_end_survives_closing_the_connection_at_once() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"last words"]).await.unwrap();
    flow.shutdown().await.unwrap();
    dialer.close("done");
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(
        &within(accepted.read_msg()).await.unwrap().unwrap()[..],
        b"last words"
    );
    assert!(within(accepted.read_msg()).await.unwrap().is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_queued_end_of_flow_goes_out_alone_when_nothing_follows() {
    let (dialer, acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"last"]).await.unwrap();
    flow.shutdown().await.unwrap();
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"last");
    assert!(within(accepted.read_msg()).await.unwrap().is_none());
}

#[tokio::test]
async fn shutting_down_a_flow_of_a_closed_connection_fails() {
    let (dialer, _acceptor) = pair_sending_inline(64).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    dialer.close("done");
    assert!(flow.shutdown().await.is_err());
}

#[tokio::test]
async fn bytes_a_transport_took_but_holds_are_flushed_by_the_writer() {
    // The transport takes every frame sent inline but keeps it until its
    // next `write_frames` (as tcp keeps the rest of a frame it took in
    // part). Nothing else is sent: only the writer task can flush them.
    let (dialer, acceptor) = pair_over(holding_pipe()).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"held"]).await.unwrap();
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    assert_eq!(
        &within(accepted.read_msg()).await.unwrap().unwrap()[..],
        b"held"
    );
    accepted.write_msg(&[b"back"]).await.unwrap();
    assert_eq!(
        &within(flow.read_msg()).await.unwrap().unwrap()[..],
        b"back"
    );
}

#[tokio::test]
async fn frames_the_transport_cannot_take_now_follow_in_order_from_the_writer() {
    // Room for two frames each way: most writes find the pipe full and
    // leave frames to the writer task, interleaved with ones sent inline.
    let (dialer, acceptor) = pair_sending_inline(2).await;
    let writer = tokio::spawn(async move {
        let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
        for i in 0u32..2000 {
            let msg = vec![(i % 251) as u8; 100 + (i as usize * 37) % 3000];
            flow.write_msg(&[&msg]).await.unwrap();
        }
        flow.close_write();
        flow.closed().await;
        dialer
    });
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    let mut got = Vec::new();
    accepted.read_to_end(&mut got).await.unwrap();
    let mut want = Vec::new();
    for i in 0u32..2000 {
        want.extend(std::iter::repeat_n(
            (i % 251) as u8,
            100 + (i as usize * 37) % 3000,
        ));
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes arrived out of order");
    accepted.close();
    within(writer).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_the_transmitter_and_every_flow_arrives_in_order() {
    // Eight tasks write eight flows at once both ways over a pipe with room
    // for four frames: the transmitter keeps changing hands between them
    // and the writer tasks.
    const FLOWS: u32 = 8;
    const MESSAGES: u32 = 300;
    fn message(flow: u32, i: u32) -> Vec<u8> {
        let len = 1 + ((flow * 7919 + i * 104_729) % 5000) as usize;
        vec![(flow * 31 + i) as u8; len]
    }
    let (dialer, acceptor) = pair_sending_inline(4).await;
    let mut writers = Vec::new();
    for f in 0..FLOWS {
        let conn = if f % 2 == 0 { &dialer } else { &acceptor }.clone();
        writers.push(tokio::spawn(async move {
            let mut flow = conn.open_flow(FlowOptions::default()).unwrap();
            flow.write_msg(&[&f.to_be_bytes()]).await.unwrap();
            for i in 0..MESSAGES {
                flow.write_msg(&[&message(f, i)]).await.unwrap();
            }
            flow.close_write();
            flow.closed().await;
        }));
    }
    let mut readers = Vec::new();
    for (conn, count) in [(&acceptor, FLOWS / 2), (&dialer, FLOWS / 2)] {
        for _ in 0..count {
            let mut flow = within(conn.accept_flow()).await.unwrap();
            readers.push(tokio::spawn(async move {
                let mut id = [0u8; 4];
                flow.read_exact(&mut id).await.unwrap();
                let f = u32::from_be_bytes(id);
                let mut got = Vec::new();
                flow.read_to_end(&mut got).await.unwrap();
                let want: Vec<u8> = (0..MESSAGES).flat_map(|i| message(f, i)).collect();
                assert!(got == want, "flow {f}: bytes lost or out of order");
                flow.close();
            }));
        }
    }
    for task in readers.into_iter().chain(writers) {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("finishes")
            .unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn writers_seal_no_more_than_a_batch_ahead_of_a_full_transport() {
    let (a, b, refusing) = refusable_pipe(64, true);
    let (dialer, acceptor) = pair_over((a, b)).await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"open"]).await.unwrap();
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    accepted.read_msg().await.unwrap();
    // The transport now takes nothing without waiting. This task never
    // yields, so the writer task cannot drain what the writes leave.
    refusing.store(true, std::sync::atomic::Ordering::SeqCst);
    let message = [7u8; 1000];
    for _ in 0..100 {
        flow.write_msg(&[&message]).await.unwrap();
    }
    let ahead = dialer
        .shared
        .sealed_ahead()
        .expect("the writer task has not run");
    assert!(ahead >= 1, "the first write sealed its frame");
    assert!(
        ahead <= 16,
        "{ahead} frames sealed ahead of a full transport"
    );
    // Once the writer runs, everything arrives.
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut got = 0;
    while got < 100 * message.len() {
        got += within(accepted.read_msg()).await.unwrap().unwrap().len();
    }
}

/// Retries `send` (a `MessageSender` call) until the flow has the credit.
async fn send_when_credit(send: impl Fn() -> Result<bool>) {
    while !send().unwrap() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn messages_sent_from_their_own_buffers_arrive_whole_and_in_order() {
    // Over a transport the writing task sends through and one only the
    // writer task writes to; on a passthrough flow (big payloads follow
    // their sealed header as they are) and an encrypted one (sealed
    // with their frame).
    for inline in [true, false] {
        for passthrough in [true, false] {
            let (dialer, acceptor) = pair_over(pipe_with(64, inline)).await;
            let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
            flow.disable_fragmentation().unwrap();
            flow.write_msg(&[b"open"]).await.unwrap();
            let mut accepted = within(acceptor.accept_flow()).await.unwrap();
            assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"open");
            if passthrough {
                flow.set_passthrough().unwrap();
            }
            let sender = flow.sender().unwrap();
            let sent: Vec<bytes::Bytes> = (0..40u8)
                .map(|i| bytes::Bytes::from(vec![i; 100 + 700 * i as usize]))
                .collect();
            let reading = tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..40 {
                    got.push(accepted.read_msg().await.unwrap().unwrap());
                }
                got
            });
            for msg in &sent {
                // Refused while credit is short: retry once the reader
                // has caught up.
                send_when_credit(|| sender.try_send_bytes(msg)).await;
            }
            let got = within(reading).await.unwrap();
            assert_eq!(got, sent, "inline {inline}, passthrough {passthrough}");
        }
    }
}

#[tokio::test]
async fn only_big_messages_on_passthrough_flows_go_out_from_the_buffer_they_came_in() {
    for inline in [true, false] {
        let (a, b, tails) = tail_recording_pipe(inline);
        let (dialer, acceptor) = pair_over((a, b)).await;
        let mut plain = dialer.open_flow(FlowOptions::default()).unwrap();
        let mut through = dialer.open_flow(FlowOptions::default()).unwrap();
        for flow in [&mut plain, &mut through] {
            flow.disable_fragmentation().unwrap();
            flow.write_msg(&[b"open"]).await.unwrap();
        }
        let mut plain_in = within(acceptor.accept_flow()).await.unwrap();
        let mut through_in = within(acceptor.accept_flow()).await.unwrap();
        for flow in [&mut plain_in, &mut through_in] {
            assert_eq!(&flow.read_msg().await.unwrap().unwrap()[..], b"open");
        }
        through.set_passthrough().unwrap();
        let big = bytes::Bytes::from(vec![1u8; 20_000]);
        let small = bytes::Bytes::from(vec![2u8; 10_000]);
        let copied = bytes::Bytes::from(vec![3u8; 20_000]);
        let sealed = bytes::Bytes::from(vec![4u8; 20_000]);
        let sender = through.sender().unwrap();
        // (Until the peer's first grant arrives, a send may find no credit.)
        within(send_when_credit(|| sender.try_send_bytes(&big))).await;
        within(send_when_credit(|| sender.try_send_bytes(&small))).await;
        within(send_when_credit(|| sender.try_send(&copied))).await;
        plain.write_bytes(&sealed).await.unwrap();
        for want in [&big, &small, &copied] {
            assert_eq!(&through_in.read_msg().await.unwrap().unwrap(), want);
        }
        assert_eq!(&plain_in.read_msg().await.unwrap().unwrap(), &sealed);
        // Only the big one handed over as Bytes to the passthrough flow
        // went out as a frame's tail, and from its own buffer.
        let tails = tails.lock();
        assert_eq!(tails.len(), 1, "inline {inline}");
        assert_eq!(tails[0].as_ptr(), big.as_ptr());
        assert_eq!(tails[0].len(), big.len());
    }
}

#[tokio::test]
async fn a_message_written_from_its_buffer_beyond_the_credit_arrives_once() {
    // A flow that splits messages, and one message four windows long:
    // it goes in pieces as credit comes back.
    let (dialer, acceptor) = pair().await;
    let mut flow = dialer.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"open"]).await.unwrap();
    let mut accepted = within(acceptor.accept_flow()).await.unwrap();
    let window = crate::conn::ConnConfig::default().initial_window as usize;
    let msg = bytes::Bytes::from((0..4 * window).map(|i| i as u8).collect::<Vec<u8>>());
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 4 + 4 * window {
            let mut buf = vec![0u8; 64 * 1024];
            let n = accepted.read(&mut buf).await.unwrap();
            assert!(n > 0, "the flow ended early");
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    within(flow.write_bytes(&msg)).await.unwrap();
    let got = within(reading).await.unwrap();
    assert_eq!(&got[..4], b"open");
    assert!(got[4..] == msg[..], "the message arrived altered");
}
