//! Through one proxy versus direct, in the same run, over tcp on loopback.
//!
//! ```text
//! cargo bench -p flow-benches --bench proxy [-- --rounds N --bytes N --iters N --workers N --quick]
//! ```
//!
//! Cases, for each way of reaching the server:
//!
//! - throughput: one new flow, the client writing 64 KiB messages
//!   (`write_all`) to a server that drains them and acks the end; MB/s of
//!   payload (default 256 MiB per run).
//! - rtt64: one new flow, a 64-byte message and its echo, one after the
//!   other (default 5,000 round trips after 500 unmeasured); the median
//!   and the 99th percentile.
//!
//! Ways (`Route`): `direct`, the client dials the server's own tcp
//! endpoint; `tunnel`, an end-to-end connection inside a flow of a direct
//! connection to the server (the layering of a proxied connection, without
//! the proxy); `proxied`, the server listens nowhere but through a
//! `flow_manager::proxy::Proxy` (`Manager::proxy_listen`) and the client
//! dials the proxied endpoint; `proxied-apart`, the same with the proxy on
//! a runtime of its own, as if it were another process. Every way uses the
//! same `Manager` API.
//!
//! Like the `compare` binary, every way runs in turn and the rounds repeat
//! (A B C D A B C D ...), so load from elsewhere on the machine falls on
//! all of them; figures are medians over rounds. Clients, servers and the
//! proxy run as tasks of one tokio runtime with two worker threads (the
//! `proxied-apart` proxy on two more; `--workers` changes both), and one
//! allocator (mimalloc) serves everything. With one worker no hop crosses
//! threads, which separates the work a hop costs from the price of waking
//! another thread.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo, sink};
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

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Application write size of the throughput case.
const CHUNK: usize = 64 * 1024;
/// Message size of the round-trip case.
const SMALL: usize = 64;
/// Round trips before measuring.
const WARM_UP: usize = 500;

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
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

/// How much work each run does.
struct Params {
    rounds: usize,
    bytes: u64,
    iters: usize,
    workers: usize,
}

impl Params {
    /// From the command line (`cargo bench` adds `--bench`, ignored).
    fn from_args() -> Params {
        let mut p = Params {
            rounds: 5,
            bytes: 256 << 20,
            iters: 5_000,
            workers: 2,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("{arg} needs a number"))
            };
            match arg.as_str() {
                "--rounds" => p.rounds = value() as usize,
                "--bytes" => p.bytes = value(),
                "--iters" => p.iters = value() as usize,
                "--workers" => p.workers = (value() as usize).max(1),
                "--quick" => {
                    p.rounds = 2;
                    p.bytes = 32 << 20;
                    p.iters = 1_000;
                }
                _ => {}
            }
        }
        p
    }
}

/// MB/s (10^6 bytes) of `bytes` written through a new flow on `route`.
async fn throughput(setup: &Setup, route: Route, bytes: u64) -> f64 {
    let mut f = open(setup, route, b"s").await;
    let message = vec![0x5au8; CHUNK];
    let chunks = bytes.div_ceil(CHUNK as u64);
    let start = Instant::now();
    f.write_all(&(chunks * CHUNK as u64).to_be_bytes())
        .await
        .expect("write");
    for _ in 0..chunks {
        f.write_all(&message).await.expect("write");
    }
    let mut ack = [0u8; 1];
    f.read_exact(&mut ack).await.expect("ack");
    let elapsed = start.elapsed();
    (chunks * CHUNK as u64) as f64 / elapsed.as_secs_f64() / 1e6
}

/// Sorted round-trip times of `iters` 64-byte echoes on a new flow.
async fn round_trips(setup: &Setup, route: Route, iters: usize) -> Vec<Duration> {
    let mut f = open(setup, route, b"e").await;
    let message = [0x33u8; SMALL];
    let mut back = [0u8; SMALL];
    let mut times = Vec::with_capacity(iters);
    for i in 0..WARM_UP + iters {
        let start = Instant::now();
        f.write_all(&message).await.expect("write");
        f.read_exact(&mut back).await.expect("echo");
        if i >= WARM_UP {
            times.push(start.elapsed());
        }
    }
    times.sort_unstable();
    times
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let p = Params::from_args();
    let rt = runtime(p.workers);
    let proxy_rt = runtime(p.workers);
    let setup = rt.block_on(setup(proxy_rt.handle().clone()));
    let setup = Arc::new(setup);
    let routes = [
        ("direct", Route::Direct),
        ("tunnel", Route::Tunnel),
        ("proxied", Route::Proxied),
        ("proxied-apart", Route::Apart),
    ];
    // Per route: throughput per round, (median, p99) rtt per round.
    let mut mbps: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let mut rtt50: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let mut rtt99: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for round in 0..p.rounds {
        for (i, (name, route)) in routes.iter().enumerate() {
            let s = setup.clone();
            let (route, bytes, iters) = (*route, p.bytes, p.iters);
            // Client work runs as a task, like the servers and the proxy.
            let (rate, times) = rt
                .block_on(rt.spawn(async move {
                    let rate = throughput(&s, route, bytes).await;
                    let times = round_trips(&s, route, iters).await;
                    (rate, times)
                }))
                .expect("client task");
            let (m, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
            eprintln!(
                "round {} {name:>13}: {rate:8.1} MB/s   rtt64 median {:6.1} us  p99 {:6.1} us",
                round + 1,
                us(m),
                us(p99)
            );
            mbps[i].push(rate);
            rtt50[i].push(us(m));
            rtt99[i].push(us(p99));
        }
    }
    println!(
        "{} rounds, {} MiB and {} round trips per run, {} worker thread(s)",
        p.rounds,
        p.bytes >> 20,
        p.iters,
        p.workers
    );
    let base_rate = median(&mut mbps[0]);
    let base_rtt = median(&mut rtt50[0]);
    println!(
        "| way | throughput (MB/s) | vs direct | rtt64 median (us) | vs direct | rtt64 p99 (us) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, (name, _)) in routes.iter().enumerate() {
        let rate = median(&mut mbps[i]);
        let rtt = median(&mut rtt50[i]);
        let p99 = median(&mut rtt99[i]);
        println!(
            "| {name} | {rate:.0} | {:.0}% | {rtt:.1} | {:.2}x | {p99:.1} |",
            100.0 * rate / base_rate,
            rtt / base_rtt
        );
    }
}
