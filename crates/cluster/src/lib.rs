//! Replication for dflockd on [openraft]: the lock table's command log is
//! the Raft log, the lock table is the state machine, and its snapshots are
//! Raft snapshots.
//!
//! This crate holds the storage half of cluster mode: [`TypeConfig`] (what
//! a log entry and its answer are), [`LogStore`] (the Raft log in files of
//! CRC-checked records, the vote in a [redb] file) and [`StateMachine`]
//! (the [`LockTable`](dflockd_core::LockTable) that committed entries are
//! applied to, with snapshots that are also kept on disk). Both pass
//! openraft's storage test suite (`tests/storage_suite.rs`).
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dflockd_cluster::{Storage, StateMachine};
//! use openraft::storage::RaftStateMachine;
//! let dir = tempfile::tempdir()?;
//! let storage = Storage::open(&dir.path().join("raft.redb"))?;
//! let mut state_machine: StateMachine = storage.state_machine(Default::default())?;
//! let (applied, _membership) = state_machine.applied_state().await?;
//! assert_eq!(applied, None); // a new node has applied nothing
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

use std::io::Cursor;

use dflockd_core::{Command, Effects};
use serde::{Deserialize, Serialize};

mod admin;
mod auth;
mod db;

/// The consensus engine, re-exported: its metrics and configuration types
/// are part of this crate's API.
pub use openraft;
mod log_store;
mod member;
mod network;
mod node;
mod records;
mod salts;
mod state_machine;
mod storage;
mod tls;
mod wal;
#[cfg(test)]
mod wal_tests;

pub use admin::{AdminError, change_membership};
pub use auth::{MIN_SECRET_BYTES, RaftSecret, ShortSecret};
pub use log_store::LogStore;
pub use member::{ChangeRefused, Member, MembershipChange};
pub use network::{MAX_FRAME, Network, Peer};
pub use node::{Committed, Node, NodeError, NodeOptions, OnCommit, ProposeError, raft_config};
pub use salts::Salts;
pub use state_machine::{ApplyObserver, Origin, SnapshotBuilder, StateMachine, TableView};
pub use storage::{Storage, StorageOpenError};
pub use tls::{RaftTls, RaftTlsError};
pub use wal::WalError;

/// A node's id in the cluster.
pub type NodeId = u64;

/// The payload of one Raft log entry: the commands that reached the leader
/// while its previous write was in flight (group commit), applied in order,
/// all stamped with the leader's clock.
///
/// `office` is an [`Op::TakeOffice`](dflockd_core::Op::TakeOffice) at the
/// batch's time. The state machine applies it first when the entry is the
/// first of its leader's process in its term: so every node, at the same
/// place in the log, restarts the leases on the new leader's clock before
/// that leader's first command. `proposer` names the process (node id and
/// incarnation, see [`Node::incarnation`]): a node restarted while it led
/// can be restored as leader of the same term, with a new clock.
///
/// ```
/// use std::time::Duration;
/// use dflockd_cluster::Batch;
/// use dflockd_core::{Command, Op, Salt};
/// let at = |op| Command::new(Duration::ZERO, Salt::new(1, 2), op);
/// let batch = Batch { proposer: (1 << 32) | 1, office: at(Op::TakeOffice), commands: vec![at(Op::Sweep)] };
/// assert_eq!(batch.commands.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The proposing process: node id in the high 32 bits, its incarnation
    /// in the low ones.
    pub proposer: u64,
    /// Taking office at the batch's time, if the leader has not yet.
    pub office: Command,
    /// The commands, in order.
    pub commands: Vec<Command>,
}

/// What applying a [`Batch`] did: the effects of taking office if that
/// happened, then of each command, in order. Blank and membership entries
/// answer an empty one.
///
/// ```
/// assert!(dflockd_cluster::BatchEffects::default().commands.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BatchEffects {
    /// The effects of taking office (leases ended and the grants that
    /// followed), when this entry was its leader's first.
    pub office: Option<Effects>,
    /// Each command's effects.
    pub commands: Vec<Effects>,
}

openraft::declare_raft_types!(
    /// The types of dflockd's Raft: entries carry a [`Batch`], answers are
    /// [`BatchEffects`], nodes are named by a `u64` and described by a
    /// [`Member`] (Raft and client addresses), snapshots are bytes in memory.
    pub TypeConfig:
        D = Batch,
        R = BatchEffects,
        Node = Member,
);

/// A Raft log entry of dflockd's Raft.
pub type Entry = openraft::Entry<TypeConfig>;

/// A storage error of dflockd's Raft.
pub type StorageError = openraft::StorageError<NodeId>;
