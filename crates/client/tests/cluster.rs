//! The client against a three-node cluster — in this process by default,
//! or any external cluster named by `DFLOCKD_TEST_CLUSTER`
//! (`dflockd_testkit::cluster_under_test`; run
//! `scripts/external-cluster-test.sh`): it finds the leader however the
//! nodes are listed, blocking requests of a plain-mode client go to the
//! leader too, new requests reach a new leader after a kill, leases and
//! requests in flight ride through failovers.

use std::time::Duration;

use std::net::SocketAddr;

use dflockd_client::{Client, ErrorKind, ServerAddr};
use dflockd_testkit::client::{BOUND, eventually};
use dflockd_testkit::cluster::{CLUSTER_WAIT, with_orphans};
use dflockd_testkit::cluster_under_test::ClusterUnderTest;
use dflockd_testkit::faultproxy::{Blackhole, Direction, FaultProxy, Faults, Link};
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
    let mut cluster = ClusterUnderTest::start(with_orphans).await;
    let (leader, _) = cluster.leader().await;
    // A follower first: the client must be redirected (or move on).
    let order = [(leader + 1) % 3, (leader + 2) % 3, leader];
    let nodes: Vec<SocketAddr> = order.iter().map(|&i| cluster.client_addrs()[i]).collect();
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
async fn leader_stats(cluster: &ClusterUnderTest) -> String {
    let (_, mut conn) = cluster.leader().await;
    conn.send(b"stats\n_\n_\n").await;
    conn.read_line_within(REPLY_TIMEOUT)
        .await
        .expect("the leader answers stats")
}

/// A node that answers `barrier` with a bare `error_not_leader` (it names
/// no leader), and whose `stats` names the leader: the client learns the
/// leader there and goes to it, skipping the follower listed between them
/// (behind a proxy that counts its connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_redirect_is_completed_from_stats() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let cluster = ClusterUnderTest::local(with_orphans).await;
    let (leader, _) = cluster.leader().await;
    let addrs = cluster.client_addrs();
    let follower = FaultProxy::start(addrs[(leader + 1) % 3]).await.unwrap();
    let leader_addr = addrs[leader].to_string();
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = mute.accept().await {
            let leader_addr = leader_addr.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(command)) = lines.next_line().await {
                    let (_, _) = (lines.next_line().await, lines.next_line().await);
                    let reply = match command.as_str() {
                        "barrier" => "error_not_leader\n".to_string(),
                        "stats" => format!(
                            "ok {{\"connections\":1,\"locks\":[],\"semaphores\":[],\"idle_locks\":[],\
                             \"idle_semaphores\":[],\"cluster\":{{\"node_id\":\"9\",\"role\":\"follower\",\
                             \"term\":2,\"leader_id\":\"1\",\"leader_addr\":\"{leader_addr}\",\
                             \"commit_index\":1,\"last_log_index\":1,\"snapshot_index\":0,\"voters\":[]}}}}\n"
                        ),
                        _ => "error\n".to_string(),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let nodes = [mute_addr, follower.addr(), addrs[leader]];
    let client = client(&nodes, true);
    let lease = client
        .lock("bare/redirect")
        .unwrap()
        .acquire()
        .await
        .unwrap();
    assert_eq!(follower.accepted(), 0, "the listed follower was tried");
    lease.release().await.unwrap();
}

/// The leader dies while a lease is held: the client's session connects
/// to the new leader under the same name, takes its holds over and renews
/// them. The holder never sees a loss; the lease keeps its token (same
/// fence) and is renewed past its first length; nobody else gets the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_survives_a_leader_failover() {
    let mut cluster = ClusterUnderTest::start(with_orphans).await;
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs();
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
    let cluster = ClusterUnderTest::start(with_orphans).await;
    release_reaches_the_next_leader(cluster, kill).await;
}

/// The leader starts a graceful stop (as SIGTERM does) while a lease is
/// held, and the holder releases at once: the release reaches a draining
/// leader, which answers `error_draining` or closes the connection. The
/// client sends it again to the next leader (the one it hands over to),
/// the caller gets `Released`, and the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_during_a_graceful_stop_goes_to_the_next_leader() {
    let cluster = ClusterUnderTest::local(with_orphans).await;
    release_reaches_the_next_leader(cluster, stop_gracefully).await;
}

