//! Failover benchmark: many leases held by one client through repeated
//! kills of the dflockd leader of a three-node cluster in this process
//! (`dflockd_testkit::cluster`, Raft links on loopback, logs fsync'd).
//!
//! ```text
//! cargo run --release -p dflockd-client --example lease_failover -- [leases] [ttl_s] [kills]
//! ```
//!
//! Prints, per kill, the unavailability window (kill → first new lock
//! granted through the new leader) and, at the end, leases lost and the
//! renew gap: per lease the longest time between two moves of its
//! deadline (sampled every 100 ms), as p50 and max over the leases.

use std::time::{Duration, Instant};

use dflockd_client::{Client, Lease};
use dflockd_testkit::cluster::TestCluster;

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn tweak(config: &mut dflockd_server::ServerConfig) {
    config.max_locks = 1_000_000;
    if let Some(cluster) = config.cluster.as_mut() {
        cluster.orphan_ttl = Duration::from_secs(60);
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (leases_wanted, ttl, kills) = (arg(1, 10_000) as usize, arg(2, 10), arg(3, 5));
    let mut cluster = TestCluster::start_with(3, tweak).await;
    let (mut leader, _) = cluster.leader().await;
    let client = Client::builder()
        .cluster(cluster.client_addrs.clone())
        .build()?;

    let started = Instant::now();
    let mut leases: Vec<Lease> = Vec::with_capacity(leases_wanted);
    for chunk in (0..leases_wanted).collect::<Vec<_>>().chunks(1_000) {
        let mut acquiring = tokio::task::JoinSet::new();
        for &i in chunk {
            let lock = client
                .lock(&format!("failover/{i}"))?
                .with_lease(Duration::from_secs(ttl));
            acquiring.spawn(async move { lock.acquire().await });
        }
        while let Some(lease) = acquiring.join_next().await {
            leases.push(lease??);
        }
    }
    println!(
        "{} leases of {ttl} s acquired in {:.2?}",
        leases.len(),
        started.elapsed()
    );

    // Sampler: each lease's deadline every 100 ms; the longest stretch
    // without a move is its renew gap.
    let leases = std::sync::Arc::new(leases);
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (leases, stop) = (std::sync::Arc::clone(&leases), stop.clone());
        tokio::spawn(async move {
            let now = tokio::time::Instant::now();
            let mut last: Vec<_> = leases.iter().map(|l| (l.deadline(), now)).collect();
            let mut gaps = vec![Duration::ZERO; leases.len()];
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = tokio::time::Instant::now();
                for (i, lease) in leases.iter().enumerate() {
                    let deadline = lease.deadline();
                    if deadline != last[i].0 {
                        gaps[i] = gaps[i].max(now - last[i].1);
                        last[i] = (deadline, now);
                    }
                }
            }
            gaps
        })
    };

    for kill in 1..=kills {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at = Instant::now();
        cluster.kill(leader).await;
        let probe = client.lock(&format!("failover/probe-{kill}"))?;
        let window = loop {
            if let Ok(Some(lease)) = probe.try_acquire().await {
                let window = at.elapsed();
                lease.release().await?;
                break window;
            }
            if at.elapsed() > Duration::from_secs(30) {
                return Err("no leader within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (next, _) = cluster.leader().await;
        println!(
            "kill {kill}: node {leader} → leader {next}, unavailable {window:.3?}, lost so far {}",
            leases.iter().filter(|l| l.is_lost()).count()
        );
        cluster.restart(leader).await;
        leader = next;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut gaps = sampler.await?;
    gaps.sort();
    let lost = leases.iter().filter(|l| l.is_lost()).count();
    println!(
        "leases lost {lost} of {}; renew gap p50 {:.2?}, max {:.2?}",
        leases.len(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    Ok(())
}
