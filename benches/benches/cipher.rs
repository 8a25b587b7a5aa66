//! Frame encryption: sealing and opening frames in place with both suites
//! (`cipher/seal/<suite>/N`, `cipher/open/<suite>/N`).

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flow::conn::{FRAME_OVERHEAD, FrameOpener, FrameSealer, Suite};

const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];

const SUITES: [(Suite, &str); 2] = [
    (Suite::AesGcm, "aes-256-gcm"),
    (Suite::ChaChaPoly, "chacha20-poly1305"),
];

const KEY: [u8; 32] = [0x42; 32];

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("cipher/seal");
    for (suite, name) in SUITES {
        for size in SIZES {
            let mut sealer = FrameSealer::new(suite, &KEY).expect("key");
            let mut frame = BytesMut::with_capacity(FRAME_OVERHEAD + size);
            frame.put_bytes(0, FRAME_OVERHEAD);
            frame.put_bytes(0x17, size);
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(name, size), |b| {
                // Sealing the same buffer again and again encrypts the last
                // ciphertext: the work is the same.
                b.iter(|| {
                    sealer.seal(&mut frame, black_box(size)).expect("seal");
                });
            });
        }
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let mut group = c.benchmark_group("cipher/open");
    for (suite, name) in SUITES {
        for size in SIZES {
            let mut sealer = FrameSealer::new(suite, &KEY).expect("key");
            let mut opener = FrameOpener::new(suite, &KEY).expect("key");
            let plaintext = vec![0x17u8; size];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(name, size), |b| {
                // Each frame is sealed (untimed) right before it is opened,
                // so the nonces of sealer and opener stay in step.
                b.iter_batched(
                    || BytesMut::from(&sealer.seal_to_bytes(&plaintext).expect("seal")[..]),
                    |frame| opener.open(frame).expect("open"),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    group.finish();
}

criterion_group!(benches, seal, open);
criterion_main!(benches);
