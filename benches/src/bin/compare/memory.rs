//! The idle-memory case, in two child processes of this binary: one serves
//! and holds streams, the other dials and opens them. Each reads its own
//! resident set size before and after the streams are opened, so the
//! figure is not blurred by the other side or by memory the parent's earlier
//! cases left in the allocator.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cases::{Outcome, open_idle};
use crate::systems::{Behaviour, Credentials, Dialer, Holder, Result, Server, System};

/// Extra stream capacity beyond the count, for the warm-up stream.
const SPARE_STREAMS: usize = 64;
/// Streams being opened at once.
const PARALLEL_OPENS: usize = 256;

/// This process's resident set size in bytes (`VmRSS` of
/// `/proc/self/status`, which is `statm`'s resident pages times the page
/// size).
pub(crate) fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// Waits until the parent closes this process's standard input.
async fn parent_done() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

/// Child: serves `system`, holds every stream, and prints `LISTEN addr`,
/// then `HELD delta count` once `count` streams beyond the first are held.
pub(crate) async fn child_serve(system: System, count: usize, creds: &Credentials) -> Result<()> {
    let baseline = Arc::new(Mutex::new(0u64));
    let holder = Holder::new(move |held| {
        if held == 1 {
            *baseline.lock().unwrap_or_else(|e| e.into_inner()) = rss_bytes().unwrap_or(0);
        } else if held == count + 1 {
            let before = *baseline.lock().unwrap_or_else(|e| e.into_inner());
            let after = rss_bytes().unwrap_or(0);
            println!("HELD {} {count}", after as i64 - before as i64);
        }
    });
    holder.reserve(count + 1);
    let server = Server::start(
        system,
        Behaviour::Hold(Arc::new(holder)),
        creds,
        count + SPARE_STREAMS,
    )
    .await?;
    println!("LISTEN {}", server.addr);
    parent_done().await;
    Ok(())
}

/// Child: dials `addr`, opens one stream, then `count` more, and prints
/// `OPENED delta count` for the `count`.
pub(crate) async fn child_dial(
    system: System,
    count: usize,
    addr: &str,
    creds: &Credentials,
) -> Result<()> {
    let dialer = Dialer::new(system, creds, count + SPARE_STREAMS)?;
    let client = dialer.connect(addr).await?;
    let mut first = Vec::with_capacity(1);
    open_idle(&client, 1, 1, &mut first).await?;
    let mut streams = Vec::with_capacity(count);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = rss_bytes()?;
    open_idle(&client, count, PARALLEL_OPENS, &mut streams).await?;
    // Let the connection's tasks finish what the opens queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_bytes()?;
    println!("OPENED {} {count}", after as i64 - before as i64);
    parent_done().await;
    drop((first, streams));
    Ok(())
}

/// Lines a child prints, read on a thread.
struct Lines {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(command: &mut Command) -> Result<Lines> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child without stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Lines { child, lines })
    }

    /// The words after `word` on the next line that starts with it.
    fn expect(&self, word: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| format!("child did not print {word} within {timeout:?}"))?;
            let mut words = line.split_whitespace().map(str::to_string);
            if words.next().as_deref() == Some(word) {
                return Ok(words.collect());
            }
        }
    }

    /// Closes the child's input (it exits) and reaps it.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn per_stream(words: &[String], count: usize) -> Result<f64> {
    let delta: i64 = words.first().ok_or("no figure")?.parse()?;
    Ok(delta as f64 / count as f64)
}

/// Parent: runs both children for `system` with `count` idle streams.
pub(crate) fn measure(system: System, count: usize, creds: &Credentials) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let (key, value) = creds.quic().to_env();
    let count_arg = count.to_string();
    let server = Lines::spawn(
        Command::new(&exe)
            .args(["--child-serve", system.name(), "--count", &count_arg])
            .env(key, &value),
    )?;
    let result = (|| {
        let addr = server
            .expect("LISTEN", Duration::from_secs(30))?
            .into_iter()
            .next()
            .ok_or("LISTEN without an address")?;
        let dialer = Lines::spawn(
            Command::new(&exe)
                .args([
                    "--child-dial",
                    system.name(),
                    "--count",
                    &count_arg,
                    "--addr",
                    &addr,
                ])
                .env(key, &value),
        )?;
        let opened = dialer.expect("OPENED", Duration::from_secs(240));
        let held = server.expect("HELD", Duration::from_secs(30));
        dialer.finish();
        let dialer_bytes = per_stream(&opened?, count)?;
        let acceptor_bytes = per_stream(&held?, count)?;
        Ok(Outcome::default()
            .figure("bytes_per_stream", dialer_bytes.max(acceptor_bytes))
            .figure("dialer_bytes_per_stream", dialer_bytes)
            .figure("acceptor_bytes_per_stream", acceptor_bytes)
            .note("streams", count))
    })();
    server.finish();
    result
}
