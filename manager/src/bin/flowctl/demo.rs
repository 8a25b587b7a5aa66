//! `flowctl demo`: a proxy, a server that listens only through it, and a
//! client that dials through it, all on loopback; then the same directly,
//! for comparison.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use flow::auth::PeerAuthorizer;
use flow::conn::Flow;
use flow::naming::Endpoint;
use flow::security::{BlessingPattern, Principal};
use flow::{Error, Result};
use flow_manager::Manager;
use flow_manager::proxy::{Proxy, ProxyConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `flowctl demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Bytes to move through each flow.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    bytes: u64,
    /// Round trips to time.
    #[arg(long, default_value_t = 200)]
    pings: usize,
}

const CHUNK: usize = 64 * 1024;

/// A principal blessed by `root` as `root:ext`, trusting `root`.
fn member(root: &Principal, ext: &str) -> Result<Principal> {
    let p = Principal::new();
    let b = root.bless(p.public_key(), &root.default_blessings(), ext, Vec::new())?;
    p.blessing_store().set_default(b.clone())?;
    p.blessing_store().set(b, BlessingPattern::all())?;
    p.add_to_roots(&root.default_blessings())?;
    Ok(p)
}

fn step(text: impl AsRef<str>) {
    println!("==> {}", text.as_ref());
}

/// Runs the demo.
pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    step("making identities: a root \"demo\" blesses a proxy, a server and a client");
    let root = Principal::with_self_blessing("demo")?;
    let proxy_id = member(&root, "proxy")?;
    let server_id = member(&root, "server")?;
    let client_id = member(&root, "client")?;

    step("starting the proxy on loopback");
    let proxy_manager = Manager::builder(proxy_id).build();
    let mut config = ProxyConfig::listening_on(&["tcp/127.0.0.1:0"])?;
    config.allow_listen = Some(vec![BlessingPattern::parse("demo")?]);
    let proxy = Proxy::start(proxy_manager, config).await?;
    for ep in proxy.endpoints() {
        println!("    proxy listening at {ep}");
    }
    let proxy_ep = proxy
        .endpoints()
        .into_iter()
        .next()
        .ok_or_else(|| Error::bad_state("the proxy listens nowhere"))?;

    step("starting a server that listens only through the proxy");
    let server = Manager::builder(server_id).build();
    let listening = server.proxy_listen("demo-proxy", &proxy_ep).await?;
    let proxied = listening
        .endpoints()
        .first()
        .cloned()
        .ok_or_else(|| Error::bad_state("the proxy gave no endpoint"))?;
    println!("    server reachable at {proxied}");
    tokio::spawn(serve(server.clone()));

    step("client dials the server's proxied endpoint, insisting on demo:server");
    let client = Manager::builder(client_id).dial_only().build();
    let expect_server = crate::common::authorizer(Some("demo:server"))?;
    let through = measure(
        &client,
        &proxied,
        expect_server.clone(),
        &args,
        "through the proxy",
    )
    .await?;

    step("the same, dialing the server directly");
    let direct_ep = server
        .listen("tcp", "127.0.0.1:0")
        .await?
        .endpoint()
        .clone();
    println!("    server also listening at {direct_ep}");
    // A client of its own: the first one's cache would reuse the proxied
    // connection (same server, same routing id).
    let direct_client = Manager::builder(member(&root, "client")?)
        .dial_only()
        .build();
    let direct = measure(
        &direct_client,
        &direct_ep,
        expect_server.clone(),
        &args,
        "direct",
    )
    .await?;

    step("the client's connection closes; it dials again and resumes");
    reconnect(&direct_client, &direct_ep, expect_server).await?;

    step("summary");
    println!(
        "    through the proxy: {:.0} MB/s, round trip p50 {:.0} us",
        through.mb_per_s, through.rtt_p50_us
    );
    println!(
        "    direct:            {:.0} MB/s, round trip p50 {:.0} us",
        direct.mb_per_s, direct.rtt_p50_us
    );
    println!(
        "    the proxied flow ran at {:.0}% of direct throughput; the proxy relayed sealed frames it cannot read",
        100.0 * through.mb_per_s / direct.mb_per_s.max(f64::MIN_POSITIVE)
    );
    let closing = Instant::now();
    tokio::join!(client.close(), direct_client.close(), server.close());
    proxy.shutdown(Duration::from_secs(1)).await;
    tracing::debug!(took = ?closing.elapsed(), "closed everything");
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

struct Figures {
    mb_per_s: f64,
    rtt_p50_us: f64,
}

/// Pings, then moves `args.bytes` through one flow, printing what each
/// side saw.
async fn measure(
    client: &Manager,
    endpoint: &Endpoint,
    authorizer: Arc<dyn PeerAuthorizer>,
    args: &DemoArgs,
    label: &str,
) -> Result<Figures> {
    let dial_start = Instant::now();
    let mut ping = client
        .dial(endpoint, authorizer.clone(), Duration::ZERO)
        .await?;
    ping.write_msg(&[b"P"]).await?;
    let who = read_line(&mut ping).await?;
    println!(
        "    connected {label} in {:.1} ms",
        dial_start.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "    the client sees the server as {:?}",
        ping.conn().authorized_peer().names
    );
    println!("    the server sees the client as {who}");
    let mut rtts = Vec::with_capacity(args.pings);
    for _ in 0..args.pings {
        let t = Instant::now();
        ping.write_msg(&[&[0u8; 64]]).await?;
        let mut got = 0;
        while got < 64 {
            got += ping
                .read_msg()
                .await?
                .ok_or_else(|| Error::network("the server closed the ping flow"))?
                .len();
        }
        rtts.push(t.elapsed());
    }
    ping.close_write();
    rtts.sort();
    let p50 = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
    println!(
        "    64-byte round trip: p50 {:.0} us, connection RTT {:.0} us",
        p50.as_secs_f64() * 1e6,
        ping.conn().rtt().as_secs_f64() * 1e6
    );

    let mut bulk = client.dial(endpoint, authorizer, Duration::ZERO).await?;
    bulk.write_msg(&[b"B"]).await?;
    let bar = ProgressBar::new(args.bytes);
    bar.set_style(
        ProgressStyle::with_template("    [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let chunk = vec![0xabu8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < args.bytes {
        let n = (args.bytes - sent).min(CHUNK as u64) as usize;
        bulk.write_msg(&[&chunk[..n]]).await?;
        sent += n as u64;
        bar.set_position(sent);
    }
    bulk.close_write();
    // The server answers with the byte count once it has everything.
    let count = read_line(&mut bulk).await?;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    if count.trim() != args.bytes.to_string() {
        return Err(Error::network(format!(
            "the server counted {count} bytes, not {}",
            args.bytes
        )));
    }
    let mb_per_s = args.bytes as f64 / elapsed.as_secs_f64() / 1e6;
    println!(
        "    moved {} MiB {label} in {:.2} s: {mb_per_s:.0} MB/s",
        args.bytes / (1024 * 1024),
        elapsed.as_secs_f64()
    );
    Ok(Figures {
        mb_per_s,
        rtt_p50_us: p50.as_secs_f64() * 1e6,
    })
}

/// Closes `client`'s connection to `endpoint`, dials again, and says
/// whether the new handshake resumed (bound the channel with the last
/// connection's ticket instead of signatures).
async fn reconnect(
    client: &Manager,
    endpoint: &Endpoint,
    authorizer: Arc<dyn PeerAuthorizer>,
) -> Result<()> {
    let old = client
        .dial(endpoint, authorizer.clone(), Duration::ZERO)
        .await?
        .conn()
        .clone();
    old.close("demo: reconnecting");
    old.closed().await;
    let start = Instant::now();
    let mut flow = client.dial(endpoint, authorizer, Duration::ZERO).await?;
    flow.write_msg(&[b"P"]).await?;
    let who = read_line(&mut flow).await?;
    flow.close_write();
    println!(
        "    reconnected in {:.1} ms; the server sees the client as {who}",
        start.elapsed().as_secs_f64() * 1e3
    );
    if flow.conn().resumed() {
        println!(
            "    the handshake resumed: both sides proved themselves with the last connection's ticket, no signatures"
        );
    } else {
        println!(
            "    the handshake did not resume (the server had no ticket for this client): both sides signed"
        );
    }
    Ok(())
}

/// Reads what the peer sends until it half-closes or a newline arrives.
async fn read_line(flow: &mut Flow) -> Result<String> {
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await? {
        out.extend_from_slice(&chunk);
        if out.ends_with(b"\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).trim_end().to_string())
}

/// The demo server: a flow starting with `P` gets who-you-are then echoes;
/// one starting with `B` is counted and answered with the count.
async fn serve(server: Manager) {
    while let Ok(flow) = server.accept().await {
        tokio::spawn(async move {
            if let Err(e) = handle(flow).await {
                tracing::debug!(error = %e, "demo flow failed");
            }
        });
    }
}

async fn handle(mut flow: Flow) -> Result<()> {
    let Some(first) = flow.read_msg().await? else {
        return Ok(());
    };
    match first.first() {
        Some(b'P') => {
            let names = format!("{:?}\n", flow.conn().authorized_peer().names);
            flow.write_msg(&[names.as_bytes()]).await?;
            let rest = first.slice(1..);
            if !rest.is_empty() {
                flow.write_msg(&[&rest]).await?;
            }
            while let Some(chunk) = flow.read_msg().await? {
                flow.write_msg(&[&chunk]).await?;
            }
            flow.close_write();
        }
        Some(b'B') => {
            let mut count = (first.len() - 1) as u64;
            while let Some(chunk) = flow.read_msg().await? {
                count += chunk.len() as u64;
            }
            flow.write_msg_and_close(&[format!("{count}\n").as_bytes()])
                .await?;
        }
        _ => flow.close(),
    }
    Ok(())
}
