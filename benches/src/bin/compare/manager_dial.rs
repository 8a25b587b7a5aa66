//! `manager-dial`: what an application pays to get a flow from flow's
//! `Manager` — on a cached connection, and on a new one (connect +
//! handshake + channel binding) — next to a fresh tcp + Noise XX + ed25519
//! handshake (the libp2p stack) in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flow::auth::AllowEveryone;
use flow::security::Principal;
use flow_manager::Manager;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cases::{Outcome, Params, STREAMS, percentile_us};
use crate::systems::{
    Behaviour, BoxStream, Credentials, Dialer, Result, Server, System, TAG_ECHO, serve_tagged,
};

/// Runs the case for `system` (flow-tcp through a Manager, or yamux-noise).
pub(crate) async fn run(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    match system {
        System::FlowTcp => flow_manager_dials(p).await,
        _ => plain_dials(system, creds, p).await,
    }
}

async fn flow_manager_dials(p: &Params) -> Result<Outcome> {
    let server = Manager::builder(Principal::with_self_blessing("server")?).build();
    let endpoint = server
        .listen("tcp", "127.0.0.1:0")
        .await?
        .endpoint()
        .clone();
    tokio::spawn({
        let server = server.clone();
        async move {
            // The same server every system gets.
            while let Ok(flow) = server.accept().await {
                tokio::spawn(serve_tagged(Box::new(flow)));
            }
        }
    });
    let client = Manager::builder(Principal::with_self_blessing("client")?)
        .dial_only()
        .build();
    let auth = Arc::new(AllowEveryone);
    // Cold: every dial makes a new connection (the last one is closed).
    let warm_up = (p.handshake_count / 10).clamp(5, 100);
    let mut start = Instant::now();
    for i in 0..warm_up + p.handshake_count {
        if i == warm_up {
            start = Instant::now();
        }
        let flow = client.dial(&endpoint, auth.clone(), Duration::ZERO).await?;
        flow.conn().close("next dial is cold");
    }
    let cold = p.handshake_count as f64 / start.elapsed().as_secs_f64();
    // Cached: a flow on the existing connection, with a 1-byte round trip
    // (as for yamux-noise below).
    let mut keep: BoxStream = Box::new(client.dial(&endpoint, auth.clone(), Duration::ZERO).await?);
    echo_one_byte(&mut keep).await?;
    let mut times = Vec::with_capacity(p.iters);
    for _ in 0..200 + p.iters {
        let t = Instant::now();
        let mut flow: BoxStream =
            Box::new(client.dial(&endpoint, auth.clone(), Duration::ZERO).await?);
        echo_one_byte(&mut flow).await?;
        times.push(t.elapsed());
    }
    times.drain(..200);
    times.sort();
    client.close().await;
    server.close().await;
    Ok(Outcome::default()
        .figure("cold_per_s", cold)
        .figure("cached_p50_us", percentile_us(&times, 0.5))
        .figure("cached_p99_us", percentile_us(&times, 0.99)))
}

async fn plain_dials(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let server = Server::start(system, Behaviour::Tagged, creds, STREAMS).await?;
    let dialer = Dialer::new(system, creds, STREAMS)?;
    let warm_up = (p.handshake_count / 10).clamp(5, 100);
    let mut start = Instant::now();
    for i in 0..warm_up + p.handshake_count {
        if i == warm_up {
            start = Instant::now();
        }
        dialer.connect(&server.addr).await?.close();
    }
    let cold = p.handshake_count as f64 / start.elapsed().as_secs_f64();
    let client = dialer.connect(&server.addr).await?;
    let mut times = Vec::with_capacity(p.iters);
    for _ in 0..200 + p.iters {
        let t = Instant::now();
        let mut stream = client.open().await?;
        echo_one_byte(&mut stream).await?;
        times.push(t.elapsed());
    }
    times.drain(..200);
    times.sort();
    client.close();
    Ok(Outcome::default()
        .figure("cold_per_s", cold)
        .figure("cached_p50_us", percentile_us(&times, 0.5))
        .figure("cached_p99_us", percentile_us(&times, 0.99)))
}

/// Asks the tagged server for an echo and has one byte echoed.
async fn echo_one_byte(stream: &mut BoxStream) -> Result<()> {
    stream.write_all(&[TAG_ECHO, b'x']).await?;
    let mut one = [0u8; 1];
    stream.read_exact(&mut one).await?;
    Ok(())
}
