//! The client-side safety checker: clients of the cluster-aware Rust
//! client contend for one lock through random faults — node kills (with
//! restarts from disk), partitions between nodes, partitions between one
//! client and one node, and asymmetric resets of a client's connection —
//! and write to a fenced register while they hold it.
//!
//! Each client reaches every node through a fault proxy of its own, so a
//! fault can cut one client off without touching the others. A client
//! believes it holds the lock from the grant until it sends the release,
//! and never past its lease's local deadline (`Lease::deadline`, which the
//! client keeps short of the server's by its safety margin) nor after the
//! lease is reported lost. Checked and printed:
//! * **violations** — a grant while another client believes it holds;
//! * **stale writes** — the register saw a fence below one it accepted;
//! * leases held through failovers (a hold during which the term moved),
//!   leases lost (reported lost by the client: allowed, a client cut off
//!   for longer than its lease loses it), errors surfaced to the caller;
//! * at the end, the lock is free (no acknowledged release was lost).
//!
//! After each repair, some client must be granted the lock again within
//! a bound (the cluster returns to service).
//!
//! The CI version runs 40 faults (about a minute);
//! `cluster_client_safety_soak` (ignored) runs 300.
//! `DFLOCKD_SAFETY_SEED` repeats a run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dflockd_client::{Client, LeaseMonitor};
use dflockd_testkit::cluster::{CLUSTER_WAIT, TestCluster, with_orphans};
use dflockd_testkit::faultproxy::{Blackhole, Direction, FaultProxy, Faults, Side};
use tokio::time::Instant;

const KEY: &str = "safety";
/// The lease clients ask for.
const LEASE: Duration = Duration::from_secs(3);
const CLIENTS: usize = 4;
/// How soon after a repair some client must be granted the lock again:
/// an election, a reconnect, and a cut-off holder's lease running out.
const RECOVERY: Duration = Duration::from_secs(21);

/// Everything the clients and the register saw.
#[derive(Default)]
struct Ledger {
    /// Per client: its lease while it believes it holds the lock.
    holding: Vec<Option<LeaseMonitor>>,
    grants: u64,
    /// `grants`, for those who wait for the next one.
    granted: tokio::sync::watch::Sender<u64>,
    violations: u64,
    held_through_failover: u64,
    leases_lost: u64,
    /// Errors returned to callers, by kind.
    errors: BTreeMap<String, u64>,
    register_highest: u64,
    writes: u64,
    stale_writes: u64,
}

impl Ledger {
    fn begin_hold(&mut self, client: usize, lease: LeaseMonitor, fence: u64) {
        let now = Instant::now();
        for (other, held) in self.holding.iter().enumerate() {
            if let Some(held) = held
                && other != client
                && !held.is_lost()
                && held.deadline() > now
            {
                eprintln!(
                    "violation: client {client} granted fence {fence} while client {other} believes it holds for {:?} more",
                    held.deadline() - now
                );
                self.violations += 1;
            }
        }
        self.grants += 1;
        self.granted.send_replace(self.grants);
        self.holding[client] = Some(lease);
    }

    fn end_hold(&mut self, client: usize) {
        self.holding[client] = None;
    }

    fn write(&mut self, fence: u64) {
        self.writes += 1;
        if fence < self.register_highest {
            eprintln!("stale write: fence {fence} after {}", self.register_highest);
            self.stale_writes += 1;
        } else {
            self.register_highest = fence;
        }
    }

