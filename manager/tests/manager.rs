//! The Manager over real TCP on loopback: dial, accept, the cache,
//! pinning, idleness, listening state, closing, and file-descriptor
//! pressure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flow::conn::FlowOptions;
use flow::naming::{Endpoint, RoutingId};
use flow::security::Principal;
use flow::transport::{FramedConn, Listener, Protocol};
use flow::{Error, ErrorKind, Result};
use flow_manager::{ListenHandle, Manager, PinOptions};
use flow_protocols::Registry;
use futures::future::BoxFuture;

use common::{everyone, within};

fn manager(name: &str) -> Manager {
    Manager::builder(Principal::with_self_blessing(name).unwrap()).build()
}

async fn listening(name: &str) -> (Manager, Endpoint) {
    let m = manager(name);
    let handle = m.listen("tcp", "127.0.0.1:0").await.unwrap();
    let ep = handle.endpoint().clone();
    (m, ep)
}

/// Echoes every accepted flow until its peer half-closes it.
fn serve_echo(m: &Manager) {
    let m = m.clone();
    tokio::spawn(async move {
        while let Ok(flow) = m.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = flow.into_split();
                while let Ok(Some(chunk)) = r.read_msg().await {
                    if w.write_msg(&[&chunk]).await.is_err() {
                        return;
                    }
                }
                w.close_write();
                let _ = w.flush_all().await;
            });
        }
    });
}

trait FlushAll {
    fn flush_all(&mut self) -> BoxFuture<'_, Result<()>>;
}

impl FlushAll for flow::conn::FlowWriter {
    fn flush_all(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            self.flush()
                .await
                .map_err(|e| Error::network(e.to_string()))
        })
    }
}

/// A new echoing server with `principal` and `rid`, listening on `ep`'s
/// address again (retrying while the old listener's port is released).
async fn restart(principal: Principal, rid: RoutingId, ep: &Endpoint) -> (Manager, ListenHandle) {
    let restarted = Manager::builder(principal).routing_id(rid).build();
    let addr = ep.address();
    for _ in 0..50 {
        if let Ok(listening) = restarted.listen("tcp", addr).await {
            serve_echo(&restarted);
            return (restarted, listening);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not listen on {addr} again");
}

async fn echo_once(client: &Manager, ep: &Endpoint, msg: &[u8]) -> Vec<u8> {
    let mut flow = client.dial(ep, everyone(), Duration::ZERO).await.unwrap();
    flow.write_msg_and_close(&[msg]).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    out
}

#[tokio::test]
async fn dial_accept_and_flows_both_ways_over_one_connection() {
    let (server, ep) = listening("server").await;
    let client = manager("client");
    let mut flow = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
    flow.write_msg(&[b"ping"]).await.unwrap();
    let mut accepted = within(5, server.accept()).await.unwrap();
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"ping");
    assert_eq!(
        accepted.remote_blessings().names(),
        vec!["client".to_string()]
    );
    assert_eq!(flow.remote_blessings().names(), vec!["server".to_string()]);
    // The server opens a flow back over the connection the client dialed.
    let back_ep = accepted.conn().remote_endpoint().clone();
    assert_eq!(back_ep.routing_id(), client.routing_id());
    let mut back = server
        .dial(&back_ep, everyone(), Duration::ZERO)
        .await
        .unwrap();
    back.write_msg(&[b"hello client"]).await.unwrap();
    let mut got = within(5, client.accept()).await.unwrap();
    assert_eq!(&got.read_msg().await.unwrap().unwrap()[..], b"hello client");
    assert_eq!(client.connections().len(), 1);
    assert_eq!(server.connections().len(), 1);
    assert!(got.conn() == flow.conn(), "one connection both ways");
}

#[tokio::test]
async fn concurrent_dials_share_one_connection() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = manager("client");
    let dials = (0..100).map(|i| {
        let client = client.clone();
        let ep = ep.clone();
        async move {
            let msg = format!("flow {i}");
            let back = echo_once(&client, &ep, msg.as_bytes()).await;
            assert_eq!(back, msg.as_bytes());
        }
    });
    within(30, futures::future::join_all(dials)).await;
    assert_eq!(client.connections().len(), 1);
    assert_eq!(server.connections().len(), 1);
}

#[tokio::test]
async fn dial_cached_only_uses_existing_connections() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = manager("client");
    let err = client
        .dial_cached(&ep, everyone(), Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DialFailed);
    assert!(err.message().contains("no cached connection"), "{err}");
    assert_eq!(echo_once(&client, &ep, b"x").await, b"x");
    let mut flow = client
        .dial_cached(&ep, everyone(), Duration::ZERO)
        .await
        .unwrap();
    flow.write_msg_and_close(&[b"cached"]).await.unwrap();
    assert_eq!(&flow.read_msg().await.unwrap().unwrap()[..], b"cached");
}

