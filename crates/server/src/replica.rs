//! Cluster mode: this server as one node of a replicated cluster.
//!
//! The lock table is the Raft state machine of `dflockd-cluster`; a
//! connection's commands are proposed to the leader's log ([`ClusterLog`])
//! and answered once committed and applied. Grants made by an applied entry
//! reach the connections of the node that proposed it ([`Router`]): only
//! that node can have the waiting connection, and a connection id carries
//! the term it was opened under, so a grant never reaches a connection of
//! another leadership. A node serves commands only while it leads the term
//! a connection was opened under; when its leadership begins or ends
//! ([`Regime`]), the connections of the old regime close, and clients go to
//! the leader that `error_not_leader` names.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dflockd_cluster::openraft::ServerState;
use dflockd_cluster::{
    ApplyObserver, Batch, BatchEffects, Committed, Member, Network, Node, NodeOptions, Origin,
    ProposeError,
};
use dflockd_core::{
    AcquireOutcome, ConnId, Grant, LockError, Op, Outcome, Policy, ResourceId, TableConfig,
    WaitOutcome, Waiting,
};
use dflockd_proto::{ClusterStats, Stats, Token};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster_config::{ClusterConfig, resolve};
use crate::session::{Answer, Done, Log, Refusal};
use crate::shared::{MuxGrant, Notify, Shared, Telemetry};

/// How long a pristine seed node waits to be found by a running cluster
/// before it forms a new one (a wiped node must not start a second
/// cluster: see [`Replica::start`]).
const FORMATION_GRACE: Duration = Duration::from_secs(2);

/// How often the regime is re-checked without a metrics change (the
/// quorum's last answer ages without one).
const REGIME_TICK: Duration = Duration::from_millis(100);

/// This node's part in the cluster at one time.
#[derive(Clone, Debug)]
pub(crate) struct Regime {
    /// The term this node leads (with a quorum that answers), if it does.
    pub(crate) leading: Option<u64>,
    /// The leader's client address, if known.
    pub(crate) leader_addr: Option<String>,
    /// Cancelled when this node's leadership begins or ends: the
    /// connections opened under this regime close.
    pub(crate) ended: CancellationToken,
}

/// Where grants made by this node's entries go: the notifications of the
/// waiting requests of its connections, by (connection, request).
pub(crate) struct Router {
    node: u64,
    /// Entries up to this index were in the log when this process
    /// started: not its own, even in a term it leads again. (Set once the
    /// node has opened its log, before it can lead.)
    startup_index: AtomicU64,
    /// The terms this process has led: only their entries are its own to
    /// route (entries replayed after a restart were routed by the process
    /// that proposed them).
    led: Mutex<std::collections::HashSet<u64>>,
    waiting: Mutex<HashMap<Waiting, Notify>>,
    /// Grants that reached no connection, to be released.
    undelivered: mpsc::UnboundedSender<(ResourceId, Token)>,
    /// Told of every command this node's table applies (metrics, events).
    telemetry: Arc<Telemetry>,
}

impl Router {
    fn register(&self, to: Waiting, notify: Notify) {
        self.lock().insert(to, notify);
    }

    fn unregister(&self, to: &Waiting) {
        self.lock().remove(to);
    }

    fn unregister_conn(&self, conn: ConnId) {
        self.lock().retain(|to, _| to.conn != conn);
    }

    /// This process leads `term` from now on.
    fn lead(&self, term: u64) {
        self.led
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(term);
    }

