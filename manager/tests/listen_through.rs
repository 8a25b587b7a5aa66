//! The Manager's side of proxying — listening through a proxy, dialing a
//! proxied endpoint, re-listening, racing several endpoints — against a
//! minimal proxy written here (the real one is `flow_manager::proxy`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flow::ErrorKind;
use flow::auth::{AllowEveryone, PatternAuthorizer};
use flow::conn::{Conn, Flow};
use flow::message::Message;
use flow::message::codec::Reader;
use flow::naming::{Endpoint, RoutingId};
use flow::security::{BlessingPattern, Principal};
use flow_manager::Manager;
use parking_lot::Mutex;

use common::{encode, within};

/// A proxy that knows just enough: registers servers by routing id and
/// relays tunnels to them. `refuse` makes it refuse every server.
#[derive(Clone)]
struct MiniProxy {
    manager: Manager,
    endpoint: Endpoint,
    servers: Arc<Mutex<HashMap<RoutingId, Conn>>>,
    relayed: Arc<Mutex<Vec<u8>>>,
}

impl MiniProxy {
    async fn start(refuse: bool) -> MiniProxy {
        Self::try_start_at("127.0.0.1:0", refuse).await.unwrap()
    }

    /// A proxy listening on `addr`, unless listening there fails.
    async fn try_start_at(addr: &str, refuse: bool) -> Option<MiniProxy> {
        let manager = Manager::builder(Principal::with_self_blessing("proxy").unwrap()).build();
        manager.set_routes_others(true);
        let endpoint = manager.listen("tcp", addr).await.ok()?.endpoint().clone();
        let proxy = MiniProxy {
            manager,
            endpoint,
            servers: Arc::default(),
            relayed: Arc::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok(flow) = p.manager.accept().await {
                let p = p.clone();
                tokio::spawn(async move { p.handle(flow, refuse).await });
            }
        });
        Some(proxy)
    }

    async fn handle(&self, mut flow: Flow, refuse: bool) {
        let Ok(Some(first)) = flow.read_msg().await else {
            return;
        };
        if flow::conn::handshake::is_hello(&first) {
            let Ok(target) = flow::conn::handshake::requested_endpoint(&first) else {
                return;
            };
            let server = self.servers.lock().get(&target.routing_id()).cloned();
            let Some(server) = server else { return };
            let Ok(to_server) = server.open_flow(Default::default()) else {
                return;
            };
            to_server.set_passthrough().unwrap();
            flow.set_passthrough().unwrap();
            let (mut cr, mut cw) = flow.into_split();
            let (mut sr, mut sw) = to_server.into_split();
            sw.write_msg(&[&first]).await.unwrap();
            let relayed = self.relayed.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = cr.read_msg().await {
                    relayed.lock().extend_from_slice(&m);
                    if sw.write_msg(&[&m]).await.is_err() {
                        break;
                    }
                }
                sw.close_write();
            });
            let relayed = self.relayed.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = sr.read_msg().await {
                    relayed.lock().extend_from_slice(&m);
                    if cw.write_msg(&[&m]).await.is_err() {
                        break;
                    }
                }
                cw.close_write();
            });
            return;
        }
        let mut r = Reader::new(first, "Control");
        let Ok(Message::ProxyServerRequest) = Message::decode(&mut r) else {
            return;
        };
        flow.disable_fragmentation().unwrap();
        if refuse {
            let no = Message::ProxyErrorResponse(flow::message::ProxyErrorResponse {
                error: "not on my list".into(),
            });
            let _ = flow.write_msg(&[&encode(&no)]).await;
            return;
        }
        let conn = flow.conn().clone();
        let rid = conn.remote_endpoint().routing_id();
        self.servers.lock().insert(rid, conn.clone());
        let eps = self
            .manager
            .status()
            .endpoints
            .iter()
            .map(|e| e.clone().with_routing_id(rid).to_string())
            .collect();
        let answer = Message::ProxyResponse(flow::message::ProxyResponse { endpoints: eps });
        flow.write_msg(&[&encode(&answer)]).await.unwrap();
        // Hold the control flow until the server goes.
        conn.closed().await;
    }
}

/// Echoes every flow accepted by `m`.
fn serve_echo(m: &Manager) {
    let m = m.clone();
    tokio::spawn(async move {
        while let Ok(mut flow) = m.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(chunk)) = flow.read_msg().await {
                    if flow.write_msg(&[&chunk]).await.is_err() {
                        return;
                    }
                }
                flow.close_write();
            });
        }
    });
}

async fn echo(client: &Manager, eps: &[Endpoint], msg: &[u8]) -> (Vec<u8>, Flow) {
    let mut flow = within(
        10,
        client.dial_any(eps, Arc::new(AllowEveryone), Duration::ZERO),
    )
    .await
    .unwrap();
    flow.write_msg(&[msg]).await.unwrap();
    flow.close_write();
    let mut out = Vec::new();
    while let Some(chunk) = within(10, flow.read_msg()).await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    (out, flow)
}

