//! Connections end to end over real TCP on loopback: the handshake's
//! identities and refusals, many concurrent flows, a slow reader beside busy
//! flows, deadlines, `closed()` and teardown reasons.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flow::ErrorKind;
use flow::auth::{AllowEveryone, PatternAuthorizer};
use flow::conn::{ConnConfig, FlowOptions};
use flow::security::{BlessingPattern, Principal};
use flow_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pattern_authorizer(pattern: &str) -> Arc<PatternAuthorizer> {
    Arc::new(PatternAuthorizer::new([
        BlessingPattern::parse(pattern).unwrap()
    ]))
}

#[tokio::test]
async fn handshake_over_tcp_binds_identities_both_ways() {
    // acme blesses the server as acme:server; the client is self-blessed.
    // Each side trusts the other's root and asks for a name.
    let root = principal("acme");
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
    let client = principal("client");
    client.add_to_roots(&root.default_blessings()).unwrap();
    server.add_to_roots(&client.default_blessings()).unwrap();

    let server_params = params_with(&server, pattern_authorizer("client"), ConnConfig::default());
    let server_rid = server_params.local_endpoint.routing_id();
    let mut srv = TestServer::start(server_params).await;
    let client_params = params_with(
        &client,
        pattern_authorizer("acme:server"),
        ConnConfig::default(),
    );
    let client_rid = client_params.local_endpoint.routing_id();
    let (d, a) = srv.connect(client_params).await;

    assert_eq!(d.authorized_peer().names, vec!["acme:server".to_string()]);
    assert_eq!(a.authorized_peer().names, vec!["client".to_string()]);
    assert_eq!(
        d.remote_blessings().names(),
        vec!["acme:server".to_string()]
    );
    assert_eq!(a.remote_blessings().names(), vec!["client".to_string()]);
    assert_eq!(d.local_blessings().names(), vec!["client".to_string()]);
    assert_eq!(a.local_blessings().names(), vec!["acme:server".to_string()]);
    assert_eq!(d.remote_blessings().public_key(), Some(server.public_key()));
    assert_eq!(a.remote_blessings().public_key(), Some(client.public_key()));
    assert_eq!(d.version(), 1);
    assert_eq!(a.version(), 1);

    // Endpoints and addresses: the dialer learned the server's routing id,
    // the acceptor the client's, and what the client asked for.
    assert_eq!(d.remote_endpoint().routing_id(), server_rid);
    assert_eq!(d.remote_endpoint().address(), srv.addr());
    assert_eq!(a.remote_endpoint().routing_id(), client_rid);
    assert_eq!(a.remote_endpoint().address(), d.local_addr());
    assert_eq!(a.requested_endpoint().unwrap().address(), srv.addr());
    assert_eq!(d.remote_addr(), srv.addr());
    assert_eq!(a.local_addr(), srv.addr());
    assert_eq!(a.remote_addr(), d.local_addr());

    // Flows carry the identities too.
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    within(SHORT, flow.write_msg(&[b"who are you?"]))
        .await
        .unwrap();
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(
        accepted.remote_blessings().names(),
        vec!["client".to_string()]
    );
    assert_eq!(
        accepted.local_blessings().names(),
        vec!["acme:server".to_string()]
    );
    assert_eq!(
        &within(SHORT, accepted.read_msg()).await.unwrap().unwrap()[..],
        b"who are you?"
    );
    assert_eq!(
        flow.remote_blessings().names(),
        vec!["acme:server".to_string()]
    );
    assert_eq!(flow.conn(), &d);
    assert_eq!(accepted.conn(), &a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_over_tcp_resumes_with_the_last_connections_ticket() {
    let server = principal("server");
    let client = principal("client");
    let mut test_server = TestServer::start(params(&server)).await;
    let dialer = params(&client);
    let mut resumed = Vec::new();
    for _ in 0..4 {
        let (d, a) = test_server.connect(dialer.clone()).await;
        assert_eq!(d.resumed(), a.resumed());
        assert_eq!(a.remote_blessings().names(), vec!["client".to_string()]);
        assert_eq!(d.remote_blessings().names(), vec!["server".to_string()]);
        resumed.push(d.resumed());
        drop((d, a));
    }
    assert_eq!(resumed, [false, true, true, true]);
}

#[tokio::test]
async fn dialer_refuses_an_untrusted_acceptor_before_revealing_itself() {
    let mut srv = TestServer::start(params(&principal("mallory"))).await;
    let alice = principal("alice");
    let err = within(
        SHORT,
        dial(
            srv.addr(),
            params_with(&alice, pattern_authorizer("bob"), ConnConfig::default()),
        ),
    )
    .await
    .unwrap_err();
    assert_error(&err, ErrorKind::NotTrusted, "mallory");
    // The acceptor never got the dialer's binding: its handshake ends
    // because the dialer hung up.
    let err = srv.next().await.unwrap_err();
    assert_error(&err, ErrorKind::Network, "closed the connection");
    // The listener is unaffected.
    srv.assert_still_serves().await;
}

#[tokio::test]
async fn acceptor_refuses_an_untrusted_dialer() {
    let bob = principal("bob");
    let mut srv = TestServer::start(params_with(
        &bob,
        pattern_authorizer("alice"),
        ConnConfig::default(),
    ))
    .await;
    // Eve's dial completes on her side (she cannot know yet)...
    let eve = within(SHORT, dial(srv.addr(), params(&principal("eve"))))
        .await
        .unwrap();
    // ...but the acceptor refuses her,
    let err = srv.next().await.unwrap_err();
    assert_error(&err, ErrorKind::NotTrusted, "eve");
    // and her connection ends, with the acceptor's reason.
    let closed = within(SHORT, eve.closed()).await;
    assert_error(
        &closed,
        ErrorKind::Aborted,
        "has no blessing matching [alice]",
    );
    assert!(eve.open_flow(FlowOptions::default()).is_err());
}

#[tokio::test]
async fn dial_times_out_against_a_listener_that_never_answers() {
    // Accepts tcp connections and keeps them, never reading.
    let listener = registry().listen("tcp", "127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr();
    let hoard = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok(t) = listener.accept().await {
            kept.push(t);
        }
    });
    let config = ConnConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ConnConfig::default()
    };
    let alice = principal("alice");
    let err = within(
        SHORT,
        dial(&addr, params_with(&alice, Arc::new(AllowEveryone), config)),
    )
    .await
    .unwrap_err();
    assert_error(&err, ErrorKind::Timeout, "timed out");
    hoard.abort();
}

