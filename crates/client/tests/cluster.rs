//! The client against a three-node cluster in this process
//! (`dflockd_testkit::cluster`): it finds the leader however the nodes are
//! listed, blocking requests of a plain-mode client go to the leader too,
//! and after the leader is killed new requests reach the new leader.

use std::time::Duration;

use dflockd_client::{Client, ErrorKind, ServerAddr};
use dflockd_testkit::client::{BOUND, eventually};
use dflockd_testkit::cluster::{CLUSTER_WAIT, TestCluster};

fn client(nodes: &[ServerAddr], multiplex: bool) -> Client {
    Client::builder()
        .cluster(nodes.to_vec())
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
    let nodes: Vec<ServerAddr> = order
        .iter()
        .map(|&i| cluster.client_addrs[i].into())
        .collect();
    let mux = client(&nodes, true);
    let plain = client(&nodes, false);

    let held = mux.lock("jobs/a").unwrap().acquire().await.unwrap();
    assert!(mux.multiplexed(0).await.unwrap(), "our nodes offer mux");
    // The plain client's contended acquire waits on a connection of its
    // own: to the leader, or a follower would refuse it.
    let lock = plain.lock("jobs/a").unwrap();
    let waiter = tokio::spawn(async move { lock.acquire_within(Duration::from_secs(10)).await });
    let leader_stats = cluster.ask_leader(b"stats\n_\n_\n").await;
    assert!(leader_stats.contains("jobs/a"), "{leader_stats}");
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
    let stats = cluster.ask_leader(b"stats\n_\n_\n").await;
    assert!(stats.contains("jobs/c"), "{stats}");
}

#[tokio::test]
async fn a_cluster_of_no_nodes_is_refused() {
    let error = Client::builder().cluster([]).build().unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::InvalidArgument(_)),
        "{error:?}"
    );
}
