//! The unavailability window of a leader kill: from the kill to the first
//! acquire granted through the new leader, for one or more Raft timings,
//! three nodes in this process on loopback.
//!
//! ```sh
//! cargo run --release -p dflockd-server --example failover_bench -- 20 100/500/1000 50/200/400
//! ```
//!
//! arguments: kills per timing, then timings as
//! `heartbeat/election_min/election_max` in milliseconds. With
//! `serve SECONDS` instead, one cluster serves for that long and its
//! leader's client address is printed (for `dflock bench`). With
//! `load SECONDS` instead, 1, 10 and 50 workers take and release their
//! own keys on the leader of a fresh cluster each (throughput with the
//! three nodes in one process). With `stop-vs-kill KILLS` instead, the shipped timing's leader is stopped
//! gracefully (SIGTERM's path: drain, hand over, stop Raft) and killed by
//! turns, and both windows are reported. With
//! `stability SECONDS TIMING...` instead, each timing's cluster serves 50
//! workers taking and releasing their own keys for that long, and the
//! leader changes during the run are counted (none is wanted). Timings take
//! turns in rounds of five kills (each round on a fresh cluster), so a
//! noisy moment hits all of them. Prints each timing's median, 90th
//! percentile and worst window, and how many leader changes happened that
//! no kill caused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dflockd_server::{
    ClusterConfig, ClusterPeer, Listeners, RaftSecret, RaftTiming, Server, ServerConfig,
    ServerHandle,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const KILLS_PER_ROUND: usize = 5;