#[tokio::test]
async fn accept_times_out_against_a_dialer_that_never_speaks() {
    let config = ConnConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ConnConfig::default()
    };
    let mut srv = TestServer::start(params_with(
        &principal("bob"),
        Arc::new(AllowEveryone),
        config,
    ))
    .await;
    let _silent = registry().dial("tcp", srv.addr(), SHORT).await.unwrap();
    let err = srv.next().await.unwrap_err();
    assert_error(&err, ErrorKind::Timeout, "timed out");
    srv.assert_still_serves().await;
}

/// Size of flow `i` in the concurrency test: 0 for the first, then spread
/// over 1 byte .. 128 KiB.
fn echo_size(i: u64) -> usize {
    if i == 0 {
        0
    } else {
        ((i * 7919) % (128 * 1024) + 1) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_flows_each_echo_their_own_data() {
    const FLOWS: u64 = 1000;
    let (d, a) = conn_pair().await;
    let echo = spawn_echo(a.clone());
    let mut tasks = Vec::new();
    for i in 0..FLOWS {
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let data = Pattern::bytes(i, echo_size(i));
            let flow = d.open_flow(FlowOptions::default())?;
            let (mut r, mut w) = flow.into_split();
            let send = async {
                // Writes of varying sizes, then a half-close.
                let mut at = 0;
                let mut step = 1 + (i as usize * 131) % 20_000;
                while at < data.len() {
                    let end = (at + step).min(data.len());
                    w.write_msg(&[&data[at..end]]).await?;
                    at = end;
                    step = step * 3 % 40_000 + 1;
                }
                w.close_write();
                Ok::<_, flow::Error>(())
            };
            let recv = async {
                let mut back = Vec::with_capacity(data.len());
                while let Some(chunk) = r.read_msg().await? {
                    back.extend_from_slice(&chunk);
                }
                Ok::<_, flow::Error>(back)
            };
            let (sent, back) = tokio::join!(send, recv);
            sent?;
            let back = back?;
            assert_eq!(back.len(), data.len(), "flow {i}: length");
            assert!(back == data, "flow {i}: echoed bytes differ");
            Ok::<_, flow::Error>(data.len() as u64)
        }));
    }
    let mut total = 0;
    within(LONG, async {
        for t in tasks {
            total += t.await.unwrap().unwrap();
        }
    })
    .await;
    let expected: u64 = (0..FLOWS).map(|i| echo_size(i) as u64).sum();
    assert_eq!(total, expected);
    // Every flow went both ways through the connection, and is gone.
    eventually(SHORT, "flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
    let (ds, as_) = (d.stats(), a.stats());
    assert_eq!(ds.flows_opened, FLOWS);
    assert_eq!(as_.flows_opened, FLOWS);
    assert_eq!(ds.flows_closed, FLOWS);
    assert_eq!(as_.flows_closed, FLOWS);
    assert_eq!(ds.bytes_sent, expected);
    assert_eq!(ds.bytes_received, expected);
    assert_eq!(as_.bytes_received, expected);
    assert!(d.is_idle() && a.is_idle());
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_stall_other_flows() {
    const STUCK_TOTAL: usize = 4 << 20;
    const BUSY_TOTAL: usize = 8 << 20;
    let (d, a) = conn_pair().await;
    let window = ConnConfig::default().initial_window as usize;

    // Flow A: the acceptor takes it and does not read it.
    let stuck_written = Arc::new(AtomicU64::new(0));
    let mut stuck = d.open_flow(FlowOptions::default()).unwrap();
    let counter = stuck_written.clone();
    let stuck_writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(0xa);
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0;
        while sent < STUCK_TOTAL {
            pattern.fill(&mut buf);
            stuck.write_msg(&[&buf]).await?;
            sent += buf.len();
            counter.store(sent as u64, Ordering::SeqCst);
        }
        stuck.close_write();
        // Keep the flow until the reader is done with it.
        read_to_end(&mut stuck).await?;
        Ok::<_, flow::Error>(())
    });
    let mut unread = within(SHORT, a.accept_flow()).await.unwrap();
    // A's writer fills the window A was granted, and then it must stop.
    eventually(SHORT, "flow A's window filled", || {
        stuck_written.load(Ordering::SeqCst) as usize >= window * 3 / 4
    })
    .await;

    // Flows B and C move megabytes each way through an echo meanwhile.
    let echo = spawn_echo(a.clone());
    let mut busy = Vec::new();
    for seed in [0xb, 0xc] {
        let d = d.clone();
        busy.push(tokio::spawn(async move {
            let flow = d.open_flow(FlowOptions::default())?;
            let (mut r, mut w) = flow.into_split();
            let send = async {
                let mut pattern = Pattern::new(seed);
                let mut buf = vec![0u8; 64 * 1024];
                for _ in 0..BUSY_TOTAL / buf.len() {
                    pattern.fill(&mut buf);
                    w.write_msg(&[&buf]).await?;
                }
                w.close_write();
                Ok::<_, flow::Error>(())
            };
            let recv = async {
                let mut expect = Pattern::new(seed);
                let mut scratch = Vec::new();
                let mut got = 0;
                while let Some(chunk) = r.read_msg().await? {
                    scratch.resize(chunk.len(), 0);
                    expect.fill(&mut scratch);
                    assert!(scratch[..] == chunk[..], "flow {seed:x} corrupted at {got}");
                    got += chunk.len();
                }
                Ok::<_, flow::Error>(got)
            };
            let (sent, got) = tokio::join!(send, recv);
            sent?;
            got
        }));
    }
    within(LONG, async {
        for t in busy {
            assert_eq!(t.await.unwrap().unwrap(), BUSY_TOTAL);
        }
    })
    .await;

    // A is still stuck: its writer has not finished and has not written
    // much beyond its window.
    let written = stuck_written.load(Ordering::SeqCst) as usize;
    assert!(
        !stuck_writer.is_finished(),
        "flow A's writer was not held back"
    );
    assert!(
        written <= 4 * window,
        "flow A's writer got {written} bytes out with a {window}-byte window and no reads"
    );

    // Reading A now lets everything through, in order.
    let mut expect = Pattern::new(0xa);
    let mut scratch = Vec::new();
    let mut got = 0;
    within(LONG, async {
        while let Some(chunk) = unread.read_msg().await.unwrap() {
            scratch.resize(chunk.len(), 0);
            expect.fill(&mut scratch);
            assert!(scratch[..] == chunk[..], "flow A corrupted at {got}");
            got += chunk.len();
        }
    })
    .await;
    assert_eq!(got, STUCK_TOTAL);
    unread.close_write();
    within(SHORT, stuck_writer).await.unwrap().unwrap();
    echo.abort();
}

