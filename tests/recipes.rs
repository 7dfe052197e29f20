//! Coordination recipes under failure: leader election across randomized
//! failovers, singleton jobs, and lease scopes.

use dflockd_testkit::queue as client_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_support::queued_waiter;
use dflockd::client::{Client, LossReason};
use dflockd::server::{Server, ServerConfig, ServerHandle};
use dflockd::{LeaderElection, LeaseScope, Singleton};
use dflockd_testkit::faultproxy::{Blackhole, Direction, FaultProxy, Faults};
use kameo::actor::Spawn;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An actor whose one handler spins forever.
struct Busy(Arc<Mutex<Instant>>);

impl kameo::Actor for Busy {
    type Args = Arc<Mutex<Instant>>;
    type Error = kameo::error::Infallible;
    async fn on_start(
        alive: Self::Args,
        _: kameo::actor::ActorRef<Self>,
    ) -> Result<Self, Self::Error> {
        Ok(Busy(alive))
    }
}

struct Spin;

impl kameo::message::Message<Spin> for Busy {
    type Reply = ();
    async fn handle(&mut self, _: Spin, _: &mut kameo::message::Context<Self, ()>) {
        loop {
            *self.0.lock().unwrap() = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

const TTL: Duration = Duration::from_secs(1);

async fn server() -> ServerHandle {
    // A short sweep so expiry-based failover is prompt.
    let config = ServerConfig {
        lease_sweep_interval: Duration::from_millis(50),
        ..ServerConfig::ephemeral()
    };
    Server::start(config).await.expect("server starts")
}

/// One client's path to the server, through the fault-injecting proxy.
struct Link(FaultProxy);

impl Link {
    async fn start(server: std::net::SocketAddr) -> Link {
        Link(FaultProxy::start(server).await.expect("proxy starts"))
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.0.addr()
    }

    /// Stop forwarding on every connection, open or opened later, without
    /// closing any.
    fn blackhole(&self) {
        for dir in Direction::BOTH {
            self.0
                .set_default_faults(dir, Faults::none().with_blackhole(Blackhole::Drop));
        }
        for link in self.0.links() {
            link.blackhole(Blackhole::Drop);
        }
    }

    /// Reset every connection (both peers see it); new ones forward again.
    async fn cut(&self) {
        for dir in Direction::BOTH {
            self.0.set_default_faults(dir, Faults::none());
        }
        self.0.cut_all().await;
    }

    /// After a blackhole: drop the dead connections and forward again.
    async fn heal(&self) {
        self.cut().await;
    }
}

fn client_via(link: &Link) -> Client {
    // Keepalive below the TTL so a blackhole is noticed by the client too.
    Client::builder()
        .server(link.addr().into())
        .reply_timeout(Duration::from_secs(2))
        .build()
        .expect("client")
}

/// Storage that rejects writes carrying a fence lower than the highest seen.
#[derive(Default)]
struct FencedRegister {
    inner: Mutex<(u64, u64, u64)>, // (highest, accepted, rejected)
}

impl FencedRegister {
    fn write(&self, fence: u64) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if fence < inner.0 {
            inner.2 += 1;
            return false;
        }
        inner.0 = fence;
        inner.1 += 1;
        true
    }
}

#[derive(Debug, Clone)]
struct TermRecord {
    who: usize,
    fence: u64,
    start: Instant,
    end: Option<Instant>,
}

struct Candidate {
    link: Link,
    client: Client,
    stop: CancellationToken,
}

fn campaign(
    who: usize,
    client: Client,
    stop: CancellationToken,
    register: Arc<FencedRegister>,
    terms: Arc<Mutex<Vec<TermRecord>>>,
    latest: watch::Sender<u64>,
) {
    tokio::spawn(async move {
        let election = LeaderElection::new(&client, "recipes/leader")
            .expect("election")
            .with_lease(TTL);
        let _ = election
            .run_as_leader(stop, |ctx| {
                let register = Arc::clone(&register);
                let terms = Arc::clone(&terms);
                let latest = latest.clone();
                async move {
                    let index = {
                        let mut terms = terms.lock().unwrap();
                        terms.push(TermRecord {
                            who,
                            fence: ctx.fence(),
                            start: Instant::now(),
                            end: None,
                        });
                        terms.len() - 1
                    };
                    latest.send_modify(|f| *f = (*f).max(ctx.fence()));
                    while !ctx.is_cancelled() {
                        register.write(ctx.fence());
                        tokio::select! {
                            _ = ctx.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        }
                    }
                    terms.lock().unwrap()[index].end = Some(Instant::now());
                }
            })
            .await;
    });
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Cut,
    Blackhole,
    Resign,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_two_leaders_across_100_randomized_failovers() {
    let server = server().await;
    let register = Arc::new(FencedRegister::default());
    let terms = Arc::new(Mutex::new(Vec::<TermRecord>::new()));
    let (latest, mut latest_rx) = watch::channel(0u64);
    let mut candidates = Vec::new();
    for who in 0..3 {
        let link = Link::start(server.local_addr()).await;
        let client = client_via(&link);
        let stop = CancellationToken::new();
        campaign(
            who,
            client.clone(),
            stop.clone(),
            Arc::clone(&register),
            Arc::clone(&terms),
            latest.clone(),
        );
        candidates.push(Candidate { link, client, stop });
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let renew_interval = TTL / 3;
    let bound = TTL + renew_interval + Duration::from_millis(700);
    let mut faults = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    let mut current = *latest_rx.wait_for(|f| *f > 0).await.unwrap();
    for round in 0..100 {
        let leader = terms
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|t| t.fence == current)
            .map(|t| t.who)
            .unwrap();
        let fault = match next() % 10 {
            0..=3 => Fault::Cut,
            4..=6 => Fault::Blackhole,
            _ => Fault::Resign,
        };
        let started = Instant::now();
        match fault {
            Fault::Cut => {
                faults.0 += 1;
                candidates[leader].link.cut().await;
            }
            Fault::Blackhole => {
                faults.1 += 1;
                candidates[leader].link.blackhole();
            }
            Fault::Resign => {
                faults.2 += 1;
                candidates[leader].stop.cancel();
            }
        }
        let new = tokio::time::timeout(bound * 3, latest_rx.wait_for(|f| *f > current))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no failover after {fault:?}"))
            .map(|f| *f)
            .unwrap();
        let took = started.elapsed();
        slowest = slowest.max(took);
        assert!(
            took <= bound,
            "round {round}: failover after {fault:?} took {took:?} > {bound:?}"
        );
        // Bring the old leader back as a candidate.
        match fault {
            Fault::Cut => {}
            Fault::Blackhole => candidates[leader].link.heal().await,
            Fault::Resign => {
                let stop = CancellationToken::new();
                candidates[leader].stop = stop.clone();
                let client = candidates[leader].client.clone();
                campaign(
                    leader,
                    client,
                    stop,
                    Arc::clone(&register),
                    Arc::clone(&terms),
                    latest.clone(),
                );
            }
        }
        current = new;
    }
    for c in &candidates {
        c.stop.cancel();
    }
    let terms = terms.lock().unwrap().clone();
    // Terms in grant order have strictly increasing fences, and a term never
    // starts before the previous one ended when its end is known locally.
    let mut ordered = terms.clone();
    ordered.sort_by_key(|t| t.fence);
    for pair in ordered.windows(2) {
        assert!(pair[0].fence < pair[1].fence);
    }
    let (_, accepted, rejected) = *register.inner.lock().unwrap();
    eprintln!(
        "failovers: 100 (cut {}, blackhole {}, resign {}); terms {}; slowest failover {:?}; register accepted {accepted}, rejected stale {rejected}",
        faults.0,
        faults.1,
        faults.2,
        terms.len(),
        slowest
    );
    assert!(terms.len() > 100);
}

/// Blackholed leaders step down before anyone else is granted: leadership
/// intervals never overlap when the server learns of the failure only by
/// lease expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_leader_steps_down_before_the_next_term_starts() {
    let server = server().await;
    let register = Arc::new(FencedRegister::default());
    let terms = Arc::new(Mutex::new(Vec::<TermRecord>::new()));
    let (latest, mut latest_rx) = watch::channel(0u64);
    let mut links = Vec::new();
    for who in 0..2 {
        let link = Link::start(server.local_addr()).await;
        campaign(
            who,
            client_via(&link),
            CancellationToken::new(),
            Arc::clone(&register),
            Arc::clone(&terms),
            latest.clone(),
        );
        links.push(link);
    }
    let mut current = *latest_rx.wait_for(|f| *f > 0).await.unwrap();
    for _ in 0..5 {
        let leader = terms
            .lock()
            .unwrap()
            .iter()
            .find(|t| t.fence == current)
            .map(|t| t.who)
            .unwrap();
        links[leader].blackhole();
        current =
            *tokio::time::timeout(Duration::from_secs(5), latest_rx.wait_for(|f| *f > current))
                .await
                .unwrap()
                .unwrap();
        links[leader].heal().await;
    }
    let terms = terms.lock().unwrap().clone();
    let mut ordered = terms;
    ordered.sort_by_key(|t| t.fence);
    for pair in ordered.windows(2) {
        let ended = pair[0].end.expect("deposed leader noticed");
        assert!(
            ended <= pair[1].start,
            "term {} still running when {} started",
            pair[0].fence,
            pair[1].fence
        );
    }
    assert_eq!(
        register.inner.lock().unwrap().2,
        0,
        "no stale write reached the register"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn singleton_restarts_elsewhere_within_one_ttl() {
    let server = server().await;
    let running = Arc::new(Mutex::new(Vec::<usize>::new()));
    let max_concurrent = Arc::new(Mutex::new(0usize));
    let (started_tx, mut started_rx) = watch::channel(None::<usize>);
    let mut links = Vec::new();
    for who in 0..2 {
        let link = Link::start(server.local_addr()).await;
        let client = client_via(&link);
        let running = Arc::clone(&running);
        let max_concurrent = Arc::clone(&max_concurrent);
        let started_tx = started_tx.clone();
        tokio::spawn(async move {
            let job = Singleton::new(&client, "recipes/singleton")
                .unwrap()
                .with_lease(TTL);
            let _ = job
                .run(CancellationToken::new(), |ctx| {
                    let running = Arc::clone(&running);
                    let max_concurrent = Arc::clone(&max_concurrent);
                    let started_tx = started_tx.clone();
                    async move {
                        {
                            let mut r = running.lock().unwrap();
                            r.push(who);
                            let mut m = max_concurrent.lock().unwrap();
                            *m = (*m).max(r.len());
                        }
                        started_tx.send_replace(Some(who));
                        ctx.cancelled().await;
                        running.lock().unwrap().retain(|w| *w != who);
                    }
                })
                .await;
        });
        links.push(link);
    }
    let first = started_rx.wait_for(Option::is_some).await.unwrap().unwrap();
    // The holder's host stops answering (no close): the job must restart on
    // the other one within one TTL (+ the sweep and a renew interval).
    let t0 = Instant::now();
    links[first].blackhole();
    let second = *tokio::time::timeout(
        Duration::from_secs(5),
        started_rx.wait_for(|w| *w == Some(1 - first)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(second, Some(1 - first));
    assert!(
        t0.elapsed() <= TTL + TTL / 3 + Duration::from_millis(700),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        *max_concurrent.lock().unwrap(),
        1,
        "the job never ran twice at once"
    );
}

/// Every child of a scope has stopped before the server could grant the
/// key to anyone else — even a child that ignores cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_scope_children_stop_before_the_key_is_regranted() {
    let server = server().await;
    let link = Link::start(server.local_addr()).await;
    let holder = client_via(&link);
    let lease = holder
        .lock("recipes/scope")
        .unwrap()
        .with_lease(Duration::from_secs(2))
        .acquire()
        .await
        .unwrap();
    let scope = LeaseScope::new(&lease);
    let last_alive = Arc::new(Mutex::new(Instant::now()));
    // A cooperative child.
    scope.spawn(|cancel| async move { cancel.cancelled().await });
    // A stubborn child that never looks at its token: it must be aborted.
    let stubborn = Arc::clone(&last_alive);
    scope.spawn(|_cancel| async move {
        loop {
            *stubborn.lock().unwrap() = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // A stubborn actor whose handler never returns: stop_gracefully cannot
    // reach it, so it must be killed by the deadline.
    let actor_alive = Arc::new(Mutex::new(Instant::now()));
    let busy = Busy::spawn(Arc::clone(&actor_alive));
    busy.tell(Spin).await.unwrap();
    scope.adopt_actor(busy.clone());
    // Someone else waits for the key directly on the server.
    let other = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    // Once the waiter is queued, cut the holder off.
    let waiter = queued_waiter(&other, "recipes/scope").await;
    link.blackhole(); // renewals stop arriving; the server expires the lease
    tokio::time::timeout(Duration::from_secs(5), scope.stopped())
        .await
        .expect("scope stops");
    let stopped_at = Instant::now();
    let last = *last_alive.lock().unwrap();
    let (granted_at, _lease) = waiter.await.unwrap();
    assert_eq!(lease.loss_reason(), Some(LossReason::Expired));
    let actor_last = *actor_alive.lock().unwrap();
    assert!(!busy.is_alive(), "the stubborn actor was killed");
    assert!(
        actor_last < granted_at,
        "the actor ran after the key was granted elsewhere"
    );
    assert!(
        last < granted_at,
        "a child ran after the key was granted elsewhere"
    );
    assert!(
        stopped_at <= granted_at,
        "scope stopped at {stopped_at:?}, key re-granted at {granted_at:?}"
    );
}

/// A long-lived scope that spawns a short task per request costs only what
/// still runs: 100,000 finished children leave nothing behind (before, each
/// left its abort handle until the scope ended), and adopted actors that
/// stopped leave too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_forgets_children_that_ended() {
    let server = server().await;
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    let lease = client
        .lock("recipes/many")
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let scope = LeaseScope::new(&lease);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for batch in 0..100 {
        for _ in 0..1_000 {
            let done = Arc::clone(&done);
            scope.spawn(|_cancel| async move {
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
        // Bounded by what runs at once, not by what ever ran.
        assert!(
            scope.running() <= 1_000,
            "batch {batch}: {} children tracked",
            scope.running()
        );
        tokio::time::timeout(Duration::from_secs(5), async {
            while scope.running() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("batch {batch}: {} children still tracked", scope.running()));
    }
    assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), 100_000);
    assert_eq!(scope.running(), 0);
    // An adopted actor that stops leaves as well.
    let alive = Arc::new(Mutex::new(Instant::now()));
    let actor = Busy::spawn(alive);
    scope.adopt_actor(actor.clone());
    assert_eq!(scope.running(), 1);
    actor.stop_gracefully().await.unwrap();
    actor.wait_for_shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while scope.running() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the stopped actor leaves the scope");
    scope.close();
    scope.stopped().await;
    lease.release().await.unwrap();
}

/// A campaign on a cluster node that does not lead ends with
/// `Error::NotLeader` instead of asking the same node forever. The node
/// is one of a two-voter cluster whose other voter never starts, so no
/// leader is ever elected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_on_a_follower_surfaces_not_leader() {
    use dflockd::server::{ClusterConfig, ClusterPeer, Listeners, RaftSecret};
    let dir = tempfile::tempdir().unwrap();
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (client_listener, raft, absent) = (bind(), bind(), bind());
    let addr = |l: &std::net::TcpListener| l.local_addr().unwrap().to_string();
    let peers = vec![
        ClusterPeer {
            id: 1,
            raft: addr(&raft),
            client: addr(&client_listener),
        },
        ClusterPeer {
            id: 2,
            raft: addr(&absent),
            client: addr(&absent),
        },
    ];
    let secret = RaftSecret::new(vec![3; 32]).unwrap();
    let mut config = ServerConfig::ephemeral();
    config.cluster = Some(ClusterConfig::new(1, dir.path(), addr(&raft), secret).with_peers(peers));
    drop(absent);
    let node = dflockd::server::Server::start_with_listeners(
        config,
        Listeners {
            client: Some(client_listener),
            raft: Some(raft),
            http: None,
        },
    )
    .await
    .unwrap();
    let client = Client::builder()
        .server(node.local_addr().into())
        .build()
        .unwrap();
    let election = LeaderElection::new(&client, "recipes/no-leader").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), election.campaign())
        .await
        .expect("the campaign gives up instead of retrying forever");
    assert!(
        matches!(outcome, Err(ref e) if matches!(e.kind(), dflockd::client::ErrorKind::NotLeader { .. })),
        "{:?}",
        outcome.map(|_| ())
    );
    node.shutdown().await;
}
