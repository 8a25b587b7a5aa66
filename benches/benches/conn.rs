//! The connection end to end, over the `memory` and `tcp` transports of
//! `flow-protocols`:
//!
//! - `conn/throughput/<transport>/N`: one flow, the application writing
//!   N-byte messages (`write_all`), a reader draining them; one iteration is
//!   one message.
//! - `conn/open-close/<transport>`: open a flow, echo one byte, close it.
//! - `conn/handshake/<transport>`: dial, handshake and channel binding of a
//!   new connection (the acceptor side runs concurrently).
//!
//! Everything runs on a two-worker tokio runtime, as the `compare` binary
//! does.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo, sink};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flow::auth::AllowEveryone;
use flow::conn::{Conn, ConnConfig, Flow, FlowOptions, HandshakeParams};
use flow::naming::{Endpoint, RoutingId};
use flow::security::Principal;
use flow::transport::Listener;
use flow_protocols::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Application write sizes measured.
const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];

/// Transports measured.
const TRANSPORTS: [&str; 2] = ["memory", "tcp"];

const TIMEOUT: Duration = Duration::from_secs(10);

fn params(principal: &Principal, protocol: &str) -> HandshakeParams {
    HandshakeParams {
        config: ConnConfig::default(),
        principal: principal.clone(),
        authorizer: Arc::new(AllowEveryone),
        local_endpoint: Endpoint::new(protocol, "bench").with_routing_id(RoutingId::random()),
        transport_max_frame: flow_protocols::MAX_FRAME_SIZE,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A listener whose accepted connections run `serve` on every flow.
struct Server {
    listener: Arc<dyn Listener>,
    principal: Principal,
    protocol: &'static str,
}

impl Server {
    async fn start(registry: &Registry, protocol: &'static str) -> Server {
        let address = if protocol == "memory" {
            ""
        } else {
            "127.0.0.1:0"
        };
        let listener: Arc<dyn Listener> =
            Arc::from(registry.listen(protocol, address).await.expect("listen"));
        Server {
            listener,
            principal: Principal::with_self_blessing("server").expect("principal"),
            protocol,
        }
    }

    /// Accepts connections forever; each flow goes to `serve`.
    fn accept_loop<F, Fut>(&self, serve: F)
    where
        F: Fn(Flow) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = self.listener.clone();
        let params = params(&self.principal, self.protocol);
        tokio::spawn(async move {
            while let Ok(transport) = listener.accept().await {
                let params = params.clone();
                let serve = serve.clone();
                tokio::spawn(async move {
                    let Ok(conn) = Conn::accept(transport, params).await else {
                        return;
                    };
                    while let Ok(flow) = conn.accept_flow().await {
                        tokio::spawn(serve(flow));
                    }
                });
            }
        });
    }

    async fn dial(&self, registry: &Registry, principal: &Principal) -> Conn {
        let address = self.listener.local_addr();
        let transport = registry
            .dial(self.protocol, &address, TIMEOUT)
            .await
            .expect("dial");
        Conn::dial(
            transport,
            params(principal, self.protocol),
            Endpoint::new(self.protocol, address),
        )
        .await
        .expect("handshake")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.listener.close();
    }
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let registry = Registry::with_defaults();
    let client = Principal::with_self_blessing("client").expect("principal");
    let mut group = c.benchmark_group("conn/throughput");
    for protocol in TRANSPORTS {
        let (conn, server) = rt.block_on(async {
            let server = Server::start(&registry, protocol).await;
            server.accept_loop(sink);
            (server.dial(&registry, &client).await, server)
        });
        for size in SIZES {
            let mut flow = Some(conn.open_flow(FlowOptions::default()).expect("flow"));
            let message = vec![0x33u8; size];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(protocol, size), |b| {
                b.iter_custom(|iters| {
                    let mut f = flow.take().expect("flow lost in an earlier iteration");
                    let (f, elapsed) = rt.block_on(async {
                        let start = Instant::now();
                        f.write_all(&(iters * size as u64).to_be_bytes())
                            .await
                            .expect("write");
                        for _ in 0..iters {
                            f.write_all(&message).await.expect("write");
                        }
                        let mut ack = [0u8; 1];
                        f.read_exact(&mut ack).await.expect("ack");
                        (f, start.elapsed())
                    });
                    flow = Some(f);
                    elapsed
                });
            });
        }
        conn.close("done");
        drop(server);
    }
    group.finish();
}

fn open_close(c: &mut Criterion) {
    let rt = runtime();
    let registry = Registry::with_defaults();
    let client = Principal::with_self_blessing("client").expect("principal");
    let mut group = c.benchmark_group("conn/open-close");
    group.throughput(Throughput::Elements(1));
    for protocol in TRANSPORTS {
        let (conn, server) = rt.block_on(async {
            let server = Server::start(&registry, protocol).await;
            server.accept_loop(echo);
            (server.dial(&registry, &client).await, server)
        });
        group.bench_function(protocol, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut one = [0u8; 1];
                    for _ in 0..iters {
                        let mut flow = conn.open_flow(FlowOptions::default()).expect("flow");
                        flow.write_all(b"x").await.expect("write");
                        flow.read_exact(&mut one).await.expect("echo");
                        flow.shutdown().await.expect("close");
                    }
                    start.elapsed()
                })
            });
        });
        conn.close("done");
        drop(server);
    }
    group.finish();
}

fn handshake(c: &mut Criterion) {
    let rt = runtime();
    let registry = Registry::with_defaults();
    let client = Principal::with_self_blessing("client").expect("principal");
    let mut group = c.benchmark_group("conn/handshake");
    group.throughput(Throughput::Elements(1));
    for protocol in TRANSPORTS {
        let server = rt.block_on(async {
            let server = Server::start(&registry, protocol).await;
            server.accept_loop(echo);
            server
        });
        group.bench_function(protocol, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let conn = server.dial(&registry, &client).await;
                        conn.close("done");
                    }
                    start.elapsed()
                })
            });
        });
        drop(server);
    }
    group.finish();
}

criterion_group!(benches, throughput, open_close, handshake);
criterion_main!(benches);