#[tokio::test]
async fn deadline_fails_pending_reads_and_writes_then_can_be_lifted() {
    let (d, a) = conn_pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"x"]).await.unwrap();
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"x");

    // A read waiting when the deadline passes fails with Timeout...
    flow.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
    let err = within(SHORT, flow.read_msg()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    // ...and so do later reads and writes, through the io traits as well.
    let err = flow.write_msg(&[b"y"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let mut byte = [0u8; 1];
    let err = flow.read(&mut byte).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);

    // A write that blocks on credit fails when the deadline passes: the
    // peer does not read, so the window fills first, and the write waits.
    let deadline = Instant::now() + Duration::from_secs(1);
    flow.set_deadline(Some(deadline));
    let big = vec![7u8; 4 << 20];
    let err = within(SHORT, flow.write_msg(&[&big])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(Instant::now() >= deadline);
    let received = a.stats().bytes_received;
    assert!(
        (128 * 1024..4 << 20).contains(&received),
        "the write was not held back by the window: {received} bytes arrived"
    );

    // Lifted, the flow works again both ways.
    flow.set_deadline(None);
    let drained = tokio::spawn(async move {
        let got = read_to_end(&mut accepted).await?;
        accepted.write_msg_and_close(&[b"bye"]).await?;
        Ok::<_, flow::Error>(got)
    });
    flow.write_msg_and_close(&[b"after"]).await.unwrap();
    let got = within(SHORT, drained).await.unwrap().unwrap();
    assert!(
        got.ends_with(b"after"),
        "the peer did not read the last write"
    );
    assert_eq!(within(SHORT, read_to_end(&mut flow)).await.unwrap(), b"bye");
}

#[tokio::test]
async fn closing_a_connection_tells_the_peer_why_and_fails_every_waiter() {
    let (d, a) = conn_pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"x"]).await.unwrap();
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"x");

    // Waiters of every kind, on both sides.
    let pending_read = tokio::spawn(async move {
        let result = accepted.read_msg().await;
        (result, accepted)
    });
    let pending_accept = {
        let d = d.clone();
        tokio::spawn(async move { d.accept_flow().await.map(|_| ()) })
    };
    let peer_closed = {
        let a = a.clone();
        tokio::spawn(async move { a.closed().await })
    };
    tokio::task::yield_now().await;
    assert!(a.close_reason().is_none());

    d.close("maintenance window");
    let here = within(SHORT, d.closed()).await;
    assert_error(&here, ErrorKind::Aborted, "maintenance window");
    let there = within(SHORT, peer_closed).await.unwrap();
    assert_error(&there, ErrorKind::Aborted, "maintenance window");
    assert!(there.message().contains("by peer"), "{there}");

    let (read, accepted) = within(SHORT, pending_read).await.unwrap();
    assert_eq!(read.unwrap_err().kind(), ErrorKind::Aborted);
    let accept = within(SHORT, pending_accept).await.unwrap();
    assert_eq!(accept.unwrap_err().kind(), ErrorKind::Aborted);
    within(SHORT, accepted.closed()).await;
    within(SHORT, flow.closed()).await;
    assert!(flow.write_msg(&[b"late"]).await.is_err());
    assert!(d.open_flow(FlowOptions::default()).is_err());
    assert!(a.open_flow(FlowOptions::default()).is_err());
    assert!(d.is_closed() && a.is_closed());
    assert_eq!(a.close_reason().map(|e| e.kind()), Some(ErrorKind::Aborted));
}

