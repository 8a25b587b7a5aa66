//! Bad input and failure: each gives a typed error naming the address, and
//! none takes down a listener.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use flow::ErrorKind;
use flow::transport::Listener;
use flow_protocols::{MAX_FRAME_SIZE, Registry};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Checks that `listener` still accepts and serves a fresh connection.
async fn still_serves(case: &Case, registry: &Registry, listener: &dyn Listener) {
    let (dialed, accepted) = tokio::join!(
        async {
            let conn = case.dial(registry, listener).await.expect("dial again");
            let (_r, mut w) = conn.split();
            write(&mut *w, &[Bytes::from_static(b"still here")]).await;
            w
        },
        async {
            let conn = tokio::time::timeout(PROMPT, listener.accept())
                .await
                .expect("accept in time")
                .expect("listener survived");
            let (mut r, _w) = conn.split();
            read_n(&mut *r, 1).await
        }
    );
    drop(dialed);
    assert_eq!(&accepted[0][..], b"still here");
}

/// Sends `bytes` on a raw tcp connection to `address`, then closes its
/// write side; returns the raw stream's local address (the peer the listener
/// sees).
async fn raw_tcp_send(address: &str, bytes: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(address).await.expect("raw connect");
    stream.write_all(bytes).await.expect("raw write");
    stream.shutdown().await.expect("raw shutdown");
    let local = stream.local_addr().expect("local").to_string();
    (stream, local)
}

/// A listener's accepted connection reading `bytes` sent raw fails with
/// `kind`, naming the peer; the listener keeps serving.
async fn raw_bytes_fail_reader(protocol: &'static str, bytes: &[u8], kind: ErrorKind) {
    let Some(case) = Case::net(protocol, "127.0.0.1:0", protocol) else {
        return;
    };
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    let (_raw, peer) = raw_tcp_send(&listener.local_addr(), bytes).await;
    let conn = tokio::time::timeout(PROMPT, listener.accept())
        .await
        .expect("accept in time")
        .expect("accept");
    let (mut reader, _w) = conn.split();
    let err = reader.read_frame().await.expect_err("bad input");
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.message().contains(&peer), "{err} should name {peer}");
    still_serves(&case, &registry, &*listener).await;
}

