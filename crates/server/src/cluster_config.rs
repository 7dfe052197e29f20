//! Cluster mode's configuration (spec §6.5): this node, its peers, where
//! Raft keeps its state, and the secret the nodes share.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use dflockd_cluster::RaftSecret;
use thiserror::Error;

/// One member of the cluster as `--cluster-peers` names it:
/// `id=raftHost:raftPort@clientHost:clientPort`.
///
/// ```
/// use dflockd_server::ClusterPeer;
/// let peer: ClusterPeer = "2=10.0.0.2:7001@10.0.0.2:6388".parse().unwrap();
/// assert_eq!(peer.id, 2);
/// assert_eq!(peer.raft, "10.0.0.2:7001");
/// assert_eq!(peer.client, "10.0.0.2:6388");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPeer {
    /// The node's id (≥ 1, unique in the cluster).
    pub id: u64,
    /// Where its Raft transport listens (`host:port`).
    pub raft: String,
    /// Where its clients connect (`host:port`): sent in redirects.
    pub client: String,
}

/// Why a `--cluster-peers` list (or one entry of it) is not valid.
///
/// ```
/// let error = "x".parse::<dflockd_server::ClusterPeer>().unwrap_err();
/// assert!(error.to_string().contains("id=raftHost:raftPort@clientHost:clientPort"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerListError {
    /// An entry is not `id=raft@client`.
    #[error("cluster peer {entry:?}: expected id=raftHost:raftPort@clientHost:clientPort")]
    Shape {
        /// The entry as given.
        entry: String,
    },
    /// An id is not a positive integer.
    #[error("cluster peer {entry:?}: the node id must be an integer ≥ 1")]
    Id {
        /// The entry as given.
        entry: String,
    },
    /// An address is not `host:port`.
    #[error("cluster peer {entry:?}: {addr:?} is not host:port")]
    Address {
        /// The entry as given.
        entry: String,
        /// The address.
        addr: String,
    },
    /// Two entries share an id.
    #[error("cluster peers: node id {id} appears twice")]
    Duplicate {
        /// The id.
        id: u64,
    },
}

impl FromStr for ClusterPeer {
    type Err = PeerListError;

    fn from_str(entry: &str) -> Result<ClusterPeer, PeerListError> {
        let entry = entry.trim();
        let shape = || PeerListError::Shape {
            entry: entry.to_string(),
        };
        let (id, addrs) = entry.split_once('=').ok_or_else(shape)?;
        let (raft, client) = addrs.split_once('@').ok_or_else(shape)?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&id| id >= 1)
            .ok_or_else(|| PeerListError::Id {
                entry: entry.to_string(),
            })?;
        for addr in [raft, client] {
            if !is_host_port(addr) {
                return Err(PeerListError::Address {
                    entry: entry.to_string(),
                    addr: addr.to_string(),
                });
            }
        }
        Ok(ClusterPeer {
            id,
            raft: raft.to_string(),
            client: client.to_string(),
        })
    }
}

/// Whether `addr` has the shape `host:port` (a non-empty host, a port
/// 0–65535); whether the host resolves is for the connection to find out.
pub(crate) fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Parses a comma-separated `--cluster-peers` list; ids must be unique.
///
/// ```
/// let peers = dflockd_server::parse_cluster_peers(
///     "1=127.0.0.1:7001@127.0.0.1:6388,2=127.0.0.1:7002@127.0.0.1:6389",
/// ).unwrap();
/// assert_eq!(peers.len(), 2);
/// assert!(dflockd_server::parse_cluster_peers("1=a:1@b:2,1=c:3@d:4").is_err());
/// ```
pub fn parse_cluster_peers(list: &str) -> Result<Vec<ClusterPeer>, PeerListError> {
    let mut peers: Vec<ClusterPeer> = Vec::new();
    for entry in list.split(',').filter(|e| !e.trim().is_empty()) {
        let peer: ClusterPeer = entry.parse()?;
        if peers.iter().any(|p| p.id == peer.id) {
            return Err(PeerListError::Duplicate { id: peer.id });
        }
        peers.push(peer);
    }
    Ok(peers)
}

/// Raft's timing: how often the leader sends heartbeats, and how long a
/// follower waits without one before it calls an election (a random time
/// between the two bounds). Shorter timeouts fail over sooner; too short
/// for a busy machine, and a slow heartbeat starts an election nobody
/// needed. The same on every node.
///
/// ```
/// let timing = dflockd_server::RaftTiming::default();
/// assert!(timing.heartbeat < timing.election_min && timing.election_min < timing.election_max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    /// Between two heartbeats of the leader.
    pub heartbeat: std::time::Duration,
    /// The shortest election timeout.
    pub election_min: std::time::Duration,
    /// The longest election timeout; also how long a leader keeps serving
    /// without an answer from a quorum.
    pub election_max: std::time::Duration,
}

impl Default for RaftTiming {
    fn default() -> RaftTiming {
        let config = dflockd_cluster::raft_config();
        RaftTiming {
            heartbeat: std::time::Duration::from_millis(config.heartbeat_interval),
            election_min: std::time::Duration::from_millis(config.election_timeout_min),
            election_max: std::time::Duration::from_millis(config.election_timeout_max),
        }
    }
}