async fn ask(addr: SocketAddr, request: &str) -> Option<String> {
    let exchange = async {
        let mut stream = BufReader::new(TcpStream::connect(addr).await.ok()?);
        stream.get_mut().write_all(request.as_bytes()).await.ok()?;
        let mut line = String::new();
        stream.read_line(&mut line).await.ok()?;
        Some(line.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

struct Cluster {
    nodes: Vec<Option<ServerHandle>>,
    dirs: Vec<tempfile::TempDir>,
    clients: Vec<SocketAddr>,
    rafts: Vec<SocketAddr>,
    timing: RaftTiming,
}

impl Cluster {
    fn config(&self, i: usize) -> ServerConfig {
        let peers: Vec<ClusterPeer> = (0..3)
            .map(|j| ClusterPeer {
                id: j as u64 + 1,
                raft: self.rafts[j].to_string(),
                client: self.clients[j].to_string(),
            })
            .collect();
        let secret = RaftSecret::new(b"failover bench secret, 32 bytes or more".to_vec())
            .expect("long enough");
        let mut cluster = ClusterConfig::new(
            i as u64 + 1,
            self.dirs[i].path(),
            self.rafts[i].to_string(),
            secret,
        )
        .with_peers(peers);
        cluster.timing = self.timing;
        let mut config = ServerConfig::ephemeral();
        config.cluster = Some(cluster);
        config
    }

    async fn start(timing: RaftTiming) -> Result<Cluster, Box<dyn std::error::Error>> {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0");
        let client_listeners = [bind()?, bind()?, bind()?];
        let raft_listeners = [bind()?, bind()?, bind()?];
        let mut cluster = Cluster {
            nodes: vec![None, None, None],
            dirs: vec![
                tempfile::tempdir()?,
                tempfile::tempdir()?,
                tempfile::tempdir()?,
            ],
            clients: client_listeners
                .iter()
                .map(std::net::TcpListener::local_addr)
                .collect::<Result<_, _>>()?,
            rafts: raft_listeners
                .iter()
                .map(std::net::TcpListener::local_addr)
                .collect::<Result<_, _>>()?,
            timing,
        };
        let mut starts = Vec::new();
        for (i, (client, raft)) in client_listeners.into_iter().zip(raft_listeners).enumerate() {
            let listeners = Listeners {
                client: Some(client),
                raft: Some(raft),
                http: None,
            };
            starts.push(tokio::spawn(Server::start_with_listeners(
                cluster.config(i),
                listeners,
            )));
        }
        for (i, start) in starts.into_iter().enumerate() {
            cluster.nodes[i] = Some(start.await??);
        }
        Ok(cluster)
    }

    /// Stops every running node.
    async fn shutdown(self) {
        for node in self.nodes.into_iter().flatten() {
            node.shutdown().await;
        }
    }

    /// The node that serves a barrier.
    async fn leader(&self) -> usize {
        loop {
            for i in 0..3 {
                if self.nodes[i].is_some()
                    && ask(self.clients[i], "barrier\n_\n\n").await.as_deref() == Some("ok")
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn term(&self) -> u64 {
        self.nodes
            .iter()
            .flatten()
            .filter_map(|n| n.cluster_node())
            .map(|n| n.raft().metrics().borrow().current_term)
            .max()
            .unwrap_or(0)
    }

    /// Kills the leader (or stops it, if `graceful`); returns the time
    /// until an acquire is granted.
    async fn kill_leader(
        &mut self,
        n: usize,
        graceful: bool,
    ) -> Result<Duration, Box<dyn std::error::Error>> {
        let leader = self.leader().await;
        let handle = self.nodes[leader].take().ok_or("no leader")?;
        let killed = Instant::now();
        let stopped = if graceful {
            tokio::spawn(handle.shutdown())
        } else {
            handle.force_close();
            tokio::spawn(handle.wait())
        };
        let request = format!("l\nfailover-{n}\n0 5\n");
        let window = 'found: loop {
            for i in (0..3).filter(|&i| i != leader) {
                if let Some(reply) = ask(self.clients[i], &request).await
                    && reply.starts_with("ok ")
                {
                    break 'found killed.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        stopped.await?;
        let listeners = Listeners {
            client: Some(std::net::TcpListener::bind(self.clients[leader])?),
            raft: Some(std::net::TcpListener::bind(self.rafts[leader])?),
            http: None,
        };
        self.nodes[leader] =
            Some(Server::start_with_listeners(self.config(leader), listeners).await?);
        // Settle: the restarted node catches up as a follower.
        let _ = self.leader().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(window)
    }
}

/// The `q` quantile of sorted windows, in seconds.
fn quantile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64()
}

fn parse_timing(text: &str) -> Result<RaftTiming, String> {
    let ms: Vec<u64> = text
        .split('/')
        .map(|p| {
            p.parse()
                .map_err(|_| format!("{text}: heartbeat/min/max in ms"))
        })
        .collect::<Result<_, _>>()?;
    match ms.as_slice() {
        [heartbeat, min, max] => Ok(RaftTiming {
            heartbeat: Duration::from_millis(*heartbeat),
            election_min: Duration::from_millis(*min),
            election_max: Duration::from_millis(*max),
        }),
        _ => Err(format!("{text}: heartbeat/min/max in ms")),
    }
}

/// `workers` connections to the leader, each taking and releasing its own
/// key for `seconds`; returns pairs done and leader changes seen.
async fn load(
    timing: RaftTiming,
    seconds: u64,
    workers_wanted: usize,
) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let cluster = Cluster::start(timing).await?;
    let leader = cluster.clients[cluster.leader().await];
    let before = cluster.term();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for w in 0..workers_wanted {
        workers.push(tokio::spawn(async move {
            let mut pairs = 0u64;
            let Ok(stream) = TcpStream::connect(leader).await else {
                return 0;
            };
            let _ = stream.set_nodelay(true);
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            while Instant::now() < until {
                let acquire = format!("l\nstable-{w}\n10\n");
                line.clear();
                if stream
                    .get_mut()
                    .write_all(acquire.as_bytes())
                    .await
                    .is_err()
                    || stream.read_line(&mut line).await.is_err()
                {
                    break;
                }
                let Some(token) = line.split_whitespace().nth(1).map(str::to_string) else {
                    break;
                };
                line.clear();
                let release = format!("r\nstable-{w}\n{token}\n");
                if stream
                    .get_mut()
                    .write_all(release.as_bytes())
                    .await
                    .is_err()
                    || stream.read_line(&mut line).await.is_err()
                {
                    break;
                }
                pairs += 1;
            }
            pairs
        }));
    }
    let mut pairs = 0;
    for worker in workers {
        pairs += worker.await?;
    }
    let changes = cluster.term().saturating_sub(before);
    cluster.shutdown().await;
    Ok((pairs, changes))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("stability") {
        let seconds: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(60);
        for text in &args[2..] {
            let timing = parse_timing(text)?;
            let (pairs, changes) = load(timing, seconds, 50).await?;
            println!(
                "{text}: {seconds} s, 50 workers: {:.0} pairs/s, leader changes {changes}",
                pairs as f64 / seconds as f64
            );
        }
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("serve") {
        let seconds: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(60);
        let cluster = Cluster::start(RaftTiming::default()).await?;
        println!("leader {}", cluster.clients[cluster.leader().await]);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        cluster.shutdown().await;
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("load") {
        let seconds: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(4);
        for workers in [1, 10, 50] {
            let (pairs, changes) = load(RaftTiming::default(), seconds, workers).await?;
            println!(
                "in process, {workers} workers: {:.0} pairs/s, leader changes {changes}",
                pairs as f64 / seconds as f64
            );
        }
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("stop-vs-kill") {
        let kills: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(20);
        let mut windows = [Vec::new(), Vec::new()];
        let mut cluster = Cluster::start(RaftTiming::default()).await?;
        for k in 0..2 * kills {
            if k % (2 * KILLS_PER_ROUND) == 0 && k > 0 {
                cluster.shutdown().await;
                cluster = Cluster::start(RaftTiming::default()).await?;
            }
            let _ = cluster.leader().await;
            let graceful = k % 2 == 0;
            windows[usize::from(graceful)].push(cluster.kill_leader(k, graceful).await?);
        }
        cluster.shutdown().await;
        for (name, w) in ["kill -9", "SIGTERM"].into_iter().zip(windows.iter_mut()) {
            w.sort();
            println!(
                "{name}: {} times, window median {:.3} s, min {:.3} s, p90 {:.3} s, max {:.3} s",
                w.len(),
                quantile(w, 0.5),
                quantile(w, 0.0),
                quantile(w, 0.9),
                quantile(w, 1.0)
            );
        }
        return Ok(());
    }
    let kills: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let timings: Vec<RaftTiming> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|t| parse_timing(t))
            .collect::<Result<_, _>>()?
    } else {
        vec![RaftTiming::default()]
    };
    let mut windows: Vec<Vec<Duration>> = vec![Vec::new(); timings.len()];
    let mut spurious = vec![0u64; timings.len()];
    let rounds = kills.div_ceil(KILLS_PER_ROUND);
    for round in 0..rounds {
        for (t, timing) in timings.iter().enumerate() {
            let mut cluster = Cluster::start(*timing).await?;
            let _ = cluster.leader().await;
            for k in 0..KILLS_PER_ROUND.min(kills - round * KILLS_PER_ROUND) {
                let before = cluster.term();
                let window = cluster.kill_leader(round * 100 + k, false).await?;
                // One kill needs one new term (two if a vote split).
                let after = cluster.term();
                spurious[t] += after.saturating_sub(before).saturating_sub(1);
                windows[t].push(window);
            }
            cluster.shutdown().await;
        }
    }
    for (t, timing) in timings.iter().enumerate() {
        let w = &mut windows[t];
        w.sort();
        let pick = |q: f64| quantile(w, q);
        println!(
            "heartbeat {} ms, election {}–{} ms: {} kills, window median {:.3} s, p90 {:.3} s, max {:.3} s; extra terms {}",
            timing.heartbeat.as_millis(),
            timing.election_min.as_millis(),
            timing.election_max.as_millis(),
            w.len(),
            pick(0.5),
            pick(0.9),
            pick(1.0),
            spurious[t],
        );
    }
    Ok(())
}
