//! Acquire + release throughput: the lock table alone, and the whole server
//! over loopback TCP (one connection, `l key 0` then `r key token`); and
//! one lease sweep of a table holding a million leases, none due.
//!
//! Run with `cargo bench --bench acquire_release`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dflockd::core::{AcquireOutcome, ConnId, FenceCounter, LockTable, ResourceId, TableConfig};
use dflockd::proto::{Key, Limit, Namespace, Reply};
use dflockd::server::{Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn table(c: &mut Criterion) {
    let mut group = c.benchmark_group("lock_table");
    group.throughput(Throughput::Elements(1));
    let mut table: LockTable<(), _> =
        LockTable::new(TableConfig::default(), FenceCounter::with_fixed_salt(0, 1));
    let rid = ResourceId::new(Namespace::Lock, Key::new("bench-key").unwrap());
    let mut token = Vec::with_capacity(32);
    group.bench_function("acquire_release_uncontended", |b| {
        b.iter(|| {
            let now = Duration::from_secs(1);
            let Ok(AcquireOutcome::Granted(grant)) =
                table.acquire(ConnId(1), &rid, Limit::ONE, None, now, None)
            else {
                panic!("not granted")
            };
            token.clear();
            grant.token.write_hex(&mut token);
            table.release(&rid, black_box(&token), now).unwrap();
        })
    });
    group.finish();

    // The sweep scans every lease slot on its interval: its cost with a
    // million held leases (none due, so it only reads).
    let mut group = c.benchmark_group("lease_sweep");
    group.sample_size(20);
    let mut table: LockTable<(), _> = LockTable::new(
        TableConfig {
            max_locks: 2_000_000,
            ..TableConfig::default()
        },
        FenceCounter::with_fixed_salt(0, 1),
    );
    for i in 0..1_000_000u32 {
        let rid = ResourceId::new(Namespace::Lock, Key::new(&format!("k{i}")).unwrap());
        let granted = table.acquire(
            ConnId(u64::from(i % 100)),
            &rid,
            Limit::ONE,
            None,
            Duration::ZERO,
            None,
        );
        assert!(matches!(granted, Ok(AcquireOutcome::Granted(_))));
    }
    group.bench_function("sweep_1m_leases_none_due", |b| {
        b.iter(|| black_box(table.sweep(Duration::from_secs(1))))
    });
    group.finish();
}

fn server(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(Server::start(ServerConfig::ephemeral()))
        .unwrap();
    let addr = server.local_addr();
    let mut group = c.benchmark_group("server_tcp");
    group.throughput(Throughput::Elements(1));
    group.bench_function("acquire_release_one_connection", |b| {
        b.to_async(&runtime).iter_custom(|iters| async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut line = String::new();
            let mut frame = Vec::with_capacity(64);
            let start = std::time::Instant::now();
            for _ in 0..iters {
                write.write_all(b"l\nbench\n10\n").await.unwrap();
                line.clear();
                read.read_line(&mut line).await.unwrap();
                let Ok(Reply::Granted { token, .. }) = Reply::parse(line.as_bytes()) else {
                    panic!("{line}")
                };
                frame.clear();
                frame.extend_from_slice(b"r\nbench\n");
                token.write_hex(&mut frame);
                frame.push(b'\n');
                write.write_all(&frame).await.unwrap();
                line.clear();
                read.read_line(&mut line).await.unwrap();
                assert_eq!(line, "ok\n");
            }
            start.elapsed()
        })
    });
    group.finish();
    runtime.block_on(server.shutdown());
}

criterion_group!(benches, table, server);
criterion_main!(benches);
