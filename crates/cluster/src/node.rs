//! One node of a cluster: its storage, its Raft, the listener its peers
//! send Raft messages to, and the proposer that batches commands into log
//! entries.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use dflockd_core::{Command, Effects, Op, TableConfig};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, Raft, ServerState};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::member::{self, ChangeRefused, Member, MembershipChange};
use crate::network::{Network, Request, Response, serve};
use crate::salts::Salts;
use crate::state_machine::{ApplyObserver, TableView};
use crate::storage::{Storage, StorageOpenError};
use crate::{Batch, NodeId, TypeConfig};

/// Raft settings for a node. Timings (milliseconds): a heartbeat every
/// 50, an election after 200–300 without one. openraft makes followers
/// refuse votes for the longest election timeout after the last heartbeat
/// (its leader lease), so a leader's death costs about twice that; the
/// measured failover window and stability under load are in
/// docs/CLUSTER.md (Failover). At most 64 entries per
/// message (see [`MAX_FRAME`](crate::MAX_FRAME)).
///
/// ```
/// let config = dflockd_cluster::raft_config();
/// assert!(config.heartbeat_interval < config.election_timeout_min);
/// ```
pub fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "dflockd".to_string(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 300,
        install_snapshot_timeout: 2000,
        // At most 64 entries per AppendEntries: with up to 1,024 commands
        // of a few hundred bytes per entry that stays well under the
        // transport's frame limit.
        max_payload_entries: 64,
        ..Config::default()
    };
    match config.validate() {
        Ok(config) => Arc::new(config),
        Err(error) => unreachable!("the shipped Raft timings are valid: {error}"),
    }
}

/// How a node runs: the lock table's rules, Raft's settings and the routes
/// to its peers.
///
/// ```
/// let options = dflockd_cluster::NodeOptions::default();
/// assert_eq!(options.raft.heartbeat_interval, 50);
/// ```
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The lock table's rules (for a node that starts empty).
    pub table: TableConfig,
    /// Raft timings and snapshot policy ([`raft_config`] by default).
    pub raft: Arc<Config>,
    /// How the node reaches its peers.
    pub network: Network,
    /// Told of every batch the node applies (the server routes grants).
    pub observer: Option<ApplyObserver>,
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions {
            table: TableConfig::default(),
            raft: raft_config(),
            network: Network::default(),
            observer: None,
        }
    }
}

/// Why a node could not start.
///
/// ```
/// let error = dflockd_cluster::NodeError::Address { node: 1, addr: "x".into() };
/// assert!(error.to_string().contains("node 1"));
/// ```
#[derive(Debug, Error)]
pub enum NodeError {
    /// The storage could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageOpenError),
    /// The Raft listener has no local address.
    #[error("node {node}: the Raft listener has no address {addr}")]
    Address {
        /// The node.
        node: NodeId,
        /// What was asked.
        addr: String,
    },
    /// openraft refused to start.
    #[error("node {node}: Raft did not start: {reason}")]
    Raft {
        /// The node.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Why a command was not applied.
///
/// ```
/// let error = dflockd_cluster::ProposeError::NotLeader { leader: Some(2) };
/// assert!(error.to_string().contains("not the leader"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProposeError {
    /// This node is not the leader (the leader's id, when known).
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The current leader, if known.
        leader: Option<NodeId>,
    },
    /// The write failed (no quorum, shutdown, …).
    #[error("the command was not committed: {0}")]
    Failed(String),
}

/// What a proposal's caller is told: the command's effects, or `None`
/// for a barrier (committed, nothing applied).
pub type Committed = Result<Option<Effects>, ProposeError>;

/// Called once with a proposal's fate, on the proposer's task: keep it
/// short (send it on).
pub type OnCommit = Box<dyn FnOnce(Committed) + Send>;

/// An op to commit (or a barrier: `None`) and who to tell.
type Proposal = (Option<Op>, OnCommit);

