//! Three nodes in this process, talking Raft over TCP on 127.0.0.1:
//! commands committed on the leader are applied on every node, and a
//! leader killed abruptly is replaced without losing a hold or letting a
//! fence go back.

use std::net::SocketAddr;
use std::time::Duration;

mod support;

use dflockd_cluster::{Node, NodeOptions, ProposeError};
use dflockd_core::{AcquireOutcome, Effects, Op, Outcome, TableConfig};
use support::{
    WAIT, acquire, acquire_for, agreed_leader, fence_of, listeners, rebind, start_cluster,
};
use tempfile::TempDir;

struct Cluster {
    _dirs: Vec<TempDir>,
    nodes: Vec<Option<Node>>,
}

async fn three_nodes() -> Cluster {
    three_nodes_with(NodeOptions::default()).await
}

async fn three_nodes_with(options: NodeOptions) -> Cluster {
    let (dirs, nodes) = start_cluster(listeners(3).await, |_| options.clone()).await;
    Cluster {
        _dirs: dirs,
        nodes: nodes.into_iter().map(Some).collect(),
    }
}

impl Cluster {
    /// The leader once the live nodes agree on one that is live.
    async fn leader(&self) -> &Node {
        let live: Vec<&Node> = self.nodes.iter().flatten().collect();
        let id = agreed_leader(&live).await;
        live.into_iter()
            .find(|n| n.id() == id)
            .expect("the agreed leader is live")
    }

    /// Proposes on the leader, following a change of leader.
    async fn propose(&self, op: Op) -> Effects {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.leader().await.propose(op.clone()).await {
                Ok(effects) => return effects,
                Err(error @ (ProposeError::NotLeader { .. } | ProposeError::Failed(_))) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "never committed: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until every live node has applied `index`, then returns their
    /// tables' snapshots.
    async fn converged(&self, index: u64) -> Vec<Vec<u8>> {
        let mut tables = Vec::new();
        for node in self.nodes.iter().flatten() {
            node.raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), "applied")
                .await
                .unwrap();
            tables.push(node.view().read(|t| t.snapshot().encode()));
        }
        tables
    }

    /// Starts node `i` (id `i + 1`) again on its directory and `addr`.
    async fn restart(&mut self, i: usize, addr: SocketAddr) {
        let listener = rebind(addr).await;
        let node = Node::start(
            i as u64 + 1,
            self._dirs[i].path(),
            listener,
            TableConfig::default(),
        )
        .await
        .unwrap();
        self.nodes[i] = Some(node);
    }

