//! `flowctl dial`: a flow connected to stdin/stdout, like netcat.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use flow::conn::Flow;
use flow::naming::Endpoint;
use flow::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common;

/// Arguments of `flowctl dial`.
#[derive(Args)]
pub(crate) struct DialArgs {
    /// Credentials directory (default: an ephemeral principal).
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Refuse a server none of whose blessings match PATTERN.
    #[arg(long, value_name = "PATTERN")]
    expect: Option<String>,
    /// Where the server is; several endpoints of one server are raced.
    #[arg(required = true, value_name = "ENDPOINT")]
    endpoints: Vec<String>,
}

/// Runs `flowctl dial`.
pub(crate) async fn run(args: DialArgs) -> Result<()> {
    let principal = common::principal(args.creds.as_deref(), "flowctl-dialer")?;
    let manager = common::manager(principal, true);
    let endpoints = args
        .endpoints
        .iter()
        .map(|e| Endpoint::parse(e))
        .collect::<Result<Vec<_>>>()?;
    let authorizer = common::authorizer(args.expect.as_deref())?;
    let flow = manager
        .dial_any(&endpoints, authorizer, Duration::ZERO)
        .await
        .map_err(|e| match (&args.expect, e.kind()) {
            (Some(p), ErrorKind::NotTrusted) => Error::new(
                ErrorKind::NotTrusted,
                format!(
                    "refused: the server does not hold a blessing matching {p} ({})",
                    e.message()
                ),
            ),
            _ => e,
        })?;
    let result = pipe_stdio(flow).await;
    manager.close().await;
    result
}

/// Copies stdin to the flow and the flow to stdout until both directions
/// are closed.
pub(crate) async fn pipe_stdio(flow: Flow) -> Result<()> {
    let (mut reader, mut writer) = flow.into_split();
    let upload = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin
                .read(&mut buf)
                .await
                .map_err(|e| common::io("reading stdin", e))?;
            if n == 0 {
                break;
            }
            writer.write_msg(&[&buf[..n]]).await?;
        }
        writer.close_write();
        writer
            .flush()
            .await
            .map_err(|e| common::io("flushing", e))?;
        Ok::<_, Error>(())
    };
    let download = async move {
        let mut stdout = tokio::io::stdout();
        while let Some(chunk) = reader.read_msg().await? {
            stdout
                .write_all(&chunk)
                .await
                .map_err(|e| common::io("writing stdout", e))?;
            stdout
                .flush()
                .await
                .map_err(|e| common::io("writing stdout", e))?;
        }
        Ok::<_, Error>(())
    };
    let (up, down) = tokio::join!(upload, download);
    up.and(down)
}
