//! The cases, each run for one system on a fresh server and connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

use crate::systems::{
    Behaviour, BoxStream, CHUNK, Client, Credentials, Dialer, Result, Server, System, TAG_DOWNLOAD,
    TAG_ECHO, TAG_SINK,
};

/// A case of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Case {
    /// One stream, bytes one way.
    Throughput,
    /// Many streams on one connection sharing the bytes.
    ThroughputMany,
    /// 64-byte request/response on one stream.
    Rtt,
    /// The same while another stream of the connection carries bulk data.
    RttUnderLoad,
    /// Stream open + 1-byte echo + close.
    Open,
    /// Memory per idle open stream.
    IdleMemory,
    /// New authenticated connections.
    Handshake,
    /// Flows from flow's Manager: on a cached connection and a new one.
    ManagerDial,
    /// One flow through a proxy versus direct.
    Proxy,
}

impl Case {
    /// Every case, in run order.
    pub(crate) const ALL: [Case; 9] = [
        Case::Throughput,
        Case::ThroughputMany,
        Case::Rtt,
        Case::RttUnderLoad,
        Case::Open,
        Case::IdleMemory,
        Case::Handshake,
        Case::ManagerDial,
        Case::Proxy,
    ];

    /// The name used on the command line and in the output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Throughput => "throughput",
            Case::ThroughputMany => "throughput-many",
            Case::Rtt => "rtt",
            Case::RttUnderLoad => "rtt-under-load",
            Case::Open => "open",
            Case::IdleMemory => "idle-memory",
            Case::Handshake => "handshake",
            Case::ManagerDial => "manager-dial",
            Case::Proxy => "proxy",
        }
    }

    /// The case called `name`.
    pub(crate) fn parse(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The figure the ratio to flow is taken of.
    pub(crate) fn main_figure(self) -> &'static str {
        match self {
            Case::Throughput | Case::ThroughputMany | Case::Proxy => "mb_per_s",
            Case::Rtt => "p50_us",
            Case::RttUnderLoad => "p99_us",
            Case::Open | Case::Handshake => "per_s",
            Case::IdleMemory => "bytes_per_stream",
            Case::ManagerDial => "cold_per_s",
        }
    }
}

/// How much work each case does.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// Bytes moved by the throughput cases.
    pub(crate) bytes: u64,
    /// Streams sharing the bytes in `throughput-many`.
    pub(crate) many_streams: usize,
    /// Round trips measured by `rtt`.
    pub(crate) iters: usize,
    /// How long the loaded round trips of `rtt-under-load` run.
    pub(crate) load_time: Duration,
    /// Streams opened by `open`.
    pub(crate) open_count: usize,
    /// Idle streams held by `idle-memory`.
    pub(crate) idle_count: usize,
    /// Longest time `idle-memory` spends opening streams (a system that
    /// opens them slower is measured with fewer).
    pub(crate) idle_time: Duration,
    /// Connections made by `handshake`.
    pub(crate) handshake_count: usize,
}

/// What one run of a case for one system gave.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// Named figures.
    pub(crate) figures: Vec<(&'static str, f64)>,
    /// Facts about how the figure was obtained.
    pub(crate) notes: Vec<(&'static str, serde_json::Value)>,
}

impl Outcome {
    /// Adds a figure.
    pub(crate) fn figure(mut self, name: &'static str, value: f64) -> Self {
        self.figures.push((name, value));
        self
    }

    /// Adds a note.
    pub(crate) fn note(mut self, name: &'static str, value: impl Into<serde_json::Value>) -> Self {
        self.notes.push((name, value.into()));
        self
    }
}

/// Why a system cannot do a case, if it cannot.
pub(crate) fn skip_reason(case: Case, system: System) -> Option<&'static str> {
    match (case, system) {
        (Case::IdleMemory, System::Tcp) => {
            Some("one TCP connection per stream: its cost is kernel socket memory, not process RSS")
        }
        (Case::Proxy, System::FlowTcp | System::FlowProxy) => None,
        (Case::Proxy, _) => Some("flow through one proxy versus flow direct (flow-tcp)"),
        (_, System::FlowProxy) => Some(crate::systems::PROXY_ONLY),
        (Case::ManagerDial, System::FlowTcp | System::YamuxNoise) => None,
        (Case::ManagerDial, _) => {
            Some("flow's Manager against tcp + Noise XX only (the Manager is flow's)")
        }
        _ => None,
    }
}

