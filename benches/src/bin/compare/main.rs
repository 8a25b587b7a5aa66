//! `compare`: flow side by side with the Rust stacks people use instead,
//! in one process, interleaved.
//!
//! ```text
//! cargo run --release -p flow-benches --features compare --bin compare -- \
//!     [--case NAME]... [--system NAME]... [--bytes N] [--iters N] \
//!     [--count N] [--rounds N] [--quick] [--json]
//! ```
//!
//! Systems: `flow-tcp`, `flow-unix`, `yamux-noise` (TCP + snow Noise XX with
//! ed25519-signed static keys + yamux, as libp2p assembles them), `yamux`
//! (over plain TCP), `quinn` (QUIC on loopback) and `tcp` (one connection
//! per stream: the ceiling), and `flow-proxy` (flow through one proxy,
//! only in the `proxy` case, against `flow-tcp` direct). Cases:
//! `throughput`, `throughput-many`, `rtt`, `rtt-under-load`, `open`,
//! `idle-memory`, `handshake`, `manager-dial`, `proxy`.
//!
//! For each case, every selected system runs in turn, and the round repeats
//! (A B C A B C ...); figures are medians over rounds. Everything, clients
//! and servers, runs as tasks of one multi-threaded tokio runtime with two
//! worker threads, and one allocator
//! (mimalloc) serves every system. `idle-memory` runs in two child
//! processes of this binary, one per side, each measuring its own RSS.
//!
//! `--json` prints one object per (case, system) on its own line, e.g.
//! `{"case":"throughput","system":"flow-tcp","mb_per_s":2450.1,...}`;
//! `ratio_to_flow` is flow-tcp's main figure divided by the system's.

mod cases;
mod manager_dial;
mod memory;
mod noise;
mod quic;
mod report;
mod systems;
mod through_proxy;
mod yamux_link;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cases::{Case, Params};
use report::{Row, Rows};
use systems::{Credentials, Result, System};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Worker threads of the runtime every system runs on.
const WORKERS: usize = 2;

const USAGE: &str = "\
usage: compare [--case NAME]... [--system NAME]... [--bytes N] [--iters N]
               [--count N] [--rounds N] [--quick] [--json]

cases:   throughput throughput-many rtt rtt-under-load open idle-memory handshake
         manager-dial proxy
systems: flow-tcp flow-unix yamux-noise yamux quinn tcp flow-proxy

  --bytes N    bytes moved by the throughput cases (default 1 GiB; the
               proxy case moves a quarter of it)
  --iters N    round trips measured by rtt (default 10000); rtt-under-load
               runs round trips for a fixed time (2 s, --quick 0.5 s)
  --count N    streams for open and idle-memory, connections for handshake
               (defaults 20000, 100000, 1000)
  --rounds N   rounds of each case (default 3; idle-memory 1)
  --quick      small figures and one round: well under a minute
  --json       one JSON object per (case, system) per line
";

/// What the command line asked for.
struct Args {
    cases: Vec<Case>,
    systems: Vec<System>,
    params: Params,
    rounds: Option<usize>,
    quick: bool,
    json: bool,
    child: Option<Child>,
}

/// A hidden role of a child process of the idle-memory case.
enum Child {
    Serve(System),
    Dial(System, String),
}

fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{flag}: not a number: {value}").into())
}

