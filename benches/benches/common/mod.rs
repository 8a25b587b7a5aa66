//! Flow services the benches' servers run.

use flow::conn::Flow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads batches: an 8-byte length, then that many bytes, then answers one
/// byte.
pub(crate) async fn sink(mut flow: Flow) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut len = [0u8; 8];
        if flow.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut left = u64::from_be_bytes(len);
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            match flow.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n as u64,
            }
        }
        if flow.write_all(b"k").await.is_err() {
            return;
        }
    }
}

/// Echoes until the end of the flow.
pub(crate) async fn echo(mut flow: Flow) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = flow.read(&mut buf).await {
        if n == 0 || flow.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = flow.shutdown().await;
}
