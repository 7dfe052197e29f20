//! The wire codec alone: decoding and parsing request frames, encoding
//! replies. `cargo bench --bench codec`
// criterion's macros make undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dflockd::proto::{FrameDecoder, Lease, Progress, Reply, Request, Token};

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let acquire = b"l\nbench-key-42\n10 30\n";
    group.bench_function("decode_and_parse_acquire", |b| {
        let mut decoder = FrameDecoder::new();
        b.iter(|| {
            let (_, progress) = decoder.feed(black_box(acquire));
            assert_eq!(progress, Progress::Frame);
            black_box(Request::parse(&decoder.frame()).unwrap());
        });
    });
    let release = b"r\nbench-key-42\n183c7875229b00017f3c1f2b3e9a8d6e\n";
    group.bench_function("decode_and_parse_release", |b| {
        let mut decoder = FrameDecoder::new();
        b.iter(|| {
            decoder.feed(black_box(release));
            black_box(Request::parse(&decoder.frame()).unwrap());
        });
    });
    let grant = Reply::Granted {
        token: Token::new(1_746_403_200_000_000_001, 0x7f3c_1f2b_3e9a_8d6e),
        lease: Lease::new(33).unwrap(),
    };
    group.bench_function("encode_grant_reply", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            black_box(&grant).encode(&mut out);
            black_box(&out);
        });
    });
    let line = b"ok 183c7875229b00017f3c1f2b3e9a8d6e 33\n";
    group.bench_function("parse_grant_reply", |b| {
        b.iter(|| black_box(Reply::parse(black_box(line)).unwrap()));
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
