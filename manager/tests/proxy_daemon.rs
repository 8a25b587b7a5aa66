//! `flowproxyd` as a process: it prints its endpoints when ready, serves
//! servers and clients, metrics, chains with `--via`, fails with one line,
//! and shuts down gracefully on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flow::auth::AllowEveryone;
use flow::naming::Endpoint;
use flow::security::Principal;
use flow_manager::Manager;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{blessed, sample, until, within};

const WAIT: Duration = Duration::from_secs(20);

/// A running `flowproxyd`, killed on drop if still running.
struct Daemon {
    child: Child,
    endpoints: Vec<Endpoint>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `flowproxyd args` and waits for `listeners` endpoints on
    /// stdout.
    fn start(args: &[&str], listeners: usize) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flowproxyd"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flowproxyd");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().push(line);
            }
        });
        let mut endpoints = Vec::new();
        while endpoints.len() < listeners {
            match rx.recv_timeout(WAIT) {
                Ok(line) => endpoints.push(
                    Endpoint::parse(&line)
                        .unwrap_or_else(|e| panic!("stdout line {line:?} is no endpoint: {e}")),
                ),
                Err(e) => panic!(
                    "flowproxyd printed {} endpoints, not {listeners} ({e}); stderr:\n{}",
                    endpoints.len(),
                    log.lock().join("\n")
                ),
            }
        }
        Daemon {
            child,
            endpoints,
            stderr: log,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Sends signal `sig` (with kill(1): the workspace forbids the
    /// `unsafe` that libc's kill would need).
    fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// The address the metrics server logged.
    fn metrics_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.stderr.lock().iter().find_map(|l| {
                if !l.contains("metrics listening") {
                    return None;
                }
                let at = l.find("address=")? + "address=".len();
                l[at..].split_whitespace().next()?.parse().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(Instant::now() < deadline, "no metrics address logged");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit.
    async fn exited(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flowproxyd-test-{what}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> String {
    flow::naming::RoutingId::random().to_string()
}

/// A server that listens nowhere and echoes every flow.
fn echo_server(principal: Principal) -> Manager {
    let m = Manager::builder(principal).build();
    let accepting = m.clone();
    tokio::spawn(async move {
        while let Ok(flow) = accepting.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = flow.into_split();
                while let Ok(Some(chunk)) = r.read_msg().await {
                    if w.write_msg(&[&chunk]).await.is_err() {
                        return;
                    }
                }
                w.close_write();
            });
        }
    });
    m
}

async fn round_trip(ep: &Endpoint, msg: &[u8]) -> Vec<u8> {
    let client = Manager::builder(Principal::with_self_blessing("client").unwrap())
        .dial_only()
        .build();
    let mut flow = client
        .dial(ep, Arc::new(AllowEveryone), Duration::ZERO)
        .await
        .unwrap();
    flow.write_msg(&[msg]).await.unwrap();
    flow.close_write();
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    out
}

async fn metrics(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    out
}

fn shorthand(ep: &Endpoint) -> Endpoint {
    Endpoint::parse(&format!("{}/{}", ep.protocol(), ep.address())).unwrap()
}

#[tokio::test]
async fn flowproxyd_prints_its_endpoints_serves_and_shuts_down_on_sigterm() {
    // The proxy's credentials; the server is blessed by the proxy, which
    // its default listen policy admits.
    let creds = temp_dir("creds");
    let proxy_principal = Principal::create_dir(&creds, "proxyd").unwrap();
    let mut daemon = Daemon::start(
        &[
            "--creds",
            creds.to_str().unwrap(),
            "--listen",
            "tcp/127.0.0.1:0",
            "--listen",
            "ws/127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--grace",
            "5s",
        ],
        2,
    );
    let eps = daemon.endpoints.clone();
    assert_eq!(eps[0].protocol(), "tcp");
    assert_eq!(eps[1].protocol(), "ws");
    assert_eq!(eps[0].routing_id(), eps[1].routing_id());
    assert!(!eps[0].routing_id().is_null());
    assert_eq!(eps[0].blessing_names(), ["proxyd"]);

    let server = echo_server(blessed(&proxy_principal, "server"));
    within(10, server.proxy_listen("d", &shorthand(&eps[0])))
        .await
        .unwrap();
    let ws = server
        .status()
        .endpoints
        .into_iter()
        .find(|e| e.protocol() == "ws")
        .expect("a ws endpoint for the server");
    assert_eq!(ws.routing_id(), server.routing_id());
    assert_eq!(
        within(10, round_trip(&ws, b"through the daemon")).await,
        b"through the daemon"
    );

    let text = within(10, metrics(daemon.metrics_addr())).await;
    assert_eq!(sample(&text, "flowproxy_servers"), 1.0);
    assert_eq!(sample(&text, "flowproxy_flows_total"), 1.0);

    daemon.signal(15);
    // The server hears that the proxy is going...
    within(20, until(|| {
        matches!(server.status().proxy_errors.get("d"), Some(Some(e)) if e.message().contains("shutting_down"))
    }))
    .await;
    // ...and the daemon exits cleanly.
    let status = within(30, daemon.exited()).await;
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains("shut down"), "{}", daemon.log());
    let _ = std::fs::remove_dir_all(&creds);
}

#[tokio::test]
async fn flowproxyd_listens_through_another_with_via() {
    let outer = Daemon::start(&["--listen", "tcp/127.0.0.1:0", "--allow-listen", "..."], 1);
    let outer_ep = outer.endpoints[0].clone();
    let via = format!("tcp/{}", outer_ep.address());
    let inner = Daemon::start(
        &[
            "--listen",
            "tcp/127.0.0.1:0",
            "--via",
            &via,
            "--allow-listen",
            "...",
        ],
        2,
    );
    let own = &inner.endpoints[0];
    let through = &inner.endpoints[1];
    assert_eq!(through.address(), outer_ep.address());
    assert_eq!(through.route(), &[own.routing_id()]);

    let server = echo_server(Principal::with_self_blessing("server").unwrap());
    within(10, server.proxy_listen("inner", &shorthand(own)))
        .await
        .unwrap();
    let via_outer = server
        .status()
        .endpoints
        .into_iter()
        .find(|e| e.address() == outer_ep.address())
        .expect("an endpoint through the outer proxy");
    assert_eq!(
        within(10, round_trip(&via_outer, b"two daemons")).await,
        b"two daemons"
    );
}

#[tokio::test]
async fn flowproxyd_errors_are_one_line() {
    for args in [
        &["--listen", "nonsense"][..],
        &["--listen", "nope/127.0.0.1:0"],
        &[],
        &["--max-servers", "many", "--listen", "tcp/127.0.0.1:0"],
        &[
            "--creds",
            "/nonexistent/flowproxyd/creds",
            "--listen",
            "tcp/127.0.0.1:0",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flowproxyd"))
            .args(args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed endpoints");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.starts_with("flowproxyd: "), "{args:?}: {err:?}");
    }
}
