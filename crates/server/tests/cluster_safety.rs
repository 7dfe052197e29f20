//! The safety checker: random faults (leader and follower kills with
//! restarts from disk, isolations healed later) against a three-node
//! cluster while clients contend for one lock, renew through failovers and
//! write to a fenced register.
//!
//! Each client believes it holds the lock from its grant until it sends
//! the release, and never past the lease counted from when it sent its last
//! successful renew (or its acquire): a conservative belief. Checked:
//! * **violations** — two clients believe they hold the lock at once;
//! * **stale fenced writes** — the register saw a write with a fence below
//!   one it had accepted;
//! * **lost acknowledged grants** — a renew sent within the lease was
//!   answered "not held" (the cluster forgot a grant it acknowledged);
//! * **lost acknowledged releases** — a released lock never became free
//!   again (checked at the end: every lock is released, so a try-lock
//!   must succeed once the last leases ran out).
//!
//! The CI version runs 50 faults; `cluster_safety_soak` (ignored) runs 400.

use dflockd_testkit::cluster as harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{CLUSTER_WAIT, TestCluster};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

const KEY: &str = "safety";
/// The lease clients ask for, in seconds.
const LEASE: u64 = 3;
/// How long one request may take before the client gives up on its node.
const REQUEST_LIMIT: Duration = Duration::from_millis(1500);

/// Everything the clients and the register saw.
#[derive(Default)]
struct Ledger {
    /// Per client: until when it believes it holds the lock, if it does.
    holding: Vec<Option<Instant>>,
    violations: u64,
    grants: u64,
    /// Holds renewed on a leader other than the one that granted them.
    held_through_failover: u64,
    /// Holds whose renewal could not reach a leader within the lease.
    leases_lost: u64,
    lost_grants: u64,
    register_highest: u64,
    stale_writes: u64,
    writes: u64,
}

impl Ledger {
    fn begin_hold(&mut self, client: usize, until: Instant) {
        let now = Instant::now();
        let others = self
            .holding
            .iter()
            .enumerate()
            .filter(|&(other, until)| other != client && until.is_some_and(|u| u > now))
            .count();
        if others > 0 {
            eprintln!("client {client}: granted while {others} other(s) believe they hold");
            self.violations += 1;
        }
        self.holding[client] = Some(until);
    }

    fn extend_hold(&mut self, client: usize, until: Instant) {
        self.holding[client] = Some(until);
    }

    fn end_hold(&mut self, client: usize) {
        self.holding[client] = None;
    }

    fn write(&mut self, fence: u64) {
        self.writes += 1;
        if fence < self.register_highest {
            self.stale_writes += 1;
        } else {
            self.register_highest = fence;
        }
    }
}

/// A connection to whichever node leads, found by following redirects.
struct LeaderLink {
    nodes: Vec<SocketAddr>,
    conn: Option<(SocketAddr, BufReader<TcpStream>)>,
    next: usize,
}

enum Answer {
    Reply(String),
    /// The node could not answer (gone, not leader, too slow).
    Unavailable,
}

impl LeaderLink {
    fn new(nodes: Vec<SocketAddr>) -> LeaderLink {
        LeaderLink {
            nodes,
            conn: None,
            next: 0,
        }
    }

    fn current(&self) -> Option<SocketAddr> {
        self.conn.as_ref().map(|(addr, _)| *addr)
    }

    /// Sends `request` to the node it is connected to (connecting to the
    /// next node if none); a redirect moves it to the named node.
    async fn ask(&mut self, request: &str) -> Answer {
        if self.conn.is_none() {
            let addr = self.nodes[self.next % self.nodes.len()];
            self.next += 1;
            match tokio::time::timeout(REQUEST_LIMIT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => self.conn = Some((addr, BufReader::new(stream))),
                _ => return Answer::Unavailable,
            }
        }
        let Some((_, stream)) = self.conn.as_mut() else {
            return Answer::Unavailable;
        };
        let exchange = async {
            stream.get_mut().write_all(request.as_bytes()).await?;
            let mut line = String::new();
            if stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok::<_, std::io::Error>(line.trim_end().to_string())
        };
        match tokio::time::timeout(REQUEST_LIMIT, exchange).await {
            // A node going away answers error_draining: try the others.
            Ok(Ok(line)) if line == "error_draining" => {
                self.conn = None;
                Answer::Unavailable
            }
            Ok(Ok(line)) if line.starts_with("error_not_leader") => {
                self.conn = None;
                if let Some(addr) = line.split_whitespace().nth(1)
                    && let Some(index) = self.nodes.iter().position(|n| n.to_string() == addr)
                {
                    self.next = index;
                }
                Answer::Unavailable
            }
            Ok(Ok(line)) => Answer::Reply(line),
            other => {
                if std::env::var("SAFETY_DEBUG").is_ok() {
                    let what = match other {
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timeout".into(),
                        _ => String::new(),
                    };
                    eprintln!(
                        "{:?} drop {:?} on {:?}: {what}",
                        Instant::now(),
                        request.lines().next(),
                        self.current()
                    );
                }
                self.conn = None;
                Answer::Unavailable
            }
        }
    }
}

fn fence(token: &str) -> u64 {
    u64::from_str_radix(&token[..16], 16).unwrap_or(0)
}

