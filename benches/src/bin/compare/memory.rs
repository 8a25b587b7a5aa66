//! The idle-memory case, in two child processes of this binary: one serves
//! and holds streams, the other dials and opens them. Each reads its own
//! resident set size before and after the streams are opened, so the
//! figure is not blurred by the other side or by memory the parent's earlier
//! cases left in the allocator.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cases::{Outcome, Params, open_idle};
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

/// Child: serves `system` and holds every stream. Prints `LISTEN addr`;
/// then, for each `REPORT` line on its input, `HELD delta count` for the
/// streams held beyond the first (the first is the baseline). Exits when its
/// input closes.
pub(crate) async fn child_serve(system: System, count: usize, creds: &Credentials) -> Result<()> {
    let baseline = Arc::new(Mutex::new(None::<u64>));
    let held_count = Arc::new(AtomicUsize::new(0));
    let holder = {
        let baseline = baseline.clone();
        let held_count = held_count.clone();
        Holder::new(move |held| {
            if held == 1 {
                *baseline.lock().unwrap_or_else(|e| e.into_inner()) = rss_bytes().ok();
            }
            held_count.store(held, Ordering::SeqCst);
        })
    };
    holder.reserve(count + 1);
    let server = Server::start(
        system,
        Behaviour::Hold(Arc::new(holder)),
        creds,
        count + SPARE_STREAMS,
    )
    .await?;
    println!("LISTEN {}", server.addr);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        if line.trim() == "REPORT" {
            let before = baseline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(0);
            let after = rss_bytes()?;
            let held = held_count.load(Ordering::SeqCst).saturating_sub(1);
            println!("HELD {} {held}", after as i64 - before as i64);
        }
    }
    Ok(())
}

/// Child: dials `addr`, opens one stream, then up to `idle_count` more
/// (for at most `idle_time`), and prints `OPENED delta count seconds`.
/// Exits when its input closes.
pub(crate) async fn child_dial(
    system: System,
    params: &Params,
    addr: &str,
    creds: &Credentials,
) -> Result<()> {
    let count = params.idle_count;
    let dialer = Dialer::new(system, creds, count + SPARE_STREAMS)?;
    let client = dialer.connect(addr).await?;
    let mut first = Vec::with_capacity(1);
    open_idle(&client, 1, 1, None, &mut first).await?;
    let mut streams = Vec::with_capacity(count);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = rss_bytes()?;
    let start = Instant::now();
    let deadline = start + params.idle_time;
    open_idle(&client, count, PARALLEL_OPENS, Some(deadline), &mut streams).await?;
    let seconds = start.elapsed().as_secs_f64();
    // Let the connection's tasks finish what the opens queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_bytes()?;
    println!(
        "OPENED {} {} {seconds:.2}",
        after as i64 - before as i64,
        streams.len()
    );
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
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

    /// Writes one line to the child's input.
    fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().ok_or("child input closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
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

/// Bytes per stream from a child's `delta count ...` words.
fn per_stream(words: &[String]) -> Result<(f64, usize)> {
    let delta: i64 = words.first().ok_or("no figure")?.parse()?;
    let count: usize = words.get(1).ok_or("no count")?.parse()?;
    if count == 0 {
        return Err("no stream was opened".into());
    }
    Ok((delta as f64 / count as f64, count))
}

/// Parent: runs both children for `system`.
pub(crate) fn measure(system: System, params: &Params, creds: &Credentials) -> Result<Outcome> {
    let exe = std::env::current_exe()?;
    let (key, value) = creds.quic().to_env();
    let count_arg = params.idle_count.to_string();
    let idle_ms = params.idle_time.as_millis().to_string();
    let mut server = Lines::spawn(
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
                    "--idle-ms",
                    &idle_ms,
                    "--addr",
                    &addr,
                ])
                .env(key, &value),
        )?;
        let limit = params.idle_time + Duration::from_secs(60);
        let opened = dialer.expect("OPENED", limit);
        let held = opened.as_ref().map_err(|e| e.to_string()).and_then(|_| {
            server.say("REPORT").map_err(|e| e.to_string())?;
            server
                .expect("HELD", Duration::from_secs(30))
                .map_err(|e| e.to_string())
        });
        dialer.finish();
        let opened = opened?;
        let (dialer_bytes, count) = per_stream(&opened)?;
        let (acceptor_bytes, held_count) = per_stream(&held?)?;
        let seconds: f64 = opened
            .get(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        let mut outcome = Outcome::default()
            .figure("bytes_per_stream", dialer_bytes.max(acceptor_bytes))
            .figure("dialer_bytes_per_stream", dialer_bytes)
            .figure("acceptor_bytes_per_stream", acceptor_bytes)
            .figure("open_seconds", seconds)
            .note("streams", count);
        if held_count != count {
            outcome = outcome.note("acceptor_streams", held_count);
        }
        if count < params.idle_count {
            outcome = outcome.note(
                "note",
                format!(
                    "opened {count} of {} streams in the {:?} limit",
                    params.idle_count, params.idle_time
                ),
            );
        }
        Ok(outcome)
    })();
    server.finish();
    result
}