/// A running node. Dropping it stops its Raft listener; call
/// [`shutdown`](Self::shutdown) to stop Raft too.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let node = dflockd_cluster::Node::start(7, dir.path(), listener, Default::default()).await?;
/// assert_eq!(node.id(), 7);
/// node.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Node {
    id: NodeId,
    raft: Raft<TypeConfig>,
    view: TableView,
    raft_addr: SocketAddr,
    network: Network,
    proposals: mpsc::UnboundedSender<Proposal>,
    origin: tokio::time::Instant,
    /// Raft's longest election timeout (and leader lease).
    election_max: std::time::Duration,
    /// Sees the storage file closed.
    closed: crate::db::Closed,
    /// How many times a node has started on this storage, this one included.
    incarnation: u64,
    /// The last log index in the storage when this node started.
    startup_index: u64,
    /// Set once [`Node::stop`] ran (then a drop has nothing to stop).
    stopped: std::sync::atomic::AtomicBool,
    server: JoinHandle<()>,
    /// Taken (and stopped) by a hand-over or a stop.
    proposer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Starts node `id` with its storage file in `dir`, taking Raft
    /// messages on `listener`. A node that has state in `dir` comes back
    /// with it; a new node waits to be initialised or added.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize_alone().await?;
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
        table: TableConfig,
    ) -> Result<Node, NodeError> {
        let options = NodeOptions {
            table,
            ..NodeOptions::default()
        };
        Node::start_with(id, dir, listener, options).await
    }

    /// [`start`](Self::start) with other [`NodeOptions`] (Raft timings,
    /// snapshot policy, routes to peers).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// let dir = tempfile::tempdir()?;
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let raft = openraft::Config {
    ///     snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(100),
    ///     ..(*dflockd_cluster::raft_config()).clone()
    /// };
    /// let options = dflockd_cluster::NodeOptions { raft: Arc::new(raft.validate()?), ..Default::default() };
    /// let node = dflockd_cluster::Node::start_with(1, dir.path(), listener, options).await?;
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start_with(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
        options: NodeOptions,
    ) -> Result<Node, NodeError> {
        let NodeOptions {
            table,
            raft: raft_config,
            network,
            observer,
        } = options;
        let raft_addr = listener.local_addr().map_err(|e| NodeError::Address {
            node: id,
            addr: e.to_string(),
        })?;
        let storage = Storage::open(&dir.join("raft.redb"))?;
        let closed = storage.closed();
        let mut state_machine = storage.state_machine(table)?;
        if let Some(observer) = observer {
            state_machine.observe(observer);
        }
        let view = state_machine.view();
        let incarnation = storage.next_incarnation()?;
        let mut log_store = storage.log_store();
        let startup_index = {
            use openraft::storage::RaftLogStorage;
            log_store
                .get_log_state()
                .await
                .map_err(|e| NodeError::Raft {
                    node: id,
                    reason: e.to_string(),
                })?
                .last_log_id
                .map_or(0, |log_id| log_id.index)
        };
        let election_max = std::time::Duration::from_millis(raft_config.election_timeout_max);
        let raft = Raft::new(id, raft_config, network.clone(), log_store, state_machine)
            .await
            .map_err(|e| NodeError::Raft {
                node: id,
                reason: e.to_string(),
            })?;
        let server = tokio::spawn(serve(
            listener,
            id,
            raft.clone(),
            network.secret().cloned(),
            network.tls().cloned(),
        ));
        let (proposals, queue) = mpsc::unbounded_channel();
        let origin = tokio::time::Instant::now();
        let process = (id << 32) | (incarnation & 0xFFFF_FFFF);
        let proposer = tokio::spawn(propose(
            raft.clone(),
            queue,
            Salts::default(),
            origin,
            process,
        ));
        Ok(Node {
            id,
            raft,
            view,
            raft_addr,
            network,
            election_max,
            proposals,
            origin,
            closed,
            incarnation,
            startup_index,
            stopped: std::sync::atomic::AtomicBool::new(false),
            server,
            proposer: std::sync::Mutex::new(Some(proposer)),
        })
    }

    /// How many times a node has started on this storage, this one
    /// included: no two processes of this node share a number.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert_eq!(node.incarnation(), 1); // a new node
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The last log index stored when this node started: every entry this
    /// process proposes comes after it (a node that led a term before a
    /// restart may lead it again at once, as openraft restores a committed
    /// vote, so the term alone does not tell whose entry it is).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert_eq!(node.startup_index(), 0); // a new node
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn startup_index(&self) -> u64 {
        self.startup_index
    }

    /// This node's id.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert_eq!(node.id(), 1);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Where this node takes Raft messages.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert!(node.raft_addr().ip().is_loopback());
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The openraft handle (metrics, membership changes, `wait`).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize_alone().await?;
    /// node.raft().wait(None).current_leader(1, "elected").await?;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Reads this node's copy of the lock table.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert_eq!(node.view().read(|table| table.holder_count()), 0);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn view(&self) -> &TableView {
        &self.view
    }

    /// Forms a cluster of the given voters (`id` → [`Member`], or just its
    /// Raft address). Call it
    /// on one node of a new cluster; the others learn it from the leader.
    /// A node that has been initialised before refuses.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize(&[(1, node.raft_addr())]).await?;
    /// // Only once: a node that was initialised refuses.
    /// assert!(node.initialize(&[(1, node.raft_addr())]).await.is_err());
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn initialize<M: Into<Member> + Clone>(
        &self,
        voters: &[(NodeId, M)],
    ) -> Result<(), NodeError> {
        let members: std::collections::BTreeMap<NodeId, Member> = voters
            .iter()
            .map(|(id, member)| (*id, member.clone().into()))
            .collect();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| NodeError::Raft {
                node: self.id,
                reason: e.to_string(),
            })
    }

    /// Forms a cluster of this node alone.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize_alone().await?;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn initialize_alone(&self) -> Result<(), NodeError> {
        self.initialize(&[(self.id, self.raft_addr)]).await
    }

    /// Applies `op` through the log: the leader stamps it with its clock
    /// (time since this node started) and fresh salts, a quorum commits
    /// it, and every node applies it. Ops that arrive while a write is in
    /// flight share the next log entry (group commit). Only the leader
    /// takes ops.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// use dflockd_core::{AcquireOutcome, ConnId, Op, Outcome, ResourceId};
    /// use dflockd_proto::{Key, Limit, Namespace};
    /// node.initialize_alone().await?;
    /// node.raft().wait(None).current_leader(1, "elected").await?;
    /// let acquire = Op::Acquire {
    ///     conn: ConnId(1), resource: ResourceId::new(Namespace::Lock, Key::new("job").unwrap()),
    ///     limit: Limit::ONE, lease: None, wait: None, origin: None,
    /// };
    /// let effects = node.propose(acquire).await?;
    /// assert!(matches!(effects.outcome, Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn propose(&self, op: Op) -> Result<Effects, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            Some(op),
            Box::new(move |committed| {
                let _ = tx.send(committed);
            }),
        );
        match rx.await {
            Ok(Ok(Some(effects))) => Ok(effects),
            Ok(Ok(None)) => Err(ProposeError::Failed("no effects".to_string())),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ProposeError::Failed("the node stopped".to_string())),
        }
    }

    /// Proposes `op` (or, with `None`, a barrier: an entry that commits
    /// nothing) without waiting: `on_commit` is called with its fate once
    /// it committed and applied, or failed. Ops submitted one after
    /// another commit in that order.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize_alone().await?;
    /// node.raft().wait(None).current_leader(1, "elected").await?;
    /// let (tx, rx) = tokio::sync::oneshot::channel();
    /// node.submit(None, Box::new(move |committed| { let _ = tx.send(committed); }));
    /// assert!(matches!(rx.await?, Ok(None))); // a barrier
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn submit(&self, op: Option<Op>, on_commit: OnCommit) {
        if let Err(error) = self.proposals.send((op, on_commit)) {
            let (_, on_commit) = error.0;
            on_commit(Err(ProposeError::Failed(
                "the node is stopping".to_string(),
            )));
        }
    }

    /// The leader clock this node stamps its proposals with: time since
    /// the node started. Table times (lease deadlines) are on the clock of
    /// the leader that proposed them, and a new leader restarts leases on
    /// its own.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// assert!(node.clock() < std::time::Duration::from_secs(60));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn clock(&self) -> std::time::Duration {
        self.origin.elapsed()
    }

    /// Adds node `id`, reachable for Raft at `addr`, as a voter: first as a
    /// learner, which this waits to catch up, then into the voters (a joint
    /// configuration, committed like any entry). Call it on the leader.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    /// # let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let one = dflockd_cluster::Node::start(1, dirs[0].path(), l1, Default::default()).await?;
    /// let two = dflockd_cluster::Node::start(2, dirs[1].path(), l2, Default::default()).await?;
    /// one.initialize_alone().await?;
    /// one.raft().wait(None).current_leader(1, "elected").await?;
    /// one.add_voter(2, two.raft_addr()).await?;
    /// one.raft().wait(None).voter_ids([1, 2], "node 2 added").await?;
    /// # two.shutdown().await;
    /// # one.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn add_voter(
        &self,
        id: NodeId,
        member: impl Into<Member>,
    ) -> Result<(), ChangeRefused> {
        let member = member.into();
        member::apply(&self.raft, MembershipChange::AddVoter { id, member }).await
    }

    /// Removes node `id` from the voters (and the cluster). Call it on the
    /// leader; a leader that removes itself steps down once the change
    /// commits.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    /// # let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let one = dflockd_cluster::Node::start(1, dirs[0].path(), l1, Default::default()).await?;
    /// # let two = dflockd_cluster::Node::start(2, dirs[1].path(), l2, Default::default()).await?;
    /// # one.initialize_alone().await?;
    /// # one.raft().wait(None).current_leader(1, "elected").await?;
    /// # one.add_voter(2, two.raft_addr()).await?;
    /// one.remove_voter(2).await?;
    /// one.raft().wait(None).voter_ids([1], "node 2 removed").await?;
    /// # two.shutdown().await;
    /// # one.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), ChangeRefused> {
        member::apply(&self.raft, MembershipChange::RemoveVoter { id }).await
    }

    /// Node `id` as the membership this node knows records it.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// use dflockd_cluster::Member;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// let me = Member::new(node.raft_addr().to_string(), "127.0.0.1:6388");
    /// node.initialize(&[(1, me.clone())]).await?;
    /// node.raft().wait(None).current_leader(1, "elected").await?;
    /// assert_eq!(node.member(1), Some(me));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn member(&self, id: NodeId) -> Option<Member> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// If this node leads, hands leadership to an up-to-date follower and
    /// waits (at most twice the election timeout) until it has taken
    /// over; returns the new leader. Call it after this node's proposals
    /// have stopped, before [`stop`](Self::stop).
    ///
    /// openraft 0.9 has no leadership transfer, and followers refuse to
    /// vote for a leader lease after the last heartbeat. The leader
    /// itself has no such lease once it has led for an election timeout
    /// (a leader newer than that waits out the rest first): so the follower whose log matches the leader's is told to stand
    /// now, the leader's vote makes its majority in a three-node cluster,
    /// and the cluster is led again in a round trip instead of a lease
    /// plus an election timeout. Where that does not happen (a larger
    /// cluster, a follower behind) the usual election follows the stop.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.initialize_alone().await?;
    /// node.raft().wait(None).current_leader(1, "elected").await?;
    /// assert_eq!(node.hand_over().await, None); // nobody to hand over to
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn hand_over(&self) -> Option<NodeId> {
        // No entry of this node's may follow the check that the target
        // has them all: the candidate's log must be as long as ours.
        self.stop_proposing().await;
        let deadline = tokio::time::Instant::now() + 2 * self.election_max;
        let mut metrics = self.raft.metrics();
        // A follower that has every entry of this leader's log.
        let target = loop {
            let now = metrics.borrow_and_update().clone();
            if now.state != ServerState::Leader {
                return None;
            }
            let last = now.last_log_index;
            let voters: Vec<NodeId> = now.membership_config.voter_ids().collect();
            let caught_up = now.replication.as_ref().and_then(|replication| {
                voters.iter().copied().find(|id| {
                    *id != self.id
                        && replication
                            .get(id)
                            .and_then(|matched| matched.map(|log_id| log_id.index))
                            == last
                })
            });
            if let Some(target) = caught_up {
                break (
                    target,
                    now.membership_config
                        .membership()
                        .get_node(&target)
                        .cloned()?,
                );
            }
            if voters.len() < 2
                || tokio::time::timeout_at(deadline, metrics.changed())
                    .await
                    .map_or(true, |changed| changed.is_err())
            {
                return None;
            }
        };
        let (target, member) = target;
        // This node votes for the candidate only once its own leader lease
        // (counted from when it took office) has passed.
        let took_office = self
            .raft
            .with_raft_state(openraft::RaftState::vote_last_modified)
            .await
            .ok()
            .flatten();
        if let Some(took_office) = took_office {
            tokio::time::sleep_until(took_office + self.election_max).await;
        }
        let mut peer = self.network.peer(target, &member);
        match peer.call(Request::Elect, self.election_max).await {
            Ok(Response::Elect(Ok(()))) => {}
            _ => {
                tracing::info!(
                    node = self.id,
                    target,
                    "hand-over refused; the cluster elects"
                );
                return None;
            }
        }
        let taken = self.raft.wait(Some(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        ));
        match taken
            .metrics(
                |m| m.current_leader.is_some_and(|leader| leader != self.id),
                "handed over",
            )
            .await
        {
            Ok(now) => {
                tracing::info!(node = self.id, leader = ?now.current_leader, "handed over");
                now.current_leader
            }
            Err(_) => None,
        }
    }

    /// Stops Raft, the proposer and the listener, keeping the handle
    /// (reads of the table still work).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.stop().await;
    /// assert_eq!(node.view().read(|table| table.holder_count()), 0);
    /// # Ok(()) }
    /// ```
    pub async fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        self.server.abort();
        self.stop_proposing().await;
        let _ = self.raft.shutdown().await;
        self.storage_closed().await;
    }

    fn take_proposer(&self) -> Option<JoinHandle<()>> {
        self.proposer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Stops the proposer and waits until it has: no entry of this node's
    /// reaches Raft afterwards (proposals queued meanwhile are dropped,
    /// and their callers told nothing).
    async fn stop_proposing(&self) {
        if let Some(proposer) = self.take_proposer() {
            proposer.abort();
            let _ = proposer.await;
        }
    }

    /// Waits (a bounded time) until Raft's tasks have dropped the storage
    /// and its file is closed, so that it can be opened again (a restart
    /// in this process).
    async fn storage_closed(&self) {
        let mut closed = self.closed.clone();
        let released = async { while closed.changed().await.is_ok() {} };
        if tokio::time::timeout(std::time::Duration::from_secs(5), released)
            .await
            .is_err()
        {
            tracing::warn!(node = self.id, "the storage is still open after shutdown");
        }
    }

    /// Stops Raft and the listener.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let node = dflockd_cluster::Node::start(1, dir.path(), listener, Default::default()).await?;
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(self) {
        self.stop().await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(proposer) = self.take_proposer() {
            proposer.abort();
        }
        // Raft's core keeps running until it is shut down (it holds its
        // own sender): stop it, or a dropped node keeps its file locked
        // and may go on sending to its peers.
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let raft = self.raft.clone();
            runtime.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("raft_addr", &self.raft_addr)
            .finish_non_exhaustive()
    }
}

