//! The `proxy` protocol and `FlowConn` with a plain relay between two
//! managers: a client reaches a server through a relay that only forwards
//! messages, and runs an end-to-end authenticated connection inside.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flow::auth::AllowEveryone;
use flow::conn::{Conn, ConnConfig, FlowOptions, HandshakeParams};
use flow::naming::Endpoint;
use flow::security::Principal;
use flow_manager::{FlowConn, Manager};
use parking_lot::Mutex;

use common::within;

fn params(principal: &Principal, local: Endpoint, max_frame: usize) -> HandshakeParams {
    HandshakeParams {
        config: ConnConfig::default(),
        principal: principal.clone(),
        authorizer: Arc::new(AllowEveryone),
        local_endpoint: local,
        transport_max_frame: max_frame,
    }
}

#[tokio::test]
async fn end_to_end_connection_through_a_relay() {
    let server_principal = Principal::with_self_blessing("server").unwrap();
    let server = Manager::builder(server_principal.clone()).build();
    let server_ep = server
        .listen("tcp", "127.0.0.1:0")
        .await
        .unwrap()
        .endpoint()
        .clone();
    // The server treats every accepted flow as a tunnel: an inner
    // connection whose flows it echoes.
    tokio::spawn({
        let server = server.clone();
        let server_ep = server_ep.clone();
        async move {
            while let Ok(flow) = server.accept().await {
                let principal = server_principal.clone();
                let local = server_ep.clone();
                tokio::spawn(async move {
                    let tunnel = FlowConn::new(flow).unwrap();
                    let max = flow::transport::FramedConn::max_frame_size(&tunnel);
                    let inner = Conn::accept(Box::new(tunnel), params(&principal, local, max))
                        .await
                        .unwrap();
                    while let Ok(mut f) = inner.accept_flow().await {
                        tokio::spawn(async move {
                            while let Ok(Some(chunk)) = f.read_msg().await {
                                f.write_msg(&[&chunk]).await.unwrap();
                            }
                            f.close_write();
                        });
                    }
                });
            }
        }
    });

    // The relay forwards messages between each client flow and a flow it
    // opens to the server, remembering everything it saw.
    let relay = Manager::builder(Principal::with_self_blessing("relay").unwrap()).build();
    let relay_ep = relay
        .listen("tcp", "127.0.0.1:0")
        .await
        .unwrap()
        .endpoint()
        .clone();
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    tokio::spawn({
        let relay = relay.clone();
        let server_ep = server_ep.clone();
        let seen = seen.clone();
        async move {
            while let Ok(client_side) = relay.accept().await {
                let server_side = relay
                    .dial(&server_ep, Arc::new(AllowEveryone), Duration::ZERO)
                    .await
                    .unwrap();
                client_side.set_passthrough().unwrap();
                server_side.set_passthrough().unwrap();
                let (mut cr, mut cw) = client_side.into_split();
                let (mut sr, mut sw) = server_side.into_split();
                let seen_up = seen.clone();
                tokio::spawn(async move {
                    while let Ok(Some(m)) = cr.read_msg().await {
                        seen_up.lock().push(m.clone());
                        if sw.write_msg(&[&m]).await.is_err() {
                            break;
                        }
                    }
                    sw.close_write();
                });
                let seen_down = seen.clone();
                tokio::spawn(async move {
                    while let Ok(Some(m)) = sr.read_msg().await {
                        seen_down.lock().push(m.clone());
                        if cw.write_msg(&[&m]).await.is_err() {
                            break;
                        }
                    }
                    cw.close_write();
                });
            }
        }
    });

    // The client dials the relay with the `proxy` protocol and runs its
    // handshake with the server inside.
    let client_principal = Principal::with_self_blessing("client").unwrap();
    let client = Manager::builder(client_principal.clone()).build();
    let tunnel = within(
        10,
        client
            .registry()
            .dial("proxy", &relay_ep.to_string(), Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let max = tunnel.max_frame_size();
    let conn = within(
        10,
        Conn::dial(
            tunnel,
            params(&client_principal, Endpoint::new("", ""), max),
            server_ep.clone(),
        ),
    )
    .await
    .unwrap();
    // Authenticated end to end: the client sees the server, not the relay.
    assert_eq!(conn.remote_blessings().names(), vec!["server".to_string()]);
    assert_eq!(conn.remote_endpoint().routing_id(), server_ep.routing_id());

    let secret = b"attack at dawn; the relay must never read this";
    let mut flow = conn.open_flow(FlowOptions::default()).unwrap();
    let big: Vec<u8> = secret.iter().copied().cycle().take(300_000).collect();
    flow.write_msg(&[&big]).await.unwrap();
    flow.close_write();
    let mut back = Vec::new();
    while let Some(chunk) = within(10, flow.read_msg()).await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, big);
    let seen = seen.lock();
    assert!(!seen.is_empty());
    for m in seen.iter() {
        assert!(
            !m.windows(secret.len()).any(|w| w == secret),
            "the relay saw plaintext"
        );
    }
}

#[tokio::test]
async fn the_proxy_protocol_cannot_listen() {
    let m = Manager::builder(Principal::with_self_blessing("m").unwrap()).build();
    let err = m.listen("proxy", "anything").await.unwrap_err();
    assert_eq!(err.kind(), flow::ErrorKind::BadArg);
}
