//! Recipes against a three-node cluster in this process
//! (`dflockd_testkit::cluster`): a leader elected through the cluster keeps
//! its term — the same fence — through three consecutive kills of the
//! dflockd leader under it.

use std::time::Duration;

use dflockd_client::{Client, ServerAddr};
use dflockd_recipes::{LeaderElection, Leadership};
use dflockd_testkit::client::{BOUND, eventually};
use dflockd_testkit::cluster::{CLUSTER_WAIT, TestCluster};

/// Nodes that keep a closed named session's holds for a while, so the
/// client's next connection can take them over.
fn with_orphans(config: &mut dflockd_server::ServerConfig) {
    if let Some(cluster) = config.cluster.as_mut() {
        cluster.orphan_ttl = Duration::from_secs(30);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elected_leader_keeps_its_term_through_three_server_failovers() {
    let mut cluster = TestCluster::start_with(3, with_orphans).await;
    let (server_leader, _) = cluster.leader().await;
    let nodes: Vec<ServerAddr> = (0..3).map(|i| cluster.client_addrs[i].into()).collect();
    let client = Client::builder()
        .cluster(nodes.clone())
        .connect_timeout(BOUND)
        .build()
        .unwrap();
    let election = LeaderElection::new(&client, "svc/leader")
        .unwrap()
        .with_lease(Duration::from_secs(4));
    let term = election.campaign().await.unwrap();
    let fence = term.fence();
    let watch = election.leadership();

    // Three server failovers in a row; each killed node comes back (on its
    // directory) before the next, so a quorum is always there.
    let mut server_leader = server_leader;
    for failover in 1..=3 {
        cluster.kill(server_leader).await;
        let (next, _) = cluster.leader().await;
        assert_ne!(next, server_leader);
        let deadline = term.lease().deadline();
        eventually(
            &format!("the term renewed through the leader after failover {failover}"),
            CLUSTER_WAIT,
            || async {
                assert!(
                    !term.lease().is_lost(),
                    "term lost at failover {failover}: {:?}",
                    term.lease().loss_reason()
                );
                term.lease().deadline() > deadline + Duration::from_secs(2)
            },
        )
        .await;
        assert_eq!(term.fence(), fence);
        cluster.restart(server_leader).await;
        server_leader = next;
    }
    assert_eq!(*watch.borrow(), Leadership::Leader { fence });
    assert!(election.is_leader());

    // A rival candidate cannot take the term while it is held.
    let rival_client = Client::builder()
        .cluster(nodes)
        .connect_timeout(BOUND)
        .build()
        .unwrap();
    let rival = LeaderElection::new(&rival_client, "svc/leader").unwrap();
    let attempt = tokio::time::timeout(Duration::from_secs(2), rival.campaign()).await;
    assert!(attempt.is_err(), "the rival was elected during the term");
    term.resign().await.unwrap();
}
