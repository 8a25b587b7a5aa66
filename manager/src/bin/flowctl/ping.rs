//! `flowctl ping`: handshake time and round trips to an echoing listener.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use flow::naming::Endpoint;
use flow::{Error, Result};

use crate::common;

/// Arguments of `flowctl ping`.
#[derive(Args)]
pub(crate) struct PingArgs {
    /// Credentials directory (default: an ephemeral principal).
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Round trips to measure.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Print only the connection line and the summary, not each round trip.
    #[arg(long, short)]
    quiet: bool,
    /// An echoing listener (`flowctl listen --echo`).
    endpoint: String,
}

/// Runs `flowctl ping`.
pub(crate) async fn run(args: PingArgs) -> Result<()> {
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let principal = common::principal(args.creds.as_deref(), "flowctl-ping")?;
    let manager = common::manager(principal, true);
    let start = Instant::now();
    let mut flow = manager
        .dial(&endpoint, common::authorizer(None)?, Duration::ZERO)
        .await?;
    let handshake = start.elapsed();
    println!(
        "connected to {} ({}) in {:.2} ms (connect + handshake)",
        endpoint,
        flow.remote_blessings().names().join(", "),
        ms(handshake)
    );
    let payload = [0x5au8; 64];
    let mut rtts = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let t = Instant::now();
        flow.write_msg(&[&payload]).await?;
        let mut got = 0;
        while got < payload.len() {
            match flow.read_msg().await? {
                Some(chunk) => got += chunk.len(),
                None => {
                    return Err(Error::network(
                        "the listener closed the flow (is it --echo?)",
                    ));
                }
            }
        }
        let rtt = t.elapsed();
        if !args.quiet {
            println!("64 bytes: seq={i} time={:.3} ms", ms(rtt));
        }
        rtts.push(rtt);
    }
    if !rtts.is_empty() {
        rtts.sort();
        let p99 = rtts[(rtts.len() * 99).div_ceil(100) - 1];
        println!(
            "round trips: min {:.3} ms, median {:.3} ms, p99 {:.3} ms ({} samples)",
            ms(rtts[0]),
            ms(rtts[rtts.len() / 2]),
            ms(p99),
            rtts.len()
        );
    }
    // Done with the flow: dropping it ends it at once, so closing the
    // manager does not wait for its drain grace period.
    drop(flow);
    manager.close().await;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
