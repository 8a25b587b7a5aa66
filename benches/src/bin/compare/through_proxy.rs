//! `proxy`: one flow through a `flowproxyd`-style proxy versus the same
//! flow on a direct connection, in the same run. `flow-tcp` is the direct
//! way (the client's Manager dials the server's own tcp endpoint);
//! `flow-proxy` is the proxied way (the server listens only through a
//! proxy, `Manager::proxy_listen`, and the client dials the endpoint the
//! proxy gave it). The proxy runs on the same two worker threads as client
//! and server, as everything else here does.

use std::sync::Arc;
use std::time::Duration;

use flow::auth::AllowEveryone;
use flow::naming::Endpoint;
use flow::security::{BlessingPattern, Principal};
use flow_manager::Manager;
use flow_manager::proxy::{Proxy, ProxyConfig};

use crate::cases::{
    Outcome, Params, download, mb_per_s, percentile_us, round_trips_and_parks, start_echo,
};
use crate::systems::{BoxStream, Result, System, serve_tagged};

/// Share of `--bytes` the proxy case moves per run (a quarter: the case
/// runs twice per round and must keep the full run under five minutes).
const BYTES_SHARE: u64 = 4;

/// Runs the case for `system` (`flow-tcp`: direct; `flow-proxy`: through
/// one proxy).
pub(crate) async fn run(system: System, p: &Params) -> Result<Outcome> {
    let server = Manager::builder(Principal::with_self_blessing("server")?).build();
    tokio::spawn({
        let server = server.clone();
        async move {
            while let Ok(flow) = server.accept().await {
                tokio::spawn(serve_tagged(Box::new(flow)));
            }
        }
    });
    let (endpoint, proxy) = match system {
        System::FlowProxy => {
            let (endpoint, proxy) = listen_through_proxy(&server).await?;
            (endpoint, Some(proxy))
        }
        _ => {
            let listening = server.listen("tcp", "127.0.0.1:0").await?;
            (listening.endpoint().clone(), None)
        }
    };
    let client = Manager::builder(Principal::with_self_blessing("client")?)
        .dial_only()
        .build();
    let outcome = measure(&client, &endpoint, p).await;
    client.close().await;
    server.close().await;
    if let Some(proxy) = proxy {
        proxy.shutdown(Duration::ZERO).await;
    }
    outcome
}

/// Starts a proxy on loopback that lets anyone listen through it, and has
/// `server` listen through it; the endpoint clients dial.
async fn listen_through_proxy(server: &Manager) -> Result<(Endpoint, Proxy)> {
    let mut config = ProxyConfig::listening_on(&["tcp/127.0.0.1:0"])?;
    config.allow_listen = Some(vec![BlessingPattern::all()]);
    let proxy_manager = Manager::builder(Principal::with_self_blessing("proxy")?).build();
    let proxy = Proxy::start(proxy_manager, config).await?;
    let proxy_endpoint = proxy
        .endpoints()
        .first()
        .cloned()
        .ok_or("the proxy listens nowhere")?;
    let listening = server.proxy_listen("compare", &proxy_endpoint).await?;
    let endpoint = listening
        .endpoints()
        .first()
        .cloned()
        .ok_or("the proxy gave no endpoint")?;
    Ok((endpoint, proxy))
}

async fn measure(client: &Manager, endpoint: &Endpoint, p: &Params) -> Result<Outcome> {
    let auth = Arc::new(AllowEveryone);
    let bytes = (p.bytes / BYTES_SHARE).max(1);
    let mut bulk: BoxStream = Box::new(client.dial(endpoint, auth.clone(), Duration::ZERO).await?);
    let start = std::time::Instant::now();
    let got = download(&mut bulk, bytes, None).await?;
    let elapsed = start.elapsed();
    drop(bulk);

    let mut echo = start_echo(Box::new(client.dial(endpoint, auth, Duration::ZERO).await?)).await?;
    let (samples, parks_per_rt) = round_trips_and_parks(&mut echo, p.iters).await?;
    drop(echo);
    Ok(Outcome::default()
        .figure("mb_per_s", mb_per_s(got, elapsed))
        .figure("p50_us", percentile_us(&samples, 0.50))
        .figure("p99_us", percentile_us(&samples, 0.99))
        .figure("parks_per_rt", parks_per_rt)
        .note("bytes", got)
        .note("samples", samples.len()))
}
