//! The client against a three-node cluster in this process
//! (`dflockd_testkit::cluster`): it finds the leader however the nodes are
//! listed, blocking requests of a plain-mode client go to the leader too,
//! and after the leader is killed new requests reach the new leader.

use std::time::Duration;

use std::net::SocketAddr;

use dflockd_client::{Client, ErrorKind, ServerAddr};
use dflockd_testkit::client::{BOUND, eventually};
use dflockd_testkit::cluster::{CLUSTER_WAIT, TestCluster};
use dflockd_testkit::wire::REPLY_TIMEOUT;

fn client(nodes: &[SocketAddr], multiplex: bool) -> Client {
    Client::builder()
        .cluster(nodes.iter().copied())
        .connect_timeout(BOUND)
        .multiplex(multiplex)
        .build()
        .expect("client builds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_client_finds_the_leader_and_follows_it_after_a_kill() {
    let mut cluster = TestCluster::start(3).await;
    let (leader, _) = cluster.leader().await;
    // A follower first: the client must be redirected (or move on).
    let order = [(leader + 1) % 3, (leader + 2) % 3, leader];
    let nodes: Vec<SocketAddr> = order.iter().map(|&i| cluster.client_addrs[i]).collect();
    let mux = client(&nodes, true);
    let plain = client(&nodes, false);

    let held = mux.lock("jobs/a").unwrap().acquire().await.unwrap();
    assert!(mux.multiplexed(0).await.unwrap(), "our nodes offer mux");
    // The plain client's contended acquire waits on a connection of its
    // own: to the leader, or a follower would refuse it.
    let lock = plain.lock("jobs/a").unwrap();
    let waiter = tokio::spawn(async move { lock.acquire_within(Duration::from_secs(10)).await });
    let stats = leader_stats(&cluster).await;
    assert!(stats.contains("jobs/a"), "{stats}");
    let fence = held.fence();
    held.release().await.unwrap();
    let granted = waiter
        .await
        .unwrap()
        .expect("plain acquire through the leader")
        .expect("granted after the release");
    assert!(granted.fence() > fence);
    granted.release().await.unwrap();

    // An error names the cluster.
    let _blocker = mux.lock("jobs/b").unwrap().acquire().await.unwrap();
    let busy = plain
        .lock("jobs/b")
        .unwrap()
        .with_timeout(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(busy.kind(), ErrorKind::Timeout), "{busy:?}");
    assert!(busy.to_string().contains("on cluster 127.0.0.1:"), "{busy}");

    // The leader dies: new requests reach the new leader.
    cluster.kill(leader).await;
    let (new_leader, _) = cluster.leader().await;
    assert_ne!(new_leader, leader);
    eventually(
        "a new lock through the new leader",
        CLUSTER_WAIT,
        || async { matches!(mux.lock("jobs/c").unwrap().try_acquire().await, Ok(Some(_))) },
    )
    .await;
    let stats = leader_stats(&cluster).await;
    assert!(stats.contains("jobs/c"), "{stats}");
}

/// `stats` from the leader itself (any node answers `stats`, a follower
/// from what it has applied so far), after a committed `barrier`.
async fn leader_stats(cluster: &TestCluster) -> String {
    let (_, mut conn) = cluster.leader().await;
    conn.send(b"stats\n_\n_\n").await;
    conn.read_line_within(REPLY_TIMEOUT)
        .await
        .expect("the leader answers stats")
}

/// Nodes that keep a closed named session's holds for a while
/// (`--orphan-ttl`), so that its next connection can take them over.
fn with_orphans(config: &mut dflockd_server::ServerConfig) {
    if let Some(cluster) = config.cluster.as_mut() {
        cluster.orphan_ttl = Duration::from_secs(30);
    }
}

/// The leader dies while a lease is held: the client's session connects
/// to the new leader under the same name, takes its holds over and renews
/// them. The holder never sees a loss; the lease keeps its token (same
/// fence) and is renewed past its first length; nobody else gets the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_survives_a_leader_failover() {
    let mut cluster = TestCluster::start_with(3, with_orphans).await;
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs.clone();
    let holder = client(&nodes, true);
    let lease = holder
        .lock("jobs/survivor")
        .unwrap()
        .with_lease(Duration::from_secs(4))
        .acquire()
        .await
        .unwrap();
    let fence = lease.fence();

    cluster.kill(leader).await;
    let (new_leader, _) = cluster.leader().await;
    assert_ne!(new_leader, leader);
    // Past the lease's first length: only renewals through the new leader
    // can have kept it.
    let first_deadline = lease.deadline();
    eventually(
        "the lease renewed past its first deadline",
        CLUSTER_WAIT,
        || async {
            assert!(!lease.is_lost(), "lost: {:?}", lease.loss_reason());
            lease.deadline() > first_deadline + Duration::from_secs(2)
        },
    )
    .await;
    tokio::time::sleep_until(first_deadline + Duration::from_secs(1)).await;
    assert!(!lease.is_lost(), "lost: {:?}", lease.loss_reason());
    assert_eq!(lease.fence(), fence);

    let other = client(&nodes, true);
    assert!(
        other
            .lock("jobs/survivor")
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_none(),
        "the key is still held"
    );
    assert_eq!(
        lease.release().await.unwrap(),
        dflockd_client::Released::Released
    );
    assert!(
        other
            .lock("jobs/survivor")
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_some()
    );
}

