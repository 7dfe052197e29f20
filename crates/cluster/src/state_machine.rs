//! The lock table as openraft's state machine: committed entries are
//! applied to it in log order, and its snapshots are Raft snapshots, kept in
//! the node's redb file so that a restart starts from the last one.

use std::io::Cursor;
use std::sync::{Arc, Mutex, PoisonError};

use dflockd_core::{LockTable, TableConfig, TableSnapshot};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageIOError,
    StoredMembership,
};
use redb::Database;
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::member::Member;
use crate::records::{META, SNAPSHOT, decode, encode, read_meta};
use crate::{Batch, BatchEffects, Entry, NodeId, StorageError, TypeConfig};

/// The version byte that starts a snapshot's data (3: members carry their
/// client address).
const SNAPSHOT_VERSION: u8 = 3;

/// What a snapshot holds: the table and how far the log was applied.
#[derive(Serialize, Deserialize)]
struct MachineState {
    last_applied: Option<LogId<NodeId>>,
    office: Office,
    membership: StoredMembership<NodeId, Member>,
    table: TableSnapshot,
}

/// Which leader took office last: its term and its process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Office {
    term: u64,
    proposer: u64,
}

/// A snapshot as the node keeps it on disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// Where an applied entry comes from: index `index` of the log, proposed
/// by node `node` as the leader of `term`.
///
/// ```
/// let origin = dflockd_cluster::Origin { term: 3, node: 1, index: 42 };
/// assert_eq!(origin.term, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The entry's log index.
    pub index: u64,
    /// The term of the entry's leader.
    pub term: u64,
    /// The node that led that term (and proposed the entry).
    pub node: NodeId,
}

/// Told of every applied batch, in log order, on the task that applies
/// it (keep it short): the server routes grants to its connections.
///
/// ```
/// let observer = dflockd_cluster::ApplyObserver::new(|origin, batch, effects| {
///     assert_eq!(batch.commands.len(), effects.commands.len());
///     println!("term {}: {} commands", origin.term, effects.commands.len());
/// });
/// # let _ = observer;
/// ```
#[derive(Clone)]
pub struct ApplyObserver(Arc<ObserveFn>);

/// What an [`ApplyObserver`] calls.
type ObserveFn = dyn Fn(Origin, &Batch, &BatchEffects) + Send + Sync;

impl ApplyObserver {
    /// Wraps `f`.
    ///
    /// ```
    /// let _ = dflockd_cluster::ApplyObserver::new(|_, _, _| {});
    /// ```
    pub fn new(f: impl Fn(Origin, &Batch, &BatchEffects) + Send + Sync + 'static) -> ApplyObserver {
        ApplyObserver(Arc::new(f))
    }
}

impl std::fmt::Debug for ApplyObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApplyObserver")
    }
}

/// The state machine of one node: the lock table, the last applied log id
/// and the last membership applied.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb"))?;
/// let machine = storage.state_machine(Default::default())?;
/// assert_eq!(machine.view().read(|table| table.holder_count()), 0);
/// # Ok(()) }
/// ```
pub struct StateMachine {
    db: Arc<Db>,
    /// Shared with the node's [`TableView`]s (readers: `stats`, tests).
    table: Arc<Mutex<LockTable>>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    /// The latest leader (term and process) that took office in the table.
    office: Office,
    /// Snapshots built by this process so far (part of each snapshot's id).
    built: u64,
    /// Told of each applied batch.
    observer: Option<ApplyObserver>,
}

impl StateMachine {
    /// The state machine from the stored snapshot, or an empty one.
    pub(crate) fn open(db: Arc<Db>, config: TableConfig) -> Result<StateMachine, String> {
        let stored = read_meta(&db, SNAPSHOT).map_err(|e| e.to_string())?;
        let mut machine = StateMachine {
            db,
            table: Arc::new(Mutex::new(LockTable::new(config))),
            last_applied: None,
            membership: StoredMembership::default(),
            office: Office::default(),
            built: 0,
            observer: None,
        };
        if let Some(bytes) = stored {
            let stored: StoredSnapshot = decode(&bytes).map_err(|e| e.to_string())?;
            machine.load(&stored.data)?;
        }
        Ok(machine)
    }

    /// A handle that reads the lock table, also once the state machine
    /// has been handed to openraft.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// let machine = storage.state_machine(Default::default()).unwrap();
    /// assert_eq!(machine.view().read(|table| table.waiter_count()), 0);
    /// ```
    pub fn view(&self) -> TableView {
        TableView(Arc::clone(&self.table))
    }