impl RaftTiming {
    /// openraft's configuration with this timing.
    pub(crate) fn raft_config(
        &self,
        snapshot_every: u64,
    ) -> Result<std::sync::Arc<dflockd_cluster::openraft::Config>, String> {
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = dflockd_cluster::openraft::Config {
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_max),
            snapshot_policy: dflockd_cluster::openraft::SnapshotPolicy::LogsSinceLast(
                snapshot_every.max(1),
            ),
            // A fifth of the interval stays behind a snapshot for followers
            // that lag a little (1,000 by default, openraft's own default).
            max_in_snapshot_log_to_keep: snapshot_every / 5,
            ..(*dflockd_cluster::raft_config()).clone()
        };
        config
            .validate()
            .map(std::sync::Arc::new)
            .map_err(|e| format!("Raft timing: {e}"))
    }
}

/// Log entries between two snapshots unless
/// [`ClusterConfig::snapshot_every`] says otherwise.
///
/// ```
/// assert_eq!(dflockd_server::DEFAULT_SNAPSHOT_EVERY, 5_000);
/// ```
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 5_000;

/// How a node runs as part of a cluster (`--raft-dir` and friends).
///
/// Nodes started with the same `peers` and empty directories form one
/// cluster of those voters: the node with the lowest id initialises it
/// (once; a node that has state never initialises again). With
/// `bootstrap`, a node forms a cluster of itself alone, which others join
/// through `dflock cluster add`.
///
/// ```
/// use dflockd_server::{ClusterConfig, parse_cluster_peers};
/// let secret = dflockd_cluster::RaftSecret::new(vec![7; 32]).unwrap();
/// let config = ClusterConfig::new(1, "/var/lib/dflockd", "127.0.0.1:7001", secret)
///     .with_peers(parse_cluster_peers("1=127.0.0.1:7001@127.0.0.1:6388").unwrap());
/// assert_eq!(config.node_id, 1);
/// ```
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id (`--node-id`): stable and unique, 1–65535.
    pub node_id: u64,
    /// Where Raft keeps the log, vote and snapshots (`--raft-dir`); locked
    /// against a second process.
    pub raft_dir: PathBuf,
    /// Where the Raft transport listens (`--raft-addr`, `host:port`).
    pub raft_addr: String,
    /// Every voter of a new cluster, this node included (`--cluster-peers`).
    pub peers: Vec<ClusterPeer>,
    /// The client address redirects name for this node
    /// (`--advertise-addr`); by default its entry in `peers`, else the
    /// listener's address.
    pub advertise_addr: Option<String>,
    /// Form a cluster of this node alone (`--cluster-bootstrap`).
    pub bootstrap: bool,
    /// The secret every Raft link proves on both ends
    /// (`--raft-auth-token`, ≥ 32 bytes).
    pub secret: RaftSecret,
    /// Mutual TLS on Raft links (`--raft-tls-cert/key/ca`), under the
    /// secret's handshake.
    pub tls: Option<dflockd_cluster::RaftTls>,
    /// How long a closed connection that named its session
    /// (`stable-ref`) keeps its holds and two-phase places for the
    /// session's next connection (`--orphan-ttl`; zero = not at all). The
    /// leader's value is the cluster's (it writes it into the log when it
    /// takes office); set the same on every node.
    pub orphan_ttl: std::time::Duration,
    /// Heartbeat and election timeouts.
    pub timing: RaftTiming,
    /// Log entries between two snapshots of the table; the log before a
    /// snapshot is then compacted (keeping a fifth of this behind it), and
    /// a node that lags further behind catches up from the snapshot. 5,000
    /// by default.
    pub snapshot_every: u64,
}

impl ClusterConfig {
    /// A node `node_id` with its state in `raft_dir`, Raft on `raft_addr`,
    /// no peers yet.
    ///
    /// ```
    /// let secret = dflockd_cluster::RaftSecret::new(vec![7; 32]).unwrap();
    /// let config = dflockd_server::ClusterConfig::new(3, "/tmp/n3", "127.0.0.1:7003", secret);
    /// assert!(config.peers.is_empty() && !config.bootstrap);
    /// ```
    pub fn new(
        node_id: u64,
        raft_dir: impl Into<PathBuf>,
        raft_addr: impl Into<String>,
        secret: RaftSecret,
    ) -> ClusterConfig {
        ClusterConfig {
            node_id,
            raft_dir: raft_dir.into(),
            raft_addr: raft_addr.into(),
            peers: Vec::new(),
            advertise_addr: None,
            bootstrap: false,
            secret,
            tls: None,
            orphan_ttl: std::time::Duration::ZERO,
            timing: RaftTiming::default(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }

    /// The same with `peers`.
    ///
    /// ```
    /// let secret = dflockd_cluster::RaftSecret::new(vec![7; 32]).unwrap();
    /// let peers = dflockd_server::parse_cluster_peers("1=127.0.0.1:7001@127.0.0.1:6388").unwrap();
    /// let config = dflockd_server::ClusterConfig::new(1, "/tmp/n1", "127.0.0.1:7001", secret).with_peers(peers);
    /// assert_eq!(config.peers.len(), 1);
    /// ```
    pub fn with_peers(mut self, peers: Vec<ClusterPeer>) -> ClusterConfig {
        self.peers = peers;
        self
    }
}

/// Resolves `addr` (`host:port`) to its first socket address.
pub(crate) fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    })
}