#[tokio::test]
async fn flow_closed_resolves_once_both_directions_end() {
    use futures::FutureExt;
    let (d, a) = conn_pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg_and_close(&[b"ping"]).await.unwrap();
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut accepted)).await.unwrap(),
        b"ping"
    );
    // Only one direction has ended.
    assert!(flow.closed().now_or_never().is_none());
    assert!(accepted.closed().now_or_never().is_none());

    accepted.write_msg_and_close(&[b"pong"]).await.unwrap();
    within(SHORT, accepted.closed()).await;
    within(SHORT, flow.closed()).await;
    assert_eq!(
        within(SHORT, read_to_end(&mut flow)).await.unwrap(),
        b"pong"
    );

    // The connection is untouched and forgets both ends once dropped.
    assert!(!d.is_closed() && !a.is_closed());
    drop(flow);
    drop(accepted);
    eventually(SHORT, "flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
    let echo = spawn_echo(a.clone());
    let mut again = d.open_flow(FlowOptions::default()).unwrap();
    again.write_msg_and_close(&[b"again"]).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut again)).await.unwrap(),
        b"again"
    );
    echo.abort();
}

#[tokio::test]
async fn io_traits_carry_a_flow_over_tcp() {
    let (d, a) = conn_pair().await;
    let echo = spawn_echo(a.clone());
    let flow = d.open_flow(FlowOptions::default()).unwrap();
    let data = Pattern::bytes(99, 300_000);
    let (mut r, mut w) = flow.into_split();
    let (sent, back) = within(SHORT, async {
        tokio::join!(
            async {
                w.write_all(&data).await?;
                w.shutdown().await
            },
            async {
                let mut back = Vec::new();
                r.read_to_end(&mut back).await.map(|_| back)
            }
        )
    })
    .await;
    sent.unwrap();
    assert!(back.unwrap() == data);
    echo.abort();
}