fn oversized_prefix() -> [u8; 4] {
    ((MAX_FRAME_SIZE + 1) as u32).to_be_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frame_over_maximum_is_bad_arg() {
    raw_bytes_fail_reader("tcp", &oversized_prefix(), ErrorKind::BadArg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsh_garbage_length_is_bad_arg() {
    raw_bytes_fail_reader("wsh", &[0x7f, 0xff, 0xff, 0xff, 1, 2], ErrorKind::BadArg).await;
    raw_bytes_fail_reader("wsh", &oversized_prefix(), ErrorKind::BadArg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_frame_then_eof_is_network() {
    for protocol in ["tcp", "wsh"] {
        raw_bytes_fail_reader(protocol, &[0, 0, 0, 10, 1, 2, 3], ErrorKind::Network).await;
        raw_bytes_fail_reader(protocol, &[0, 0], ErrorKind::Network).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_bad_frames_are_typed() {
    let Some(case) = Case::unix() else { return };
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    for (bytes, kind) in [
        (oversized_prefix().to_vec(), ErrorKind::BadArg),
        (vec![0, 0, 1, 0, 9], ErrorKind::Network),
    ] {
        let mut raw = tokio::net::UnixStream::connect(&case.listen_address)
            .await
            .expect("raw connect");
        raw.write_all(&bytes).await.expect("raw write");
        raw.shutdown().await.expect("raw shutdown");
        let conn = tokio::time::timeout(PROMPT, listener.accept())
            .await
            .expect("accept in time")
            .expect("accept");
        let (mut reader, _w) = conn.split();
        let err = reader.read_frame().await.expect_err("bad input");
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.message().contains(&case.listen_address), "{err}");
    }
    still_serves(&case, &registry, &*listener).await;
}

/// A port that nothing listens on.
fn closed_port_address() -> String {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = socket.local_addr().expect("addr").to_string();
    drop(socket);
    address
}

#[tokio::test]
async fn refused_dial_is_dial_failed() {
    let registry = Registry::with_defaults();
    let address = closed_port_address();
    for protocol in ["tcp", "tcp4", "ws", "wsh", ""] {
        let err = registry
            .dial(protocol, &address, DIAL_TIMEOUT)
            .await
            .map(drop)
            .expect_err("nothing listens");
        assert_eq!(err.kind(), ErrorKind::DialFailed, "{protocol}: {err}");
        assert!(err.message().contains(&address), "{err}");
    }
}

#[tokio::test]
async fn unresolvable_name_is_resolve_failed() {
    let registry = Registry::with_defaults();
    for protocol in ["tcp", "ws", "wsh"] {
        let err = registry
            .dial(protocol, "no-such-host.invalid:80", DIAL_TIMEOUT)
            .await
            .map(drop)
            .expect_err("does not resolve");
        assert_eq!(err.kind(), ErrorKind::ResolveFailed, "{protocol}: {err}");
        assert!(err.message().contains("no-such-host.invalid"), "{err}");
    }
}

#[tokio::test]
async fn malformed_addresses_are_bad_args() {
    let registry = Registry::with_defaults();
    for (protocol, address) in [
        ("tcp", "no-port"),
        ("tcp", "[::1"),
        ("ws", "host:notaport/x"),
        ("unix", ""),
    ] {
        let err = registry
            .dial(protocol, address, DIAL_TIMEOUT)
            .await
            .map(drop)
            .expect_err("malformed");
        assert_eq!(err.kind(), ErrorKind::BadArg, "{protocol} {address}: {err}");
    }
}

#[tokio::test]
async fn port_in_use_is_bad_arg() {
    let registry = Registry::with_defaults();
    let first = registry.listen("tcp", "127.0.0.1:0").await.expect("listen");
    let address = first.local_addr();
    let err = registry
        .listen("tcp", &address)
        .await
        .map(drop)
        .expect_err("in use");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains(&address), "{err}");
}

/// Sends `request` raw and returns everything the listener answers before
/// closing.
async fn http_exchange(address: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    tokio::time::timeout(PROMPT, stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .expect("read response");
    String::from_utf8_lossy(&response).into_owned()
}

async fn http_requests_are_refused(protocol: &'static str, dial_protocol: &'static str) {
    let Some(case) = Case::net(protocol, "127.0.0.1:0", dial_protocol) else {
        return;
    };
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    let address = listener.local_addr();
    for (request, status) in [
        ("GET / HTTP/1.1\r\nHost: example\r\n\r\n", "426"),
        (
            "POST /flow HTTP/1.1\r\nHost: example\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        ("GARBAGE\0\r\n\r\n", "400"),
        (
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "400",
        ),
    ] {
        let response = http_exchange(&address, request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} got {response:?}"
        );
    }
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(40_000));
    let response = http_exchange(&address, &huge).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:?}");
    still_serves(&case, &registry, &*listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsh_plain_http_gets_error_response_and_listener_survives() {
    http_requests_are_refused("wsh", "ws").await;
    http_requests_are_refused("wsh", "tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_plain_http_gets_error_response_and_listener_survives() {
    http_requests_are_refused("ws", "ws").await;
}

/// Peers that connect and never finish their handshake do not hold up
/// other connections.
async fn silent_peers_do_not_block(protocol: &'static str, dial_protocol: &'static str) {
    let Some(case) = Case::net(protocol, "127.0.0.1:0", dial_protocol) else {
        return;
    };
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    let address = listener.local_addr();
    let mut stalled = Vec::new();
    for partial in [&b""[..], b"GET / HT", b"GET / HTTP/1.1\r\nHost: x\r\n"] {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        stream.write_all(partial).await.expect("write");
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    still_serves(&case, &registry, &*listener).await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_block_accepts() {
    silent_peers_do_not_block("ws", "ws").await;
    silent_peers_do_not_block("wsh", "ws").await;
    silent_peers_do_not_block("wsh", "tcp").await;
}

/// A WebSocket client of our own, to send what flow's dialer never would.
async fn raw_ws_client(
    address: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{address}/any/path"))
        .await
        .expect("ws connect");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_text_and_oversized_messages_are_bad_args_pings_are_skipped() {
    let Some(case) = Case::net("ws", "127.0.0.1:0", "ws") else {
        return;
    };
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    let address = listener.local_addr();

    let mut client = raw_ws_client(&address).await;
    let conn = listener.accept().await.expect("accept");
    let peer = conn.remote_addr();
    let (mut reader, _w) = conn.split();
    client
        .send(Message::Ping(Bytes::from_static(b"p")))
        .await
        .expect("ping");
    client
        .send(Message::Binary(Bytes::from_static(b"frame")))
        .await
        .expect("binary");
    let frame = reader.read_frame().await.expect("read").expect("frame");
    assert_eq!(&frame[..], b"frame");
    // The ping was answered on the way.
    let pong = tokio::time::timeout(PROMPT, client.next())
        .await
        .expect("pong in time")
        .expect("message")
        .expect("ok");
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"p")));
    client.send(Message::text("words")).await.expect("text");
    let err = reader.read_frame().await.expect_err("text");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains(&peer), "{err}");

    let mut client = raw_ws_client(&address).await;
    let conn = listener.accept().await.expect("accept");
    let (mut reader, _w) = conn.split();
    let too_big = Bytes::from(vec![0u8; MAX_FRAME_SIZE + 1]);
    // The send may or may not fail, depending on when the server hangs up.
    let _ = client.send(Message::Binary(too_big)).await;
    let err = reader.read_frame().await.expect_err("too big");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");

    still_serves(&case, &registry, &*listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_dial_to_a_non_websocket_server_fails() {
    let registry = Registry::with_defaults();
    let tcp = registry.listen("tcp", "127.0.0.1:0").await.expect("listen");
    let address = tcp.local_addr();
    let accepting = tokio::spawn(async move {
        // The raw listener sees "GET " as an oversized length.
        let conn = tcp.accept().await.expect("accept");
        let (mut r, _w) = conn.split();
        let err = r.read_frame().await.expect_err("http is no frame");
        assert_eq!(err.kind(), ErrorKind::BadArg);
    });
    let err = registry
        .dial("ws", &address, DIAL_TIMEOUT)
        .await
        .map(drop)
        .expect_err("not a websocket server");
    assert_eq!(err.kind(), ErrorKind::DialFailed, "{err}");
    assert!(err.message().contains(&address), "{err}");
    accepting.await.expect("server side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_dial_sends_path_and_host() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = server.local_addr().expect("addr").port();
    let capture = tokio::spawn(async move {
        let (mut stream, _) = server.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "request ended early");
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("respond");
        String::from_utf8_lossy(&head).into_owned()
    });
    let registry = Registry::with_defaults();
    let err = registry
        .dial("ws", &format!("localhost:{port}/flow/v1"), DIAL_TIMEOUT)
        .await
        .map(drop)
        .expect_err("404");
    assert_eq!(err.kind(), ErrorKind::DialFailed, "{err}");
    assert!(err.message().contains("404"), "{err}");
    let head = capture.await.expect("captured");
    assert!(head.starts_with("GET /flow/v1 HTTP/1.1\r\n"), "{head}");
    let host = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Host: ")
                .or_else(|| l.strip_prefix("host: "))
        })
        .expect("Host header");
    assert_eq!(host, format!("localhost:{port}"));
}

#[tokio::test]
async fn unix_path_that_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain-file");
    std::fs::write(&path, b"not a socket").expect("write file");
    let address = path.to_string_lossy().into_owned();
    let registry = Registry::with_defaults();
    let err = registry
        .listen("unix", &address)
        .await
        .map(drop)
        .expect_err("not a socket");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains(&address), "{err}");
    assert_eq!(std::fs::read(&path).expect("file kept"), b"not a socket");
    let err = registry
        .dial("unix", &address, DIAL_TIMEOUT)
        .await
        .map(drop)
        .expect_err("not a socket");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains(&address), "{err}");
    let missing = dir.path().join("missing").to_string_lossy().into_owned();
    let err = registry
        .dial("unix", &missing, DIAL_TIMEOUT)
        .await
        .map(drop)
        .expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::DialFailed, "{err}");
    assert!(err.message().contains(&missing), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_stale_live_and_removed_socket_files() {
    let Some(case) = Case::unix() else { return };
    let path = std::path::PathBuf::from(&case.listen_address);
    // A socket file left behind by a listener that is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "std leaves the file behind");
    let registry = Registry::with_defaults();
    let listener = case.listen(&registry).await;
    // A live listener is not taken over.
    let err = registry
        .listen("unix", &case.listen_address)
        .await
        .map(drop)
        .expect_err("in use");
    assert_eq!(err.kind(), ErrorKind::BadArg, "{err}");
    assert!(err.message().contains(&case.listen_address), "{err}");
    // The probe that found it live was one connection, closed at once.
    let probe = tokio::time::timeout(PROMPT, listener.accept())
        .await
        .expect("probe accepted in time")
        .expect("probe");
    let (mut probe_reader, _w) = probe.split();
    expect_end(&mut *probe_reader).await;
    still_serves(&case, &registry, &*listener).await;
    listener.close();
    assert!(!path.exists(), "close removes the socket file");
}