/// The most commands one log entry carries.
const MAX_BATCH: usize = 1024;

/// The most entries the proposer has on their way at once.
const IN_FLIGHT: usize = 1;

/// What a failed write means for its callers.
fn write_error(error: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ProposeError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ProposeError::NotLeader {
                leader: forward.leader_id,
            }
        }
        other => ProposeError::Failed(other.to_string()),
    }
}

/// Writes proposals to the log: what arrives while entries are being
/// committed goes into the next entry, with at most [`IN_FLIGHT`] entries
/// on their way at once (the log's writer thread makes entries that queue
/// meanwhile durable with one fsync). Only this task stamps times, and it
/// hands entries to Raft in the order it stamps them, so times grow in log
/// order.
async fn propose(
    raft: Raft<TypeConfig>,
    mut queue: mpsc::UnboundedReceiver<Proposal>,
    mut salts: Salts,
    origin: tokio::time::Instant,
    process: u64,
) {
    use futures_util::StreamExt;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    loop {
        let first = tokio::select! {
            first = queue.recv(), if in_flight.len() < IN_FLIGHT => match first {
                Some(first) => first,
                None => break,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
        };
        let mut proposals = vec![first];
        while proposals.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(proposal) => proposals.push(proposal),
                Err(_) => break,
            }
        }
        let at = origin.elapsed();
        let mut ops = Vec::with_capacity(proposals.len());
        let mut callers = Vec::with_capacity(proposals.len());
        for (op, on_commit) in proposals {
            callers.push((op.is_some(), on_commit));
            ops.extend(op);
        }
        let batch = Batch {
            proposer: process,
            office: Command::new(at, salts.next(), Op::TakeOffice),
            commands: ops
                .into_iter()
                .map(|op| Command::new(at, salts.next(), op))
                .collect(),
        };
        let written = match raft.client_write_ff(batch).await {
            Ok(written) => written,
            Err(fatal) => {
                let error = ProposeError::Failed(fatal.to_string());
                for (_, on_commit) in callers {
                    on_commit(Err(error.clone()));
                }
                continue;
            }
        };
        in_flight.push(async move {
            let result = match written.await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(error)) => Err(write_error(RaftError::APIError(error))),
                Err(_) => Err(ProposeError::Failed("Raft stopped".to_string())),
            };
            answer(callers, result);
        });
    }
    while in_flight.next().await.is_some() {}
}

/// Tells each caller of a batch its command's fate.
fn answer(
    callers: Vec<(bool, OnCommit)>,
    result: Result<openraft::raft::ClientWriteResponse<TypeConfig>, ProposeError>,
) {
    match result {
        Ok(response) => {
            let mut effects = response.data.commands.into_iter();
            for (has_op, on_commit) in callers {
                let committed = if has_op {
                    effects.next().map(Some).ok_or_else(|| {
                        ProposeError::Failed("an entry answered too few commands".to_string())
                    })
                } else {
                    Ok(None)
                };
                on_commit(committed);
            }
        }
        Err(error) => {
            for (_, on_commit) in callers {
                on_commit(Err(error.clone()));
            }
        }
    }
}