async fn release_reaches_the_next_leader(mut cluster: ClusterUnderTest, lose_leader: LoseLeader) {
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs();
    let holder = client(&nodes, true);
    let lease = holder
        .lock("jobs/released")
        .unwrap()
        .with_lease(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    lose_leader(&mut cluster, leader).await;
    let released = tokio::time::timeout(CLUSTER_WAIT, lease.release())
        .await
        .expect("the release returns in time")
        .expect("the release applies through the next leader");
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

/// How a test takes the leader away.
type LoseLeader = for<'a> fn(&'a mut ClusterUnderTest, usize) -> Step<'a>;

/// A step of a test that borrows its cluster.
type Step<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Kills node `leader` at once (as a crash).
fn kill(cluster: &mut ClusterUnderTest, leader: usize) -> Step<'_> {
    Box::pin(async move { cluster.kill(leader).await })
}

/// Starts a graceful stop of node `leader` (drain, hand-over, stop, as on
/// SIGTERM) and takes it out of the cluster's running nodes; it finishes
/// stopping in the background.
fn stop_gracefully(cluster: &mut ClusterUnderTest, leader: usize) -> Step<'_> {
    Box::pin(async move {
        let local = cluster.local_mut().expect("a cluster in this process");
        let node = local.nodes[leader].take().expect("the leader runs");
        node.begin_drain();
        tokio::spawn(node.wait());
    })
}

/// A cluster whose nodes the client reaches through fault proxies, and
/// the live link of its session to the leader.
struct Proxied {
    cluster: ClusterUnderTest,
    proxies: Vec<FaultProxy>,
    client: Client,
}

impl Proxied {
    async fn start() -> Proxied {
        Proxied::on(ClusterUnderTest::start(with_orphans).await).await
    }

    async fn on(cluster: ClusterUnderTest) -> Proxied {
        let mut proxies = Vec::new();
        for addr in &cluster.client_addrs() {
            proxies.push(FaultProxy::start(*addr).await.expect("proxy"));
        }
        let nodes: Vec<SocketAddr> = proxies.iter().map(FaultProxy::addr).collect();
        let client = client(&nodes, true);
        // Connect the session before any test step.
        let warm = client.lock("warm").unwrap().try_acquire().await.unwrap();
        drop(warm);
        Proxied {
            cluster,
            proxies,
            client,
        }
    }

    /// The open link of the session to the leader.
    async fn session_link(&self) -> Link {
        let (leader, _) = self.cluster.leader().await;
        let open: Vec<Link> = self.proxies[leader]
            .links()
            .into_iter()
            .filter(|link| !link.is_closed())
            .collect();
        assert_eq!(open.len(), 1, "one connection to the leader");
        open.into_iter().next().unwrap()
    }

