//! One redb file holds everything a node must not lose: the Raft log, the
//! vote, the committed index and the state machine's last snapshot.

use std::path::Path;
use std::sync::Arc;

use dflockd_core::TableConfig;
use redb::Database;
use thiserror::Error;

use crate::db::{Closed, Db};
use crate::log_store::{LogStore, Writer};
use crate::records::{INCARNATION, LOGS, META, decode, encode, read_meta, write_meta};
use crate::state_machine::StateMachine;

/// Why a node's storage could not be opened.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let first = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
/// // A second opener (another process, or this one) is refused.
/// let second = dflockd_cluster::Storage::open(&dir.path().join("raft.redb"));
/// assert!(second.is_err());
/// # drop(first);
/// ```
#[derive(Debug, Error)]
pub enum StorageOpenError {
    /// The file could not be created, opened or checked (or another process
    /// has it open).
    #[error("cannot open the Raft storage {path}: {source}")]
    Database {
        /// The file.
        path: String,
        /// What went wrong.
        source: redb::DatabaseError,
    },
    /// The file opened but its tables could not be made.
    #[error("cannot prepare the Raft storage {path}: {source}")]
    Prepare {
        /// The file.
        path: String,
        /// What went wrong.
        source: redb::Error,
    },
    /// The snapshot stored in the file cannot be read back.
    #[error("the snapshot in {path} cannot be restored: {reason}")]
    Snapshot {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A node's durable storage: one redb file, opened by one process at a
/// time. Every write is committed with an fsync before it is acknowledged.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
/// let _log = storage.log_store();
/// ```
#[derive(Clone)]
pub struct Storage {
    db: Arc<Db>,
    /// The log's writer thread, shared by every log store of this file.
    writer: Arc<Writer>,
    path: String,
}

impl Storage {
    /// A handle that sees when the file is closed: once every part of the
    /// storage (log store, state machine, snapshot builders) is dropped
    /// and the file released (`changed()` then fails).
    pub(crate) fn closed(&self) -> Closed {
        self.db.closed()
    }

    /// Opens (or creates) the storage file at `path`.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// assert!(dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).is_ok());
    /// ```
    pub fn open(path: &Path) -> Result<Storage, StorageOpenError> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|source| StorageOpenError::Database {
            path: shown.clone(),
            source,
        })?;
        let prepare = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(LOGS)?;
            txn.open_table(META)?;
            txn.commit()?;
            Ok(())
        };
        prepare().map_err(|source| StorageOpenError::Prepare {
            path: shown.clone(),
            source,
        })?;
        let db = Arc::new(Db::new(db));
        let writer = Writer::start(Arc::clone(&db)).map_err(|e| StorageOpenError::Prepare {
            path: shown.clone(),
            source: redb::Error::Io(e),
        })?;
        Ok(Storage {
            db,
            writer,
            path: shown,
        })
    }

    /// Counts one more start of a node on this file and returns the count
    /// (1 for the first), durably: every process that opens the file gets
    /// a number no process before it had.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// assert_eq!(storage.next_incarnation().unwrap(), 1);
    /// assert_eq!(storage.next_incarnation().unwrap(), 2);
    /// ```
    pub fn next_incarnation(&self) -> Result<u64, StorageOpenError> {
        let count = || -> Result<u64, redb::Error> {
            let previous = match read_meta(&self.db, INCARNATION)? {
                Some(bytes) => decode::<u64>(&bytes)
                    .map_err(|e| redb::Error::Corrupted(format!("incarnation: {e}")))?,
                None => 0,
            };
            let next = previous.saturating_add(1);
            write_meta(&self.db, INCARNATION, &encode(&next))?;
            Ok(next)
        };
        count().map_err(|source| StorageOpenError::Prepare {
            path: self.path.clone(),
            source,
        })
    }

    /// The Raft log, vote and committed index.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// let log = storage.log_store();
    /// # drop(log);
    /// ```
    pub fn log_store(&self) -> LogStore {
        LogStore::new(Arc::clone(&self.db), Arc::clone(&self.writer))
    }

    /// The state machine, restored from the stored snapshot if there is
    /// one (else an empty table with `config`); openraft then applies the
    /// committed entries after it.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = dflockd_cluster::Storage::open(&dir.path().join("raft.redb")).unwrap();
    /// let machine = storage.state_machine(Default::default()).unwrap();
    /// assert_eq!(machine.view().read(|table| table.resource_count()), 0);
    /// ```
    pub fn state_machine(&self, config: TableConfig) -> Result<StateMachine, StorageOpenError> {
        StateMachine::open(Arc::clone(&self.db), config).map_err(|reason| {
            StorageOpenError::Snapshot {
                path: self.path.clone(),
                reason,
            }
        })
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
