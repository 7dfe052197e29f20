//! Recipes against a three-node cluster — in this process, or an external
//! one (`DFLOCKD_TEST_CLUSTER`, see `dflockd_testkit::cluster_under_test`): a leader elected through the cluster keeps
//! its term — the same fence, the same proclaimed label — through three
//! consecutive kills of the dflockd leader under it.

use std::time::Duration;

use dflockd_client::Client;
use dflockd_recipes::{LeaderElection, Leadership};
use dflockd_testkit::client::{BOUND, eventually};
use dflockd_testkit::cluster::{CLUSTER_WAIT, with_orphans};
use dflockd_testkit::cluster_under_test::ClusterUnderTest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elected_leader_keeps_its_term_through_three_server_failovers() {
    let mut cluster = ClusterUnderTest::start(with_orphans).await;
    let (server_leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs();
    let client = Client::builder()
        .cluster(nodes.clone())
        .connect_timeout(BOUND)
        .build()
        .unwrap();
    let election = LeaderElection::new(&client, "svc/leader")
        .unwrap()
        .with_lease(Duration::from_secs(4))
        .with_label("node-a:8080")
        .unwrap();
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
    // Everyone sees who leads, with the label its term proclaimed before
    // the failovers: replicated with the hold.
    let seen = Some(dflockd_recipes::Leader {
        fence: Some(fence),
        label: Some("node-a:8080".into()),
    });
    assert_eq!(rival.leader().await.unwrap(), seen);
    let mut observed = rival.observe();
    let attempt = tokio::time::timeout(Duration::from_secs(2), rival.campaign()).await;
    assert!(attempt.is_err(), "the rival was elected during the term");
    tokio::time::timeout(CLUSTER_WAIT, observed.wait_for(|now| *now == seen))
        .await
        .expect("the observer sees the leader in time")
        .unwrap();
    term.resign().await.unwrap();
    tokio::time::timeout(CLUSTER_WAIT, observed.changed())
        .await
        .expect("the observer sees the resignation")
        .unwrap();
    assert_eq!(*observed.borrow(), None);
}

/// A singleton job with two candidate processes: it starts once, runs in
/// one place at a time, and a failover of the dflockd leader under it
/// neither stops nor restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_singleton_job_is_not_restarted_by_a_server_failover() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut cluster = ClusterUnderTest::start(with_orphans).await;
    let (server_leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs();
    let starts = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let stop = dflockd_recipes::CancellationToken::new();
    let mut candidates = Vec::new();
    for _ in 0..2 {
        let client = Client::builder()
            .cluster(nodes.clone())
            .connect_timeout(BOUND)
            .build()
            .unwrap();
        let singleton = dflockd_recipes::Singleton::new(&client, "jobs/singleton")
            .unwrap()
            .with_lease(Duration::from_secs(4));
        let (starts, running, most_at_once, stop) = (
            Arc::clone(&starts),
            Arc::clone(&running),
            Arc::clone(&most_at_once),
            stop.clone(),
        );
        candidates.push(tokio::spawn(async move {
            let _client = client;
            singleton
                .run(stop, move |ctx| {
                    let (starts, running, most_at_once) = (
                        Arc::clone(&starts),
                        Arc::clone(&running),
                        Arc::clone(&most_at_once),
                    );
                    async move {
                        starts.fetch_add(1, Ordering::SeqCst);
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most_at_once.fetch_max(now, Ordering::SeqCst);
                        ctx.cancelled().await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                })
                .await
        }));
    }
    eventually("the job started", BOUND, || async {
        starts.load(Ordering::SeqCst) == 1
    })
    .await;

    cluster.kill(server_leader).await;
    let _ = cluster.leader().await;
    // Two lease lengths after the failover: a lost lease would have
    // stopped the job and let the other candidate start it by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 1, "the job restarted");
    assert_eq!(running.load(Ordering::SeqCst), 1, "the job stopped");
    assert_eq!(most_at_once.load(Ordering::SeqCst), 1, "the job ran twice");
    stop.cancel();
    for candidate in candidates {
        let _ = tokio::time::timeout(BOUND, candidate).await;
    }
}
