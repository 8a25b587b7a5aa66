//! `flowctl listen`: prints where it is reachable, then echoes flows or
//! connects the first one to stdin/stdout.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::Args;
use flow::Result;
use flow::conn::Flow;
use flow::naming::Endpoint;
use flow::security::BlessingPattern;
use flow_manager::Manager;
use tokio::io::AsyncWriteExt;

use crate::common;

/// Arguments of `flowctl listen`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["echo", "stdio"])))]
pub(crate) struct ListenArgs {
    /// Credentials directory (default: an ephemeral principal).
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Listen on TCP at ADDR (e.g. `127.0.0.1:0`). The default when nothing
    /// else is given.
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<String>,
    /// Listen on WebSocket at ADDR.
    #[arg(long, value_name = "ADDR")]
    ws: Vec<String>,
    /// Listen on a Unix socket at PATH.
    #[arg(long, value_name = "PATH")]
    unix: Vec<String>,
    /// Listen through the proxy at ENDPOINT (`@1@...` or `tcp/HOST:PORT`).
    #[arg(long, value_name = "ENDPOINT")]
    proxy: Vec<String>,
    /// Serve only peers holding a blessing matching PATTERN.
    #[arg(long, value_name = "PATTERN")]
    allow: Vec<String>,
    /// Echo every accepted flow.
    #[arg(long)]
    echo: bool,
    /// Connect the first accepted flow to stdin/stdout, then exit.
    #[arg(long)]
    stdio: bool,
}

/// Runs `flowctl listen`.
pub(crate) async fn run(args: ListenArgs) -> Result<()> {
    let principal = common::principal(args.creds.as_deref(), "flowctl-listener")?;
    let allow = args
        .allow
        .iter()
        .map(|p| BlessingPattern::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let manager = common::manager(principal, false);
    let mut tcp = args.tcp.clone();
    if tcp.is_empty() && args.ws.is_empty() && args.unix.is_empty() && args.proxy.is_empty() {
        tcp.push("127.0.0.1:0".into());
    }
    for (proto, addrs) in [("tcp", &tcp), ("ws", &args.ws), ("unix", &args.unix)] {
        for addr in addrs {
            manager
                .listen(proto, addr)
                .await
                .map_err(|e| e.context(format!("listening on {proto}/{addr}")))?;
        }
    }
    let mut keepers = Vec::new();
    for p in &args.proxy {
        let ep = Endpoint::parse(p)?;
        keepers.push(manager.keep_proxy_listening(p, &ep));
    }
    tokio::spawn(print_endpoints(manager.clone()));
    loop {
        let flow = manager.accept().await?;
        if !allowed(&flow, &allow) {
            tracing::warn!(peer = ?flow.conn().authorized_peer().names, "refusing a flow from a peer not allowed");
            flow.close();
            continue;
        }
        if args.echo {
            tokio::spawn(echo(flow));
        } else {
            let result = crate::dial::pipe_stdio(flow).await;
            drop(keepers);
            manager.close().await;
            return result;
        }
    }
}

fn allowed(flow: &Flow, allow: &[BlessingPattern]) -> bool {
    allow.is_empty()
        || allow
            .iter()
            .any(|p| p.matched_by(&flow.conn().authorized_peer().names))
}

/// Prints each endpoint once, as soon as it is known.
async fn print_endpoints(manager: Manager) {
    let mut printed = HashSet::new();
    loop {
        let status = manager.status();
        let mut out = tokio::io::stdout();
        for ep in &status.endpoints {
            // The bare routing-id endpoint is not a place to dial.
            if ep.protocol().is_empty() {
                continue;
            }
            let s = ep.to_string();
            if printed.insert(s.clone()) {
                let _ = out.write_all(format!("{s}\n").as_bytes()).await;
                let _ = out.flush().await;
            }
        }
        status.changed().await;
    }
}

async fn echo(flow: Flow) {
    let (mut r, mut w) = flow.into_split();
    loop {
        match r.read_msg().await {
            Ok(Some(chunk)) => {
                if w.write_msg(&[&chunk]).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "echo flow failed");
                return;
            }
        }
    }
    w.close_write();
    let _ = w.flush().await;
}
