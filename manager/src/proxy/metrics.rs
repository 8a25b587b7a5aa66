//! The proxy's counters, their Prometheus text form, and a minimal
//! HTTP/1.1 server for `/metrics` and `/healthz`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Cutoff, Refusal};

/// Upper bounds, in seconds, of the dial-through latency buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Longest request head the metrics server reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a metrics client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Live counters, updated without locks.
#[derive(Default)]
pub(crate) struct Counters {
    registrations: AtomicU64,
    tunnels: AtomicU64,
    tunnels_active: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    cutoffs: [AtomicU64; Cutoff::ALL.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
}

/// Which way bytes went through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    ToServer,
    ToClient,
}

impl Counters {
    pub(crate) fn registered(&self) {
        self.registrations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cut(&self, why: Cutoff) {
        self.cutoffs[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tunnel_opened(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        self.tunnels_active.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn tunnel_closed(&self) {
        self.tunnels_active.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn active_tunnels(&self) -> u64 {
        self.tunnels_active.load(Ordering::Acquire)
    }

    pub(crate) fn relayed(&self, direction: Direction, bytes: u64) {
        let counter = match direction {
            Direction::ToServer => &self.bytes_to_server,
            Direction::ToClient => &self.bytes_to_client,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn dial_through(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// A snapshot, with the registration gauges given by the caller.
    pub(crate) fn snapshot(&self, servers: usize, proxies: usize) -> ProxyStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.latency_buckets)
            .map(|(bound, n)| {
                cumulative += load(n);
                (*bound, cumulative)
            })
            .collect();
        ProxyStats {
            servers: servers as u64,
            proxies: proxies as u64,
            registrations: load(&self.registrations),
            tunnels: load(&self.tunnels),
            tunnels_active: load(&self.tunnels_active),
            bytes_to_server: load(&self.bytes_to_server),
            bytes_to_client: load(&self.bytes_to_client),
            refusals: Refusal::ALL
                .iter()
                .map(|r| (*r, load(&self.refusals[*r as usize])))
                .collect(),
            cutoffs: Cutoff::ALL
                .iter()
                .map(|c| (*c, load(&self.cutoffs[*c as usize])))
                .collect(),
            dial_through: LatencyHistogram {
                buckets,
                count: load(&self.latency_count),
                sum: Duration::from_nanos(load(&self.latency_sum_nanos)),
            },
        }
    }
}

/// A snapshot of what the proxy did ([`super::Proxy::stats`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyStats {
    /// Servers listening through the proxy now.
    pub servers: u64,
    /// Downstream proxies listening through the proxy now.
    pub proxies: u64,
    /// Registrations accepted since the start.
    pub registrations: u64,
    /// Tunnels set up since the start.
    pub tunnels: u64,
    /// Tunnels open now.
    pub tunnels_active: u64,
    /// Payload bytes relayed from clients to servers.
    pub bytes_to_server: u64,
    /// Payload bytes relayed from servers to clients.
    pub bytes_to_client: u64,
    /// Refusals by reason, every reason listed.
    pub refusals: Vec<(Refusal, u64)>,
    /// Tunnels cut by a per-flow limit, by limit, every limit listed.
    pub cutoffs: Vec<(Cutoff, u64)>,
    /// Time from a client's hello to the first bytes back from the server.
    pub dial_through: LatencyHistogram,
}

impl ProxyStats {
    /// Refusals for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refusals
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Tunnels cut for `why`.
    pub fn cut(&self, why: Cutoff) -> u64 {
        self.cutoffs
            .iter()
            .find(|(c, _)| *c == why)
            .map_or(0, |(_, n)| *n)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "flowproxy_servers",
            "gauge",
            "Servers listening through the proxy.",
            &plain(self.servers),
        );
        metric(
            "flowproxy_proxies",
            "gauge",
            "Downstream proxies listening through the proxy.",
            &plain(self.proxies),
        );
        metric(
            "flowproxy_registrations_total",
            "counter",
            "Registrations accepted.",
            &plain(self.registrations),
        );
        metric(
            "flowproxy_flows_total",
            "counter",
            "Flows proxied (tunnels set up).",
            &plain(self.tunnels),
        );
        metric(
            "flowproxy_flows_active",
            "gauge",
            "Flows being proxied now.",
            &plain(self.tunnels_active),
        );
        metric(
            "flowproxy_bytes_total",
            "counter",
            "Payload bytes relayed, by direction.",
            &[
                (
                    "{direction=\"to_server\"}".to_string(),
                    self.bytes_to_server.to_string(),
                ),
                (
                    "{direction=\"to_client\"}".to_string(),
                    self.bytes_to_client.to_string(),
                ),
            ],
        );
        let refusals: Vec<_> = self
            .refusals
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", r.as_str()), n.to_string()))
            .collect();
        metric(
            "flowproxy_refusals_total",
            "counter",
            "Registrations and tunnels refused, by reason.",
            &refusals,
        );
        let cutoffs: Vec<_> = self
            .cutoffs
            .iter()
            .map(|(c, n)| (format!("{{limit=\"{}\"}}", c.as_str()), n.to_string()))
            .collect();
        metric(
            "flowproxy_flows_cut_total",
            "counter",
            "Proxied flows closed by a per-flow limit.",
            &cutoffs,
        );
        let h = &self.dial_through;
        let mut samples: Vec<_> = h
            .buckets
            .iter()
            .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), n.to_string()))
            .collect();
        samples.push(("_bucket{le=\"+Inf\"}".to_string(), h.count.to_string()));
        samples.push(("_sum".to_string(), h.sum.as_secs_f64().to_string()));
        samples.push(("_count".to_string(), h.count.to_string()));
        metric(
            "flowproxy_dial_through_seconds",
            "histogram",
            "Time from a client's handshake hello to the server's first answer.",
            &samples,
        );
        out
    }
}

/// A latency histogram with cumulative buckets, as Prometheus has them.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations.
    pub sum: Duration,
}