/// A release sent while the leader is gone is retried until the new
/// leader applies it: the caller gets `Released`, and the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_during_a_failover_is_retried_until_it_applies() {
    let mut cluster = TestCluster::start_with(3, with_orphans).await;
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs.clone();
    let holder = client(&nodes, true);
    let lease = holder
        .lock("jobs/released")
        .unwrap()
        .with_lease(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    cluster.kill(leader).await;
    let released = tokio::time::timeout(CLUSTER_WAIT, lease.release())
        .await
        .expect("the release returns in time")
        .expect("the release applies through the new leader");
    assert_eq!(released, dflockd_client::Released::Released);
    let other = client(&nodes, true);
    assert!(
        other
            .lock("jobs/released")
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_some(),
        "the key is free after the release"
    );
}

/// How the leader is lost.
#[derive(Debug, Clone, Copy)]
enum LeaderLoss {
    /// Killed at once.
    Kill,
    /// Cut off from the other nodes (it keeps running, steps down and
    /// closes its connections).
    Isolate,
}

/// 1,000 leases (TTL 5 s) on one client while the leader is killed: none
/// is reported lost, and every one is renewed through the new leader past
/// its first deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_leases_survive_a_leader_kill() {
    thousand_leases_survive(LeaderLoss::Kill).await;
}

/// The same while the leader is isolated from the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_leases_survive_an_isolated_leader() {
    thousand_leases_survive(LeaderLoss::Isolate).await;
}

async fn thousand_leases_survive(loss: LeaderLoss) {
    const LEASES: usize = 1_000;
    let mut cluster = TestCluster::start_with(3, with_orphans).await;
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs.clone();
    let holder = Client::builder()
        .cluster(nodes)
        .connect_timeout(BOUND)
        .build()
        .unwrap();
    // Taken concurrently: the leader commits them in batches.
    let mut acquiring = tokio::task::JoinSet::new();
    for i in 0..LEASES {
        let lock = holder
            .lock(&format!("many/{i}"))
            .unwrap()
            .with_lease(Duration::from_secs(5));
        acquiring.spawn(async move { lock.acquire().await });
    }
    let mut leases = Vec::with_capacity(LEASES);
    while let Some(lease) = acquiring.join_next().await {
        leases.push(lease.unwrap().unwrap());
    }
    let fences: Vec<u64> = leases.iter().map(|l| l.fence()).collect();
    let started = std::time::Instant::now();

    match loss {
        LeaderLoss::Kill => cluster.kill(leader).await,
        LeaderLoss::Isolate => cluster.isolate(leader).await,
    }
    let (new_leader, _) = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let first_deadlines: Vec<_> = leases.iter().map(|l| l.deadline()).collect();
    eventually(
        "every lease renewed through the new leader",
        CLUSTER_WAIT,
        || async {
            let lost: Vec<_> = leases.iter().filter(|l| l.is_lost()).collect();
            assert!(
                lost.is_empty(),
                "{} leases lost, the first: {:?}",
                lost.len(),
                lost[0].loss_reason()
            );
            leases
                .iter()
                .zip(&first_deadlines)
                .all(|(lease, first)| lease.deadline() > *first + Duration::from_secs(1))
        },
    )
    .await;
    println!(
        "{LEASES} leases: all renewed through the new leader {:?} after the {loss:?}",
        started.elapsed()
    );
    let now_fences: Vec<u64> = leases.iter().map(|l| l.fence()).collect();
    assert_eq!(now_fences, fences);
    let stats = leader_stats(&cluster).await;
    assert_eq!(
        stats.matches("\"key\":\"many/").count(),
        LEASES,
        "held on the new leader"
    );
    let mut releasing = tokio::task::JoinSet::new();
    for lease in leases {
        releasing.spawn(lease.release());
    }
    while let Some(released) = releasing.join_next().await {
        assert_eq!(
            released.unwrap().unwrap(),
            dflockd_client::Released::Released
        );
    }
}

#[tokio::test]
async fn a_cluster_of_no_nodes_is_refused() {
    let error = Client::builder()
        .cluster(Vec::<ServerAddr>::new())
        .build()
        .unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::InvalidArgument(_)),
        "{error:?}"
    );
}