    /// Waits until the leader's table shows `key` with a holder and
    /// `waiters` waiters (patiently: after a kill, an election under the
    /// load of the other tests comes first).
    async fn applied(&self, key: &str, waiters: u64) {
        let until = std::time::Instant::now() + 2 * CLUSTER_WAIT;
        loop {
            let stats = leader_stats(&self.cluster).await;
            let json = stats.strip_prefix("ok ").expect("a stats reply");
            let parsed: dflockd_client::Stats = serde_json::from_str(json).expect("stats JSON");
            let entry = parsed.locks.iter().find(|l| l.key == key);
            if entry.is_some_and(|l| l.owner_conn_id != 0 && l.waiters == waiters) {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "{key} never held with {waiters} waiters: {entry:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An acquire is applied but its answer never arrives (dropped on the way
/// back), then the connection breaks. The client sends it again, with the
/// same id, on its session's next connection; the server answers with the
/// hold the first attempt got. Without that rule the retry would find the
/// lock held — by its own session — and the caller would see it busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_whose_answer_was_lost_gets_its_hold_on_the_next_connection() {
    let p = Proxied::start().await;
    let link = p.session_link().await;
    link.set_blackhole(Direction::ToClient, Some(Blackhole::Drop));
    let lock = p.client.lock("lost/try").unwrap();
    let acquiring = tokio::spawn(async move { lock.try_acquire().await });
    p.applied("lost/try", 0).await;
    link.reset().await;
    let lease = acquiring
        .await
        .unwrap()
        .expect("no error surfaces")
        .expect("the hold the first attempt got");
    // One hold, not two: after its release the key is free for others.
    lease.release().await.unwrap();
    let other = client(&p.cluster.client_addrs(), true);
    assert!(
        other
            .lock("lost/try")
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_some(),
        "one release frees the key"
    );
}

/// The caller gives up while its acquire's answer is lost: the request,
/// applied on the server, is let go of on the session's next connection
/// (sent again with its id and no wait, its grant released), so the key is
/// free long before the hold's 30 s lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_whose_caller_left_while_its_answer_was_lost_is_released() {
    let p = Proxied::start().await;
    let link = p.session_link().await;
    link.set_blackhole(Direction::ToClient, Some(Blackhole::Drop));
    let lock = p
        .client
        .lock("lost/left")
        .unwrap()
        .with_lease(Duration::from_secs(30));
    let acquiring = tokio::spawn(async move { lock.try_acquire().await });
    p.applied("lost/left", 0).await;
    acquiring.abort();
    let _ = acquiring.await;
    link.reset().await;
    let other = client(&p.cluster.client_addrs(), true);
    let started = std::time::Instant::now();
    eventually("the abandoned grant released", CLUSTER_WAIT, || async {
        matches!(
            other.lock("lost/left").unwrap().try_acquire().await,
            Ok(Some(_))
        )
    })
    .await;
    println!("free again after {:?}", started.elapsed());
}

/// The same for a blocking acquire granted while queued, and for a
/// two-phase enqueue: the resent `e` finds its place (it would otherwise
/// be refused as already enqueued), and the ticket is granted in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_whose_answers_were_lost_keep_what_they_got() {
    let p = Proxied::start().await;
    let other = client(&p.cluster.client_addrs(), true);
    let blocker = other.lock("lost/wait").unwrap().acquire().await.unwrap();
    let link = p.session_link().await;
    link.set_blackhole(Direction::ToClient, Some(Blackhole::Drop));
    let lock = p.client.lock("lost/wait").unwrap();
    let waiting = tokio::spawn(async move { lock.acquire_within(Duration::from_secs(20)).await });
    let ticket_lock = p.client.lock("lost/ticket").unwrap();
    let ticket_blocker = other.lock("lost/ticket").unwrap().acquire().await.unwrap();
    let enqueueing = tokio::spawn(async move { ticket_lock.enqueue().await });
    p.applied("lost/wait", 1).await;
    p.applied("lost/ticket", 1).await;
    // The waiter is granted; its grant's reply is dropped too.
    let fence = blocker.fence();
    blocker.release().await.unwrap();
    p.applied("lost/wait", 0).await;
    link.reset().await;
    let lease = waiting
        .await
        .unwrap()
        .expect("no error surfaces")
        .expect("the grant made while the answer was lost");
    assert!(lease.fence() > fence);
    let ticket = match enqueueing
        .await
        .unwrap()
        .expect("the resent enqueue finds its place")
    {
        dflockd_client::Enqueue::Queued(ticket) => ticket,
        dflockd_client::Enqueue::Acquired(_) => panic!("the key was held"),
    };
    ticket_blocker.release().await.unwrap();
    let granted = ticket
        .wait(Duration::from_secs(10))
        .await
        .expect("granted in turn");
    granted.release().await.unwrap();
    lease.release().await.unwrap();
}

/// A blocking acquire waiting in the queue when the leader dies keeps its
/// place: another client that queues after the failover — while this
/// client is still cut off from the new leader — stays behind it, and the
/// holder's release grants this client first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_waiter_keeps_its_place_through_a_failover() {
    let p = Proxied::start().await;
    waiter_keeps_its_place(p, kill).await;
}

/// The same when the leader stops gracefully (as on SIGTERM: it drains,
/// hands its leadership over and stops): the drain leaves a named
/// session's waiting requests in their queues instead of withdrawing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_waiter_keeps_its_place_when_the_leader_stops_gracefully() {
    let p = Proxied::on(ClusterUnderTest::local(with_orphans).await).await;
    waiter_keeps_its_place(p, stop_gracefully).await;
}

