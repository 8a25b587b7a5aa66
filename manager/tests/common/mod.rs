//! Helpers shared by the Manager's integration tests (each test file uses
//! some of them).

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use flow::auth::AllowEveryone;
use flow::message::Message;
use flow::security::{BlessingPattern, Principal};

/// Runs `fut`, failing the test if it has not finished within `secs`.
pub async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(Duration::from_secs(secs)) => panic!("did not finish within {secs} s"),
        out = fut => out,
    }
}

/// Polls `cond` every 10 ms until it holds (the caller bounds the time).
pub async fn until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A principal blessed by `root` as `root's name:extension`, trusting
/// `root`.
pub fn blessed(root: &Principal, extension: &str) -> Principal {
    let p = Principal::new();
    let b = root
        .bless(
            p.public_key(),
            &root.default_blessings(),
            extension,
            Vec::new(),
        )
        .unwrap();
    p.blessing_store().set_default(b.clone()).unwrap();
    p.blessing_store().set(b, BlessingPattern::all()).unwrap();
    p.add_to_roots(&root.default_blessings()).unwrap();
    p
}

/// The value of the sample `series` (name and labels) in Prometheus text.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// `msg` encoded as it travels on the wire.
pub fn encode(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf);
    buf
}

/// An authorizer that accepts every peer.
pub fn everyone() -> Arc<AllowEveryone> {
    Arc::new(AllowEveryone)
}
