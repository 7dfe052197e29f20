use serde::{Deserialize, Serialize};

/// The `stats` document (spec §5). Field order matches the Go server.
///
/// ```
/// use dflockd_proto::Stats;
/// let s: Stats = serde_json::from_str(
///     r#"{"connections":1,"locks":[],"semaphores":[],"idle_locks":[],"idle_semaphores":[]}"#,
/// ).unwrap();
/// assert_eq!(s.connections, 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Live connections, including the asking one.
    pub connections: u64,
    /// Limit-1 resources with a holder or waiters.
    pub locks: Vec<LockEntry>,
    /// Resources with limit > 1 and holders or waiters.
    pub semaphores: Vec<SemaphoreEntry>,
    /// Limit-1 resources with nobody holding or waiting.
    pub idle_locks: Vec<IdleEntry>,
    /// Limit > 1 resources with nobody holding or waiting.
    pub idle_semaphores: Vec<IdleEntry>,
    /// Cluster mode only: this node's view of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStats>,
}

/// The `"cluster"` object of [`Stats`] in cluster mode (spec §5): this
/// node's role and how far its log reaches.
///
/// ```
/// use dflockd_proto::Stats;
/// let s: Stats = serde_json::from_str(r#"{"connections":1,"locks":[],"semaphores":[],"idle_locks":[],"idle_semaphores":[],
///     "cluster":{"node_id":"2","role":"follower","term":3,"leader_id":"1","leader_addr":"10.0.0.1:6388",
///     "commit_index":12,"last_log_index":12,"snapshot_index":0,"voters":["1","2","3"]}}"#).unwrap();
/// let cluster = s.cluster.unwrap();
/// assert_eq!(cluster.leader_addr.as_deref(), Some("10.0.0.1:6388"));
/// assert_eq!(cluster.voters.len(), 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// This node's id.
    pub node_id: String,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: String,
    /// The current Raft term.
    pub term: u64,
    /// The leader's node id (empty when unknown).
    pub leader_id: String,
    /// The leader's client address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_addr: Option<String>,
    /// The highest log index known committed.
    pub commit_index: u64,
    /// The last index in this node's log.
    pub last_log_index: u64,
    /// The last index the latest snapshot covers.
    pub snapshot_index: u64,
    /// The voters' node ids.
    pub voters: Vec<String>,
}

/// One busy lock in [`Stats`].
///
/// ```
/// use dflockd_proto::Stats;
/// let s: Stats = serde_json::from_str(r#"{"connections":2,"idle_locks":[],"idle_semaphores":[],"semaphores":[],
///     "locks":[{"key":"jobs","owner_conn_id":1,"lease_expires_in_s":29.5,"waiters":1}]}"#).unwrap();
/// assert_eq!(s.locks[0].key, "jobs");
/// assert_eq!(s.locks[0].waiters, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    /// The key, without namespace.
    pub key: String,
    /// Connection id of the holder; 0 if nobody holds it.
    pub owner_conn_id: u64,
    /// Seconds until the holder's lease deadline, clamped at 0.
    pub lease_expires_in_s: f64,
    /// Queued waiters.
    pub waiters: u64,
    /// The holder's fence (this server's extension, on multiplexed
    /// connections; absent when free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// What the holder proclaimed with `label` (this server's extension,
    /// on multiplexed connections; absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// One busy semaphore in [`Stats`].
///
/// ```
/// use dflockd_proto::SemaphoreEntry;
/// let e: SemaphoreEntry = serde_json::from_str(r#"{"key":"pool","limit":4,"holders":4,"waiters":2}"#).unwrap();
/// assert_eq!(e.holders, e.limit); // full: new requests queue
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SemaphoreEntry {
    /// The key, without namespace.
    pub key: String,
    /// The semaphore's limit.
    pub limit: u64,
    /// Current holders.
    pub holders: u64,
    /// Queued waiters.
    pub waiters: u64,
}

/// One idle resource in [`Stats`], awaiting garbage collection.
///
/// ```
/// use dflockd_proto::IdleEntry;
/// let e: IdleEntry = serde_json::from_str(r#"{"key":"old","idle_s":12.5}"#).unwrap();
/// assert!(e.idle_s > 10.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdleEntry {
    /// The key, without namespace.
    pub key: String,
    /// Seconds since last activity.
    pub idle_s: f64,
}
