//! Cluster mode end to end: three dflockd nodes in this process on
//! loopback, clients speaking the wire protocol, the fault proxy on every
//! Raft link (see `dflockd_testkit::cluster`).

use dflockd_testkit::wire as support;

use dflockd_testkit::cluster as harness;

use std::time::Duration;

use harness::{CLUSTER_WAIT, TestCluster};
use support::{Client, parse_grant};

/// The reply to `request` on a fresh connection to node `i`.
async fn ask(cluster: &TestCluster, i: usize, request: &[u8]) -> String {
    let mut c = Client::connect(cluster.client_addrs[i]).await;
    c.req(request).await
}

/// Waits until node `i`'s own copy of the table shows `key` held.
async fn wait_held_on(cluster: &TestCluster, i: usize, key: &str) {
    let node = cluster.node(i).cluster_node().unwrap();
    let key = key.to_string();
    tokio::time::timeout(CLUSTER_WAIT, async {
        let mut metrics = node.raft().metrics();
        loop {
            let stats = ask(cluster, i, b"stats\n_\n_\n").await;
            if stats.contains(&format!("\"key\":\"{key}\",\"owner_conn_id\"")) {
                return;
            }
            // Applied entries change the metrics: wait for the next one.
            let _ = metrics.changed().await;
        }
    })
    .await
    .expect("the follower applies the entry in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_replicate_redirect_and_answer_stats_locally() {
    let cluster = TestCluster::start(3).await;
    let (leader, mut c) = cluster.leader().await;
    let granted = c.grant(b"l\njob\n0 30\n").await;
    assert!(granted.fence() > 0);
    let leader_addr = cluster.client_addrs[leader].to_string();
    for i in (0..3).filter(|&i| i != leader) {
        wait_held_on(&cluster, i, "job").await;
        // Mutating commands and barriers go to the leader.
        assert_eq!(
            ask(&cluster, i, b"l\nother\n0\n").await,
            format!("error_not_leader {leader_addr}")
        );
        assert_eq!(
            ask(&cluster, i, b"barrier\n_\n\n").await,
            format!("error_not_leader {leader_addr}")
        );
        // Ping and stats are answered by any node.
        assert_eq!(ask(&cluster, i, b"ping\n_\n\n").await, "ok");
        let stats = support::parse_stats(&ask(&cluster, i, b"stats\n_\n_\n").await);
        assert_eq!(stats["cluster"]["role"], "follower");
        assert_eq!(stats["cluster"]["leader_addr"], leader_addr);
        assert_eq!(stats["cluster"]["voters"].as_array().unwrap().len(), 3);
    }
    let stats = support::parse_stats(&ask(&cluster, leader, b"stats\n_\n_\n").await);
    assert_eq!(stats["cluster"]["role"], "leader");
    // A second holder is refused on the leader; the holder releases.
    assert_eq!(ask(&cluster, leader, b"l\njob\n0\n").await, "timeout");
    c.expect(format!("r\njob\n{}\n", granted.token), "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_granted_through_the_log_in_fifo_order() {
    let cluster = TestCluster::start(3).await;
    let (leader, mut holder) = cluster.leader().await;
    let first = holder.grant(b"l\nq\n0 30\n").await;
    let mut a = Client::connect(cluster.client_addrs[leader]).await;
    let mut b = Client::connect(cluster.client_addrs[leader]).await;
    a.send(b"l\nq\n10\n").await;
    holder.wait_lock_waiters("q", 1).await;
    b.send(b"l\nq\n10\n").await;
    holder.wait_lock_waiters("q", 2).await;
    holder
        .expect(format!("r\nq\n{}\n", first.token), "ok")
        .await;
    let granted_a = parse_grant(&a.line().await, "ok").expect("a is first");
    assert!(granted_a.fence() > first.fence());
    a.expect(format!("r\nq\n{}\n", granted_a.token), "ok").await;
    let granted_b = parse_grant(&b.line().await, "ok").expect("b is next");
    assert!(granted_b.fence() > granted_a.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_through_a_leader_kill_is_kept_and_fences_grow() {
    let mut cluster = TestCluster::start(3).await;
    let (old, mut c) = cluster.leader().await;
    let held = c.grant(b"l\nleader-job\n0 20\n").await;
    // The holder's connection dies with the node (closing it first would
    // release the lock: auto-release); its hold stays, the lease decides.
    cluster.kill(old).await;
    drop(c);
    let (new, mut c) = cluster.leader().await;
    assert_ne!(new, old);
    // The holder renews on the new leader with its token: still held.
    c.expect(format!("n\nleader-job\n{} 20\n", held.token), "ok 20")
        .await;
    let mut other = Client::connect(cluster.client_addrs[new]).await;
    other.expect(b"l\nleader-job\n0\n", "timeout").await;
    // A new grant's fence is larger than any before the failover.
    let next = other.grant(b"l\nsomething-else\n0\n").await;
    assert!(
        next.fence() > held.fence(),
        "{} <= {}",
        next.fence(),
        held.fence()
    );
    c.expect(format!("r\nleader-job\n{}\n", held.token), "ok")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_grants_nothing_and_the_majority_goes_on() {
    let cluster = TestCluster::start(3).await;
    let (old, mut c) = cluster.leader().await;
    let before = c.grant(b"l\nk\n0 30\n").await;
    cluster.isolate(old).await;
    // The old leader's connection closes once it has no quorum, or its
    // request finds no leader: it never grants `x`.
    c.send(b"l\nx\n0\n").await;
    // (Or the connection closes: the client moves on.)
    if let Ok(line) = c.read_line_within(CLUSTER_WAIT).await {
        assert!(line.starts_with("error_not_leader"), "{line}");
    }
    // The majority elects a leader and grants `x`.
    let (new, mut c2) = tokio::time::timeout(CLUSTER_WAIT, async {
        loop {
            let (i, c) = cluster.leader().await;
            if i != old {
                return (i, c);
            }
        }
    })
    .await
    .expect("the majority elects");
    let x = c2.grant(b"l\nx\n0\n").await;
    assert!(x.fence() > before.fence());
    // Heal: the old leader follows, and redirects to the new one.
    cluster.heal().await;
    let expected = format!("error_not_leader {}", cluster.client_addrs[new]);
    let mut metrics = cluster.node(old).cluster_node().unwrap().raft().metrics();
    tokio::time::timeout(CLUSTER_WAIT, async {
        loop {
            let reply = ask(&cluster, old, b"l\ny\n0\n").await;
            if reply == expected {
                return;
            }
            // The old leader learns of the new term from the next message.
            let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
        }
    })
    .await
    .expect("the old leader follows the new one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restarted_from_disk_keeps_locks_and_fences() {
    let mut cluster = TestCluster::start(3).await;
    let (_, mut c) = cluster.leader().await;
    let held = c.grant(b"l\ndurable\n0 60\n").await;
    for i in 0..3 {
        cluster.kill(i).await;
    }
    drop(c);
    for i in 0..3 {
        cluster.restart(i).await;
    }
    let (_, mut c) = cluster.leader().await;
    c.expect(b"l\ndurable\n0\n", "timeout").await;
    c.expect(format!("n\ndurable\n{} 60\n", held.token), "ok 60")
        .await;
    let next = c.grant(b"l\nfresh\n0\n").await;
    assert!(next.fence() > held.fence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_lease() {
    let mut cluster = TestCluster::start(3).await;
    let (_, mut holder) = cluster.leader().await;
    let held = holder.grant(b"l\nrolling\n0 6\n").await;
    let renew = format!("n\nrolling\n{} 6\n", held.token);
    for i in 0..3 {
        // Each node in turn stops as on SIGTERM and comes back; the holder
        // renews on whichever node leads, every time.
        cluster.stop(i).await;
        assert_eq!(
            cluster.ask_leader(renew.as_bytes()).await,
            "ok 6",
            "node {i} stopped"
        );
        cluster.restart(i).await;
        let _ = cluster.leader().await;
        assert_eq!(
            cluster.ask_leader(renew.as_bytes()).await,
            "ok 6",
            "node {i} back"
        );
    }
    assert_eq!(cluster.ask_leader(b"l\nrolling\n0\n").await, "timeout");
    let next =
        parse_grant(&cluster.ask_leader(b"l\nafter-rolling\n0\n").await, "ok").expect("granted");
    assert!(next.fence() > held.fence());
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_misses_nothing_once_healed() {
    let cluster = TestCluster::start(3).await;
    let (leader, mut c) = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    cluster.isolate(follower).await;
    // The leader and the other follower still commit.
    let held = c.grant(b"l\nwhile-cut-off\n0 30\n").await;
    assert!(held.fence() > 0);
    cluster.heal().await;
    // Healed, the follower catches up (its own table shows the hold). Its
    // elections while cut off may have moved the leadership (openraft 0.9
    // has no pre-vote); whoever leads, the hold is there and releasable.
    wait_held_on(&cluster, follower, "while-cut-off").await;
    let release = format!("r\nwhile-cut-off\n{}\n", held.token);
    assert_eq!(cluster.ask_leader(release.as_bytes()).await, "ok");
    // (The holder's connection stays open until here: closing it on the
    // leader would release the lock itself.)
    drop(c);
}

/// Who owns `key` in node `i`'s `stats` (its `owner_conn_id`).
async fn owner_of(cluster: &TestCluster, i: usize, key: &str) -> Option<u64> {
    let stats = ask(cluster, i, b"stats\n_\n_\n").await;
    let json = stats.strip_prefix("ok ").unwrap_or(&stats);
    let stats: serde_json::Value = serde_json::from_str(json).expect("stats is JSON");
    stats["locks"]
        .as_array()?
        .iter()
        .find(|lock| lock["key"] == key)
        .and_then(|lock| lock["owner_conn_id"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_session_is_taken_over_through_the_new_leader() {
    let mut cluster = TestCluster::start_with(3, |config| {
        if let Some(cluster) = config.cluster.as_mut() {
            cluster.orphan_ttl = Duration::from_secs(30);
        }
    })
    .await;
    let (old, mut c) = cluster.leader().await;
    c.expect(b"stable-ref\nworker-7\n_\n", "ok").await;
    let held = c.grant(b"l\nnamed-job\n0 20\n").await;
    // A two-phase place behind another session's hold.
    let mut other = Client::connect(cluster.client_addrs[old]).await;
    let busy = other.grant(b"l\nbusy\n0 20\n").await;
    c.expect(b"e\nbusy\n20\n", "queued").await;
    let before = owner_of(&cluster, old, "named-job").await;
    cluster.kill(old).await;
    drop((c, other));
    let (new, mut c) = cluster.leader().await;
    assert_ne!(new, old);
    // The session's next connection names it again and takes over.
    c.expect(b"stable-ref\nworker-7\n_\n", "ok").await;
    let after = owner_of(&cluster, new, "named-job").await;
    assert!(
        after.is_some() && after != before,
        "{before:?} -> {after:?}"
    );
    // The place is this connection's now: once the hold ahead is
    // released (by token), its `w` collects the grant.
    let mut third = Client::connect(cluster.client_addrs[new]).await;
    third
        .expect(format!("r\nbusy\n{}\n", busy.token), "ok")
        .await;
    let place = c.grant(b"w\nbusy\n5\n").await;
    assert!(place.fence() > busy.fence());
    // The hold is renewed with its token as before.
    c.expect(format!("n\nnamed-job\n{} 20\n", held.token), "ok 20")
        .await;
    // An unnamed `w` finds nothing to collect.
    third.expect(b"w\nbusy\n0\n", "error_not_enqueued").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_past_a_compaction_catches_up_by_snapshot() {
    // A snapshot every 20 entries, and the log before it compacted.
    let cluster = TestCluster::start_with(3, |config| {
        if let Some(cluster) = config.cluster.as_mut() {
            cluster.snapshot_every = 20;
        }
    })
    .await;
    let (leader, mut c) = cluster.leader().await;
    let lagging = (leader + 1) % 3;
    cluster.isolate(lagging).await;
    // The majority goes on: 60 grants, each its own entry.
    for i in 0..60 {
        c.grant(format!("l\nsnap-{i}\n0 60\n")).await;
    }
    let leader_node = cluster.node(leader).cluster_node().unwrap();
    leader_node
        .raft()
        .wait(Some(CLUSTER_WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index > 20), "compacted")
        .await
        .expect("the leader compacts its log");
    let target = leader_node.raft().metrics().borrow().last_applied;
    cluster.heal().await;
    // Back on the links, the follower can only catch up from a snapshot.
    let follower = cluster.node(lagging).cluster_node().unwrap();
    let caught_up = follower
        .raft()
        .wait(Some(CLUSTER_WAIT))
        .metrics(
            |m| m.last_applied >= target && m.snapshot.is_some(),
            "caught up by snapshot",
        )
        .await
        .expect("the follower catches up");
    assert!(caught_up.snapshot.is_some());
    wait_held_on(&cluster, lagging, "snap-59").await;
    // Its copy of the table is the leader's.
    let count = |stats: String| stats.matches("\"owner_conn_id\"").count();
    assert_eq!(count(ask(&cluster, lagging, b"stats\n_\n_\n").await), 60);
}

/// The reply to `request`, or `None` if the connection failed.
async fn try_req(c: &mut Client, request: String) -> Option<String> {
    c.try_send(request).await.ok()?;
    c.read_line_within(support::REPLY_TIMEOUT).await.ok()
}

/// Takes and releases `key` in a loop on whichever node leads until
/// `stop`, counting pairs in `done`; a pair cut by a change of leader is
/// started again on the next leader.
async fn load(
    addrs: Vec<std::net::SocketAddr>,
    key: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        for addr in &addrs {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
                    .await
            else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mut c = Client::new(support::Stream::Tcp(stream));
            while !stop.load(Ordering::Relaxed) {
                let Some(reply) = try_req(&mut c, format!("l\n{key}\n0 10\n")).await else {
                    break;
                };
                let Some(token) = reply.strip_prefix("ok ").and_then(|r| r.split(' ').next())
                else {
                    break;
                };
                let release = format!("r\n{key}\n{token}\n");
                if try_req(&mut c, release).await.as_deref() != Some("ok") {
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_is_added_and_another_removed_under_load() {
    use dflockd_cluster::{MembershipChange, Network, change_membership};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let mut cluster = TestCluster::start(3).await;
    let (leader, mut c) = cluster.leader().await;
    let kept = c.grant(b"l\nkept\n0 60\n").await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(load(
                cluster.client_addrs.clone(),
                format!("load-{w}"),
                stop.clone(),
                done.clone(),
            ))
        })
        .collect();
    // Load runs before, during and after each change.
    let progress = |at_least: u64| {
        let done = done.clone();
        async move {
            tokio::time::timeout(CLUSTER_WAIT, async {
                while done.load(Ordering::Relaxed) < at_least {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the load makes progress");
        }
    };
    progress(20).await;
    let network = Network::with_secret(cluster.secret().clone());
    let (added, member) = cluster.add_node().await;
    let via = cluster.raft_addr(leader);
    let add = MembershipChange::AddVoter { id: 4, member };
    change_membership(via, &network, add, CLUSTER_WAIT)
        .await
        .expect("node 4 is added");
    let base = done.load(Ordering::Relaxed);
    progress(base + 20).await;
    // A follower leaves; asked through the new node, which sends it on.
    let leaving = (0..3).find(|&i| i != leader).unwrap();
    let remove = MembershipChange::RemoveVoter {
        id: leaving as u64 + 1,
    };
    change_membership(cluster.raft_addr(added), &network, remove, CLUSTER_WAIT)
        .await
        .expect("the follower is removed");
    cluster.stop(leaving).await;
    let base = done.load(Ordering::Relaxed);
    progress(base + 20).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let voters: Vec<u64> = {
        let node = cluster.node(leader).cluster_node().unwrap();
        let metrics = node.raft().metrics().borrow().clone();
        metrics.membership_config.voter_ids().collect()
    };
    let mut expected: Vec<u64> = vec![1, 2, 3, 4];
    expected.retain(|&id| id != leaving as u64 + 1);
    assert_eq!(voters, expected);
    // The new voter has the table: the hold from before it joined, and
    // every load key free again.
    wait_held_on(&cluster, added, "kept").await;
    c.expect(format!("n\nkept\n{} 60\n", kept.token), "ok 60")
        .await;
    for w in 0..3 {
        let free = cluster
            .ask_leader(format!("l\nload-{w}\n0\n").as_bytes())
            .await;
        assert!(free.starts_with("ok "), "load-{w}: {free}");
    }
}