async fn waiter_keeps_its_place(mut p: Proxied, lose_leader: LoseLeader) {
    let nodes = p.cluster.client_addrs();
    let (holder_client, late_client) = (client(&nodes, true), client(&nodes, true));
    let held = holder_client
        .lock("queue/k")
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let lock = p.client.lock("queue/k").unwrap();
    let first = tokio::spawn(async move { lock.acquire_within(Duration::from_secs(30)).await });
    p.applied("queue/k", 1).await;
    // Hold this client's bytes towards the servers while the leader goes.
    let hold = Faults::none().with_blackhole(Blackhole::Hold);
    for proxy in &p.proxies {
        proxy.set_default_faults(Direction::ToServer, hold);
    }
    let (leader, _) = p.cluster.leader().await;
    lose_leader(&mut p.cluster, leader).await;
    let lock = late_client.lock("queue/k").unwrap();
    let late = tokio::spawn(async move { lock.acquire_within(Duration::from_secs(30)).await });
    // The old place (detached) and the late one.
    p.applied("queue/k", 2).await;
    for proxy in &p.proxies {
        proxy.set_default_faults(Direction::ToServer, Faults::none());
        for link in proxy.links() {
            link.clear_faults();
        }
    }
    held.release().await.unwrap();
    let lease = first
        .await
        .unwrap()
        .expect("no error surfaces")
        .expect("granted first");
    assert!(!late.is_finished(), "the late waiter went first");
    let fence = lease.fence();
    lease.release().await.unwrap();
    let late = late.await.unwrap().unwrap().expect("granted next");
    assert!(late.fence() > fence);
    late.release().await.unwrap();
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
    // Isolating a node needs the in-process cluster's Raft proxies.
    let mut cluster = match loss {
        LeaderLoss::Kill => ClusterUnderTest::start(with_orphans).await,
        LeaderLoss::Isolate => ClusterUnderTest::local(with_orphans).await,
    };
    let (leader, _) = cluster.leader().await;
    let nodes = cluster.client_addrs();
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
        LeaderLoss::Isolate => {
            let local = cluster.local_mut().expect("an in-process cluster");
            local.isolate(leader).await;
        }
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

/// Workers lock, write a fenced register, and release, in a loop, while
/// the leader is killed twice (the first victim restarted in between, so a
/// majority stays). Requests whose answers the kills lost are sent again
/// on the new leader with the same id: the callers see no error at all,
/// every key's fences only grow, and no two workers are ever inside one
/// key at once. A two-phase worker (enqueue, then wait) runs alongside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_through_leader_kills_without_errors() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const WORKERS: usize = 8;
    const KEYS: usize = 3;
    let mut cluster = ClusterUnderTest::start(with_orphans).await;
    let nodes = cluster.client_addrs();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    // Per key: the last fence written, and whether someone is inside.
    let registers: Arc<Vec<(AtomicU64, AtomicBool)>> = Arc::new(
        (0..KEYS)
            .map(|_| (AtomicU64::new(0), AtomicBool::new(false)))
            .collect(),
    );
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        // Two clients: workers of one process and of another contend.
        let client = client(&nodes, true);
        let (stop, rounds, registers) = (stop.clone(), rounds.clone(), registers.clone());
        workers.spawn(async move {
            let mut errors = Vec::new();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = i % KEYS;
                let lock = client
                    .lock(&format!("work/{k}"))
                    .unwrap()
                    .with_lease(Duration::from_secs(5));
                let lease = if w == 0 {
                    // Two-phase: a place in the queue, then the grant.
                    match lock.enqueue().await {
                        Ok(dflockd_client::Enqueue::Acquired(lease)) => Ok(lease),
                        Ok(dflockd_client::Enqueue::Queued(ticket)) => {
                            ticket.wait(Duration::from_secs(20)).await
                        }
                        Err(error) => Err(error),
                    }
                } else {
                    lock.acquire_within(Duration::from_secs(20))
                        .await
                        .and_then(|lease| lease.ok_or_else(|| ErrorKind::Timeout.into()))
                };
                let lease = match lease {
                    Ok(lease) => lease,
                    Err(error) => {
                        errors.push(format!("acquire: {error}"));
                        continue;
                    }
                };
                let (last, inside) = &registers[k];
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "two holders of work/{k}"
                );
                let fence = lease.fence();
                let before = last.fetch_max(fence, Ordering::SeqCst);
                assert!(fence > before, "work/{k}: fence {fence} after {before}");
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                if let Err(error) = lease.release().await {
                    errors.push(format!("release: {error}"));
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            errors
        });
    }
    let progress = |since: u64| {
        let rounds = rounds.clone();
        async move {
            eventually("the workload goes on", CLUSTER_WAIT, || async {
                rounds.load(Ordering::Relaxed) >= since + 50
            })
            .await;
        }
    };
    progress(0).await;
    let (first, _) = cluster.leader().await;
    cluster.kill(first).await;
    progress(rounds.load(Ordering::Relaxed)).await;
    cluster.restart(first).await;
    let (second, _) = cluster.leader().await;
    cluster.kill(second).await;
    progress(rounds.load(Ordering::Relaxed)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    while let Some(worker) = workers.join_next().await {
        errors.extend(worker.expect("no assertion failed in a worker"));
    }
    println!(
        "{} rounds through two leader kills, {} errors",
        rounds.load(Ordering::Relaxed),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, the first: {:#?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
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
