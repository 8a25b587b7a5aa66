//! `flowctl demo`: a proxy, a server that listens only through it, and a
//! client that dials through it, all on loopback.

use clap::Args;
use flow::Result;

/// Arguments of `flowctl demo`.
#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Bytes to move through each flow.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    bytes: u64,
}

/// Runs the demo.
pub(crate) async fn run(_args: DemoArgs) -> Result<()> {
    Err(flow::Error::bad_state("the demo needs the proxy server"))
}