#[tokio::test]
async fn tiny_reads_through_async_read_get_every_byte_in_order() {
    // Reads of 7 bytes split the received chunks; credit must still flow
    // back as they are consumed, or the 1 MiB transfer stalls.
    let (d, a) = conn_pair().await;
    let data = Pattern::bytes(5, 1 << 20);
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        flow.write_msg_and_close(&[&data[..1000], &data[1000..]])
            .await
            .unwrap();
        flow
    });
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 7];
    within(SHORT, async {
        loop {
            let n = accepted.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(back.len(), expected.len());
    assert!(back == expected);
    drop(within(SHORT, writer).await.unwrap());
}

#[tokio::test]
async fn a_flow_dropped_right_after_writing_still_delivers() {
    let (d, a) = conn_pair().await;
    for i in 0..3u64 {
        let data = Pattern::bytes(i, 100_000);
        let mut flow = d.open_flow(FlowOptions::default()).unwrap();
        // Beyond its first payload a flow has credit only once accepted, so
        // the write completes while the acceptor accepts.
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            flow.write_msg(&[&data]).await.unwrap();
            drop(flow);
        });
        let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
        within(SHORT, writer).await.unwrap();
        let got = within(SHORT, read_to_end(&mut accepted)).await.unwrap();
        assert!(got == expected, "flow {i}: got {} bytes", got.len());
    }
    eventually(SHORT, "flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
}

#[tokio::test]
async fn dropping_an_unread_flow_discards_its_bytes_and_frees_the_writer() {
    let (d, a) = conn_pair().await;
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    let big = vec![9u8; 4 << 20];
    let writer = tokio::spawn(async move {
        flow.write_msg(&[&big]).await?;
        flow.close_write();
        // The peer closed its side when it dropped the flow.
        let rest = read_to_end(&mut flow).await?;
        Ok::<_, flow::Error>(rest)
    });
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    let first = within(SHORT, accepted.read_msg()).await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(accepted);
    // Without a reader the bytes are thrown away and credit returned, so
    // the 4 MiB write completes.
    let rest = within(SHORT, writer).await.unwrap().unwrap();
    assert!(rest.is_empty());
    eventually(SHORT, "flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
    assert!(!d.is_closed() && !a.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_budget_bounds_what_unread_flows_buffer() {
    const FLOWS: u64 = 32;
    const PER_FLOW: usize = 256 * 1024;
    let acceptor = ConnConfig {
        connection_budget: 1 << 20,
        initial_window: 256 * 1024,
        min_window: 16 * 1024,
        ..ConnConfig::default()
    };
    let bound = acceptor.connection_budget + FLOWS * acceptor.min_window;
    let (d, a) = conn_pair_with(ConnConfig::default(), acceptor).await;
    let mut writers = Vec::new();
    for i in 0..FLOWS {
        let mut flow = d.open_flow(FlowOptions::default()).unwrap();
        writers.push(tokio::spawn(async move {
            flow.write_msg_and_close(&[&Pattern::bytes(i, PER_FLOW)])
                .await?;
            Ok::<_, flow::Error>(flow)
        }));
    }
    let mut accepted = Vec::new();
    for _ in 0..FLOWS {
        accepted.push(within(SHORT, a.accept_flow()).await.unwrap());
    }
    // Nothing is read: the peer may fill the windows and no more.
    eventually(SHORT, "the first megabyte arrives", || {
        a.stats().bytes_received >= 1 << 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let buffered = a.stats().bytes_received;
    assert!(
        buffered <= bound,
        "{buffered} bytes buffered, over the budget's bound of {bound}"
    );
    assert!(writers.iter().any(|w| !w.is_finished()));
    // Reading lets every flow finish, each with its own bytes.
    let mut readers = Vec::new();
    for mut flow in accepted {
        readers.push(tokio::spawn(async move {
            read_to_end(&mut flow).await.map(|b| (b, flow))
        }));
    }
    let mut seen = Vec::new();
    within(SHORT, async {
        for r in readers {
            let (bytes, flow) = r.await.unwrap().unwrap();
            assert_eq!(bytes.len(), PER_FLOW);
            seen.push(bytes);
            drop(flow);
        }
    })
    .await;
    // Flows are accepted in the order they were opened on the wire, which
    // need not be the order of open_flow calls: match by content.
    for i in 0..FLOWS {
        let want = Pattern::bytes(i, PER_FLOW);
        assert!(seen.contains(&want), "flow {i}'s bytes never arrived");
    }
    for w in writers {
        within(SHORT, w).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn lame_duck_lets_existing_flows_finish_and_refuses_new_ones() {
    let (d, a) = conn_pair().await;
    let echo = spawn_echo(a.clone());
    let mut busy = d.open_flow(FlowOptions::default()).unwrap();
    busy.write_msg(&[b"one "]).await.unwrap();
    a.enter_lame_duck();
    within(SHORT, a.lame_duck_acked()).await;
    assert!(d.is_peer_lame_duck());
    let err = d.open_flow(FlowOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadState);
    // The existing flow goes on to the end.
    busy.write_msg_and_close(&[b"two"]).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut busy)).await.unwrap(),
        b"one two"
    );
    drop(busy);
    within(SHORT, a.idle()).await;
    a.close("drained");
    let reason = within(SHORT, d.closed()).await;
    assert_error(&reason, ErrorKind::Aborted, "drained");
    echo.abort();
}

/// A flow created before the peer's lame duck but not yet used: whatever
/// the application does with it afterwards must fail that flow alone, not
/// send an `OpenFlow` the peer is entitled to treat as a violation.
async fn use_after_lame_duck(use_it: impl AsyncFnOnce(&mut flow::conn::Flow)) {
    let (d, a) = conn_pair().await;
    let echo = spawn_echo(a.clone());
    let mut early = d.open_flow(FlowOptions::default()).unwrap();
    let mut busy = d.open_flow(FlowOptions::default()).unwrap();
    busy.write_msg(&[b"ping"]).await.unwrap();
    a.enter_lame_duck();
    within(SHORT, a.lame_duck_acked()).await;
    within(SHORT, use_it(&mut early)).await;
    // A round trip on the busy flow: anything `early` sent is ahead of it.
    busy.write_msg_and_close(&[b"!"]).await.unwrap();
    let back = within(SHORT, read_to_end(&mut busy)).await;
    assert!(
        !a.is_closed(),
        "the acceptor closed the connection: {:?}",
        a.close_reason()
    );
    assert_eq!(back.unwrap(), b"ping!");
    echo.abort();
}

#[tokio::test]
async fn writing_a_flow_opened_before_lame_duck_fails_cleanly() {
    use_after_lame_duck(async |f: &mut flow::conn::Flow| {
        let err = f.write_msg(&[b"late"]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadState);
    })
    .await;
}

#[tokio::test]
async fn flushing_a_flow_opened_before_lame_duck_does_not_break_the_connection() {
    use_after_lame_duck(async |f: &mut flow::conn::Flow| {
        let _ = f.flush().await;
    })
    .await;
}

#[tokio::test]
async fn half_closing_a_flow_opened_before_lame_duck_does_not_break_the_connection() {
    use_after_lame_duck(async |f: &mut flow::conn::Flow| f.close_write()).await;
}

#[tokio::test]
async fn an_idle_connection_stays_up_on_health_checks() {
    // Both sides use the same channel timeout, as with the defaults.
    let config = ConnConfig {
        channel_timeout: Duration::from_millis(400),
        ..ConnConfig::default()
    };
    let (d, a) = conn_pair_with(config.clone(), config).await;
    // Several channel timeouts of silence from the application.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(d.close_reason().is_none(), "{:?}", d.close_reason());
    assert!(a.close_reason().is_none(), "{:?}", a.close_reason());
    assert!(d.stats().messages_received > 0 && a.stats().messages_received > 0);
    let echo = spawn_echo(a.clone());
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg_and_close(&[b"awake"]).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut flow)).await.unwrap(),
        b"awake"
    );
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_payloads_stay_within_the_connection_budget() {
    // Flows not yet accepted hold only their first payloads, bounded
    // together by the shared tokens; accepted flows get windows from the
    // budget, then min_window each (ConnConfig::connection_budget).
    const FLOWS: u64 = 48;
    let acceptor = ConnConfig {
        connection_budget: 256 * 1024,
        initial_window: 64 * 1024,
        min_window: 4 * 1024,
        shared_tokens: 64 * 1024,
        ..ConnConfig::default()
    };
    let bound = acceptor.connection_budget
        + FLOWS * acceptor.min_window
        + acceptor.effective_shared_tokens();
    let pool = acceptor.effective_shared_tokens();
    let (d, a) = conn_pair_with(ConnConfig::default(), acceptor).await;
    // Every flow tries to write 64 KiB at once; nobody reads.
    let mut writers = Vec::new();
    for i in 0..FLOWS {
        let mut flow = d.open_flow(FlowOptions::default()).unwrap();
        writers.push(tokio::spawn(async move {
            let data = Pattern::bytes(i, 64 * 1024);
            let _ = flow.write_msg(&[&data]).await;
            flow
        }));
    }
    // Before anything is accepted, at most the shared tokens arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let unaccepted = a.stats().bytes_received;
    assert!(
        unaccepted <= pool,
        "{unaccepted} bytes arrived on flows nobody accepted"
    );
    let mut accepted = Vec::new();
    for _ in 0..FLOWS {
        accepted.push(within(SHORT, a.accept_flow()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let buffered = a.stats().bytes_received;
    assert!(
        buffered <= bound,
        "{buffered} bytes buffered by the acceptor, over its documented ceiling of {bound}"
    );
    assert!(buffered > 256 * 1024, "the accepted flows did get windows");
    for w in writers {
        w.abort();
    }
}

#[tokio::test]
async fn the_dialers_binding_and_first_flow_leave_in_one_frame() {
    // On this current-thread runtime the connection's writer cannot run
    // between the end of dial and the first write, so both are queued
    // before the first frame is built.
    let mut srv = TestServer::start(params(&principal("bob"))).await;
    let d = within(SHORT, dial(srv.addr(), params(&principal("alice"))))
        .await
        .unwrap();
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg(&[b"zero round trips"]).await.unwrap();
    let a = srv.next().await.unwrap();
    let mut accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(
        &accepted.read_msg().await.unwrap().unwrap()[..],
        b"zero round trips"
    );
    // The binding frame carried the OpenFlow and its payload too.
    assert_eq!(d.stats().frames_sent, 1);
    assert_eq!(a.stats().frames_received, 1);
    assert_eq!(a.stats().messages_received, 1);
}

#[tokio::test]
async fn a_flow_may_present_other_blessings_of_the_same_key() {
    let alice = principal("alice");
    let (d, a) = {
        let mut srv = TestServer::start(params(&principal("bob"))).await;
        srv.connect(params(&alice)).await
    };
    let phone = alice.bless_self("alice-phone", Vec::new()).unwrap();
    let mut flow = d
        .open_flow(FlowOptions {
            side_channel: false,
            blessings: Some((phone, flow::security::Discharges::new())),
        })
        .unwrap();
    flow.write_msg(&[b"from my phone"]).await.unwrap();
    let plain = d.open_flow(FlowOptions::default()).unwrap();
    let mut plain = plain;
    plain.write_msg(&[b"plain"]).await.unwrap();
    let mut first = within(SHORT, a.accept_flow()).await.unwrap();
    let mut second = within(SHORT, a.accept_flow()).await.unwrap();
    assert_eq!(
        &first.read_msg().await.unwrap().unwrap()[..],
        b"from my phone"
    );
    assert_eq!(&second.read_msg().await.unwrap().unwrap()[..], b"plain");
    assert_eq!(
        first.remote_blessings().names(),
        vec!["alice-phone".to_string()]
    );
    assert_eq!(second.remote_blessings().names(), vec!["alice".to_string()]);
    assert_eq!(
        flow.local_blessings().names(),
        vec!["alice-phone".to_string()]
    );
    assert_eq!(a.remote_blessings().names(), vec!["alice".to_string()]);
    // Blessings of another key are refused locally.
    let err = d
        .open_flow(FlowOptions {
            side_channel: false,
            blessings: Some((
                principal("mallory").default_blessings(),
                flow::security::Discharges::new(),
            )),
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadArg);
}

#[tokio::test]
async fn side_channel_flows_do_not_keep_the_connection_busy() {
    let (d, a) = conn_pair().await;
    let mut side = d
        .open_flow(FlowOptions {
            side_channel: true,
            blessings: None,
        })
        .unwrap();
    side.write_msg(&[b"side"]).await.unwrap();
    let accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert!(side.is_side_channel() && accepted.is_side_channel());
    assert!(d.is_idle() && a.is_idle());
    let mut busy = d.open_flow(FlowOptions::default()).unwrap();
    busy.write_msg(&[b"busy"]).await.unwrap();
    let busy_accepted = within(SHORT, a.accept_flow()).await.unwrap();
    assert!(!d.is_idle() && !a.is_idle());
    drop(busy);
    drop(busy_accepted);
    within(SHORT, a.idle()).await;
    within(SHORT, d.idle()).await;
    assert!(a.is_idle() && d.is_idle());
}
