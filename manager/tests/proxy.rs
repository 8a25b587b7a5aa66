//! The proxy server (`flow_manager::proxy::Proxy`) over real TCP (and
//! WebSocket) on loopback, with servers that listen nowhere but through it
//! (`Manager::proxy_listen`) and clients that dial their proxied endpoints
//! (`Manager::dial`), plus hand-driven peers where the wire matters.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flow::auth::PatternAuthorizer;
use flow::conn::{Conn, ConnConfig, Flow, FlowOptions, FlowReader, FlowWriter, HandshakeParams};
use flow::message::codec::Reader;
use flow::message::{Message, ProxyResponse};
use flow::naming::{Endpoint, RoutingId};
use flow::security::{BlessingPattern, Principal};
use flow::{Error, ErrorKind};
use flow_manager::proxy::{Cutoff, Proxy, ProxyConfig, ProxyLimits, Refusal};
use flow_manager::{FlowConn, Manager};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{blessed, encode, everyone, sample, until, within};

/// A proxy named `proxy` on tcp loopback, configured by `tune`.
async fn start_proxy(tune: impl FnOnce(&mut ProxyConfig)) -> Proxy {
    let principal = Principal::with_self_blessing("proxy").unwrap();
    start_proxy_as(principal, tune).await
}

async fn start_proxy_as(principal: Principal, tune: impl FnOnce(&mut ProxyConfig)) -> Proxy {
    let mut config = ProxyConfig::listening_on(&["tcp/127.0.0.1:0"]).unwrap();
    tune(&mut config);
    let manager = Manager::builder(principal).build();
    within(20, Proxy::start(manager, config)).await.unwrap()
}

fn tcp_endpoint(proxy: &Proxy) -> Endpoint {
    proxy
        .endpoints()
        .into_iter()
        .find(|e| e.protocol() == "tcp" && e.route().is_empty())
        .expect("the proxy listens on tcp")
}

/// The proxy's tcp address in the shorthand (routing id learned in the
/// handshake).
fn shorthand(proxy: &Proxy) -> Endpoint {
    Endpoint::parse(&format!("tcp/{}", tcp_endpoint(proxy).address())).unwrap()
}

/// A server that listens nowhere: it can only be reached through proxies.
/// Every accepted flow gets `tag`, then an echo of what it sends.
fn server(principal: Principal, tag: &'static [u8]) -> Manager {
    server_with_rid(principal, RoutingId::random(), tag)
}

fn server_with_rid(principal: Principal, rid: RoutingId, tag: &'static [u8]) -> Manager {
    let m = Manager::builder(principal).routing_id(rid).build();
    let accepting = m.clone();
    tokio::spawn(async move {
        while let Ok(flow) = accepting.accept().await {
            tokio::spawn(echo(flow, tag));
        }
    });
    m
}

async fn echo(flow: Flow, tag: &'static [u8]) {
    let (mut r, mut w) = flow.into_split();
    if w.write_msg(&[tag]).await.is_err() {
        return;
    }
    while let Ok(Some(chunk)) = r.read_msg().await {
        if w.write_msg(&[&chunk]).await.is_err() {
            return;
        }
    }
    w.close_write();
}

