//! Through one proxy versus direct, in the same run, over tcp on loopback:
//!
//! - `proxy/throughput/{direct,proxied}`: one flow, the client writing
//!   64 KiB messages (`write_all`) to a server that drains them and acks
//!   each batch; one iteration is one message.
//! - `proxy/rtt64/{direct,proxied}`: a 64-byte message and its echo on one
//!   flow; one iteration is one round trip.
//!
//! Direct: the client dials the server's own tcp endpoint. Proxied: the
//! server listens nowhere but through a `flow_manager::proxy::Proxy`
//! (`Manager::proxy_listen`) and the client dials the proxied endpoint, so
//! its end-to-end connection runs inside a flow to the proxy, which relays
//! it to the server over the server's own connection. Both sides use the
//! same `Manager` API; the proxy hop is the only difference.
//!
//! Client work runs as a task on the runtime's two workers, like the
//! servers and the proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flow::auth::AllowEveryone;
use flow::conn::{Conn, ConnConfig, Flow, FlowOptions, HandshakeParams};
use flow::naming::Endpoint;
use flow::security::{BlessingPattern, Principal};
use flow::transport::FramedConn;
use flow_manager::FlowConn;
use flow_manager::Manager;
use flow_manager::proxy::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Application write size of the throughput case.
const CHUNK: usize = 64 * 1024;
/// Message size of the round-trip case.
const SMALL: usize = 64;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Reads batches: an 8-byte length, then that many bytes, then answers one
/// byte.
async fn sink(mut flow: Flow) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut len = [0u8; 8];
        if flow.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut left = u64::from_be_bytes(len);
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            match flow.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n as u64,
            }
        }
        if flow.write_all(b"k").await.is_err() {
            return;
        }
    }
}

/// Echoes until the end of the flow.
async fn echo(mut flow: Flow) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = flow.read(&mut buf).await {
        if n == 0 || flow.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = flow.shutdown().await;
}

/// A server whose flows start with a byte choosing the service: `s` sink,
/// `e` echo.
fn serve(m: &Manager) {
    let m = m.clone();
    tokio::spawn(async move {
        while let Ok(flow) = m.accept().await {
            tokio::spawn(serve_flow(flow));
        }
    });
}

/// Takes every flow opened to `m` as a tunnel: an end-to-end connection
/// inside, whose flows `serve_flow` serves.
fn serve_tunnels(m: &Manager) {
    let m = m.clone();
    tokio::spawn(async move {
        while let Ok(flow) = m.accept().await {
            let principal = m.principal().clone();
            tokio::spawn(async move {
                let tunnel = FlowConn::new(flow).expect("tunnel");
                let params = HandshakeParams {
                    transport_max_frame: tunnel.max_frame_size(),
                    config: ConnConfig::default(),
                    principal,
                    authorizer: Arc::new(AllowEveryone),
                    local_endpoint: Endpoint::new("", ""),
                };
                let Ok(inner) = Conn::accept(Box::new(tunnel), params).await else {
                    return;
                };
                while let Ok(flow) = inner.accept_flow().await {
                    tokio::spawn(serve_flow(flow));
                }
            });
        }
    });
}

async fn serve_flow(mut flow: Flow) {
    let mut mode = [0u8; 1];
    if flow.read_exact(&mut mode).await.is_err() {
        return;
    }
    match &mode {
        b"s" => sink(flow).await,
        _ => echo(flow).await,
    }
}

/// The setup of both cases: a server reachable directly and one reachable
/// only through a proxy; the client; the endpoints to dial.
struct Setup {
    client: Manager,
    direct: Endpoint,
    tunnel: Endpoint,
    proxied: Endpoint,
    apart: Endpoint,
    _proxies: [Proxy; 2],
    _servers: [Manager; 4],
}

/// A proxy (started on `runtime`, or the current one) and a server that
/// listens only through it; the server's proxied endpoint.
async fn behind_a_proxy(runtime: Option<tokio::runtime::Handle>) -> (Proxy, Manager, Endpoint) {
    let mut config = ProxyConfig::listening_on(&["tcp/127.0.0.1:0"]).expect("config");
    config.allow_listen = Some(vec![BlessingPattern::all()]);
    let start = async move {
        let manager = Manager::builder(Principal::with_self_blessing("proxy").expect("p")).build();
        Proxy::start(manager, config).await.expect("proxy")
    };
    let proxy = match runtime {
        Some(rt) => rt.spawn(start).await.expect("proxy task"),
        None => start.await,
    };
    let proxy_ep = proxy.endpoints()[0].clone();
    let hidden = Manager::builder(Principal::with_self_blessing("hidden").expect("p")).build();
    serve(&hidden);
    let handle = hidden
        .proxy_listen("bench", &proxy_ep)
        .await
        .expect("proxy_listen");
    let proxied = handle.endpoints()[0].clone();
    (proxy, hidden, proxied)
}