    fn error(&mut self, what: &str, error: &dflockd_client::Error) {
        eprintln!("{what}: {error} ({:?})", error.kind());
        let kind = format!("{what}: {:?}", error.kind());
        let kind = kind
            .split(['(', '{'])
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// One client: acquire, hold a while (writing to the register while the
/// lease is not lost), release; until `stop`.
async fn client(
    id: usize,
    nodes: Vec<SocketAddr>,
    ledger: Arc<Mutex<Ledger>>,
    term: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let client = Client::builder()
        .cluster(nodes)
        .connect_timeout(Duration::from_secs(1))
        .reply_timeout(Duration::from_secs(1))
        .keepalive(Duration::from_millis(500))
        .build()
        .expect("client builds");
    let lock = client.lock(KEY).unwrap().with_lease(LEASE);
    while !stop.load(Ordering::Relaxed) {
        let lease = match lock.acquire_within(Duration::from_secs(5)).await {
            Ok(Some(lease)) => lease,
            Ok(None) => continue,
            Err(error) => {
                ledger.lock().unwrap().error("acquire", &error);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let fence = lease.fence();
        let first_term = term.load(Ordering::Relaxed);
        ledger
            .lock()
            .unwrap()
            .begin_hold(id, lease.monitor(), fence);
        let hold_end = Instant::now() + Duration::from_millis(100 + fastrand::u64(0..300));
        while Instant::now() < hold_end && !lease.is_lost() {
            {
                let mut ledger = ledger.lock().unwrap();
                // Written only while the client believes it holds.
                if !lease.is_lost() && lease.deadline() > Instant::now() {
                    ledger.write(fence);
                }
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let lost = lease.is_lost();
        {
            let mut ledger = ledger.lock().unwrap();
            ledger.end_hold(id);
            if lost {
                ledger.leases_lost += 1;
            } else if term.load(Ordering::Relaxed) > first_term {
                ledger.held_through_failover += 1;
            }
        }
        if let Err(error) = lease.release().await {
            ledger.lock().unwrap().error("release", &error);
        }
    }
}

/// One fault and its repair. At most one node is out (or one client cut
/// off from one node) at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillNode,
    PartitionNodes,
    PartitionClient,
    AsymmetricReset,
}

struct Harness {
    cluster: TestCluster,
    /// `proxies[client][node]`.
    proxies: Vec<Vec<FaultProxy>>,
}

impl Harness {
    async fn fault(&mut self, rng: &mut fastrand::Rng) -> Fault {
        let fault = match rng.u8(0..4) {
            0 => Fault::KillNode,
            1 => Fault::PartitionNodes,
            2 => Fault::PartitionClient,
            _ => Fault::AsymmetricReset,
        };
        // Half the time the leader, or else any node.
        let (leader, _) = self.cluster.leader().await;
        let node = if rng.bool() { leader } else { rng.usize(0..3) };
        let outage = Duration::from_millis(200 + rng.u64(0..1200));
        match fault {
            Fault::KillNode => {
                self.cluster.kill(node).await;
                tokio::time::sleep(outage).await;
                self.cluster.restart(node).await;
            }
            Fault::PartitionNodes => {
                self.cluster.isolate(node).await;
                tokio::time::sleep(outage).await;
                self.cluster.heal().await;
            }
            Fault::PartitionClient => {
                let proxy = &self.proxies[rng.usize(0..CLIENTS)][node];
                let cut = Faults::none().with_blackhole(Blackhole::Drop);
                for dir in [Direction::ToServer, Direction::ToClient] {
                    proxy.set_default_faults(dir, cut);
                    for link in proxy.links() {
                        link.set_faults(dir, cut);
                    }
                }
                tokio::time::sleep(outage).await;
                for dir in [Direction::ToServer, Direction::ToClient] {
                    proxy.set_default_faults(dir, Faults::none());
                }
                for link in proxy.links() {
                    link.clear_faults();
                }
            }
            Fault::AsymmetricReset => {
                let proxy = &self.proxies[rng.usize(0..CLIENTS)][node];
                let first = if rng.bool() {
                    Side::Client
                } else {
                    Side::Server
                };
                let delay = Duration::from_millis(50 + rng.u64(0..450));
                for link in proxy.links().into_iter().filter(|l| !l.is_closed()) {
                    link.reset_asymmetric(first, delay).await;
                }
            }
        }
        fault
    }
}

async fn run_checker(fault_count: u64) {
    let seed = std::env::var("DFLOCKD_SAFETY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    eprintln!("client safety checker seed {seed} (DFLOCKD_SAFETY_SEED to repeat)");
    let cluster = TestCluster::start_with(3, with_orphans).await;
    let _ = cluster.leader().await;
    let mut proxies = Vec::new();
    for _ in 0..CLIENTS {
        let mut mine = Vec::new();
        for addr in &cluster.client_addrs {
            mine.push(FaultProxy::start(*addr).await.expect("proxy"));
        }
        proxies.push(mine);
    }
    let first_term = cluster.term();
    let term = Arc::new(AtomicU64::new(first_term));
    let ledger = Ledger {
        holding: (0..CLIENTS).map(|_| None).collect(),
        ..Ledger::default()
    };
    let mut grants = ledger.granted.subscribe();
    let ledger = Arc::new(Mutex::new(ledger));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = proxies
        .iter()
        .enumerate()
        .map(|(id, mine)| {
            tokio::spawn(client(
                id,
                mine.iter().map(FaultProxy::addr).collect(),
                Arc::clone(&ledger),
                Arc::clone(&term),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let mut harness = Harness { cluster, proxies };
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut slowest_recovery = Duration::ZERO;
    for n in 0..fault_count {
        let fault = harness.fault(&mut rng).await;
        *faults.entry(fault).or_default() += 1;
        term.fetch_max(harness.cluster.term(), Ordering::Relaxed);
        // The cluster serves again after each repair: some client is
        // granted the lock within a bound (a holder cut off may keep it
        // until its lease runs out, an election may be under way).
        let repaired = Instant::now();
        let seen = *grants.borrow_and_update();
        // (`wait_for` answers with a read guard of the watch: drop it at
        // once, or the next grant's send blocks on it.)
        let served = tokio::time::timeout(RECOVERY, grants.wait_for(|&g| g > seen))
            .await
            .is_ok_and(|seen| seen.is_ok());
        assert!(
            served,
            "seed {seed}: no grant within {RECOVERY:?} after fault {n} ({fault:?}) was repaired"
        );
        slowest_recovery = slowest_recovery.max(repaired.elapsed());
        // And some more time to serve, of random length.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        term.fetch_max(harness.cluster.term(), Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(CLUSTER_WAIT * 2, task)
            .await
            .expect("clients stop")
            .expect("no client task panicked");
    }
    // Every lease was released or ran out: a try-lock must succeed soon.
    let free_by = Instant::now() + 2 * LEASE + Duration::from_secs(2);
    let free = loop {
        let (_, mut c) = harness.cluster.leader().await;
        let reply = c.req(format!("l\n{KEY}\n0\n")).await;
        if reply.starts_with("ok ") || Instant::now() >= free_by {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failovers = harness.cluster.term().saturating_sub(first_term);
    let ledger = ledger.lock().unwrap();
    println!(
        "client safety: {} faults {faults:?} in {:.0} s, {failovers} failovers (terms), {} grants, \
         {} fenced writes, {} leases held through failovers, {} leases lost, errors {:?}, \
         {} violations, {} stale writes, lock free at the end: {}; slowest return to service \
         after a repair {slowest_recovery:?}",
        fault_count,
        started.elapsed().as_secs_f64(),
        ledger.grants,
        ledger.writes,
        ledger.held_through_failover,
        ledger.leases_lost,
        ledger.errors,
        ledger.violations,
        ledger.stale_writes,
        free.starts_with("ok "),
    );
    assert_eq!(ledger.violations, 0, "seed {seed}: two holders at once");
    assert_eq!(ledger.stale_writes, 0, "seed {seed}: a stale fenced write");
    assert!(
        free.starts_with("ok "),
        "seed {seed}: the lock never became free: {free}"
    );
    assert!(failovers > 0, "seed {seed}: no failover happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_client_safety_under_40_random_faults() {
    run_checker(40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 300 faults, several minutes"]
async fn cluster_client_safety_soak() {
    run_checker(300).await;
}
