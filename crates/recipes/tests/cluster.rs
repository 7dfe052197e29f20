//! Recipes against a three-node cluster in this process
//! (`dflockd_testkit::cluster`): a leader elected through the cluster keeps
//! its term — the same fence — when the dflockd leader under it is killed.

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
async fn an_elected_leader_keeps_its_term_through_a_server_failover() {
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

    cluster.kill(server_leader).await;
    let _ = cluster.leader().await;
    let first_deadline = term.lease().deadline();
    eventually(
        "the term's lease renewed through the new leader",
        CLUSTER_WAIT,
        || async {
            assert!(
                !term.lease().is_lost(),
                "term lost: {:?}",
                term.lease().loss_reason()
            );
            term.lease().deadline() > first_deadline + Duration::from_secs(2)
        },
    )
    .await;
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
