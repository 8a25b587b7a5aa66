//! `flowproxyd`: the flow proxy daemon. Services that cannot accept
//! connections listen through it; clients reach them through it, end to
//! end.
//!
//! When ready it prints each endpoint it listens on to stdout, one per line
//! (the full `@1@...` form), and flushes. Logs go to stderr (`RUST_LOG`,
//! default `info`). SIGTERM or ctrl-c starts a graceful shutdown (a second
//! one exits at once). Errors are one line on stderr and a non-zero exit.

// Peer input must never panic this code: no unwrap, expect or panic
// outside tests (a peer's bad bytes get a typed error instead).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::unreachable
    )
)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use flow::naming::Endpoint;
use flow::security::{BlessingPattern, Principal};
use flow::{Error, ErrorKind, Result};
use flow_manager::Manager;
use flow_manager::proxy::{Proxy, ProxyConfig, ProxyLimits};

/// The flow proxy: lets servers behind firewalls listen through it and
/// relays clients' end-to-end connections to them without reading them.
#[derive(Parser, Debug)]
#[command(name = "flowproxyd", version, about)]
struct Args {
    /// Where to listen, as PROTOCOL/ADDRESS (e.g. tcp/127.0.0.1:8100,
    /// ws/127.0.0.1:8101; port 0 picks one). Repeatable.
    #[arg(long = "listen", value_name = "PROTO/ADDR")]
    listen: Vec<String>,

    /// Credentials directory (key, blessings, roots). Without it the proxy
    /// runs as an ephemeral principal blessed by itself as --name.
    #[arg(long, value_name = "DIR")]
    creds: Option<PathBuf>,

    /// The self-blessing of the ephemeral principal (without --creds).
    #[arg(long, value_name = "NAME", default_value = "flowproxyd")]
    name: String,

    /// Blessing pattern of servers allowed to listen through the proxy.
    /// Repeatable. Default: the proxy's own blessing names and their
    /// extensions.
    #[arg(long = "allow-listen", value_name = "PATTERN")]
    allow_listen: Vec<String>,

    /// Blessing pattern of clients allowed to dial through the proxy.
    /// Repeatable. Default: everyone.
    #[arg(long = "allow-dial", value_name = "PATTERN")]
    allow_dial: Vec<String>,

    /// Most servers listening through the proxy at once.
    #[arg(long, value_name = "N", default_value_t = ProxyLimits::default().max_servers)]
    max_servers: usize,

    /// Most routing ids one key may hold at once.
    #[arg(long, value_name = "N", default_value_t = ProxyLimits::default().max_servers_per_identity)]
    max_servers_per_identity: usize,

    /// Most proxied flows open at once to one server.
    #[arg(long, value_name = "N", default_value_t = ProxyLimits::default().max_flows_per_server)]
    max_flows_per_server: usize,

    /// Bytes after which a proxied flow is cut (both ways together).
    #[arg(long, value_name = "BYTES")]
    max_flow_bytes: Option<u64>,

    /// Time after which a proxied flow is cut (e.g. 30s, 10m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    max_flow_duration: Option<Duration>,

    /// An upstream proxy to listen through (a chain), as an endpoint or
    /// PROTOCOL/ADDRESS. Repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    via: Vec<String>,

    /// Serve /metrics (Prometheus text) and /healthz on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// How long a graceful shutdown lets proxied flows finish.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad arguments");
            eprintln!("flowproxyd: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowproxyd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(args));
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowproxyd: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

fn patterns(specs: &[String]) -> Result<Vec<BlessingPattern>> {
    specs.iter().map(|s| BlessingPattern::parse(s)).collect()
}

fn endpoints(specs: &[String], what: &str) -> Result<Vec<Endpoint>> {
    specs
        .iter()
        .map(|s| Endpoint::parse(s).map_err(|e| e.context(format!("{what} {s:?}"))))
        .collect()
}

fn config(args: &Args) -> Result<ProxyConfig> {
    let listen = endpoints(&args.listen, "--listen")?;
    let via = endpoints(&args.via, "--via")?;
    if listen.is_empty() && via.is_empty() {
        return Err(Error::bad_arg(
            "nowhere to listen: give --listen PROTO/ADDR or --via ENDPOINT",
        ));
    }
    Ok(ProxyConfig {
        listen,
        allow_listen: if args.allow_listen.is_empty() {
            None
        } else {
            Some(patterns(&args.allow_listen)?)
        },
        allow_dial: patterns(&args.allow_dial)?,
        limits: ProxyLimits {
            max_servers: args.max_servers,
            max_servers_per_identity: args.max_servers_per_identity,
            max_flows_per_server: args.max_flows_per_server,
            max_bytes_per_flow: args.max_flow_bytes,
            max_flow_duration: args.max_flow_duration,
        },
        via,
        metrics: args.metrics,
    })
}

async fn run(args: Args) -> Result<ExitCode> {
    let config = config(&args)?;
    let principal = match &args.creds {
        Some(dir) => Principal::load_dir(dir)
            .map_err(|e| e.context(format!("loading credentials from {}", dir.display())))?,
        None => Principal::with_self_blessing(&args.name)?,
    };
    let mut signals = Signals::new()?;
    let manager = Manager::builder(principal).build();
    let names = manager.principal().default_blessings().names();
    let proxy = Proxy::start(manager, config).await?;
    let endpoints = proxy.endpoints();
    if endpoints.is_empty() {
        proxy.shutdown(Duration::ZERO).await;
        return Err(Error::new(
            ErrorKind::Proxy,
            "listening nowhere: no upstream proxy answered and no --listen given",
        ));
    }
    for up in proxy.upstreams() {
        if let Some(err) = &up.error {
            tracing::warn!(via = %up.via, error = %err, "not listening through upstream proxy yet");
        }
    }
    if let Some(addr) = proxy.metrics_addr() {
        tracing::info!(address = %addr, "metrics listening");
    }
    tracing::info!(routing_id = %proxy.routing_id(), ?names, "flowproxyd ready");
    {
        let mut out = std::io::stdout().lock();
        for ep in &endpoints {
            writeln!(out, "{ep}").map_err(|e| io("writing endpoints", e))?;
        }
        out.flush().map_err(|e| io("writing endpoints", e))?;
    }
    signals.next().await;
    tracing::info!(grace = ?args.grace, "shutting down");
    tokio::select! {
        () = proxy.shutdown(args.grace) => {
            tracing::info!("shut down");
            Ok(ExitCode::SUCCESS)
        }
        () = signals.next() => {
            tracing::warn!("second signal; exiting without draining");
            Ok(ExitCode::from(130))
        }
    }
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Network, format!("{what}: {e}"), e)
}

/// SIGTERM and ctrl-c (SIGINT).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(|e| io("watching SIGTERM", e))?,
            int: signal(SignalKind::interrupt()).map_err(|e| io("watching SIGINT", e))?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
