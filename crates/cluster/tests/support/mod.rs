//! What the cluster tests share: starting nodes in this process on
//! 127.0.0.1, and the commands they propose.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use dflockd_cluster::{Node, NodeOptions};
use dflockd_core::{AcquireOutcome, ConnId, Effects, Op, Outcome, ResourceId};
use dflockd_proto::{Key, Limit, Namespace};
use tempfile::TempDir;
use tokio::net::TcpListener;

/// Bound for elections and replication on a busy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// The id of the leader the given nodes agree on, once one of them leads.
/// Re-checked whenever the first node's Raft metrics change (bounded
/// waits, so a change on another node is seen too).
pub async fn agreed_leader(nodes: &[&Node]) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut changes = nodes.first().expect("at least one node").raft().metrics();
    loop {
        let leaders: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.raft().metrics().borrow().current_leader)
            .collect();
        if let Some(Some(id)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*id))
            && nodes.iter().any(|n| n.id() == *id)
        {
            return *id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader: {leaders:?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
    }
}

/// Listeners for `n` nodes on ephemeral ports.
pub async fn listeners(n: usize) -> Vec<TcpListener> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    listeners
}

/// Starts a node per listener (ids from 1, `options(i)` for the i-th),
/// each in a temporary directory, and forms one cluster of them all.
pub async fn start_cluster(
    listeners: Vec<TcpListener>,
    options: impl Fn(usize) -> NodeOptions,
) -> (Vec<TempDir>, Vec<Node>) {
    let voters: Vec<(u64, SocketAddr)> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap()))
        .collect();
    let mut dirs = Vec::new();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start_with(i as u64 + 1, dir.path(), listener, options(i))
            .await
            .unwrap();
        dirs.push(dir);
        nodes.push(node);
    }
    nodes[0].initialize(&voters).await.unwrap();
    (dirs, nodes)
}

/// Proposes `op` on `node` until it commits (bounded by [`WAIT`]): a new
/// cluster may still be electing.
pub async fn commit(node: &Node, op: Op) -> Effects {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match node.propose(op.clone()).await {
            Ok(effects) => return effects,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never committed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Binds `addr` again once a stopped node has let go of it.
pub async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(error) => {
                assert!(tokio::time::Instant::now() < deadline, "{addr}: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A try-lock of `key` by connection `conn` (the leader stamps the time).
pub fn acquire(conn: u64, key: &str) -> Op {
    acquire_for(conn, key, None)
}

/// [`acquire`] with a lease of `lease` seconds.
pub fn acquire_for(conn: u64, key: &str, lease: Option<u64>) -> Op {
    Op::Acquire {
        conn: ConnId(conn),
        resource: ResourceId::new(Namespace::Lock, Key::new(key).unwrap()),
        limit: Limit::ONE,
        lease: lease.and_then(|secs| dflockd_proto::Lease::new(secs).ok()),
        wait: None,
        origin: None,
    }
}

/// The fence of a granted acquire, if it was granted.
pub fn granted(effects: &Effects) -> Option<u64> {
    match effects.outcome {
        Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) => Some(grant.token.fence()),
        _ => None,
    }
}

/// The fence of an acquire that must have been granted.
#[track_caller]
pub fn fence_of(effects: &Effects) -> u64 {
    granted(effects).unwrap_or_else(|| panic!("not granted: {:?}", effects.outcome))
}