    fn has_led(&self, term: u64) -> bool {
        self.led
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&term)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Waiting, Notify>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An entry was applied: if this process proposed it, each grant goes
    /// to its waiting request, or (its connection gone, or of another
    /// process) is released again. Entries of other nodes, and entries
    /// this node wrote before a restart, are not its to route.
    fn applied(&self, origin: Origin, batch: &Batch, effects: &BatchEffects) {
        // Every node's table applies every command: each node's metrics
        // and event stream follow its own table.
        let metrics = &self.telemetry.metrics;
        let events = &self.telemetry.events;
        if let Some(office) = &effects.office {
            crate::events::observe(&batch.office.op, office, |_| false, metrics, events, true);
        }
        for (command, effects) in batch.commands.iter().zip(&effects.commands) {
            crate::events::observe(&command.op, effects, |_| false, metrics, events, true);
        }
        let own = origin.node == self.node
            && origin.index > self.startup_index.load(Ordering::Acquire)
            && self.has_led(origin.term);
        if !own {
            return;
        }
        let deliveries = effects
            .office
            .iter()
            .chain(&effects.commands)
            .flat_map(|effects| &effects.grants);
        let mut waiting = None;
        for delivery in deliveries {
            let waiting = waiting.get_or_insert_with(|| self.lock());
            let sent = match waiting.remove(&delivery.to) {
                Some(notify) => notify.send(&delivery.resource, delivery.grant),
                None => Err(delivery.grant),
            };
            if let Err(grant) = sent {
                tracing::debug!(
                    conn = delivery.to.conn.0,
                    request = delivery.to.request,
                    term = origin.term,
                    "grant reached no connection: released"
                );
                let _ = self
                    .undelivered
                    .send((delivery.resource.clone(), grant.token));
            }
        }
    }
}

/// Grants that reached no connection (see [`release_undelivered`]).
pub(crate) type Releases = mpsc::UnboundedReceiver<(ResourceId, Token)>;