#[tokio::test]
async fn a_server_listening_only_through_a_proxy_is_reachable_end_to_end() {
    let proxy = MiniProxy::start(false).await;
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap()).build();
    serve_echo(&server);
    let before = server.status();
    // The shorthand: the proxy's routing id is learned in the handshake.
    let shorthand = Endpoint::parse(&format!("tcp/{}", proxy.endpoint.address())).unwrap();
    let handle = within(10, server.proxy_listen("p", &shorthand))
        .await
        .unwrap();
    within(5, before.changed()).await;
    let status = server.status();
    assert!(matches!(status.proxy_errors.get("p"), Some(None)));
    let eps = status.endpoints.clone();
    assert_eq!(eps, handle.endpoints().to_vec());
    assert!(eps.iter().all(|e| e.routing_id() == server.routing_id()));
    assert!(eps.iter().all(|e| e.address() == proxy.endpoint.address()));

    // A client that only knows the proxied endpoint, and insists on talking
    // to the server (not the proxy).
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap()).build();
    client
        .principal()
        .add_to_roots(&server.principal().default_blessings())
        .unwrap();
    let only_server = Arc::new(PatternAuthorizer::new([
        BlessingPattern::parse("server").unwrap()
    ]));
    let secret = b"through the proxy, sealed end to end";
    let mut flow = within(10, client.dial(&eps[0], only_server, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(flow.remote_blessings().names(), vec!["server".to_string()]);
    flow.write_msg(&[secret]).await.unwrap();
    flow.close_write();
    let mut back = Vec::new();
    while let Some(chunk) = within(10, flow.read_msg()).await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, secret);
    let relayed = proxy.relayed.lock().clone();
    assert!(!relayed.is_empty());
    assert!(
        !relayed.windows(secret.len()).any(|w| w == secret),
        "the proxy saw plaintext"
    );
    // The server sees the real client.
    let conns = server.connections();
    assert!(
        conns
            .iter()
            .any(|c| c.remote_blessings().names() == vec!["client".to_string()])
    );
    assert!(conns.iter().any(|c| server.is_tunneled(c)));
}

#[tokio::test]
async fn a_proxy_refusal_is_recorded_in_status() {
    let proxy = MiniProxy::start(true).await;
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap()).build();
    let err = within(10, server.proxy_listen("strict", &proxy.endpoint))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Proxy);
    assert!(err.message().contains("not on my list"), "{err}");
    let status = server.status();
    let recorded = status
        .proxy_errors
        .get("strict")
        .cloned()
        .flatten()
        .unwrap();
    assert!(recorded.message().contains("not on my list"));
}

#[tokio::test]
async fn losing_the_proxy_is_recorded_and_the_keeper_listens_again() {
    let proxy = MiniProxy::start(false).await;
    let addr = proxy.endpoint.address().to_string();
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap()).build();
    serve_echo(&server);
    let shorthand = Endpoint::parse(&format!("tcp/{addr}")).unwrap();
    let keeper = server.keep_proxy_listening("p", &shorthand);
    within(10, async {
        while !matches!(server.status().proxy_errors.get("p"), Some(None)) {
            server.status().changed().await;
        }
    })
    .await;
    let ep = server.status().endpoints[0].clone();
    // The proxy goes away: the loss shows in status.
    proxy.manager.close().await;
    within(10, async {
        while !matches!(server.status().proxy_errors.get("p"), Some(Some(_))) {
            server.status().changed().await;
        }
    })
    .await;
    // It comes back on the same address; the server is reachable again at
    // the same endpoint, with nothing done by hand.
    let mut back = None;
    for _ in 0..100 {
        if let Ok(p) = tokio::time::timeout(
            Duration::from_secs(1),
            MiniProxy::try_start_at(&addr, false),
        )
        .await
            && let Some(p) = p
        {
            back = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _proxy = back.expect("could not restart the proxy");
    within(15, async {
        while !matches!(server.status().proxy_errors.get("p"), Some(None)) {
            server.status().changed().await;
        }
    })
    .await;
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap()).build();
    let (out, _) = echo(&client, std::slice::from_ref(&ep), b"again").await;
    assert_eq!(out, b"again");
    keeper.stop();
}

#[tokio::test]
async fn dial_any_survives_a_dead_proxy_within_the_stagger() {
    let p1 = MiniProxy::start(false).await;
    let p2 = MiniProxy::start(false).await;
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap()).build();
    serve_echo(&server);
    within(10, server.proxy_listen("p1", &p1.endpoint))
        .await
        .unwrap();
    within(10, server.proxy_listen("p2", &p2.endpoint))
        .await
        .unwrap();
    let eps = server.status().endpoints;
    assert_eq!(eps.len(), 2, "{eps:?}");
    // The first proxy dies; the list still works.
    p1.manager.close().await;
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap()).build();
    let (out, flow) = echo(&client, &eps, b"either").await;
    assert_eq!(out, b"either");
    assert_eq!(flow.remote_blessings().names(), vec!["server".to_string()]);
}

#[tokio::test]
async fn dial_only_managers_cannot_listen_through_a_proxy() {
    let proxy = MiniProxy::start(false).await;
    let m = Manager::builder(Principal::with_self_blessing("d").unwrap())
        .dial_only()
        .build();
    let err = m.proxy_listen("p", &proxy.endpoint).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadState);
}

#[tokio::test]
async fn closing_managers_with_proxied_connections_does_not_wait_out_the_grace() {
    // A proxied connection runs inside a flow of the connection to the
    // proxy, so that outer connection is busy until the inner one closes:
    // closing must close drained connections as it goes, not wait for all.
    let proxy = MiniProxy::start(false).await;
    let grace = Duration::from_secs(600);
    let server = Manager::builder(Principal::with_self_blessing("server").unwrap())
        .close_grace(grace)
        .build();
    serve_echo(&server);
    let handle = within(10, server.proxy_listen("p", &proxy.endpoint))
        .await
        .unwrap();
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .dial_only()
        .close_grace(grace)
        .build();
    let (back, flow) = echo(&client, handle.endpoints(), b"ping").await;
    assert_eq!(back, b"ping");
    drop(flow);
    // The client holds its connection to the proxy and the one inside it.
    assert_eq!(client.connections().len(), 2);
    assert!(server.connections().iter().any(|c| server.is_tunneled(c)));
    within(30, client.close()).await;
    within(30, server.close()).await;
}