    /// Tells `observer` of every batch applied from now on.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// let mut machine = storage.state_machine(Default::default()).unwrap();
    /// machine.observe(dflockd_cluster::ApplyObserver::new(|_, _, _| {}));
    /// ```
    pub fn observe(&mut self, observer: ApplyObserver) {
        self.observer = Some(observer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LockTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the state with a snapshot's data.
    fn load(&mut self, data: &[u8]) -> Result<(), String> {
        let state = decode_state(data)?;
        *self.lock() = LockTable::restore(&state.table).map_err(|e| e.to_string())?;
        self.last_applied = state.last_applied;
        self.office = state.office;
        self.membership = state.membership;
        Ok(())
    }

    fn state_bytes(&self) -> Vec<u8> {
        let mut data = vec![SNAPSHOT_VERSION];
        data.extend(encode(&MachineState {
            last_applied: self.last_applied,
            office: self.office,
            membership: self.membership.clone(),
            table: self.lock().snapshot(),
        }));
        data
    }
}

/// Keeps `snapshot` as the node's snapshot unless the stored one reaches
/// as far or further: openraft builds snapshots in a task of their own, so
/// a build of an older state can finish after a newer snapshot was
/// installed, whose log has been purged since. One transaction.
fn store_if_newer(db: &Database, snapshot: &StoredSnapshot) -> Result<(), redb::Error> {
    use redb::ReadableTable;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let stored: Option<StoredSnapshot> = match meta.get(SNAPSHOT)? {
            Some(bytes) => Some(decode(bytes.value()).map_err(|e| {
                redb::Error::Corrupted(format!("undecodable stored snapshot: {e}"))
            })?),
            None => None,
        };
        let newer = stored.is_none_or(|stored| stored.meta.last_log_id < snapshot.meta.last_log_id);
        if newer {
            meta.insert(SNAPSHOT, encode(snapshot).as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn decode_state(data: &[u8]) -> Result<MachineState, String> {
    match data.split_first() {
        Some((&SNAPSHOT_VERSION, rest)) => decode(rest).map_err(|e| e.to_string()),
        Some((version, _)) => Err(format!(
            "snapshot format version {version} is not supported"
        )),
        None => Err("empty snapshot".to_string()),
    }
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("last_applied", &self.last_applied)
            .field("table", &*self.lock())
            .finish_non_exhaustive()
    }
}

/// Reads a node's lock table (a clone of the handle reads the same table).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
/// let view = storage.state_machine(Default::default()).unwrap().view();
/// assert_eq!(view.read(|table| table.resource_count()), 0);
/// ```
#[derive(Clone)]
pub struct TableView(Arc<Mutex<LockTable>>);

impl TableView {
    /// Runs `f` on the table (locked meanwhile: keep it short).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// let view = storage.state_machine(Default::default()).unwrap().view();
    /// let bytes = view.read(|table| table.snapshot().encode());
    /// assert!(!bytes.is_empty());
    /// ```
    pub fn read<R>(&self, f: impl FnOnce(&LockTable) -> R) -> R {
        f(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl std::fmt::Debug for TableView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableView").finish_non_exhaustive()
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use openraft::storage::RaftStateMachine;
/// use openraft::RaftSnapshotBuilder;
/// let dir = tempfile::tempdir()?;
/// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb"))?;
/// let mut machine = storage.state_machine(Default::default())?;
/// let snapshot = machine.get_snapshot_builder().await.build_snapshot().await?;
/// assert_eq!(snapshot.meta.last_log_id, None);
/// # Ok(()) }
/// ```
pub struct SnapshotBuilder {
    db: Arc<Db>,
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let stored = StoredSnapshot {
            meta: self.meta.clone(),
            data: std::mem::take(&mut self.data),
        };
        store_if_newer(&self.db, &stored)
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchEffects>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            answers.push(match entry.payload {
                EntryPayload::Blank => BatchEffects::default(),
                EntryPayload::Normal(batch) => {
                    let term = entry.log_id.leader_id.term;
                    let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
                    // The first entry of a term's leader process: it takes
                    // office.
                    let leader = Office {
                        term,
                        proposer: batch.proposer,
                    };
                    let new = term > self.office.term
                        || (term == self.office.term && batch.proposer != self.office.proposer);
                    let office = new.then(|| table.apply(&batch.office));
                    if new {
                        self.office = leader;
                    }
                    let effects = BatchEffects {
                        office,
                        commands: batch.commands.iter().map(|c| table.apply(c)).collect(),
                    };
                    drop(table);
                    if let Some(observer) = &self.observer {
                        let origin = Origin {
                            index: entry.log_id.index,
                            term,
                            node: entry.log_id.leader_id.node_id,
                        };
                        (observer.0)(origin, &batch, &effects);
                    }
                    effects
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    BatchEffects::default()
                }
            });
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.built += 1;
        let id = match self.last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, self.built),
            None => format!("empty-{}", self.built),
        };
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: id,
            },
            data: self.state_bytes(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let signature = Some(meta.signature());
        self.load(&data).map_err(|reason| {
            StorageIOError::read_snapshot(signature.clone(), AnyError::error(reason))
        })?;
        // The snapshot's own record of how far it reaches wins over what
        // its data says (they are the same when a node of ours made it).
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        store_if_newer(&self.db, &stored)
            .map_err(|e| StorageIOError::write_snapshot(signature, AnyError::new(&e)))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored = read_meta(&self.db, SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        let Some(bytes) = stored else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