async fn setup(apart: tokio::runtime::Handle) -> Setup {
    let direct_server =
        Manager::builder(Principal::with_self_blessing("direct").expect("p")).build();
    let direct = direct_server
        .listen("tcp", "127.0.0.1:0")
        .await
        .expect("listen")
        .endpoint()
        .clone();
    serve(&direct_server);

    let tunnel_server =
        Manager::builder(Principal::with_self_blessing("tunnel").expect("p")).build();
    let tunnel = tunnel_server
        .listen("tcp", "127.0.0.1:0")
        .await
        .expect("listen")
        .endpoint()
        .clone();
    serve_tunnels(&tunnel_server);

    let (proxy, hidden, proxied) = behind_a_proxy(None).await;
    let (apart_proxy, apart_hidden, apart) = behind_a_proxy(Some(apart)).await;

    let client = Manager::builder(Principal::with_self_blessing("client").expect("p"))
        .dial_only()
        .build();
    Setup {
        client,
        direct,
        tunnel,
        proxied,
        apart,
        _proxies: [proxy, apart_proxy],
        _servers: [direct_server, tunnel_server, hidden, apart_hidden],
    }
}

/// How the client reaches the server.
#[derive(Clone, Copy)]
enum Route {
    /// Its own connection to the server.
    Direct,
    /// An end-to-end connection inside a flow of a direct connection to
    /// the server: the layering of a proxied connection without the proxy.
    Tunnel,
    /// Through the proxy, on the same two worker threads as client and
    /// servers.
    Proxied,
    /// Through a proxy on a runtime of its own (two more worker threads),
    /// as if it were another process.
    Apart,
}

async fn open(setup: &Setup, route: Route, mode: &[u8]) -> Flow {
    let client = &setup.client;
    let ep = match route {
        Route::Direct => &setup.direct,
        Route::Tunnel => &setup.tunnel,
        Route::Proxied => &setup.proxied,
        Route::Apart => &setup.apart,
    };
    let mut flow = client
        .dial(ep, Arc::new(AllowEveryone), Duration::ZERO)
        .await
        .expect("dial");
    if let Route::Tunnel = route {
        let tunnel = FlowConn::new(flow).expect("tunnel");
        let params = HandshakeParams {
            transport_max_frame: tunnel.max_frame_size(),
            config: ConnConfig::default(),
            principal: client.principal().clone(),
            authorizer: Arc::new(AllowEveryone),
            local_endpoint: Endpoint::new("", ""),
        };
        let inner = Conn::dial(Box::new(tunnel), params, ep.clone())
            .await
            .expect("inner handshake");
        flow = inner.open_flow(FlowOptions::default()).expect("flow");
    }
    flow.write_all(mode).await.expect("mode");
    flow
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let proxy_rt = runtime();
    let setup = rt.block_on(setup(proxy_rt.handle().clone()));
    let routes = [
        ("direct", Route::Direct),
        ("tunnel", Route::Tunnel),
        ("proxied", Route::Proxied),
        ("proxied-apart", Route::Apart),
    ];

    let mut group = c.benchmark_group("proxy/throughput");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, route) in routes {
        let mut flow = Some(rt.block_on(open(&setup, route, b"s")));
        group.bench_function(BenchmarkId::new(name, CHUNK), |b| {
            b.iter_custom(|iters| {
                let mut f = flow.take().expect("flow lost in an earlier iteration");
                let (f, elapsed) = rt
                    .block_on(rt.spawn(async move {
                        let message = vec![0x5au8; CHUNK];
                        let start = Instant::now();
                        f.write_all(&(iters * CHUNK as u64).to_be_bytes())
                            .await
                            .expect("write");
                        for _ in 0..iters {
                            f.write_all(&message).await.expect("write");
                        }
                        let mut ack = [0u8; 1];
                        f.read_exact(&mut ack).await.expect("ack");
                        (f, start.elapsed())
                    }))
                    .expect("client task");
                flow = Some(f);
                elapsed
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("proxy/rtt64");
    group.throughput(Throughput::Elements(1));
    for (name, route) in routes {
        let mut flow = Some(rt.block_on(open(&setup, route, b"e")));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut f = flow.take().expect("flow lost in an earlier iteration");
                let (f, elapsed) = rt
                    .block_on(rt.spawn(async move {
                        let message = [0x33u8; SMALL];
                        let mut back = [0u8; SMALL];
                        let start = Instant::now();
                        for _ in 0..iters {
                            f.write_all(&message).await.expect("write");
                            f.read_exact(&mut back).await.expect("echo");
                        }
                        (f, start.elapsed())
                    }))
                    .expect("client task");
                flow = Some(f);
                elapsed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
