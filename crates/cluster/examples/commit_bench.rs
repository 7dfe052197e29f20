//! Commit latency and throughput of the cluster storage and Raft, in this
//! process on 127.0.0.1, every write fsync'd:
//!
//! ```sh
//! cargo run --release -p dflockd-cluster --example commit_bench -- 3 50 10
//! ```
//!
//! arguments: nodes (1 or 3), concurrent proposers, seconds. Each proposer
//! takes and releases its own key in a loop (two commands per round), so
//! the figures are comparable with `dflock bench`'s acquire + release
//! pairs. Prints rounds/s, the latency of one command (p50, p99) and how
//! many commands a log entry carried on average.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dflockd_cluster::Node;
use dflockd_core::{AcquireOutcome, ConnId, Op, Outcome, ResourceId, TableConfig};
use dflockd_proto::{Key, Limit, Namespace};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let nodes_wanted = args.first().copied().unwrap_or(3);
    let workers = args.get(1).copied().unwrap_or(10);
    let seconds = args.get(2).copied().unwrap_or(5);

    let mut listeners = Vec::new();
    for _ in 0..nodes_wanted {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let voters: Vec<(u64, SocketAddr)> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Ok((i as u64 + 1, l.local_addr()?)))
        .collect::<Result<_, std::io::Error>>()?;
    let mut dirs = Vec::new();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let config = TableConfig {
            max_locks: 1_000_000,
            ..TableConfig::default()
        };
        nodes.push(Node::start(i as u64 + 1, dir.path(), listener, config).await?);
        dirs.push(dir);
    }
    nodes[0].initialize(&voters).await?;
    let leader_id = loop {
        if let Some(id) = nodes[0].raft().metrics().borrow().current_leader {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let leader = Arc::new(nodes.remove((leader_id - 1) as usize));
    let before = leader.raft().metrics().borrow().last_log_index.unwrap_or(0);

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let leader = Arc::clone(&leader);
        tasks.push(tokio::spawn(async move {
            let rid = ResourceId::new(Namespace::Lock, Key::new(&format!("bench-{w}")).unwrap());
            let mut latencies = Vec::new();
            let mut rounds = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let acquire = Op::Acquire {
                    conn: ConnId(w + 1),
                    resource: rid.clone(),
                    limit: Limit::ONE,
                    lease: None,
                    wait: None,
                    origin: None,
                };
                let effects = leader.propose(acquire).await.expect("committed");
                latencies.push(sent.elapsed());
                let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = effects.outcome else {
                    panic!("not granted: {effects:?}");
                };
                let sent = Instant::now();
                let release = Op::Release {
                    resource: rid.clone(),
                    token: grant.token,
                };
                let _ = leader.propose(release).await.expect("committed");
                latencies.push(sent.elapsed());
                rounds += 1;
            }
            (rounds, latencies)
        }));
    }
    let mut rounds = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let (r, l) = task.await?;
        rounds += r;
        latencies.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let entries = leader.raft().metrics().borrow().last_log_index.unwrap_or(0) - before;
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "nodes {nodes_wanted}, proposers {workers}, {seconds} s: {:.0} acquire+release rounds/s, \
         command latency p50 {:?} p99 {:?}, {} log entries for {} commands ({:.1} per entry)",
        rounds as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        entries,
        latencies.len(),
        latencies.len() as f64 / entries.max(1) as f64,
    );
    drop(dirs);
    Ok(())
}
