//! Acquire + release throughput: the lock table alone, and the whole server
//! over loopback TCP (one connection, `l key 0` then `r key token`); and
//! one lease sweep of a table holding a million leases, none due.
//!
//! Run with `cargo bench --bench acquire_release`.
// criterion's macros make undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dflockd::core::{
    AcquireOutcome, Command, ConnId, LockTable, Op, Outcome, ResourceId, Salt, TableConfig,
};
use dflockd::proto::{Key, Limit, Namespace, Reply};
use dflockd::server::{Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn table(c: &mut Criterion) {
    let mut group = c.benchmark_group("lock_table");
    group.throughput(Throughput::Elements(1));
    let mut table = LockTable::new(TableConfig::default());
    let rid = ResourceId::new(Namespace::Lock, Key::new("bench-key").unwrap());
    let salt = Salt::new(1, 2);
    let now = Duration::from_secs(1);
    group.bench_function("acquire_release_uncontended", |b| {
        b.iter(|| {
            let acquire = Command::new(
                now,
                salt,
                Op::Acquire {
                    conn: ConnId(1),
                    resource: rid.clone(),
                    limit: Limit::ONE,
                    lease: None,
                    wait: None,
                    origin: None,
                },
            );
            let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) =
                table.apply(&acquire).outcome
            else {
                panic!("not granted")
            };
            let release = Command::new(
                now,
                salt,
                Op::Release {
                    resource: rid.clone(),
                    token: black_box(grant.token),
                },
            );
            assert!(table.apply(&release).outcome.is_ok());
        });
    });
    group.finish();

    // The sweep scans every lease slot on its interval: its cost with a
    // million held leases (none due, so it only reads).
    let mut group = c.benchmark_group("lease_sweep");
    group.sample_size(20);
    let mut table = LockTable::new(TableConfig {
        max_locks: 2_000_000,
        ..TableConfig::default()
    });
    for i in 0..1_000_000u32 {
        let acquire = Op::Acquire {
            conn: ConnId(u64::from(i % 100)),
            resource: ResourceId::new(Namespace::Lock, Key::new(&format!("k{i}")).unwrap()),
            limit: Limit::ONE,
            lease: None,
            wait: None,
            origin: None,
        };
        let granted = table
            .apply(&Command::new(Duration::ZERO, salt, acquire))
            .outcome;
        assert!(matches!(
            granted,
            Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))
        ));
    }
    let sweep = Command::new(Duration::from_secs(1), salt, Op::Sweep);
    group.bench_function("sweep_1m_leases_none_due", |b| {
        b.iter(|| black_box(table.apply(&sweep).outcome));
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
        });
    });
    group.finish();
    runtime.block_on(server.shutdown());
}

criterion_group!(benches, table, server);
criterion_main!(benches);
