//! `flowctl` end to end: the built binary, spawned as a user would run it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FLOWCTL: &str = env!("CARGO_BIN_EXE_flowctl");
const FLOWPROXYD: &str = env!("CARGO_BIN_EXE_flowproxyd");

fn flowctl(args: &[&str]) -> Output {
    Command::new(FLOWCTL)
        .args(args)
        .output()
        .expect("flowctl runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A child process killed when the test ends, whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `program args` and returns it with the first `lines` lines it
/// prints on stdout (within 20 s).
fn spawn_printing(program: &str, args: &[&str], lines: usize) -> (Guard, Vec<String>) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawns");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < lines {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(_) => panic!("{program} printed only {got:?}"),
        }
    }
    (Guard(child), got)
}

/// Dials `endpoint` with flowctl, sending `input`; returns the output.
fn dial(extra: &[&str], endpoint: &str, input: &[u8]) -> Output {
    let mut child = Command::new(FLOWCTL)
        .arg("dial")
        .args(extra)
        .arg(endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flowctl dial runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("writes stdin");
    child.wait_with_output().expect("flowctl dial ends")
}

#[test]
fn creds_create_bless_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    let a = alice.to_str().unwrap();
    let b = bob.to_str().unwrap();
    let out = flowctl(&["creds", "create", a, "--name", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("public key:"));
    // Refuses to overwrite.
    let again = flowctl(&["creds", "create", a, "--name", "alice"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("already"), "{}", stderr(&again));
    assert_eq!(stderr(&again).lines().count(), 1, "one line of error");
    assert!(
        flowctl(&["creds", "create", b, "--name", "bob"])
            .status
            .success()
    );
    let out = flowctl(&[
        "creds",
        "bless",
        "--from",
        a,
        "--to",
        b,
        "--extension",
        "phone",
        "--for",
        "1h",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("alice:phone"));
    let show = stdout(&flowctl(&["creds", "show", b]));
    assert!(show.contains("blessing: bob"), "{show}");
    assert!(show.contains("blessing: alice:phone (expires"), "{show}");
    assert!(show.contains("for alice"), "{show}");
    let key_mode = std::fs::metadata(alice.join("key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key_mode.permissions().mode() & 0o077, 0);
}

#[test]
fn listen_echo_and_dial_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("flow.sock");
    let (_server, eps) = spawn_printing(
        FLOWCTL,
        &[
            "listen",
            "--echo",
            "--tcp",
            "127.0.0.1:0",
            "--unix",
            sock.to_str().unwrap(),
        ],
        2,
    );
    for ep in &eps {
        let out = dial(&[], ep, b"hello over flow\n");
        assert!(out.status.success(), "{ep}: {}", stderr(&out));
        assert_eq!(stdout(&out), "hello over flow\n", "{ep}");
    }
    assert!(eps.iter().any(|e| e.contains("@tcp@")));
    assert!(eps.iter().any(|e| e.contains("@unix@")));
    // The shorthand works too.
    let tcp = eps.iter().find(|e| e.contains("@tcp@")).unwrap();
    let addr = tcp.split('@').nth(3).unwrap();
    let out = dial(&[], &format!("tcp/{addr}"), b"short\n");
    assert_eq!(stdout(&out), "short\n");
}

#[test]
fn expect_refuses_the_wrong_server_with_exit_code_2() {
    let (_server, eps) = spawn_printing(FLOWCTL, &["listen", "--echo"], 1);
    let out = dial(&["--expect", "somebody-else"], &eps[0], b"x");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn listen_through_flowproxyd_and_dial_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("proxy");
    assert!(
        flowctl(&["creds", "create", creds.to_str().unwrap(), "--name", "org"])
            .status
            .success()
    );
    let (_proxy, proxy_eps) = spawn_printing(
        FLOWPROXYD,
        &[
            "--listen",
            "tcp/127.0.0.1:0",
            "--creds",
            creds.to_str().unwrap(),
            "--allow-listen",
            "...",
        ],
        1,
    );
    let (_server, server_eps) =
        spawn_printing(FLOWCTL, &["listen", "--echo", "--proxy", &proxy_eps[0]], 1);
    // The server listens on nothing itself: its endpoint is the proxy's
    // address with the server's routing id.
    let proxy_addr = proxy_eps[0].split('@').nth(3).unwrap();
    assert_eq!(server_eps[0].split('@').nth(3).unwrap(), proxy_addr);
    let out = dial(&[], &server_eps[0], b"through the proxy\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "through the proxy\n");
}

#[test]
fn the_demo_runs_and_exits_0() {
    let out = flowctl(&["demo", "--bytes", "8388608", "--pings", "20"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for needle in [
        "proxy listening at",
        "server reachable at",
        "the client sees the server as [\"demo:server\"]",
        "the server sees the client as [\"demo:client\"]",
        "through the proxy:",
        "direct:",
        "the handshake resumed",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn ping_reports_round_trips_and_quiet_prints_only_the_summary() {
    let (_server, endpoints) =
        spawn_printing(FLOWCTL, &["listen", "--echo", "--tcp", "127.0.0.1:0"], 1);
    let out = flowctl(&["ping", "--count", "5", &endpoints[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("connected to "), "{text}");
    assert_eq!(text.matches("64 bytes: seq=").count(), 5, "{text}");
    assert!(text.contains("(5 samples)"), "{text}");

    let out = flowctl(&["ping", "--quiet", "--count", "50", &endpoints[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains("seq="), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("(50 samples)"), "{text}");
}