/// This server's node of the cluster, and what its connections share.
pub(crate) struct Replica {
    node: Node,
    router: Arc<Router>,
    /// The members' client addresses, for redirects.
    clients: HashMap<u64, String>,
    regime: Mutex<Regime>,
    next_conn: AtomicU64,
    /// This node's table rules, which it writes to the log when it takes
    /// office (so every node applies the log under the same rules).
    policy: Policy,
    /// How long a leader serves without an answer from a quorum.
    stale_after: Duration,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    /// The Raft listener could not bind.
    #[error("node {node}: cannot listen for Raft on {addr}: {source}")]
    Bind {
        /// This node.
        node: u64,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A peer's Raft address does not resolve.
    #[error("node {node}: cluster peer {peer}'s Raft address {addr} does not resolve: {source}")]
    Resolve {
        /// This node.
        node: u64,
        /// The peer.
        peer: u64,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is contradictory.
    #[error("node {node}: {reason}")]
    Config {
        /// This node.
        node: u64,
        /// What is wrong.
        reason: String,
    },
    /// The node did not start (storage, Raft).
    #[error(transparent)]
    Node(#[from] dflockd_cluster::NodeError),
}

impl Replica {
    /// Starts this server's node: its storage in `config.raft_dir`, Raft on
    /// `raft` (or `config.raft_addr`). A pristine node forms the cluster if
    /// it is told to bootstrap (alone) or is the seed (the lowest id of
    /// `peers`, after [`FORMATION_GRACE`] without being found by a running
    /// cluster); every other pristine node waits for the leader to reach
    /// it. A node with state never forms a cluster again.
    pub(crate) async fn start(
        config: &ClusterConfig,
        table: TableConfig,
        raft: Option<std::net::TcpListener>,
        own_client_addr: String,
        telemetry: Arc<Telemetry>,
    ) -> Result<(Arc<Replica>, Releases), ClusterStartError> {
        let id = config.node_id;
        let bind_error = |source| ClusterStartError::Bind {
            node: id,
            addr: config.raft_addr.clone(),
            source,
        };
        let listener = match raft {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(bind_error)?;
                TcpListener::from_std(listener).map_err(bind_error)?
            }
            None => TcpListener::bind(&config.raft_addr)
                .await
                .map_err(bind_error)?,
        };
        if !(1..=0xFFFF).contains(&id) {
            return Err(ClusterStartError::Config {
                node: id,
                reason: "node ids are 1–65535".to_string(),
            });
        }
        if !config.bootstrap && !config.peers.iter().any(|p| p.id == id) {
            return Err(ClusterStartError::Config {
                node: id,
                reason: "--cluster-peers must include this node (or use --cluster-bootstrap)"
                    .to_string(),
            });
        }
        let mut network = Network::with_secret(config.secret.clone());
        if let Some(tls) = &config.tls {
            network = network.with_tls(tls.clone());
        }
        let mut voters = Vec::new();
        let mut clients = HashMap::new();
        for peer in &config.peers {
            let addr = resolve(&peer.raft).map_err(|source| ClusterStartError::Resolve {
                node: id,
                peer: peer.id,
                addr: peer.raft.clone(),
                source,
            })?;
            if peer.id != id {
                network.route(peer.id, addr);
            }
            voters.push((peer.id, addr));
            clients.insert(peer.id, peer.client.clone());
        }
        let own = config
            .advertise_addr
            .clone()
            .or_else(|| clients.get(&id).cloned())
            .unwrap_or(own_client_addr);
        clients.insert(id, own.clone());
        let members = |voters: Vec<(u64, std::net::SocketAddr)>| -> Vec<(u64, Member)> {
            voters
                .into_iter()
                .map(|(peer, raft)| {
                    let client = clients.get(&peer).cloned().unwrap_or_default();
                    (peer, Member::new(raft.to_string(), client))
                })
                .collect()
        };
        let (undelivered, releases) = mpsc::unbounded_channel();
        let router = Arc::new(Router {
            node: id,
            led: Mutex::new(std::collections::HashSet::new()),
            startup_index: AtomicU64::new(u64::MAX),
            waiting: Mutex::new(HashMap::new()),
            undelivered,
            telemetry,
        });
        let observer = {
            let router = Arc::clone(&router);
            ApplyObserver::new(move |origin, batch, effects| router.applied(origin, batch, effects))
        };
        let table_rules = table;
        let raft = config
            .timing
            .raft_config(config.snapshot_every)
            .map_err(|reason| ClusterStartError::Config { node: id, reason })?;
        let options = NodeOptions {
            table,
            raft,
            network,
            observer: Some(observer),
        };
        std::fs::create_dir_all(&config.raft_dir).map_err(|e| ClusterStartError::Config {
            node: id,
            reason: format!("cannot create {}: {e}", config.raft_dir.display()),
        })?;
        let node = Node::start_with(id, Path::new(&config.raft_dir), listener, options).await?;
        router
            .startup_index
            .store(node.startup_index(), Ordering::Release);
        let seed = config.peers.iter().map(|p| p.id).min() == Some(id);
        let form = if config.bootstrap {
            Some(members(vec![(id, node.raft_addr())]))
        } else if seed {
            Some(members(voters))
        } else {
            None
        };
        let replica = Arc::new(Replica {
            node,
            router,
            clients,
            regime: Mutex::new(Regime {
                leading: None,
                leader_addr: None,
                ended: CancellationToken::new(),
            }),
            next_conn: AtomicU64::new(1),
            policy: Policy::of(&table_rules),
            stale_after: config.timing.election_max,
        });
        if let Some(voters) = form {
            replica.form(voters, !config.bootstrap).await;
        }
        Ok((replica, releases))
    }

    /// Forms a cluster of `voters` if this node is pristine (after the
    /// grace period, if `wait`: a running cluster that has this node as a
    /// member reaches it by then, and then it is not pristine any more).
    async fn form(&self, voters: Vec<(u64, Member)>, wait: bool) {
        let raft = self.node.raft();
        if wait {
            let found = raft
                .wait(Some(FORMATION_GRACE))
                .metrics(|m| m.last_log_index.is_some(), "found by a cluster")
                .await;
            if found.is_ok() {
                return;
            }
        }
        if raft.is_initialized().await.unwrap_or(true) {
            return;
        }
        match self.node.initialize(&voters).await {
            Ok(()) => tracing::info!(node = self.node.id(), ?voters, "formed the cluster"),
            Err(error) => tracing::info!(node = self.node.id(), %error, "cluster already formed"),
        }
    }

    /// This node stops serving: the current regime ends (its connections
    /// close) and no later one begins.
    pub(crate) fn retire(&self) {
        let mut regime = self.regime.lock().unwrap_or_else(PoisonError::into_inner);
        regime.ended.cancel();
        *regime = Regime {
            leading: None,
            leader_addr: None,
            ended: CancellationToken::new(),
        };
    }

    /// The node.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// The regime now.
    pub(crate) fn regime(&self) -> Regime {
        self.regime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The id and regime of a new connection. Ids are unique across the
    /// cluster's nodes and every process a node ever ran: the node id and
    /// the node's incarnation (its count of starts) in the high 32 bits, a
    /// counter of this process in the low ones.
    pub(crate) fn open(&self) -> (ConnId, Regime) {
        let regime = self.regime();
        let count = self.next_conn.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF;
        let node = self.node.id() & 0xFFFF;
        let incarnation = self.node.incarnation() & 0xFFFF;
        (ConnId((node << 48) | (incarnation << 32) | count), regime)
    }

    /// Why a command cannot be proposed now under `regime`, if it cannot.
    fn refuse(&self, term: Option<u64>) -> Option<Refusal> {
        let now = self.regime();
        if term.is_some() && now.leading == term {
            return None;
        }
        Some(Refusal::NotLeader(now.leader_addr))
    }

    /// The client address of node `id`, if known: as the membership
    /// records it (nodes added later too), else as `--cluster-peers` says.
    /// Node `id`'s client address, if known.
    pub(crate) fn client_addr(&self, id: Option<u64>) -> Option<String> {
        let id = id?;
        self.node
            .member(id)
            .map(|member| member.client)
            .filter(|client| !client.is_empty())
            .or_else(|| self.clients.get(&id).cloned())
    }

    /// What a failed proposal answers: `error_not_leader`, with the
    /// leader's address when known (spec §8: other proposal failures are
    /// reported the same way).
    fn refusal(&self, error: ProposeError) -> Refusal {
        match error {
            ProposeError::NotLeader { leader } => Refusal::NotLeader(self.client_addr(leader)),
            ProposeError::Failed(reason) => {
                tracing::debug!(%reason, "proposal failed");
                Refusal::NotLeader(self.regime().leader_addr)
            }
        }
    }

    /// The `"cluster"` object of `stats`.
    pub(crate) fn cluster_stats(&self) -> ClusterStats {
        let metrics = self.node.raft().metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ClusterStats {
            node_id: self.node.id().to_string(),
            role: role.to_string(),
            term: metrics.current_term,
            leader_id: metrics
                .current_leader
                .map(|id| id.to_string())
                .unwrap_or_default(),
            leader_addr: self.client_addr(metrics.current_leader),
            commit_index: metrics.last_applied.map_or(0, |id| id.index),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map_or(0, |id| id.index),
            voters: metrics
                .membership_config
                .voter_ids()
                .map(|id| id.to_string())
                .collect(),
        }
    }

    /// The `stats` document: this node's copy of the table, and the
    /// cluster object.
    pub(crate) fn stats(&self, connections: u64) -> Stats {
        let now = self.node.clock();
        let mut stats = self
            .node
            .view()
            .read(|table| table.stats(connections, now.max(table.latest())));
        stats.cluster = Some(self.cluster_stats());
        stats
    }
}

/// Sends a proposal's answer to the connection that asked.
fn answer_to(
    replica: &Arc<Replica>,
    answers: &mpsc::UnboundedSender<(u64, Answer)>,
    request: u64,
    then: impl FnOnce(&Answer) + Send + 'static,
) -> dflockd_cluster::OnCommit {
    let replica = Arc::clone(replica);
    let answers = answers.clone();
    Box::new(move |committed: Committed| {
        let answer: Answer = match committed {
            Ok(Some(effects)) => effects.outcome.map(Some).map_err(Refusal::Lock),
            Ok(None) => Ok(None),
            Err(error) => Err(replica.refusal(error)),
        };
        then(&answer);
        let _ = answers.send((request, answer));
    })
}

/// The log of one connection of a cluster node: commands are proposed to
/// the Raft log and answered once applied.
pub(crate) struct ClusterLog {
    replica: Arc<Replica>,
    shared: Arc<Shared>,
    id: ConnId,
    /// The term this node led when the connection opened.
    term: Option<u64>,
    /// Whether a command of this connection was proposed (then its close
    /// proposes its disconnect).
    proposed: bool,
    pub(crate) grants: mpsc::UnboundedReceiver<MuxGrant>,
    grant_sink: mpsc::UnboundedSender<MuxGrant>,
    pub(crate) answers: mpsc::UnboundedReceiver<(u64, Answer)>,
    answer_sink: mpsc::UnboundedSender<(u64, Answer)>,
    /// Cancelled when the regime it opened under ends.
    pub(crate) ended: CancellationToken,
}

impl ClusterLog {
    pub(crate) fn new(
        replica: Arc<Replica>,
        shared: Arc<Shared>,
        id: ConnId,
        regime: Regime,
    ) -> ClusterLog {
        let (grant_sink, grants) = mpsc::unbounded_channel();
        let (answer_sink, answers) = mpsc::unbounded_channel();
        ClusterLog {
            replica,
            shared,
            id,
            term: regime.leading,
            proposed: false,
            grants,
            grant_sink,
            answers,
            answer_sink,
            ended: regime.ended,
        }
    }

    /// Proposes `op` for request `request`; `then` sees the answer first.
    fn propose(
        &mut self,
        op: Option<Op>,
        request: u64,
        then: impl FnOnce(&Answer) + Send + 'static,
    ) -> Done<Answer> {
        if let Some(refusal) = self.replica.refuse(self.term) {
            return Done::Now(Err(refusal));
        }
        self.proposed = true;
        let on_commit = answer_to(&self.replica, &self.answer_sink, request, then);
        self.replica.node.submit(op, on_commit);
        Done::Later
    }
}

impl Log for ClusterLog {
    fn run(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        self.propose(Some(op), request, |_| {})
    }

    fn run_waiting(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let to = Waiting {
            conn: self.id,
            request,
        };
        // Registered before the proposal: the entry that queues the request
        // may be followed, even in the same batch, by one that grants it.
        let notify = Notify {
            id: request,
            to: self.grant_sink.clone(),
        };
        if self.replica.refuse(self.term).is_none() {
            self.replica.router.register(to, notify);
        }
        let router = Arc::clone(&self.replica.router);
        self.propose(Some(op), request, move |answer| {
            let queued = matches!(
                answer,
                Ok(Some(
                    Outcome::Acquire(AcquireOutcome::Queued(_))
                        | Outcome::Wait(WaitOutcome::Pending(_))
                ))
            );
            if !queued {
                router.unregister(&to);
            }
        })
    }

    fn withdraw(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let to = Waiting {
            conn: self.id,
            request,
        };
        let router = Arc::clone(&self.replica.router);
        self.propose(Some(op), request, move |answer| {
            if let Ok(Some(Outcome::Withdrawn(true))) = answer {
                router.unregister(&to);
            }
        })
    }

    fn barrier(&mut self, request: u64) -> Done<Answer> {
        self.propose(None, request, |_| {})
    }

    fn bind(&mut self, reference: dflockd_proto::StableRef, request: u64) -> Done<Answer> {
        let op = Op::Bind {
            conn: self.id,
            reference,
        };
        self.propose(Some(op), request, |_| {})
    }

    fn observe(&mut self, _: &ResourceId, grant: Grant) -> Result<Grant, LockError> {
        // The lease runs from the grant's commit: restarting it here would
        // cost a second commit per waiting grant.
        Ok(grant)
    }

    fn release_undelivered(&mut self, rid: &ResourceId, token: Token) {
        let op = Op::ReleaseUndelivered {
            resource: rid.clone(),
            token,
        };
        self.replica.node.submit(Some(op), Box::new(|_| {}));
    }

    fn try_grant(&mut self) -> Option<(u64, ResourceId, Grant)> {
        self.grants.try_recv().ok()
    }

    fn waiters(&mut self) -> usize {
        let conn = self.id;
        self.replica
            .node
            .view()
            .read(|table| table.waiters_of(conn))
    }

    fn stats(&mut self) -> Stats {
        self.replica.stats(self.shared.connections() as u64)
    }

    fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    fn keeps_orphans(&self) -> bool {
        self.replica
            .node
            .view()
            .read(|table| !table.config().orphan_ttl.is_zero())
    }
}

impl Drop for ClusterLog {
    fn drop(&mut self) {
        self.replica.router.unregister_conn(self.id);
        self.grants.close();
        let mut undelivered = Vec::new();
        while let Ok((_, rid, grant)) = self.grants.try_recv() {
            undelivered.push((rid, grant.token));
        }
        for (rid, token) in undelivered {
            self.release_undelivered(&rid, token);
        }
        // A connection of a leadership that ended leaves its holds to their
        // leases (or re-attachment): only the node that still leads the
        // connection's term runs its disconnect.
        // (The same term again after a moment without a quorum is another
        // regime too: its connections were closed as the old one ended.)
        // Nor does a connection this node closes because it is stopping
        // (drain or kill): its client moves to another node, and the holds
        // stay with their leases, so a rolling restart loses no lock.
        let leaving = self.ended.is_cancelled() || self.shared.is_draining();
        if self.proposed && !leaving && self.replica.refuse(self.term).is_none() {
            tracing::debug!(conn = self.id.0, "disconnect proposed");
            let op = Op::Disconnect {
                conn: self.id,
                auto_release: Some(self.shared.config.auto_release_on_disconnect),
            };
            self.replica.node.submit(Some(op), Box::new(|_| {}));
        }
    }
}

/// Keeps [`Replica::regime`] current: leading while Raft says this node
/// leads and a quorum answered within the longest election timeout (a
/// leader cut off from its quorum stays leader in Raft until it hears of a
/// newer term; it stops serving sooner, and its connections close).
pub(crate) async fn watch_regime(replica: Arc<Replica>) {
    let raft = replica.node.raft().clone();
    let stale_after = replica.stale_after;
    let mut metrics = raft.metrics();
    let mut tick = tokio::time::interval(REGIME_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The term this node leads and when a quorum last answered it, as of
    // the latest metrics report.
    let mut acked: Option<(u64, Instant)> = None;
    let mut reported = true;
    loop {
        let leader = {
            let m = metrics.borrow_and_update();
            match (m.state == ServerState::Leader).then_some(m.current_term) {
                Some(term) if reported => {
                    let since = m.millis_since_quorum_ack.map(Duration::from_millis);
                    let at = match (since, acked) {
                        (Some(since), _) => Instant::now().checked_sub(since),
                        // No answer yet in this term: counted from taking office.
                        (None, Some((t, at))) if t == term => Some(at),
                        (None, _) => Some(Instant::now()),
                    };
                    acked = at.map(|at| (term, at));
                }
                Some(_) => {}
                None => acked = None,
            }
            m.current_leader
        };
        let leading = acked
            .filter(|(_, at)| at.elapsed() <= stale_after)
            .map(|(term, _)| term);
        // A leader that lost its quorum names nobody.
        let leader = leader.filter(|&id| id != replica.node.id() || leading.is_some());
        let leader_addr = replica.client_addr(leader);
        {
            let mut regime = replica
                .regime
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if regime.leading != leading {
                tracing::info!(node = replica.node.id(), ?leading, "leadership changed");
                if let Some(term) = leading {
                    replica.router.lead(term);
                    // First in this term's log, before any command of its
                    // connections: the rules every node applies from here.
                    let policy = Op::SetPolicy(replica.policy);
                    replica.node.submit(Some(policy), Box::new(|_| {}));
                }
                regime.ended.cancel();
                *regime = Regime {
                    leading,
                    leader_addr,
                    ended: CancellationToken::new(),
                };
            } else {
                regime.leader_addr = leader_addr;
            }
        }
        reported = tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            _ = tick.tick() => false,
        };
    }
}

/// Releases grants that reached no connection, while this node leads.
pub(crate) async fn release_undelivered(
    replica: Arc<Replica>,
    mut releases: mpsc::UnboundedReceiver<(ResourceId, Token)>,
) {
    while let Some((resource, token)) = releases.recv().await {
        let op = Op::ReleaseUndelivered { resource, token };
        replica.node.submit(Some(op), Box::new(|_| {}));
    }
}

/// While this node leads: proposes the sweep of expired leases, the end of
/// lock-delays and idle GC, each only when something is due on the
/// leader's clock (table times are the clock of the leader that proposed
/// them; a new leader's first entry restarts them on its own).
pub(crate) async fn propose_timers(replica: Arc<Replica>, sweep: Duration, gc: Duration) {
    let mut tick = tokio::time::interval(sweep.min(gc).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_gc = Instant::now();
    loop {
        tick.tick().await;
        if replica.regime().leading.is_none() {
            continue;
        }
        let now = replica.node.clock();
        let (deadline, delay_end, resources) = replica.node.view().read(|table| {
            (
                table.next_deadline(),
                table.next_delay_end(),
                table.resource_count(),
            )
        });
        if deadline.is_some_and(|d| d <= now) {
            replica.node.submit(Some(Op::Sweep), Box::new(|_| {}));
        }
        if delay_end.is_some_and(|d| d <= now) {
            replica.node.submit(Some(Op::EndDelays), Box::new(|_| {}));
        }
        if resources > 0 && last_gc.elapsed() >= gc {
            last_gc = Instant::now();
            replica.node.submit(Some(Op::Gc), Box::new(|_| {}));
        }
    }
}