/// Default stream limit of a connection in the in-process cases.
pub(crate) const STREAMS: usize = 1024;

pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

pub(crate) fn percentile_us(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len() - 1);
    sorted[index].as_secs_f64() * 1e6
}

/// A server and a connected client.
struct Setup {
    client: Client,
    _server: Server,
}

async fn setup(system: System, creds: &Credentials) -> Result<Setup> {
    let server = Server::start(system, Behaviour::Tagged, creds, STREAMS).await?;
    let dialer = Dialer::new(system, creds, STREAMS)?;
    let client = dialer.connect(&server.addr).await?;
    Ok(Setup {
        client,
        _server: server,
    })
}

/// Runs `case` for `system` once (idle-memory runs elsewhere, in child
/// processes).
pub(crate) async fn run(
    case: Case,
    system: System,
    creds: &Credentials,
    p: &Params,
) -> Result<Outcome> {
    match case {
        Case::Throughput => throughput(system, creds, p).await,
        Case::ThroughputMany => throughput_many(system, creds, p).await,
        Case::Rtt => rtt(system, creds, p).await,
        Case::RttUnderLoad => rtt_under_load(system, creds, p).await,
        Case::Open => open(system, creds, p).await,
        Case::Handshake => handshake(system, creds, p).await,
        Case::ManagerDial => crate::manager_dial::run(system, creds, p).await,
        Case::Proxy => crate::through_proxy::run(system, p).await,
        Case::IdleMemory => Err("idle-memory runs in child processes".into()),
    }
}

