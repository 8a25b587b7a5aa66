//! Raw transport throughput (no encryption): frames per second and bytes per
//! second through each transport of `flow-protocols` on loopback, for a few
//! frame sizes, plus plain tokio TCP with 64 KiB chunks as a ceiling.
//!
//! One connection per (transport, frame size), reused across iterations. One
//! iteration is one frame: a writer task sends frames in vectored batches of
//! [`BATCH`] per `write_frames` call while a reader task reads them one by one,
//! and the clock runs until the reader has the last one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flow::transport::{Frame, FrameReader, FrameWriter, Listener};
use flow_protocols::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Frame sizes measured.
const SIZES: [usize; 3] = [64, 4 * 1024, 64 * 1024];

/// Frames per `write_frames` call.
const BATCH: usize = 32;

/// How long setup may take before the bench gives up.
const SETUP: Duration = Duration::from_secs(10);

/// Both halves of one connection, held between criterion's calls.
struct Link {
    writer: Option<Box<dyn FrameWriter>>,
    reader: Option<Box<dyn FrameReader>>,
    _listener: Box<dyn Listener>,
    _dir: Option<tempfile::TempDir>,
}

/// Listens and dials with `protocol`; the dialer writes, the acceptor reads.
async fn link(registry: &Registry, protocol: &str) -> Link {
    let (address, dir) = match protocol {
        "unix" => {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("bench.sock");
            (path.to_string_lossy().into_owned(), Some(dir))
        }
        "memory" => (String::new(), None),
        _ => ("127.0.0.1:0".to_string(), None),
    };
    let listener = registry.listen(protocol, &address).await.expect("listen");
    let dialed = registry
        .dial(protocol, &listener.local_addr(), SETUP)
        .await
        .expect("dial");
    let (_dialer_reader, mut writer) = dialed.split();
    // The dialer speaks first (a wsh listener sniffs the first byte).
    writer
        .write_frames(&[Frame::from(&b"hello"[..])])
        .await
        .expect("greeting");
    let accepted = tokio::time::timeout(SETUP, listener.accept())
        .await
        .expect("accept in time")
        .expect("accept");
    let (mut reader, _acceptor_writer) = accepted.split();
    reader.read_frame().await.expect("greeting").expect("frame");
    Link {
        writer: Some(writer),
        reader: Some(reader),
        _listener: listener,
        _dir: dir,
    }
}

/// Moves `frames` frames of `size` bytes through `link`; returns the time
/// taken.
fn run(rt: &Runtime, link: &mut Link, size: usize, frames: u64) -> Duration {
    let (Some(mut writer), Some(mut reader)) = (link.writer.take(), link.reader.take()) else {
        panic!("link lost in an earlier iteration");
    };
    let frame = Frame::from(Bytes::from(vec![0x5a; size]));
    let batch: Vec<Frame> = vec![frame; BATCH];
    let (writer, reader, elapsed) = rt.block_on(async move {
        let start = Instant::now();
        let writing = tokio::spawn(async move {
            let mut left = frames;
            while left > 0 {
                let n = left.min(BATCH as u64) as usize;
                writer.write_frames(&batch[..n]).await.expect("write");
                left -= n as u64;
            }
            writer
        });
        let reading = tokio::spawn(async move {
            for _ in 0..frames {
                let frame = reader.read_frame().await.expect("read").expect("frame");
                assert_eq!(frame.len(), size);
            }
            reader
        });
        let reader = reading.await.expect("reader task");
        let elapsed = start.elapsed();
        let writer = writing.await.expect("writer task");
        (writer, reader, elapsed)
    });
    link.writer = Some(writer);
    link.reader = Some(reader);
    elapsed
}

fn transports(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = Registry::with_defaults();
    let mut group = c.benchmark_group("transports");
    for protocol in ["tcp", "unix", "ws", "wsh", "memory"] {
        for size in SIZES {
            let mut link = rt.block_on(link(&registry, protocol));
            group.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: size as u64,
            });
            group.bench_function(BenchmarkId::new(protocol, size), |b| {
                b.iter_custom(|iters| run(&rt, &mut link, size, iters));
            });
        }
    }
    plain_tcp(&rt, &mut group);
    group.finish();
}

/// The ceiling: tokio TCP on loopback, 64 KiB writes and reads, no framing.
fn plain_tcp(
    rt: &Runtime,
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    const CHUNK: usize = 64 * 1024;
    let (mut tx, mut rx) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let (dialed, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        let dialed = dialed.expect("connect");
        dialed.set_nodelay(true).expect("nodelay");
        (Some(dialed), Some(accepted.expect("accept").0))
    });
    group.throughput(Throughput::ElementsAndBytes {
        elements: 1,
        bytes: CHUNK as u64,
    });
    group.bench_function(BenchmarkId::new("plain-tcp", CHUNK), |b| {
        b.iter_custom(|iters| {
            let (Some(mut writer), Some(mut reader)) = (tx.take(), rx.take()) else {
                panic!("streams lost in an earlier iteration");
            };
            let (writer, reader, elapsed) = rt.block_on(async move {
                let start = Instant::now();
                let writing = tokio::spawn(async move {
                    let chunk = vec![0x5a; CHUNK];
                    for _ in 0..iters {
                        writer.write_all(&chunk).await.expect("write");
                    }
                    writer
                });
                let reading = tokio::spawn(async move {
                    let mut chunk = vec![0; CHUNK];
                    for _ in 0..iters {
                        reader.read_exact(&mut chunk).await.expect("read");
                    }
                    reader
                });
                let reader = reading.await.expect("reader task");
                let elapsed = start.elapsed();
                (writing.await.expect("writer task"), reader, elapsed)
            });
            tx = Some(writer);
            rx = Some(reader);
            elapsed
        });
    });
}

criterion_group!(benches, transports);
criterion_main!(benches);