fn parse_args() -> Result<Args> {
    let mut cases = Vec::new();
    let mut systems = Vec::new();
    let mut bytes = None;
    let mut iters = None;
    let mut count = None;
    let mut rounds = None;
    let mut idle_ms = None;
    let mut quick = false;
    let mut json = false;
    let mut serve = None;
    let mut dial = None;
    let mut addr = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--case" => {
                let name = args.next().ok_or("--case needs a name")?;
                cases.push(Case::parse(&name).ok_or_else(|| format!("unknown case {name}"))?);
            }
            "--system" => {
                let name = args.next().ok_or("--system needs a name")?;
                systems.push(System::parse(&name).ok_or_else(|| format!("unknown system {name}"))?);
            }
            "--bytes" => bytes = Some(number::<u64>("--bytes", args.next())?),
            "--iters" => iters = Some(number::<usize>("--iters", args.next())?),
            "--count" => count = Some(number::<usize>("--count", args.next())?),
            "--rounds" => rounds = Some(number::<usize>("--rounds", args.next())?),
            "--quick" => quick = true,
            "--json" => json = true,
            "--idle-ms" => idle_ms = Some(number::<u64>("--idle-ms", args.next())?),
            "--child-serve" => serve = args.next(),
            "--child-dial" => dial = args.next(),
            "--addr" => addr = args.next(),
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }
    if cases.is_empty() {
        cases = Case::ALL.to_vec();
    }
    if systems.is_empty() {
        systems = System::ALL.to_vec();
    }
    cases.dedup();
    systems.dedup();
    let mut params = if quick {
        Params {
            bytes: 128 << 20,
            many_streams: 64,
            iters: 2_000,
            load_time: Duration::from_millis(500),
            open_count: 3_000,
            idle_count: 10_000,
            idle_time: Duration::from_secs(5),
            handshake_count: 200,
        }
    } else {
        Params {
            bytes: 1 << 30,
            many_streams: 64,
            iters: 10_000,
            load_time: Duration::from_secs(2),
            open_count: 20_000,
            idle_count: 100_000,
            idle_time: Duration::from_secs(20),
            handshake_count: 1_000,
        }
    };
    if let Some(bytes) = bytes {
        params.bytes = bytes.max(params.many_streams as u64);
    }
    if let Some(iters) = iters {
        params.iters = iters.max(1);
    }
    if let Some(count) = count {
        let count = count.max(1);
        params.open_count = count;
        params.idle_count = count;
        params.handshake_count = count;
    }
    if let Some(ms) = idle_ms {
        params.idle_time = Duration::from_millis(ms);
    }
    let system_arg = |name: Option<String>| -> Result<Option<System>> {
        name.map(|n| System::parse(&n).ok_or_else(|| format!("unknown system {n}").into()))
            .transpose()
    };
    let child = match (system_arg(serve)?, system_arg(dial)?) {
        (Some(system), _) => Some(Child::Serve(system)),
        (None, Some(system)) => Some(Child::Dial(
            system,
            addr.ok_or("--child-dial needs --addr")?,
        )),
        (None, None) => None,
    };
    Ok(Args {
        cases,
        systems,
        params,
        rounds,
        quick,
        json,
        child,
    })
}

fn rounds_of(case: Case, args: &Args) -> usize {
    if case == Case::IdleMemory {
        return 1;
    }
    match (args.rounds, args.quick) {
        (Some(rounds), _) => rounds.max(1),
        (None, true) => 1,
        (None, false) => 3,
    }
}

fn brief(outcome: &cases::Outcome) -> String {
    outcome
        .figures
        .iter()
        .map(|(name, value)| format!("{name}={value:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `work` as a task on the runtime's workers (not on this thread, as
/// `block_on` would), so that client and server code share the same two
/// threads.
fn on_worker<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    runtime.block_on(async { tokio::spawn(work).await? })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()?;
    let creds = Arc::new(Credentials::generate()?);
    match &args.child {
        Some(Child::Serve(system)) => {
            let (system, count) = (*system, args.params.idle_count);
            return on_worker(&runtime, async move {
                memory::child_serve(system, count, &creds).await
            });
        }
        Some(Child::Dial(system, addr)) => {
            let (system, addr, params) = (*system, addr.clone(), args.params.clone());
            return on_worker(&runtime, async move {
                memory::child_dial(system, &params, &addr, &creds).await
            });
        }
        None => {}
    }

    let started = Instant::now();
    let mut rows = Rows::new();
    for &case in &args.cases {
        for round in 0..rounds_of(case, &args) {
            for &system in &args.systems {
                let row: &mut Row = rows.entry((case, system)).or_default();
                if let Some(reason) = cases::skip_reason(case, system) {
                    row.skipped = Some(reason.to_string());
                    continue;
                }
                let outcome = if case == Case::IdleMemory {
                    memory::measure(system, &args.params, &creds)
                } else {
                    // Let the previous run's connections finish closing.
                    std::thread::sleep(Duration::from_millis(100));
                    let (creds, params) = (creds.clone(), args.params.clone());
                    on_worker(&runtime, async move {
                        cases::run(case, system, &creds, &params).await
                    })
                };
                match outcome {
                    Ok(outcome) => {
                        eprintln!(
                            "[{:>6.1}s] {} {} round {}: {}",
                            started.elapsed().as_secs_f64(),
                            case.name(),
                            system.name(),
                            round + 1,
                            brief(&outcome)
                        );
                        row.runs.push(outcome);
                    }
                    Err(e) => {
                        eprintln!(
                            "{} {} round {}: failed: {e}",
                            case.name(),
                            system.name(),
                            round + 1
                        );
                        row.error = Some(e.to_string());
                    }
                }
            }
        }
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    if args.json {
        report::print_json(&rows);
    } else {
        report::print_table(&rows);
        report::print_targets(&rows);
    }
    Ok(())
}