#[tokio::test]
async fn authorizer_filters_cached_connections() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = manager("client");
    assert_eq!(echo_once(&client, &ep, b"x").await, b"x");
    let strict = Arc::new(flow::auth::PatternAuthorizer::new([
        flow::security::BlessingPattern::parse("someone-else").unwrap(),
    ]));
    let err = client
        .dial_cached(&ep, strict, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DialFailed, "{err}");
}

#[tokio::test]
async fn side_channel_on_exactly_the_given_connection() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = manager("client");
    let flow = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
    let conn = flow.conn().clone();
    let mut side = client
        .dial_side_channel_cached(&ep, everyone(), &conn, Duration::ZERO)
        .await
        .unwrap();
    assert!(side.is_side_channel());
    assert!(side.conn() == &conn);
    side.write_msg_and_close(&[b"side"]).await.unwrap();
    assert_eq!(&side.read_msg().await.unwrap().unwrap()[..], b"side");
}

#[tokio::test]
async fn dial_only_manager_refuses_to_listen() {
    let m = Manager::builder(Principal::with_self_blessing("d").unwrap())
        .dial_only()
        .build();
    let err = m.listen("tcp", "127.0.0.1:0").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadState);
    // Its status shows one endpoint with its (null) routing id.
    let status = m.status();
    assert_eq!(status.endpoints.len(), 1);
    assert!(status.endpoints[0].routing_id().is_null());
}

#[tokio::test]
async fn stop_listening_fails_pending_accepts_and_listening_again_works() {
    let (server, ep) = listening("server").await;
    let status = server.status();
    assert_eq!(status.endpoints, vec![ep.clone()]);
    let pending = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.stop_listening();
    let err = within(5, pending).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    within(5, status.changed()).await;
    let after = server.status();
    assert_eq!(after.endpoints.len(), 1);
    assert_ne!(
        after.endpoints[0], ep,
        "only the bidirectional endpoint remains"
    );
    // Nobody listens there any more.
    let client = manager("client");
    assert!(client.dial(&ep, everyone(), Duration::ZERO).await.is_err());
    // Listening again works.
    let again = server.listen("tcp", "127.0.0.1:0").await.unwrap();
    serve_echo(&server);
    assert_eq!(
        echo_once(&client, again.endpoint(), b"again").await,
        b"again"
    );
}