/// Asks the server for `bytes` on `stream` and reads them; adds each read
/// to `progress`. Returns the bytes read.
pub(crate) async fn download(
    stream: &mut BoxStream,
    bytes: u64,
    progress: Option<&AtomicU64>,
) -> Result<u64> {
    let mut request = [0u8; 9];
    request[0] = TAG_DOWNLOAD;
    request[1..].copy_from_slice(&bytes.to_be_bytes());
    stream.write_all(&request).await?;
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut got = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if let Some(progress) = progress {
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    if got != bytes {
        return Err(format!("asked for {bytes} bytes, got {got}").into());
    }
    Ok(got)
}

async fn throughput(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let s = setup(system, creds).await?;
    let mut stream = s.client.open().await?;
    let start = Instant::now();
    let got = download(&mut stream, p.bytes, None).await?;
    let elapsed = start.elapsed();
    drop(stream);
    s.client.close();
    Ok(Outcome::default().figure("mb_per_s", mb_per_s(got, elapsed)))
}

async fn throughput_many(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let s = setup(system, creds).await?;
    let n = p.many_streams;
    let per_stream = p.bytes / n as u64;
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let first_done = Arc::new(AtomicBool::new(false));
    let snapshot = Arc::new(std::sync::Mutex::new(Vec::new()));
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(s.client.open().await?);
    }
    let mut tasks = Vec::with_capacity(n);
    for (i, mut stream) in streams.into_iter().enumerate() {
        let progress = progress.clone();
        let first_done = first_done.clone();
        let snapshot = snapshot.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let result = download(&mut stream, per_stream, Some(&progress[i])).await;
            if result.is_ok() && !first_done.swap(true, Ordering::AcqRel) {
                let now: Vec<u64> = progress.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = now;
            }
            drop(stream);
            result
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let elapsed = start.elapsed();
    s.client.close();
    let at_first = snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let slowest = at_first.iter().copied().min().unwrap_or(0);
    Ok(Outcome::default()
        .figure("mb_per_s", mb_per_s(total, elapsed))
        .figure("slowest_share", slowest as f64 / per_stream as f64)
        .note("streams", n))
}

/// Measures 64-byte round trips on `stream` (already tagged for echo):
/// `iters` of them, or as many as fit before `deadline`; returns them
/// sorted.
pub(crate) async fn round_trips(
    stream: &mut BoxStream,
    iters: usize,
    deadline: Option<Instant>,
) -> Result<Vec<Duration>> {
    let request = [7u8; 64];
    let mut response = [0u8; 64];
    let mut samples = Vec::with_capacity(iters);
    while deadline.is_some() || samples.len() < iters {
        let start = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        let now = Instant::now();
        samples.push(now - start);
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
    }
    samples.sort();
    Ok(samples)
}

/// Round trips like [`round_trips`], and how many times per round trip a
/// worker thread of the runtime went to sleep: one per socket hop is the
/// floor (the thread waits for the peer); more means wake-ups that woke
/// the other worker for nothing, each a futex round on this machine.
pub(crate) async fn round_trips_and_parks(
    stream: &mut BoxStream,
    iters: usize,
) -> Result<(Vec<Duration>, f64)> {
    let parks_before = worker_parks();
    let samples = round_trips(stream, iters, None).await?;
    let parks = worker_parks() - parks_before;
    let per_rt = parks as f64 / samples.len().max(1) as f64;
    Ok((samples, per_rt))
}

/// Times the current runtime's worker threads have parked, summed.
fn worker_parks() -> u64 {
    let metrics = tokio::runtime::Handle::current().metrics();
    (0..metrics.num_workers())
        .map(|w| metrics.worker_park_count(w))
        .sum()
}

async fn echo_stream(client: &Client) -> Result<BoxStream> {
    start_echo(client.open().await?).await
}

/// Asks the tagged server to echo `stream`, then warms it up: the stream is
/// open on both sides and the path is hot.
pub(crate) async fn start_echo(mut stream: BoxStream) -> Result<BoxStream> {
    stream.write_all(&[TAG_ECHO]).await?;
    round_trips(&mut stream, 200, None).await?;
    Ok(stream)
}

async fn rtt(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let s = setup(system, creds).await?;
    let mut stream = echo_stream(&s.client).await?;
    let (samples, parks_per_rt) = round_trips_and_parks(&mut stream, p.iters).await?;
    drop(stream);
    s.client.close();
    Ok(Outcome::default()
        .figure("p50_us", percentile_us(&samples, 0.50))
        .figure("p99_us", percentile_us(&samples, 0.99))
        .figure("parks_per_rt", parks_per_rt)
        .note("samples", samples.len()))
}

/// Bulk data on its own stream until `stop`; returns bytes and the time
/// from the first write to the server's acknowledgement of the end.
async fn bulk(mut stream: BoxStream, stop: Arc<AtomicBool>) -> Result<(u64, Duration)> {
    let chunk = vec![0x3cu8; CHUNK];
    let start = Instant::now();
    stream.write_all(&[TAG_SINK]).await?;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        stream.write_all(&chunk).await?;
        sent += CHUNK as u64;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    Ok((sent, start.elapsed()))
}

async fn rtt_under_load(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let s = setup(system, creds).await?;
    let mut stream = echo_stream(&s.client).await?;

    // Loaded: bulk starts, settles, then round trips run beside it for the
    // whole load time (however fast they are, so the bulk figure always
    // covers the same span).
    let stop = Arc::new(AtomicBool::new(false));
    let loaded = tokio::spawn(bulk(s.client.open().await?, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let samples = round_trips(&mut stream, p.iters, Some(Instant::now() + p.load_time)).await?;
    stop.store(true, Ordering::Relaxed);
    let (loaded_bytes, loaded_time) = loaded.await??;

    // Solo: the same bulk on the same connection, alone, as long.
    let stop = Arc::new(AtomicBool::new(false));
    let solo = tokio::spawn(bulk(s.client.open().await?, stop.clone()));
    tokio::time::sleep(loaded_time).await;
    stop.store(true, Ordering::Relaxed);
    let (solo_bytes, solo_time) = solo.await??;

    drop(stream);
    s.client.close();
    let bulk_mb = mb_per_s(loaded_bytes, loaded_time);
    let solo_mb = mb_per_s(solo_bytes, solo_time);
    Ok(Outcome::default()
        .figure("p50_us", percentile_us(&samples, 0.50))
        .figure("p99_us", percentile_us(&samples, 0.99))
        .figure("bulk_mb_per_s", bulk_mb)
        .figure("bulk_solo_mb_per_s", solo_mb)
        .figure("bulk_share_of_solo", bulk_mb / solo_mb)
        .note("samples", samples.len()))
}

/// Streams opened at once in `open`'s second measurement.
const OPEN_IN_FLIGHT: usize = 32;

async fn open(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let s = setup(system, creds).await?;
    let warm_up = (p.open_count / 10).clamp(10, 1000);
    let mut one = [0u8; 1];
    let mut start = Instant::now();
    let mut parks_before = worker_parks();
    for i in 0..warm_up + p.open_count {
        if i == warm_up {
            start = Instant::now();
            parks_before = worker_parks();
        }
        let mut stream = s.client.open().await?;
        stream.write_all(&[TAG_ECHO, b'x']).await?;
        stream.read_exact(&mut one).await?;
        stream.shutdown().await?;
    }
    let elapsed = start.elapsed();
    let parks = worker_parks() - parks_before;
    // The same, OPEN_IN_FLIGHT streams at a time on the one connection.
    let start = Instant::now();
    futures::stream::iter(0..p.open_count)
        .map(|_| async {
            let mut stream = s.client.open().await?;
            stream.write_all(&[TAG_ECHO, b'x']).await?;
            let mut one = [0u8; 1];
            stream.read_exact(&mut one).await?;
            stream.shutdown().await?;
            Ok::<_, crate::systems::BoxError>(())
        })
        .buffer_unordered(OPEN_IN_FLIGHT)
        .try_for_each(|()| futures::future::ready(Ok(())))
        .await?;
    let parallel = p.open_count as f64 / start.elapsed().as_secs_f64();
    s.client.close();
    let mut outcome = Outcome::default()
        .figure("per_s", p.open_count as f64 / elapsed.as_secs_f64())
        .figure("parks_per_op", parks as f64 / p.open_count as f64)
        .figure("parallel_per_s", parallel);
    if system == System::Tcp {
        outcome = outcome.note("note", "a new TCP connection per stream");
    }
    Ok(outcome)
}

async fn handshake(system: System, creds: &Credentials, p: &Params) -> Result<Outcome> {
    let server = Server::start(system, Behaviour::Tagged, creds, STREAMS).await?;
    let dialer = Dialer::new(system, creds, STREAMS)?;
    let per_s = handshake_rate(system, &dialer, &server.addr, p).await?;
    let mut outcome = Outcome::default()
        .figure("per_s", per_s)
        .note("authenticated", system.authenticates());
    if system.is_flow() {
        // The loop above resumes (each connection leaves a ticket for the
        // next); this one signs every time, like a first contact.
        let full = Dialer::new(system, creds, STREAMS)?.without_resumption();
        outcome = outcome.figure(
            "full_per_s",
            handshake_rate(system, &full, &server.addr, p).await?,
        );
    }
    drop(server);
    Ok(outcome)
}

/// Connections set up (and closed) per second, one after another.
async fn handshake_rate(system: System, dialer: &Dialer, addr: &str, p: &Params) -> Result<f64> {
    let warm_up = (p.handshake_count / 10).clamp(5, 100);
    let mut start = Instant::now();
    for i in 0..warm_up + p.handshake_count {
        if i == warm_up {
            start = Instant::now();
        }
        let client = dialer.connect(addr).await?;
        if system == System::Tcp {
            // Plain TCP has no connection apart from its stream: connect.
            drop(client.open().await?);
        }
        client.close();
    }
    Ok(p.handshake_count as f64 / start.elapsed().as_secs_f64())
}

/// Opens up to `count` idle streams on `client` (each sends one byte and
/// reads one back), `parallel` at a time, and adds them to `into`; starts no
/// new one after `deadline`.
pub(crate) async fn open_idle(
    client: &Client,
    count: usize,
    parallel: usize,
    deadline: Option<Instant>,
    into: &mut Vec<BoxStream>,
) -> Result<()> {
    futures::stream::iter(0..count)
        .take_while(|_| futures::future::ready(deadline.is_none_or(|d| Instant::now() < d)))
        .map(|_| async {
            let mut stream = client.open().await?;
            stream.write_all(b"H").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok::<_, crate::systems::BoxError>(stream)
        })
        .buffer_unordered(parallel)
        .try_for_each(|stream| {
            into.push(stream);
            futures::future::ready(Ok(()))
        })
        .await
}