    /// Stops the leader abruptly; returns its id.
    async fn kill_leader(&mut self) -> u64 {
        let old = self.leader().await.id();
        let index = self
            .nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.id() == old))
            .unwrap();
        self.nodes[index].take().unwrap().shutdown().await;
        old
    }

    /// `key` is held: a try-lock by connection `conn` times out.
    async fn assert_held(&self, conn: u64, key: &str) {
        let refused = self.propose(acquire(conn, key)).await;
        assert_eq!(
            refused.outcome,
            Ok(Outcome::Acquire(AcquireOutcome::Timeout)),
            "{key} is not held"
        );
    }

    /// What the leader has applied.
    async fn last_applied(&self) -> u64 {
        self.leader()
            .await
            .raft()
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |id| id.index)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_replicate_and_a_killed_leader_is_replaced() {
    let mut cluster = three_nodes().await;
    let first = fence_of(&cluster.propose(acquire(1, "a")).await);
    let second = fence_of(&cluster.propose(acquire(2, "b")).await);
    assert!(second > first);
    // Held: another connection is refused (try-lock).
    cluster.assert_held(3, "a").await;
    let tables = cluster.converged(cluster.last_applied().await).await;
    assert_eq!(tables.len(), 3);
    assert!(
        tables.windows(2).all(|w| w[0] == w[1]),
        "the nodes' tables differ"
    );

    // Kill the leader (no graceful hand-over).
    let old = cluster.kill_leader().await;
    let new = cluster.leader().await.id();
    assert_ne!(new, old);
    // The holds survived, and fences keep growing.
    cluster.assert_held(4, "a").await;
    let third = fence_of(&cluster.propose(acquire(5, "c")).await);
    assert!(third > second, "fence {third} after {second}");
    let tables = cluster.converged(cluster.last_applied().await).await;
    assert_eq!(tables.len(), 2);
    assert_eq!(tables[0], tables[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_share_log_entries() {
    let cluster = three_nodes().await;
    let leader = cluster.leader().await;
    let before = leader.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let proposals: Vec<_> = (0..200u64)
        .map(|i| leader.propose(acquire(100 + i, &format!("k{i}"))))
        .collect();
    let results = futures_util::future::join_all(proposals).await;
    let mut fences: Vec<u64> = results
        .iter()
        .map(|r| fence_of(r.as_ref().expect("committed")))
        .collect();
    let after = leader.raft().metrics().borrow().last_log_index.unwrap_or(0);
    println!("200 commands in {} log entries", after - before);
    // Group commit: far fewer entries than commands.
    assert!(
        after - before < 200,
        "{} entries for 200 commands",
        after - before
    );
    fences.sort_unstable();
    fences.dedup();
    assert_eq!(fences.len(), 200, "a fence was handed out twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_restart_from_disk() {
    let mut cluster = three_nodes().await;
    let held = fence_of(&cluster.propose(acquire(1, "a")).await);
    let tables = cluster.converged(cluster.last_applied().await).await;
    let addrs: Vec<SocketAddr> = cluster
        .nodes
        .iter()
        .flatten()
        .map(dflockd_cluster::Node::raft_addr)
        .collect();
    for node in cluster.nodes.iter_mut() {
        node.take().unwrap().shutdown().await;
    }
    // Same ids, same directories, same addresses; no initialisation.
    for (i, addr) in addrs.iter().enumerate() {
        cluster.restart(i, *addr).await;
    }
    let leader = cluster.leader().await;
    // The table came back: the lock is still held, the next fence is larger.
    let restored = leader.view().read(|t| t.snapshot().encode());
    assert_eq!(restored, tables[0], "the table after the restart differs");
    cluster.assert_held(2, "a").await;
    let next = fence_of(&cluster.propose(acquire(3, "b")).await);
    assert!(next > held, "fence {next} after {held}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_catches_up_from_a_snapshot() {
    // Snapshots every 20 entries, keeping few entries behind them, so a
    // follower that misses 100 entries can only catch up by snapshot.
    let raft = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 5,
        purge_batch_size: 1,
        ..(*dflockd_cluster::raft_config()).clone()
    };
    let raft = std::sync::Arc::new(raft.validate().unwrap());
    let mut cluster = three_nodes_with(NodeOptions {
        raft: raft.clone(),
        ..NodeOptions::default()
    })
    .await;
    let _ = cluster.propose(acquire(1, "first")).await;
    // Stop a follower.
    let leader = cluster.leader().await.id();
    let lagging = cluster
        .nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.id() != leader))
        .unwrap();
    let stopped = cluster.nodes[lagging].take().unwrap();
    let (id, addr) = (stopped.id(), stopped.raft_addr());
    stopped.shutdown().await;
    for i in 0..100u64 {
        let _ = cluster.propose(acquire(10 + i, &format!("k{i}"))).await;
    }
    // The leader has compacted its log past what the follower has.
    let leader_node = cluster.leader().await;
    leader_node
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index > 10), "purged")
        .await
        .unwrap();
    // Back it comes, with the entries it has; it needs the snapshot.
    let listener = rebind(addr).await;
    let node = Node::start_with(
        id,
        cluster._dirs[lagging].path(),
        listener,
        NodeOptions {
            raft: raft.clone(),
            ..NodeOptions::default()
        },
    )
    .await
    .unwrap();
    cluster.nodes[lagging] = Some(node);
    let tables = cluster.converged(cluster.last_applied().await).await;
    assert_eq!(tables.len(), 3);
    assert!(
        tables.windows(2).all(|w| w[0] == w[1]),
        "the caught-up table differs"
    );
    let caught_up = cluster.nodes[lagging].as_ref().unwrap();
    let snapshot = caught_up.raft().metrics().borrow().snapshot;
    assert!(
        snapshot.is_some(),
        "the follower caught up without a snapshot"
    );
}