#[tokio::test]
async fn status_records_listen_errors_and_notifies() {
    let m = manager("server");
    // Listening is a change.
    let initial = m.status();
    let handle = m.listen("tcp", "127.0.0.1:0").await.unwrap();
    within(5, initial.changed()).await;
    assert!(m.status().endpoints.contains(handle.endpoint()));
    let before = m.status();
    let err = m.listen("tcp", "256.0.0.1:1").await.unwrap_err();
    assert_ne!(err.kind(), ErrorKind::BadState);
    within(5, before.changed()).await;
    let status = m.status();
    assert!(
        status
            .listen_errors
            .contains_key(&("tcp".to_string(), "256.0.0.1:1".to_string()))
    );
    let err = m.listen("no-such-protocol", "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadArg);
}

#[tokio::test]
async fn a_manager_redialing_a_server_resumes_and_a_restarted_server_signs_again() {
    let rid = RoutingId::random();
    let principal = Principal::with_self_blessing("server").unwrap();
    let server = Manager::builder(principal.clone()).routing_id(rid).build();
    let ep = server
        .listen("tcp", "127.0.0.1:0")
        .await
        .unwrap()
        .endpoint()
        .clone();
    serve_echo(&server);
    let client = manager("client");
    let mut resumed = Vec::new();
    for _ in 0..3 {
        let mut flow = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
        let conn = flow.conn().clone();
        resumed.push(conn.resumed());
        assert_eq!(conn.remote_blessings().names(), vec!["server".to_string()]);
        // An echo shows the server finished its side of the handshake (and
        // so holds the next ticket) before the connection goes.
        flow.write_msg_and_close(&[b"x"]).await.unwrap();
        assert_eq!(
            &within(5, flow.read_msg()).await.unwrap().unwrap()[..],
            b"x"
        );
        drop(flow);
        // A new connection each time: the cached one goes away.
        conn.close("next round");
        within(5, conn.closed()).await;
    }
    assert_eq!(resumed, [false, true, true]);
    assert_eq!(echo_once(&client, &ep, b"resumed").await, b"resumed");

    // The server restarts: its tickets are gone, so the next handshake
    // signs (and leaves a ticket for the one after).
    server.close().await;
    let (_restarted, _listening) = restart(principal, rid, &ep).await;
    let flow = within(5, client.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    assert!(!flow.conn().resumed());
    assert_eq!(
        echo_once(&client, &ep, b"signed again").await,
        b"signed again"
    );
}

#[tokio::test]
async fn pinned_connection_survives_the_peer_restarting() {
    let rid = RoutingId::random();
    let principal = Principal::with_self_blessing("server").unwrap();
    let server = Manager::builder(principal.clone()).routing_id(rid).build();
    let ep = server
        .listen("tcp", "127.0.0.1:0")
        .await
        .unwrap()
        .endpoint()
        .clone();
    let client = manager("client");
    let pinned = client
        .pin(
            &ep,
            everyone(),
            PinOptions {
                min_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                ..PinOptions::default()
            },
        )
        .await
        .unwrap();
    let first = pinned.conn();
    assert!(client.is_pinned(&first));
    // The server goes away and comes back on the same address.
    server.close().await;
    let (_restarted, _listening) = restart(principal, rid, &ep).await;
    within(10, async {
        while pinned.conn() == first || pinned.conn().is_closed() {
            pinned.changed().await;
        }
    })
    .await;
    let second = pinned.conn();
    assert!(second != first);
    assert!(client.is_pinned(&second));
    assert_eq!(
        echo_once(&client, &ep, b"after restart").await,
        b"after restart"
    );
    pinned.unpin();
    pinned.unpin();
    assert!(!client.is_pinned(&second));
}

#[tokio::test]
async fn idle_connections_are_closed_but_pinned_ones_are_kept() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let (server2, ep2) = listening("server2").await;
    serve_echo(&server2);
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .idle_expiry(Duration::from_millis(200))
        .build();
    assert_eq!(echo_once(&client, &ep, b"x").await, b"x");
    let pinned = client
        .pin(&ep2, everyone(), PinOptions::default())
        .await
        .unwrap();
    // A side channel does not keep a connection busy.
    let idle_conn = client
        .dial_cached(&ep, everyone(), Duration::ZERO)
        .await
        .unwrap()
        .conn()
        .clone();
    let mut side = client
        .dial_side_channel_cached(&ep, everyone(), &idle_conn, Duration::ZERO)
        .await
        .unwrap();
    side.write_msg(&[b"heartbeat"]).await.unwrap();
    within(10, idle_conn.closed()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pinned.conn().is_closed(), "pinned connection was evicted");
    assert_eq!(client.connections().len(), 1);
}

#[tokio::test]
async fn busy_connections_are_not_idle() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .idle_expiry(Duration::from_millis(100))
        .build();
    let mut flow = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
    flow.write_msg(&[b"open"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!flow.conn().is_closed());
    flow.write_msg_and_close(&[b" still here"]).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    assert_eq!(out, b"open still here");
}

#[tokio::test]
async fn close_lets_flows_in_flight_finish() {
    let (server, ep) = listening("server").await;
    let client = manager("client");
    let mut flow = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
    flow.write_msg(&[b"request"]).await.unwrap();
    let mut accepted = within(5, server.accept()).await.unwrap();
    let closing = tokio::spawn({
        let server = server.clone();
        async move { server.close().await }
    });
    // The flow in flight still completes.
    assert_eq!(&accepted.read_msg().await.unwrap().unwrap()[..], b"request");
    accepted.write_msg_and_close(&[b"response"]).await.unwrap();
    assert_eq!(&flow.read_msg().await.unwrap().unwrap()[..], b"response");
    flow.close_write();
    drop(flow);
    drop(accepted);
    within(10, closing).await.unwrap();
    within(5, server.closed()).await;
    assert!(server.accept().await.is_err());
    // New flows on the old connection are refused (lame duck).
    let err = client.dial(&ep, everyone(), Duration::ZERO).await;
    assert!(err.is_err());
}

#[tokio::test]
async fn failed_dials_are_remembered_briefly() {
    let counting = Arc::new(Counting::new());
    let registry = Arc::new(Registry::with_defaults());
    registry.register("counted", counting.clone(), vec!["counted".into()]);
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .registry(registry)
        .build();
    // Nothing listens on port 1.
    let dead = Endpoint::new("counted", "127.0.0.1:1");
    let e1 = client
        .dial(&dead, everyone(), Duration::ZERO)
        .await
        .unwrap_err();
    let e2 = client
        .dial(&dead, everyone(), Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(counting.dials.load(Ordering::SeqCst), 1, "{e1} / {e2}");
    assert!(e2.message().contains("moments ago"), "{e2}");
    tokio::time::sleep(flow_manager::DIAL_FAILURE_MEMORY + Duration::from_millis(100)).await;
    let _ = client.dial(&dead, everyone(), Duration::ZERO).await;
    assert_eq!(counting.dials.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn file_descriptor_exhaustion_evicts_idle_connections_and_retries() {
    let counting = Arc::new(Counting::new());
    let registry = Arc::new(Registry::with_defaults());
    registry.register("counted", counting.clone(), vec!["counted".into()]);
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let (server2, ep2) = listening("server2").await;
    serve_echo(&server2);
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .registry(registry)
        .build();
    let ep_counted = Endpoint::new("counted", ep.address()).with_routing_id(ep.routing_id());
    assert_eq!(echo_once(&client, &ep_counted, b"x").await, b"x");
    let idle = client.connections()[0].clone();
    within(5, idle.idle()).await;
    // The next dial hits EMFILE once: the idle connection is closed to make
    // room and the dial retried.
    counting.fail_next_with_emfile.store(1, Ordering::SeqCst);
    let ep2_counted = Endpoint::new("counted", ep2.address()).with_routing_id(ep2.routing_id());
    assert_eq!(echo_once(&client, &ep2_counted, b"y").await, b"y");
    within(5, idle.closed()).await;
}

/// Wraps tcp, counting dials and failing them with EMFILE on request.
struct Counting {
    dials: AtomicUsize,
    fail_next_with_emfile: AtomicUsize,
    tcp: Arc<dyn Protocol>,
}

impl Counting {
    fn new() -> Self {
        let (tcp, _) = Registry::with_defaults().lookup("tcp").unwrap();
        Counting {
            dials: AtomicUsize::new(0),
            fail_next_with_emfile: AtomicUsize::new(0),
            tcp,
        }
    }
}

impl Protocol for Counting {
    fn dial<'a>(
        &'a self,
        _protocol: &'a str,
        address: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn FramedConn>>> {
        Box::pin(async move {
            if self.fail_next_with_emfile.swap(0, Ordering::SeqCst) > 0 {
                let io = std::io::Error::from_raw_os_error(libc_emfile());
                return Err(Error::with_source(ErrorKind::DialFailed, "dial failed", io));
            }
            self.dials.fetch_add(1, Ordering::SeqCst);
            self.tcp.dial("tcp", address, timeout).await
        })
    }

    fn resolve<'a>(
        &'a self,
        _protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(String, Vec<String>)>> {
        Box::pin(async move { Ok(("counted".to_string(), vec![address.to_string()])) })
    }

    fn listen<'a>(
        &'a self,
        _protocol: &'a str,
        address: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Listener>>> {
        Box::pin(async move { self.tcp.listen("tcp", address).await })
    }
}

fn libc_emfile() -> i32 {
    24
}

#[tokio::test]
async fn bidirectional_flows_accepted_on_dialed_connections() {
    let (server, ep) = listening("server").await;
    let client = manager("client");
    let mut f = client.dial(&ep, everyone(), Duration::ZERO).await.unwrap();
    f.flush().await.unwrap();
    let accepted = within(5, server.accept()).await.unwrap();
    let conn = accepted.conn().clone();
    let mut back = conn.open_flow(FlowOptions::default()).unwrap();
    back.write_msg_and_close(&[b"reverse"]).await.unwrap();
    let mut got = within(5, client.accept()).await.unwrap();
    assert_eq!(&got.read_msg().await.unwrap().unwrap()[..], b"reverse");
}

#[tokio::test]
async fn servers_can_hide_their_blessings_from_strangers() {
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap())
        .blessings_visible_to(vec![
            flow::security::BlessingPattern::parse("friend").unwrap(),
        ])
        .build();
    let ep = server
        .listen("tcp", "127.0.0.1:0")
        .await
        .unwrap()
        .endpoint()
        .clone();
    serve_echo(&server);
    let friend = Manager::builder(Principal::with_self_blessing("friend").unwrap())
        .reveal_to_hidden_servers(true)
        .build();
    server
        .principal()
        .add_to_roots(&friend.principal().default_blessings())
        .unwrap();
    assert_eq!(echo_once(&friend, &ep, b"hello").await, b"hello");
    let stranger = Manager::builder(Principal::with_self_blessing("stranger").unwrap())
        .reveal_to_hidden_servers(true)
        .build();
    let err = stranger
        .dial(&ep, everyone(), Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotTrusted, "{err}");
}

#[tokio::test]
async fn listeners_out_of_descriptors_make_managers_close_idle_connections() {
    let (server, ep) = listening("server").await;
    serve_echo(&server);
    let client = manager("client");
    assert_eq!(echo_once(&client, &ep, b"x").await, b"x");
    let idle = client.connections()[0].clone();
    within(5, idle.idle()).await;
    // What a listener does when accept fails with EMFILE.
    assert!(flow_protocols::pressure::resources_exhausted() >= 2);
    within(5, idle.closed()).await;
    assert!(client.connections().is_empty());
}