/// One client: acquire, hold a while (renewing, writing to the register),
/// release; over and over until `stop`.
async fn client(
    id: usize,
    nodes: Vec<SocketAddr>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let lease = Duration::from_secs(LEASE);
    let mut link = LeaderLink::new(nodes);
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let reply = match link.ask(&format!("l\n{KEY}\n1 {LEASE}\n")).await {
            Answer::Reply(reply) => reply,
            Answer::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(token) = reply
            .strip_prefix("ok ")
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
        else {
            continue; // timeout: someone else holds it
        };
        let granted_by = link.current();
        // The belief ends a lease after the last successful renew was sent.
        let mut valid_until = sent + lease;
        {
            let mut ledger = ledger.lock().unwrap();
            ledger.grants += 1;
            ledger.begin_hold(id, valid_until);
        }
        let mut failed_over = false;
        let hold_for = Duration::from_millis(100 + fastrand::u64(0..300));
        let hold_end = Instant::now() + hold_for;
        let mut lost = false;
        while Instant::now() < hold_end {
            ledger.lock().unwrap().write(fence(&token));
            tokio::time::sleep(Duration::from_millis(40)).await;
            // Renew until it works or the lease is gone.
            loop {
                if Instant::now() >= valid_until {
                    lost = true;
                    ledger.lock().unwrap().leases_lost += 1;
                    break;
                }
                let sent = Instant::now();
                match link.ask(&format!("n\n{KEY}\n{token} {LEASE}\n")).await {
                    Answer::Reply(reply) if reply.starts_with("ok") => {
                        valid_until = sent + lease;
                        ledger.lock().unwrap().extend_hold(id, valid_until);
                        if link.current() != granted_by {
                            failed_over = true;
                        }
                        break;
                    }
                    Answer::Reply(reply) => {
                        // Not held, though our lease has not run out.
                        lost = true;
                        if Instant::now() < valid_until {
                            eprintln!(
                                "{:?} client {id}: renew refused within the lease: {reply} on {:?}, granted by {granted_by:?} at {sent:?}",
                                Instant::now(),
                                link.current()
                            );
                            ledger.lock().unwrap().lost_grants += 1;
                        }
                        break;
                    }
                    Answer::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            if lost || Instant::now() >= valid_until {
                break;
            }
        }
        {
            let mut ledger = ledger.lock().unwrap();
            ledger.end_hold(id);
            if failed_over && !lost {
                ledger.held_through_failover += 1;
            }
        }
        if lost {
            continue;
        }
        // Release; retried through failovers until answered.
        let deadline = Instant::now() + CLUSTER_WAIT;
        while Instant::now() < deadline {
            match link.ask(&format!("r\n{KEY}\n{token}\n")).await {
                Answer::Reply(_) => break,
                Answer::Unavailable => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// One random fault, then its repair: kill and restart a node, or isolate
/// one and heal. At most one node is out at a time, so a majority serves.
async fn fault(cluster: &mut TestCluster, faults: &AtomicU64, rng: &mut fastrand::Rng) {
    let victim = rng.usize(0..3);
    faults.fetch_add(1, Ordering::Relaxed);
    let outage = Duration::from_millis(200 + rng.u64(0..1200));
    if rng.bool() {
        cluster.kill(victim).await;
        tokio::time::sleep(outage).await;
        cluster.restart(victim).await;
    } else {
        cluster.isolate(victim).await;
        tokio::time::sleep(outage).await;
        cluster.heal().await;
    }
}

async fn run_checker(fault_count: u64) {
    let seed = std::env::var("DFLOCKD_SAFETY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    if std::env::var("SAFETY_DEBUG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("dflockd_server=debug")
            .with_writer(std::io::stderr)
            .try_init();
    }
    eprintln!("safety checker seed {seed} (DFLOCKD_SAFETY_SEED to repeat)");
    let mut cluster = TestCluster::start(3).await;
    let _ = cluster.leader().await;
    let first_term = cluster.term();
    let clients = 4;
    let ledger = Arc::new(Mutex::new(Ledger {
        holding: vec![None; clients],
        ..Ledger::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            tokio::spawn(client(
                id,
                cluster.client_addrs.clone(),
                Arc::clone(&ledger),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let faults = AtomicU64::new(0);
    let started = Instant::now();
    for _ in 0..fault_count {
        fault(&mut cluster, &faults, &mut rng).await;
        // Let the cluster serve between faults.
        tokio::time::sleep(Duration::from_millis(100 + rng.u64(0..400))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(CLUSTER_WAIT * 2, task)
            .await
            .expect("clients stop")
            .expect("client task");
    }
    // Every lock was released or ran out: within two leases and a sweep,
    // a try-lock on the leader must succeed (a release that was
    // acknowledged but lost would keep it held).
    let free_by = Instant::now() + Duration::from_secs(2 * LEASE + 2);
    let free = loop {
        let (_, mut c) = cluster.leader().await;
        let reply = c.req(format!("l\n{KEY}\n0\n")).await;
        if reply.starts_with("ok ") || Instant::now() >= free_by {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failovers = cluster.term().saturating_sub(first_term);
    let ledger = ledger.lock().unwrap();
    println!(
        "safety: {} faults in {:.0} s, {} failovers (terms), {} grants, {} fenced writes, \
         {} leases held through failovers, {} leases lost, {} violations, {} stale fenced writes, \
         {} lost acknowledged grants, lost acknowledged releases: {}",
        faults.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        failovers,
        ledger.grants,
        ledger.writes,
        ledger.held_through_failover,
        ledger.leases_lost,
        ledger.violations,
        ledger.stale_writes,
        ledger.lost_grants,
        u64::from(!free.starts_with("ok ")),
    );
    assert_eq!(ledger.violations, 0, "two holders at once");
    assert_eq!(ledger.stale_writes, 0, "a stale fenced write");
    assert_eq!(ledger.lost_grants, 0, "an acknowledged grant was lost");
    assert!(
        free.starts_with("ok "),
        "the lock never became free: {free}"
    );
    assert!(
        ledger.grants > fault_count,
        "too few grants to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_safety_under_50_random_faults() {
    run_checker(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: 400 faults, several minutes"]
async fn cluster_safety_soak() {
    run_checker(400).await;
}