/// Seconds left on the lease of lock `key`, as `node` sees it at the
/// latest command time.
fn lease_left(node: &Node, key: &str) -> f64 {
    node.view().read(|t| {
        let stats = t.stats(0, t.latest());
        stats
            .locks
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.lease_expires_in_s)
            .unwrap_or_else(|| panic!("{key} is not held: {stats:?}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_restarts_every_lease_in_full() {
    let mut cluster = three_nodes().await;
    fence_of(&cluster.propose(acquire_for(1, "a", Some(4))).await);
    // The lease runs down on the leader's clock.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = cluster.propose(Op::Gc).await;
    let before = lease_left(cluster.leader().await, "a");
    assert!(before < 3.0, "{before} s left after 1.5 s of a 4 s lease");
    // The leader dies; the new one's first entry takes office.
    let old = cluster.kill_leader().await;
    let _ = cluster.propose(Op::Gc).await;
    let leader = cluster.leader().await;
    assert_ne!(leader.id(), old);
    let after = lease_left(leader, "a");
    assert!(
        after >= 3.9,
        "{after} s left after the change of leader (had {before})"
    );
    // And the hold is still a hold.
    cluster.assert_held(2, "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_lease() {
    let mut cluster = three_nodes().await;
    let mut last = fence_of(&cluster.propose(acquire(1, "held")).await);
    for i in 0..3 {
        // One node down at a time: the other two keep committing.
        let node = cluster.nodes[i].take().unwrap();
        let (id, addr) = (node.id(), node.raft_addr());
        node.shutdown().await;
        let fence = fence_of(
            &cluster
                .propose(acquire(10 + i as u64, &format!("k{i}")))
                .await,
        );
        assert!(fence > last, "fence {fence} after {last}");
        last = fence;
        cluster.restart(i, addr).await;
        // Back in step before the next one goes down.
        let tables = cluster.converged(cluster.last_applied().await).await;
        assert!(
            tables.windows(2).all(|w| w[0] == w[1]),
            "node {id} did not catch up"
        );
    }
    // The first hold was never lost, on any node.
    cluster.assert_held(2, "held").await;
    for node in cluster.nodes.iter().flatten() {
        assert_eq!(
            node.view().read(dflockd_core::LockTable::holder_count),
            4,
            "node {}",
            node.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_is_added_and_another_removed_under_load() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::sync::RwLock;

    let mut cluster = three_nodes().await;
    fence_of(&cluster.propose(acquire(1, "held")).await);
    // A fourth node, empty and not initialised.
    let extra_dir = tempfile::tempdir().unwrap();
    let extra_listener = listeners(1).await.remove(0);
    let extra_addr = extra_listener.local_addr().unwrap();
    let extra = Node::start(4, extra_dir.path(), extra_listener, TableConfig::default())
        .await
        .unwrap();
    cluster._dirs.push(extra_dir);
    // Load meanwhile: proposals on whichever node leads.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let cluster = Arc::new(RwLock::new(cluster));
    let load = {
        let (stop, committed, cluster) = (stop.clone(), committed.clone(), cluster.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let op = acquire(100 + i, &format!("load{i}"));
                let effects = cluster.read().await.propose(op).await;
                fence_of(&effects);
                committed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // It joins (as a learner that catches up, then a voter) ...
    {
        let reading = cluster.read().await;
        reading
            .leader()
            .await
            .add_voter(4, extra_addr)
            .await
            .unwrap();
    }
    cluster.write().await.nodes.push(Some(extra));
    // ... and a voter other than the leader leaves.
    let leaving = {
        let reading = cluster.read().await;
        let leader = reading.leader().await;
        let leaving = (1..=3).find(|id| *id != leader.id()).unwrap();
        leader.remove_voter(leaving).await.unwrap();
        // The metrics catch up with the committed change.
        leader
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| {
                    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                    voters.contains(&4) && !voters.contains(&leaving)
                },
                "node 4 in, the other out",
            )
            .await
            .unwrap();
        leaving
    };
    let gone = cluster.write().await.nodes[(leaving - 1) as usize]
        .take()
        .unwrap();
    gone.shutdown().await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(committed.load(Ordering::Relaxed) > 0, "no load committed");
    // The new voter has the whole table, the first hold included.
    let cluster = cluster.read().await;
    let tables = cluster.converged(cluster.last_applied().await).await;
    assert_eq!(tables.len(), 3);
    assert!(tables.windows(2).all(|w| w[0] == w[1]), "the tables differ");
    let four = cluster.nodes[3].as_ref().unwrap();
    assert!(four.view().read(dflockd_core::LockTable::holder_count) > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_to_an_up_to_date_follower() {
    let mut cluster = three_nodes().await;
    let first = fence_of(&cluster.propose(acquire(1, "kept")).await);
    let old = cluster.leader().await;
    let (old_id, old_term) = (old.id(), old.raft().metrics().borrow().current_term);
    // Openraft's own election would wait out the followers' lease first;
    // a hand-over is one election, won at once with the old leader's vote.
    let new = old.hand_over().await;
    let new = new.expect("an up-to-date follower took over");
    assert_ne!(new, old_id);
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.id() == old_id))
        .unwrap();
    cluster.nodes[index].take().unwrap().shutdown().await;
    let leader = cluster.leader().await;
    assert_eq!(leader.id(), new);
    assert_eq!(
        leader.raft().metrics().borrow().current_term,
        old_term + 1,
        "more than one election"
    );
    // The hold is kept and fences go on growing.
    cluster.assert_held(2, "kept").await;
    let next = fence_of(&cluster.propose(acquire(3, "next")).await);
    assert!(next > first);
}