/// What the metrics server answers.
pub(crate) trait MetricsSource: Send + Sync + 'static {
    /// The Prometheus text; `None` once the proxy is gone.
    fn metrics(&self) -> Option<String>;
    /// Whether the proxy serves (not gone, not shutting down).
    fn healthy(&self) -> bool;
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    source: impl MetricsSource,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let source = std::sync::Arc::new(source);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let source = source.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &*source).await {
                        tracing::debug!(%peer, error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener failed to accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, source: &dyn MetricsSource) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            if find_head_end(&head).is_some() || head.len() >= MAX_REQUEST_HEAD {
                return Ok::<_, std::io::Error>(());
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let response = respond(&head, source);
    stream.write_all(&response).await?;
    stream.shutdown().await
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The whole HTTP response to the request whose head is `head`.
pub(crate) fn respond(head: &[u8], source: &dyn MetricsSource) -> Vec<u8> {
    let Some(end) = find_head_end(head) else {
        return response(400, "text/plain", "incomplete request\n", true);
    };
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return response(400, "text/plain", "request is not UTF-8\n", true);
    };
    let mut parts = text.lines().next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return response(400, "text/plain", "malformed request line\n", true);
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "text/plain", "HTTP/1.x only\n", true);
    }
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return response(405, "text/plain", "GET or HEAD only\n", true),
    };
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => match source.metrics() {
            Some(text) => response(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
                with_body,
            ),
            None => response(503, "text/plain", "proxy is gone\n", with_body),
        },
        "/healthz" if source.healthy() => response(200, "text/plain", "ok\n", with_body),
        "/healthz" => response(503, "text/plain", "shutting down\n", with_body),
        _ => response(404, "text/plain", "not found\n", with_body),
    }
}

fn response(status: u16, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl MetricsSource for Fixed {
        fn metrics(&self) -> Option<String> {
            Some("x 1\n".to_string())
        }
        fn healthy(&self) -> bool {
            self.0
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn answers_the_two_paths() {
        let ok = text(respond(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &Fixed(true),
        ));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        let down = text(respond(b"GET /healthz HTTP/1.1\r\n\r\n", &Fixed(false)));
        assert!(down.starts_with("HTTP/1.1 503 "), "{down}");
        let m = text(respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &Fixed(true)));
        assert!(m.contains("Content-Length: 4\r\n"), "{m}");
        assert!(m.ends_with("x 1\n"), "{m}");
        let head = text(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &Fixed(true)));
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        for (req, status) in [
            (&b"GET /other HTTP/1.1\r\n\r\n"[..], "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics\r\n\r\n", "400"),
            (b"GET /metrics HTTP/2\r\n\r\n", "400"),
            (b"GET /metrics HTTP/1.1\r\n", "400"),
            (b"\xff\xfe\r\n\r\n", "400"),
        ] {
            let out = text(respond(req, &Fixed(true)));
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        }
    }

    #[test]
    fn renders_every_family() {
        let c = Counters::default();
        c.registered();
        c.tunnel_opened();
        c.relayed(Direction::ToServer, 10);
        c.relayed(Direction::ToClient, 20);
        c.refused(Refusal::UnknownTarget);
        c.cut(Cutoff::MaxBytes);
        c.dial_through(Duration::from_millis(3));
        c.dial_through(Duration::from_secs(60));
        let stats = c.snapshot(2, 1);
        assert_eq!(stats.refused(Refusal::UnknownTarget), 1);
        assert_eq!(stats.refused(Refusal::TooManyFlows), 0);
        assert_eq!(stats.cut(Cutoff::MaxBytes), 1);
        let text = stats.to_prometheus();
        for line in [
            "flowproxy_servers 2",
            "flowproxy_proxies 1",
            "flowproxy_registrations_total 1",
            "flowproxy_flows_total 1",
            "flowproxy_flows_active 1",
            "flowproxy_bytes_total{direction=\"to_server\"} 10",
            "flowproxy_bytes_total{direction=\"to_client\"} 20",
            "flowproxy_refusals_total{reason=\"unknown_target\"} 1",
            "flowproxy_refusals_total{reason=\"too_many_flows\"} 0",
            "flowproxy_flows_cut_total{limit=\"max_bytes\"} 1",
            "flowproxy_dial_through_seconds_bucket{le=\"0.0025\"} 0",
            "flowproxy_dial_through_seconds_bucket{le=\"0.005\"} 1",
            "flowproxy_dial_through_seconds_bucket{le=\"10\"} 1",
            "flowproxy_dial_through_seconds_bucket{le=\"+Inf\"} 2",
            "flowproxy_dial_through_seconds_count 2",
            "# TYPE flowproxy_dial_through_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
