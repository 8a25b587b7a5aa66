//! Wire format: encoding and decoding frames of `flow-message`.
//!
//! - `message/encode/data/N` and `message/decode/data/N`: a frame holding one
//!   `Data` message with an N-byte payload.
//! - `message/*/small-batch`: a frame of 32 `Data` messages of 64 bytes and a
//!   `Release` for 8 flows, the shape the writer makes when many flows send
//!   small messages at once.
//! - `message/varint`: encoding then decoding 1,024 varints of every length.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flow_message::codec::{Reader, put_varint};
use flow_message::{Data, Flags, FrameMessages, Message, Release, ReleaseMsg, encode_frame};

const PAYLOADS: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];

fn data_frame(size: usize) -> Vec<Message> {
    vec![Message::Data(Data {
        id: 1_001,
        flags: Flags::NONE,
        payload: Bytes::from(vec![0xa5; size]),
    })]
}

fn small_batch() -> Vec<Message> {
    let mut messages: Vec<Message> = (0..32u64)
        .map(|i| {
            Message::Data(Data {
                id: 2 * i + 1,
                flags: Flags::NONE,
                payload: Bytes::from(vec![i as u8; 64]),
            })
        })
        .collect();
    messages.push(Message::Release(ReleaseMsg {
        releases: (0..8u64)
            .map(|i| Release {
                flow_id: 2 * i,
                tokens: 128 * 1024,
            })
            .collect(),
    }));
    messages
}

fn encoded(messages: &[Message]) -> Bytes {
    let mut buf = BytesMut::new();
    encode_frame(messages, &mut buf);
    buf.freeze()
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("message/encode");
    let mut cases: Vec<(String, Vec<Message>)> = PAYLOADS
        .iter()
        .map(|&size| (format!("data/{size}"), data_frame(size)))
        .collect();
    cases.push(("small-batch".to_string(), small_batch()));
    for (name, messages) in &cases {
        let len = encoded(messages).len();
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = BytesMut::with_capacity(len);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                buf.clear();
                encode_frame(black_box(messages), &mut buf);
                black_box(buf.len())
            });
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("message/decode");
    let mut cases: Vec<(String, Bytes)> = PAYLOADS
        .iter()
        .map(|&size| (format!("data/{size}"), encoded(&data_frame(size))))
        .collect();
    cases.push(("small-batch".to_string(), encoded(&small_batch())));
    for (name, frame) in &cases {
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let mut count = 0usize;
                for message in FrameMessages::new(black_box(frame.clone())) {
                    black_box(message.expect("valid frame"));
                    count += 1;
                }
                count
            });
        });
    }
    group.finish();
}

fn varint(c: &mut Criterion) {
    // Values of every encoded length from 1 to 9 bytes.
    let values: Vec<u64> = (0..1024u64)
        .map(|i| {
            let bits = (i % 64) as u32;
            (1u64 << bits).wrapping_sub(1) ^ i
        })
        .collect();
    let mut group = c.benchmark_group("message/varint");
    group.throughput(Throughput::Elements(values.len() as u64));
    let mut buf = BytesMut::with_capacity(values.len() * 9);
    group.bench_function("encode+decode/1024", |b| {
        b.iter(|| {
            buf.clear();
            for &v in &values {
                put_varint(&mut buf, black_box(v));
            }
            let mut reader = Reader::new(buf.clone().freeze(), "bench");
            let mut sum = 0u64;
            for _ in 0..values.len() {
                sum = sum.wrapping_add(reader.varint("v").expect("valid varint"));
            }
            sum
        });
    });
    group.finish();
}

criterion_group!(benches, encode, decode, varint);
criterion_main!(benches);