/// Sends `msg` on a new flow to `ep` and returns (tag, echo) from the
/// server.
async fn round_trip(client: &Manager, ep: &Endpoint, msg: &[u8]) -> Result<Vec<u8>, Error> {
    let mut flow = client.dial(ep, everyone(), Duration::ZERO).await?;
    flow.write_msg(&[msg]).await?;
    flow.close_write();
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn client(name: &str) -> Manager {
    Manager::builder(Principal::with_self_blessing(name).unwrap())
        .dial_only()
        .build()
}

/// The refusal a proxy's error (as `proxy_listen` reports it) names.
fn refusal_of(err: &Error) -> Option<Refusal> {
    let m = err.message();
    let at = m.find("refused: ")?;
    Refusal::of_message(&m[at + "refused: ".len()..])
}

/// The endpoints a server got from proxy `name`, once it has them.
async fn proxied_endpoints(server: &Manager, proxy_addr: &str) -> Vec<Endpoint> {
    let eps: Vec<Endpoint> = server
        .status()
        .endpoints
        .into_iter()
        .filter(|e| e.address() == proxy_addr)
        .collect();
    assert!(!eps.is_empty(), "no endpoints at {proxy_addr}");
    eps
}

/// A TCP forwarder that records every byte it carries, both ways.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn to(target: &str) -> Tap {
        let target: SocketAddr = target.parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                tokio::spawn(copy(ir, ow, recorded.clone()));
                tokio::spawn(copy(or, iw, recorded.clone()));
            }
        });
        Tap { addr, seen }
    }

    fn contains(&self, needle: &[u8]) -> bool {
        self.seen.lock().windows(needle.len()).any(|w| w == needle)
    }

    fn len(&self) -> usize {
        self.seen.lock().len()
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.lock().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// GET `path` from the metrics server: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

// ----- A hand-driven peer, for the wire itself ---------------------------

/// Opens a control flow to `proxy` over `manager`'s connection and sends
/// `request`; returns the flow and the proxy's first answer.
async fn register_by_hand(
    manager: &Manager,
    proxy: &Endpoint,
    request: Message,
) -> (FlowReader, FlowWriter, Message) {
    let flow = within(10, manager.dial(proxy, everyone(), Duration::ZERO))
        .await
        .unwrap();
    flow.disable_fragmentation().unwrap();
    let (mut r, mut w) = flow.into_split();
    w.write_msg(&[&encode(&request)]).await.unwrap();
    let answer = read_control(&mut r).await.expect("an answer");
    (r, w, answer)
}

async fn read_control(r: &mut FlowReader) -> Option<Message> {
    let raw = within(10, r.read_msg()).await.ok()??;
    let mut reader = Reader::new(raw, "test");
    Message::decode(&mut reader).ok()
}

fn endpoints_of(msg: &Message) -> Vec<Endpoint> {
    match msg {
        Message::ProxyResponse(ProxyResponse { endpoints }) => endpoints
            .iter()
            .map(|s| Endpoint::parse(s).unwrap())
            .collect(),
        other => panic!("expected ProxyResponse, got {other:?}"),
    }
}

/// Takes every flow opened to `manager` as a tunnel: runs the acceptor's
/// handshake inside and echoes every inner flow, after `tag`.
fn accept_tunnels_by_hand(manager: &Manager, tag: &'static [u8]) {
    let m = manager.clone();
    tokio::spawn(async move {
        while let Ok(flow) = m.accept().await {
            let principal = m.principal().clone();
            let local = Endpoint::new("", "").with_routing_id(m.routing_id());
            tokio::spawn(async move {
                let Ok(tunnel) = FlowConn::new(flow) else {
                    return;
                };
                let params = HandshakeParams {
                    transport_max_frame: flow::transport::FramedConn::max_frame_size(&tunnel),
                    config: ConnConfig::default(),
                    principal,
                    authorizer: everyone(),
                    local_endpoint: local,
                };
                let Ok(inner) = Conn::accept(Box::new(tunnel), params).await else {
                    return;
                };
                while let Ok(f) = inner.accept_flow().await {
                    tokio::spawn(echo(f, tag));
                }
            });
        }
    });
}

// ----- Tests ---------------------------------------------------------------

#[tokio::test]
async fn a_server_behind_the_proxy_is_reachable_end_to_end() {
    let proxy = start_proxy(|_| {}).await;
    let proxy_addr = tcp_endpoint(&proxy).address().to_string();
    // Both links go through taps that record every byte on the wire.
    let server_tap = Tap::to(&proxy_addr).await;
    let client_tap = Tap::to(&proxy_addr).await;

    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    let through_tap = Endpoint::parse(&format!("tcp/{}", server_tap.addr)).unwrap();
    let handle = within(10, s.proxy_listen("p", &through_tap)).await.unwrap();
    assert!(!handle.endpoints().is_empty());
    // The server listens nowhere itself: every endpoint is the proxy's (as
    // the proxy knows its address), with the server's routing id.
    let eps = s.status().endpoints;
    assert!(eps.iter().all(|e| e.address() == proxy_addr));
    assert!(eps.iter().all(|e| e.routing_id() == s.routing_id()));
    assert!(eps.iter().all(|e| e.blessing_names() == ["proxy:server"]));

    // The client reaches the proxy through its own tap, and insists on the
    // server's blessings (it trusts the proxy's root, which blessed them).
    let c = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .dial_only()
        .build();
    c.principal()
        .add_to_roots(&proxy.manager().principal().default_blessings())
        .unwrap();
    let target = eps[0].clone().with_address(client_tap.addr.to_string());
    let only_server = Arc::new(PatternAuthorizer::new([BlessingPattern::parse(
        "proxy:server",
    )
    .unwrap()]));
    let mut flow = within(10, c.dial(&target, only_server, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(flow.remote_blessings().names(), ["proxy:server"]);
    assert_eq!(flow.conn().remote_endpoint().routing_id(), s.routing_id());

    let secret = b"the proxy must never read this line of plaintext";
    let payload: Vec<u8> = secret.iter().copied().cycle().take(300_000).collect();
    flow.write_msg(&[&payload]).await.unwrap();
    flow.close_write();
    let mut back = Vec::new();
    while let Some(chunk) = within(10, flow.read_msg()).await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(&back[..1], b"S");
    assert_eq!(&back[1..], &payload[..]);

    // The server saw the real client, through a tunneled connection.
    let conns = s.connections();
    assert!(
        conns
            .iter()
            .any(|c| s.is_tunneled(c) && c.remote_blessings().names() == ["client"]),
        "the server should see the client's blessings"
    );

    // What crossed the proxy's sockets never had the plaintext in it.
    assert!(client_tap.len() > payload.len() && server_tap.len() > payload.len());
    assert!(
        !client_tap.contains(secret),
        "plaintext between client and proxy"
    );
    assert!(
        !server_tap.contains(secret),
        "plaintext between proxy and server"
    );

    let stats = proxy.stats();
    assert_eq!(stats.servers, 1);
    assert_eq!(stats.tunnels, 1);
    assert!(stats.bytes_to_server > payload.len() as u64);
    assert!(stats.bytes_to_client > payload.len() as u64);
    assert_eq!(stats.dial_through.count, 1);
}

#[tokio::test]
async fn a_slow_reader_behind_the_proxy_gets_every_byte_in_order() {
    // Far more than the windows of the three flows in the path: the
    // proxy's relay must hold the sender back (its sinks refuse, the relay
    // waits for credit) and lose nothing while the server is not reading.
    const TOTAL: usize = 24 * 1024 * 1024;
    let proxy = start_proxy(|c| c.allow_listen = Some(vec![BlessingPattern::all()])).await;
    // Windows as small as they go, the same on the server's link to the
    // proxy and inside the end-to-end connection: the inner frames'
    // overhead then outgrows the link's credit.
    let small = 64 * 1024;
    let config = ConnConfig {
        initial_window: small,
        min_window: small,
        max_window: small,
        contended_window: small,
        ..ConnConfig::default()
    };
    let s = Manager::builder(Principal::with_self_blessing("server").unwrap())
        .conn_config(config)
        .build();
    within(10, s.proxy_listen("p", &tcp_endpoint(&proxy)))
        .await
        .unwrap();
    let received = tokio::spawn({
        let s = s.clone();
        async move {
            let mut flow = s.accept().await.unwrap();
            // Let the client fill every window on the way first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::with_capacity(TOTAL);
            while let Some(chunk) = flow.read_msg().await.unwrap() {
                got.extend_from_slice(&chunk);
                // A reader slower than the writer, in bursts.
                if got.len() % (1 << 20) < chunk.len() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            got
        }
    });
    let c = client("client");
    let ep = s.status().endpoints[0].clone();
    let mut flow = within(10, c.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    let sent: Vec<u8> = (0..TOTAL)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    for part in sent.chunks(64 * 1024) {
        within(30, flow.write_msg(&[part])).await.unwrap();
    }
    flow.close_write();
    let got = within(60, received).await.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the bytes differ");
}

#[tokio::test]
async fn a_client_redialing_a_proxied_server_resumes_end_to_end() {
    let proxy = start_proxy(|_| {}).await;
    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    let _handle = within(10, s.proxy_listen("p", &tcp_endpoint(&proxy)))
        .await
        .unwrap();
    let target = s.status().endpoints[0].clone();
    let c = client("client");
    let mut resumed = Vec::new();
    for _ in 0..3 {
        let mut flow = within(10, c.dial(&target, everyone(), Duration::ZERO))
            .await
            .unwrap();
        // The end-to-end connection (not the link to the proxy) resumes.
        let conn = flow.conn().clone();
        assert_eq!(conn.remote_endpoint().routing_id(), s.routing_id());
        resumed.push(conn.resumed());
        // The server's tag (a flow opens with its first write) shows it
        // finished its side of the handshake, and so holds the next ticket,
        // before the connection goes.
        flow.write_msg(&[b"x"]).await.unwrap();
        assert_eq!(
            &within(10, flow.read_msg()).await.unwrap().unwrap()[..],
            b"S"
        );
        drop(flow);
        conn.close("next round");
        within(5, conn.closed()).await;
    }
    assert_eq!(resumed, [false, true, true]);
    assert_eq!(round_trip(&c, &target, b"hi").await.unwrap(), b"Shi");
}

#[tokio::test]
async fn a_ws_client_reaches_a_server_registered_over_tcp() {
    let proxy = start_proxy(|c| {
        c.listen.push(Endpoint::parse("ws/127.0.0.1:0").unwrap());
    })
    .await;
    assert_eq!(proxy.endpoints().len(), 2);
    let s = server(blessed(proxy.manager().principal(), "server"), b"W");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let eps = s.status().endpoints;
    assert_eq!(eps.len(), 2);
    let ws = eps.iter().find(|e| e.protocol() == "ws").unwrap();
    let c = client("client");
    let back = within(10, round_trip(&c, ws, b"over websocket"))
        .await
        .unwrap();
    assert_eq!(back, b"Wover websocket");
    assert_eq!(proxy.stats().tunnels, 1);
}

#[tokio::test]
async fn a_second_key_cannot_take_over_a_routing_id_but_the_owner_can() {
    let proxy = start_proxy(|_| {}).await;
    let root = proxy.manager().principal().clone();
    let owner = blessed(&root, "owner");
    let rid = RoutingId::random();

    let first = server_with_rid(owner.clone(), rid, b"1");
    within(10, first.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let ep = first.status().endpoints[0].clone();

    // Another key, claiming the same routing id, is refused and never
    // replaces the owner.
    let thief = server_with_rid(blessed(&root, "thief"), rid, b"T");
    let err = within(10, thief.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    assert_eq!(refusal_of(&err), Some(Refusal::RoutingIdTaken), "{err}");
    assert!(matches!(
        thief.status().proxy_errors.get("p"),
        Some(Some(_))
    ));
    let back = within(10, round_trip(&client("c1"), &ep, b"?"))
        .await
        .unwrap();
    assert_eq!(back, b"1?");

    // The owner reconnecting (same key, same routing id) takes it back;
    // the old registration is ended and told why.
    let again = server_with_rid(owner, rid, b"2");
    within(10, again.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    within(
        10,
        until(|| matches!(first.status().proxy_errors.get("p"), Some(Some(_)))),
    )
    .await;
    let back = within(10, round_trip(&client("c2"), &ep, b"?"))
        .await
        .unwrap();
    assert_eq!(back, b"2?");

    let stats = proxy.stats();
    assert_eq!(stats.refused(Refusal::RoutingIdTaken), 1);
    assert_eq!(stats.servers, 1);
    assert_eq!(stats.registrations, 2);
}

#[tokio::test]
async fn the_listen_policy_refusal_reaches_the_server() {
    // Default policy: the proxy's own names and their extensions.
    let proxy = start_proxy(|_| {}).await;
    let stranger = server(Principal::with_self_blessing("stranger").unwrap(), b"x");
    let err = within(10, stranger.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Proxy);
    assert_eq!(refusal_of(&err), Some(Refusal::ListenNotAllowed), "{err}");
    let recorded = stranger.status().proxy_errors.get("p").cloned().flatten();
    let recorded = recorded.expect("the refusal is in status");
    assert!(
        recorded.message().contains("listen_not_allowed"),
        "{recorded}"
    );
    assert!(
        stranger
            .status()
            .endpoints
            .iter()
            .all(|e| e.address().is_empty())
    );

    // An explicit policy: a blessing from a root the proxy trusts, under
    // the allowed name.
    let org = Principal::with_self_blessing("org").unwrap();
    let proxy = start_proxy(|c| {
        c.allow_listen = Some(vec![BlessingPattern::parse("org:services").unwrap()]);
    })
    .await;
    proxy
        .manager()
        .principal()
        .add_to_roots(&org.default_blessings())
        .unwrap();
    let allowed = server(blessed(&org, "services:echo"), b"a");
    within(10, allowed.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let other = server(blessed(&org, "laptops:bob"), b"b");
    let err = within(10, other.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    assert_eq!(refusal_of(&err), Some(Refusal::ListenNotAllowed), "{err}");
    assert_eq!(proxy.stats().refused(Refusal::ListenNotAllowed), 1);
    assert_eq!(proxy.stats().servers, 1);
}

#[tokio::test]
async fn the_dial_policy_closes_tunnels_of_strangers() {
    let proxy = start_proxy(|c| {
        c.allow_dial = vec![BlessingPattern::parse("proxy:friends").unwrap()];
    })
    .await;
    let root = proxy.manager().principal().clone();
    let s = server(blessed(&root, "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let ep = s.status().endpoints[0].clone();

    let friend = Manager::builder(blessed(&root, "friends:ann"))
        .dial_only()
        .build();
    let back = within(10, round_trip(&friend, &ep, b"hi")).await.unwrap();
    assert_eq!(back, b"Shi");

    let stranger = client("stranger");
    let err = within(10, round_trip(&stranger, &ep, b"hi"))
        .await
        .unwrap_err();
    assert!(!err.message().is_empty());
    let stats = proxy.stats();
    assert_eq!(stats.refused(Refusal::DialNotAllowed), 1);
    assert_eq!(stats.tunnels, 1);
}

#[tokio::test]
async fn server_limits_refuse_with_their_reason() {
    let proxy = start_proxy(|c| {
        c.limits = ProxyLimits {
            max_servers: 2,
            max_servers_per_identity: 1,
            ..ProxyLimits::default()
        };
    })
    .await;
    let root = proxy.manager().principal().clone();
    let alice = blessed(&root, "alice");
    let a1 = server(alice.clone(), b"a");
    within(10, a1.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    // The same key under a second routing id: over the per-identity cap.
    let a2 = server(alice, b"a");
    let err = within(10, a2.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    assert_eq!(refusal_of(&err), Some(Refusal::TooManyForIdentity), "{err}");

    let b = server(blessed(&root, "bob"), b"b");
    within(10, b.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    // A third server: over the global cap.
    let c = server(blessed(&root, "carol"), b"c");
    let err = within(10, c.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    assert_eq!(refusal_of(&err), Some(Refusal::TooManyServers), "{err}");

    let stats = proxy.stats();
    assert_eq!(stats.refused(Refusal::TooManyForIdentity), 1);
    assert_eq!(stats.refused(Refusal::TooManyServers), 1);
    assert_eq!(stats.servers, 2);
}

#[tokio::test]
async fn flow_limits_refuse_and_cut_with_their_reason() {
    let proxy = start_proxy(|c| {
        c.limits = ProxyLimits {
            max_flows_per_server: 1,
            max_bytes_per_flow: Some(256 * 1024),
            ..ProxyLimits::default()
        };
    })
    .await;
    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let ep = s.status().endpoints[0].clone();

    // One end-to-end connection is one proxied flow; a second client's
    // connection is over the per-server cap while the first stands.
    let first = client("first");
    let mut open = within(10, first.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    open.write_msg(&[b"x"]).await.unwrap();
    assert_eq!(
        within(10, open.read_msg()).await.unwrap().unwrap(),
        &b"S"[..]
    );
    let second = client("second");
    within(10, round_trip(&second, &ep, b"y"))
        .await
        .unwrap_err();
    assert_eq!(proxy.stats().refused(Refusal::TooManyFlows), 1);

    // Over the byte cap, the first client's tunnel is cut.
    let big = vec![7u8; 1024 * 1024];
    let _ = open.write_msg(&[&big]).await;
    let ended = within(10, async {
        loop {
            match open.read_msg().await {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return true,
            }
        }
    })
    .await;
    assert!(ended);
    within(10, until(|| proxy.stats().cut(Cutoff::MaxBytes) == 1)).await;
    within(10, until(|| proxy.stats().tunnels_active == 0)).await;

    // With the slot free again, the second client gets through.
    let third = client("third");
    let back = within(10, round_trip(&third, &ep, b"z")).await.unwrap();
    assert_eq!(back, b"Sz");
}

#[tokio::test]
async fn a_flow_over_its_time_is_cut() {
    let proxy = start_proxy(|c| {
        c.limits.max_flow_duration = Some(Duration::from_millis(300));
    })
    .await;
    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let ep = s.status().endpoints[0].clone();
    let c = client("c");
    let flow = within(10, c.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    // The tunnel under the flow's connection goes, and the connection
    // with it.
    within(20, flow.conn().closed()).await;
    assert_eq!(proxy.stats().cut(Cutoff::MaxDuration), 1);
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let proxy = start_proxy(|c| {
        c.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = proxy.metrics_addr().expect("metrics are served");
    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http_get(addr, "/nothing").await;
    assert_eq!(status, 404);

    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let refused = server(Principal::with_self_blessing("stranger").unwrap(), b"x");
    within(10, refused.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap_err();
    let ep = s.status().endpoints[0].clone();
    let msg = vec![1u8; 10_000];
    let back = within(10, round_trip(&client("c"), &ep, &msg))
        .await
        .unwrap();
    assert_eq!(back.len(), 10_001);
    // A routing id nobody registered.
    let nobody = ep.clone().with_routing_id(RoutingId::random());
    within(10, round_trip(&client("d"), &nobody, b"?"))
        .await
        .unwrap_err();
    within(10, until(|| proxy.stats().tunnels_active == 0)).await;

    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "flowproxy_servers"), 1.0);
    assert_eq!(sample(&text, "flowproxy_registrations_total"), 1.0);
    assert_eq!(sample(&text, "flowproxy_flows_total"), 1.0);
    assert_eq!(sample(&text, "flowproxy_flows_active"), 0.0);
    assert!(sample(&text, "flowproxy_bytes_total{direction=\"to_server\"}") > 10_000.0);
    assert!(sample(&text, "flowproxy_bytes_total{direction=\"to_client\"}") > 10_000.0);
    assert_eq!(
        sample(
            &text,
            "flowproxy_refusals_total{reason=\"listen_not_allowed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&text, "flowproxy_refusals_total{reason=\"unknown_target\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "flowproxy_refusals_total{reason=\"too_many_flows\"}"),
        0.0
    );
    assert_eq!(sample(&text, "flowproxy_dial_through_seconds_count"), 1.0);
    assert_eq!(
        sample(&text, "flowproxy_dial_through_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );

    proxy.shutdown(Duration::from_secs(1)).await;
    // The metrics server stops with the proxy.
    within(10, until(|| std::net::TcpStream::connect(addr).is_err())).await;
}

#[tokio::test]
async fn chains_of_two_and_three_proxies() {
    // A, the outer proxy; B listens through A, and C through B (each on a
    // port of its own too). Each is blessed by the one before it, so each
    // one's default listen policy admits the next.
    let a = start_proxy(|_| {}).await;
    let a_addr = tcp_endpoint(&a).address().to_string();
    let b = start_proxy_as(blessed(a.manager().principal(), "b"), |c| {
        c.via = vec![shorthand(&a)];
    })
    .await;
    let b_addr = tcp_endpoint(&b).address().to_string();
    let b_via_a: Vec<Endpoint> = b
        .endpoints()
        .into_iter()
        .filter(|e| e.address() == a_addr)
        .collect();
    assert_eq!(b_via_a.len(), 1, "{:?}", b.endpoints());
    assert_eq!(b_via_a[0].route(), &[b.routing_id()]);
    assert!(b.upstreams()[0].error.is_none());
    assert_eq!(a.stats().proxies, 1);
    let c = start_proxy_as(blessed(b.manager().principal(), "c"), |conf| {
        conf.via = vec![shorthand(&b)];
    })
    .await;
    let c_via_a: Vec<Endpoint> = c
        .endpoints()
        .into_iter()
        .filter(|e| e.address() == a_addr)
        .collect();
    assert_eq!(c_via_a.len(), 1, "{:?}", c.endpoints());
    assert_eq!(c_via_a[0].route(), &[b.routing_id(), c.routing_id()]);
    assert_eq!(c.endpoints().len(), 3);

    // The server is blessed by C and registers with C directly; it is
    // given C's endpoints, B's and A's.
    let s = server(blessed(c.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("c", &shorthand(&c)))
        .await
        .unwrap();
    let through_a = proxied_endpoints(&s, &a_addr).await;
    assert_eq!(through_a[0].route(), &[b.routing_id(), c.routing_id()]);
    assert_eq!(through_a[0].routing_id(), s.routing_id());
    let through_b = proxied_endpoints(&s, &b_addr).await;
    assert_eq!(through_b[0].route(), &[c.routing_id()]);

    // A client given only the endpoint at A's address: A forwards to B,
    // B to C, C to the server.
    let back = within(10, round_trip(&client("c1"), &through_a[0], b"three hops"))
        .await
        .unwrap();
    assert_eq!(back, b"Sthree hops");
    // And one given B's.
    let back = within(10, round_trip(&client("c2"), &through_b[0], b"two hops"))
        .await
        .unwrap();
    assert_eq!(back, b"Stwo hops");
    assert_eq!(a.stats().tunnels, 1);
    assert_eq!(b.stats().tunnels, 2);
    assert_eq!(c.stats().tunnels, 2);
    for p in [&a, &b, &c] {
        assert_eq!(p.stats().refused(Refusal::UnknownTarget), 0);
    }

    // A hop that is not registered at A: refused there.
    let astray = through_a[0]
        .clone()
        .with_route([RoutingId::random(), c.routing_id()]);
    within(10, round_trip(&client("c3"), &astray, b"?"))
        .await
        .unwrap_err();
    assert_eq!(a.stats().refused(Refusal::UnknownTarget), 1);
}

#[tokio::test]
async fn endpoint_changes_are_pushed_to_registered_servers() {
    let proxy = start_proxy(|_| {}).await;
    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    assert_eq!(s.status().endpoints.len(), 1);
    let added = proxy.listen("ws", "127.0.0.1:0").await.unwrap();
    within(10, until(|| s.status().endpoints.len() == 2)).await;
    let ws = s
        .status()
        .endpoints
        .into_iter()
        .find(|e| e.protocol() == "ws")
        .unwrap();
    assert_eq!(ws.address(), added.address());
    let back = within(10, round_trip(&client("c"), &ws, b"new"))
        .await
        .unwrap();
    assert_eq!(back, b"Snew");
}

#[tokio::test]
async fn the_wire_protocol_by_hand() {
    let proxy = start_proxy(|_| {}).await;
    let root = proxy.manager().principal().clone();
    let proxy_ep = tcp_endpoint(&proxy);

    // A server: its endpoints carry its routing id and presented names.
    let s = Manager::builder(blessed(&root, "server")).build();
    let (_r, _w, answer) = register_by_hand(&s, &proxy_ep, Message::ProxyServerRequest).await;
    let eps = endpoints_of(&answer);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].routing_id(), s.routing_id());
    assert!(eps[0].route().is_empty());
    assert_eq!(eps[0].blessing_names(), ["proxy:server"]);
    accept_tunnels_by_hand(&s, b"H");

    // A proxy: the route ends with its routing id.
    let p = Manager::builder(blessed(&root, "downstream")).build();
    let (_pr, _pw, answer) = register_by_hand(&p, &proxy_ep, Message::MultiProxyRequest).await;
    let peps = endpoints_of(&answer);
    assert_eq!(peps[0].route(), &[p.routing_id()]);
    assert_eq!(peps[0].routing_id(), p.routing_id());
    assert_eq!(proxy.stats().proxies, 1);

    // A client by hand: a flow to the proxy, the handshake inside it.
    let c = client("client");
    let to_proxy = within(10, c.dial(&proxy_ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    let tunnel = FlowConn::new(to_proxy).unwrap();
    let params = HandshakeParams {
        transport_max_frame: flow::transport::FramedConn::max_frame_size(&tunnel),
        config: ConnConfig::default(),
        principal: c.principal().clone(),
        authorizer: everyone(),
        local_endpoint: Endpoint::new("", ""),
    };
    let inner = within(10, Conn::dial(Box::new(tunnel), params, eps[0].clone()))
        .await
        .unwrap();
    assert_eq!(inner.remote_blessings().names(), ["proxy:server"]);
    let mut f = inner.open_flow(FlowOptions::default()).unwrap();
    f.write_msg(&[b"by hand"]).await.unwrap();
    f.close_write();
    let mut back = Vec::new();
    while let Some(chunk) = within(10, f.read_msg()).await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, b"Hby hand");

    // A first message that is neither: the flow is closed and counted.
    let mut junk = within(10, c.dial(&proxy_ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    junk.write_msg(&[b"GET / HTTP/1.1\r\n\r\n"]).await.unwrap();
    let end = within(10, junk.read_msg()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert_eq!(proxy.stats().refused(Refusal::BadRequest), 1);

    // A server without blessings has no key to own its routing id with.
    let anonymous = Manager::builder(Principal::new()).build();
    let open = start_proxy(|c| c.allow_listen = Some(vec![BlessingPattern::all()])).await;
    let (mut r, _w, answer) = register_by_hand(
        &anonymous,
        &tcp_endpoint(&open),
        Message::ProxyServerRequest,
    )
    .await;
    match answer {
        Message::ProxyErrorResponse(e) => {
            assert_eq!(
                Refusal::of_message(&e.error),
                Some(Refusal::NoIdentity),
                "{}",
                e.error
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // ...and the proxy closes the flow after saying why.
    assert!(read_control(&mut r).await.is_none());
}

#[tokio::test]
async fn proxying_over_a_proxied_connection_is_refused() {
    // Q is a proxy; P is a proxy whose manager also listens through Q as a
    // server, so connections can reach P's manager through Q's tunnels.
    let q = start_proxy(|c| c.allow_listen = Some(vec![BlessingPattern::all()])).await;
    let p = start_proxy(|_| {}).await;
    within(10, p.manager().proxy_listen("q", &shorthand(&q)))
        .await
        .unwrap();
    let p_via_q = proxied_endpoints(p.manager(), tcp_endpoint(&q).address()).await;

    // A server that reaches P through Q and asks P to listen for it.
    let s = Manager::builder(blessed(p.manager().principal(), "server")).build();
    let (mut r, _w, answer) = register_by_hand(&s, &p_via_q[0], Message::ProxyServerRequest).await;
    match answer {
        Message::ProxyErrorResponse(e) => {
            assert_eq!(
                Refusal::of_message(&e.error),
                Some(Refusal::Tunneled),
                "{}",
                e.error
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(read_control(&mut r).await.is_none());
    assert_eq!(p.stats().refused(Refusal::Tunneled), 1);
    assert_eq!(p.stats().servers, 0);
}

#[tokio::test]
async fn shutdown_tells_servers_and_drains_proxied_flows() {
    let proxy = start_proxy(|_| {}).await;
    let proxy_ep = tcp_endpoint(&proxy);
    // A hand-driven server, so the test controls what it does when the
    // proxy goes away: it keeps its tunnels until they end.
    let s = Manager::builder(blessed(proxy.manager().principal(), "server")).build();
    let (mut control, _w, answer) =
        register_by_hand(&s, &proxy_ep, Message::ProxyServerRequest).await;
    let ep = endpoints_of(&answer).remove(0);
    accept_tunnels_by_hand(&s, b"D");

    let c = client("c");
    let mut flow = within(10, c.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    flow.write_msg(&[b"before"]).await.unwrap();
    assert_eq!(
        within(10, flow.read_msg()).await.unwrap().unwrap(),
        &b"D"[..]
    );
    assert_eq!(
        within(10, flow.read_msg()).await.unwrap().unwrap(),
        &b"before"[..]
    );

    let proxy = Arc::new(proxy);
    let stopping = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.shutdown(Duration::from_secs(30)).await }
    });
    // The server is told at once.
    match read_control(&mut control).await {
        Some(Message::ProxyErrorResponse(e)) => {
            assert_eq!(
                Refusal::of_message(&e.error),
                Some(Refusal::ShuttingDown),
                "{}",
                e.error
            )
        }
        other => panic!("expected shutting_down, got {other:?}"),
    }
    assert!(proxy.is_shutting_down());
    // No new connections...
    let late = client("late");
    within(10, round_trip(&late, &ep, b"?")).await.unwrap_err();
    // ...but the proxied flow in progress goes on.
    flow.write_msg(&[b"during"]).await.unwrap();
    assert_eq!(
        within(10, flow.read_msg()).await.unwrap().unwrap(),
        &b"during"[..]
    );
    assert!(!stopping.is_finished());
    // Once it ends, shutdown finishes well before its grace period.
    flow.close_write();
    while within(10, flow.read_msg()).await.is_ok_and(|m| m.is_some()) {}
    drop(flow);
    c.close().await;
    within(20, stopping).await.unwrap();
    assert!(proxy.endpoints().is_empty());
    assert_eq!(proxy.stats().tunnels_active, 0);
}

#[tokio::test]
async fn shutdown_ends_after_the_grace_period_when_flows_do_not() {
    let proxy = start_proxy(|_| {}).await;
    let s = server(blessed(proxy.manager().principal(), "server"), b"S");
    within(10, s.proxy_listen("p", &shorthand(&proxy)))
        .await
        .unwrap();
    let ep = s.status().endpoints[0].clone();
    let c = client("c");
    let flow = within(10, c.dial(&ep, everyone(), Duration::ZERO))
        .await
        .unwrap();
    // A flow that never ends: shutdown still finishes, and cuts it.
    within(20, proxy.shutdown(Duration::from_millis(200))).await;
    within(10, flow.conn().closed()).await;
    within(
        10,
        until(|| matches!(s.status().proxy_errors.get("p"), Some(Some(_)))),
    )
    .await;
}

#[tokio::test]
async fn a_restarted_proxy_serves_the_same_endpoint_again() {
    let principal = Principal::with_self_blessing("proxy").unwrap();
    let first = start_proxy_as(principal.clone(), |_| {}).await;
    let addr = tcp_endpoint(&first).address().to_string();
    let s = server(blessed(&principal, "server"), b"S");
    let _keeper = s.keep_proxy_listening("p", &shorthand(&first));
    within(
        10,
        until(|| s.status().endpoints.iter().any(|e| e.address() == addr)),
    )
    .await;
    let ep = proxied_endpoints(&s, &addr).await.remove(0);
    assert_eq!(
        within(10, round_trip(&client("c1"), &ep, b"1"))
            .await
            .unwrap(),
        b"S1"
    );

    // The proxy goes away; the server notices.
    first.shutdown(Duration::ZERO).await;
    drop(first);
    within(
        10,
        until(|| matches!(s.status().proxy_errors.get("p"), Some(Some(_)))),
    )
    .await;

    // A new proxy process on the same address (a new routing id, same
    // credentials): the server's keeper registers again on its own, and
    // the endpoint clients already hold works again.
    let second = start_proxy_as(principal, |c| {
        c.listen = vec![Endpoint::parse(&format!("tcp/{addr}")).unwrap()];
    })
    .await;
    within(60, until(|| second.stats().servers == 1)).await;
    within(
        10,
        until(|| matches!(s.status().proxy_errors.get("p"), Some(None))),
    )
    .await;
    assert_eq!(proxied_endpoints(&s, &addr).await[0], ep);
    assert_eq!(
        within(10, round_trip(&client("c2"), &ep, b"2"))
            .await
            .unwrap(),
        b"S2"
    );
}

#[tokio::test]
async fn through_two_proxies_one_killed_the_endpoint_list_still_works() {
    let root = Principal::with_self_blessing("proxy").unwrap();
    let a = start_proxy_as(root.clone(), |_| {}).await;
    let b = start_proxy_as(root.clone(), |_| {}).await;
    let s = server(blessed(&root, "server"), b"S");
    within(10, s.proxy_listen("a", &shorthand(&a)))
        .await
        .unwrap();
    within(10, s.proxy_listen("b", &shorthand(&b)))
        .await
        .unwrap();
    let eps = s.status().endpoints;
    assert_eq!(eps.len(), 2, "{eps:?}");

    // The first proxy in the list dies; a client given the whole list
    // still gets through, by the second.
    let first_addr = eps[0].address().to_string();
    let (dead, alive) = if tcp_endpoint(&a).address() == first_addr {
        (a, b)
    } else {
        (b, a)
    };
    dead.shutdown(Duration::ZERO).await;
    let c = client("c");
    let mut flow = within(10, c.dial_any(&eps, everyone(), Duration::ZERO))
        .await
        .unwrap();
    flow.write_msg(&[b"!"]).await.unwrap();
    flow.close_write();
    let mut back = Vec::new();
    while let Some(chunk) = within(10, flow.read_msg()).await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, b"S!");
    assert_eq!(alive.stats().tunnels, 1);
    assert_eq!(dead.stats().tunnels, 0);
}
