//! Resolution: DNS for the IP transports, family filtering, identity for the
//! others.

use flow::ErrorKind;
use flow_protocols::{Registry, default_registry};

fn parsed(addrs: &[String]) -> Vec<std::net::SocketAddr> {
    addrs
        .iter()
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
        .collect()
}

#[tokio::test]
async fn localhost_resolves() {
    let registry = Registry::with_defaults();
    let (protocol, addrs) = registry
        .resolve("tcp", "localhost:80")
        .await
        .expect("resolve");
    assert_eq!(protocol, "tcp");
    assert!(!addrs.is_empty());
    for addr in parsed(&addrs) {
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 80);
    }
}

#[tokio::test]
async fn families_are_filtered() {
    let registry = Registry::with_defaults();
    let (_, v4) = registry.resolve("tcp4", "localhost:80").await.expect("v4");
    assert!(parsed(&v4).iter().all(|a| a.is_ipv4()), "{v4:?}");
    let (_, v6) = registry.resolve("tcp6", "[::1]:80").await.expect("v6");
    assert_eq!(v6, vec!["[::1]:80".to_string()]);
    for (protocol, address) in [
        ("tcp4", "[::1]:80"),
        ("tcp6", "127.0.0.1:80"),
        ("ws6", "127.0.0.1:80"),
        ("wsh4", "[::1]:80"),
    ] {
        let err = registry
            .resolve(protocol, address)
            .await
            .expect_err("wrong family");
        assert_eq!(err.kind(), ErrorKind::ResolveFailed, "{err}");
        assert!(err.message().contains(address), "{err}");
    }
}

#[tokio::test]
async fn unresolvable_name_is_resolve_failed() {
    let registry = Registry::with_defaults();
    for protocol in ["tcp", "tcp4", "ws", "wsh6"] {
        let err = registry
            .resolve(protocol, "no-such-host.invalid:80")
            .await
            .expect_err("no such host");
        assert_eq!(err.kind(), ErrorKind::ResolveFailed, "{err}");
        assert!(err.message().contains("no-such-host.invalid"), "{err}");
    }
}

#[tokio::test]
async fn ws_keeps_the_path() {
    let registry = Registry::with_defaults();
    let (protocol, addrs) = registry
        .resolve("ws4", "localhost:8080/flow")
        .await
        .expect("resolve");
    assert_eq!(protocol, "ws4");
    assert!(
        addrs.contains(&"127.0.0.1:8080/flow".to_string()),
        "{addrs:?}"
    );
}

#[tokio::test]
async fn other_transports_resolve_to_themselves() {
    let registry = default_registry();
    let (protocol, addrs) = registry
        .resolve("unix", "/run/some.sock")
        .await
        .expect("unix");
    assert_eq!(
        (protocol.as_str(), addrs),
        ("unix", vec!["/run/some.sock".into()])
    );
    let (protocol, addrs) = registry.resolve("memory", "svc").await.expect("memory");
    assert_eq!((protocol.as_str(), addrs), ("memory", vec!["svc".into()]));
    // No protocol: the unknown-protocol target (wsh) resolves like tcp.
    let (protocol, addrs) = registry.resolve("", "127.0.0.1:9").await.expect("unknown");
    assert_eq!(
        (protocol.as_str(), addrs),
        ("wsh", vec!["127.0.0.1:9".into()])
    );
}
