//! 1,000,000 unique keys churned through the idle-resource GC: memory stays
//! bounded and the table empties. Its own test binary, so the process's RSS
//! is this test's alone (no other test shares the process).
//!
//! Protection checked: idle-resource GC (`--gc-interval`, `--gc-max-idle`).
//! The `#[ignore]`d control runs the same churn with GC effectively off and
//! asserts that it *exceeds* the bound — run it with
//! `cargo test --test gc_churn -- --ignored --nocapture` to see the bound bite.

use std::time::Duration;

use dflockd_server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::{Instant, timeout};

const KEYS: usize = 1_000_000;
const CONNECTIONS: usize = 4;
const BATCH: usize = 1_000;
/// Growth of RSS over the start allowed while churning with GC. Measured on
/// a 2-core VM (debug build, 4 connections, ≈ 17 s): with GC +13.2 MiB;
/// without GC (the ignored control) +323.0 MiB.
const RSS_GROWTH_BOUND: u64 = 64 * 1024 * 1024;
const STEP: Duration = Duration::from_secs(10);

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("resident pages");
    pages * 4096
}

async fn start(gc: bool) -> ServerHandle {
    let (gc_interval, gc_max_idle) = if gc {
        (Duration::from_millis(100), Duration::from_millis(200))
    } else {
        (Duration::from_secs(3600), Duration::from_secs(3600))
    };
    Server::start(ServerConfig {
        gc_interval,
        gc_max_idle,
        max_locks: 2 * KEYS,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("server starts")
}

async fn send(write: &mut OwnedWriteHalf, bytes: &[u8]) {
    timeout(STEP, write.write_all(bytes))
        .await
        .expect("write in time")
        .expect("write");
}

/// One connection's share: batches of try-locks on fresh keys, then the
/// releases of their tokens, pipelined. Returns the peak RSS it saw.
async fn churn(server: std::net::SocketAddr, conn: usize) -> u64 {
    let stream = TcpStream::connect(server).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let mut line = String::new();
    let mut peak = 0;
    let per_conn = KEYS / CONNECTIONS;
    let mut out = Vec::with_capacity(BATCH * 48);
    let mut tokens = Vec::with_capacity(BATCH);
    for batch in (0..per_conn).step_by(BATCH) {
        let keys = batch..(batch + BATCH).min(per_conn);
        out.clear();
        for n in keys.clone() {
            out.extend_from_slice(format!("l\ngc-{conn}-{n}\n0\n").as_bytes());
        }
        send(&mut write, &out).await;
        tokens.clear();
        for _ in keys.clone() {
            line.clear();
            timeout(STEP, read.read_line(&mut line))
                .await
                .expect("reply in time")
                .expect("read");
            let token = line
                .strip_prefix("ok ")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("expected a grant, got {line:?}"));
            tokens.push(token.to_owned());
        }
        out.clear();
        for (n, token) in keys.clone().zip(&tokens) {
            out.extend_from_slice(format!("r\ngc-{conn}-{n}\n{token}\n").as_bytes());
        }
        send(&mut write, &out).await;
        for _ in keys {
            line.clear();
            timeout(STEP, read.read_line(&mut line))
                .await
                .expect("reply in time")
                .expect("read");
            assert_eq!(line, "ok\n");
        }
        peak = peak.max(rss());
    }
    peak
}

/// Churns all keys; returns (RSS at start, peak RSS, seconds).
async fn run(server: &ServerHandle) -> (u64, u64, f64) {
    let started = Instant::now();
    let before = rss();
    let mut tasks = Vec::new();
    for conn in 0..CONNECTIONS {
        tasks.push(tokio::spawn(churn(server.local_addr(), conn)));
    }
    let mut peak = before;
    for task in tasks {
        peak = peak.max(task.await.expect("churn task"));
    }
    (before, peak, started.elapsed().as_secs_f64())
}

/// How many resources (held or idle) the server still has.
async fn resources(server: &ServerHandle) -> usize {
    let stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    send(&mut write, b"stats\n_\n_\n").await;
    let mut line = String::new();
    timeout(STEP, BufReader::new(read).read_line(&mut line))
        .await
        .expect("stats in time")
        .expect("read");
    let json: serde_json::Value =
        serde_json::from_str(line.trim_end().strip_prefix("ok ").expect("ok")).expect("json");
    ["locks", "semaphores", "idle_locks", "idle_semaphores"]
        .iter()
        .map(|field| json[field].as_array().map_or(0, Vec::len))
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_unique_keys_through_gc_keep_memory_bounded() {
    let server = start(true).await;
    let (before, peak, secs) = run(&server).await;
    // Every key is idle now; GC collects them all (bounded poll).
    let deadline = Instant::now() + STEP;
    let mut left = resources(&server).await;
    while left > 0 {
        assert!(
            Instant::now() < deadline,
            "{left} resources never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = resources(&server).await;
    }
    eprintln!(
        "{KEYS} unique keys (acquire + release) in {secs:.1} s with GC: RSS {:.1} MiB -> peak {:.1} MiB (+{:.1} MiB, bound +{:.0} MiB); resources left {left}",
        mib(before),
        mib(peak),
        mib(peak - before),
        mib(RSS_GROWTH_BOUND)
    );
    assert!(
        peak - before < RSS_GROWTH_BOUND,
        "RSS grew by {:.1} MiB",
        mib(peak - before)
    );
}

/// The control: the same churn with GC effectively off must exceed the
/// bound, or the bound above proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "control for the bound: cargo test --test gc_churn -- --ignored --nocapture"]
async fn without_gc_the_same_churn_exceeds_the_bound() {
    let server = start(false).await;
    let (before, peak, secs) = run(&server).await;
    eprintln!(
        "{KEYS} unique keys in {secs:.1} s without GC: RSS {:.1} MiB -> peak {:.1} MiB (+{:.1} MiB)",
        mib(before),
        mib(peak),
        mib(peak - before)
    );
    assert!(peak - before >= RSS_GROWTH_BOUND);
}
