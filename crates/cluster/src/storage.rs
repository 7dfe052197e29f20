//! What a node must not lose: the Raft log (with the committed index) in
//! segment files beside the redb file, which holds the vote and the state
//! machine's last snapshot.

use std::path::Path;
use std::sync::Arc;

use dflockd_core::TableConfig;
use redb::Database;
use thiserror::Error;

use crate::db::{Closed, Db};
use crate::log_store::{LogStore, Writer};
use crate::records::{
    COMMITTED, INCARNATION, LAST_PURGED, LOGS, META, decode, encode, read_meta, write_meta,
};
use crate::state_machine::StateMachine;
use crate::wal::{self, Kind, WalError};

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
    /// The Raft log beside the file cannot be opened (or is damaged).
    #[error("cannot open the Raft log of {path}: {source}")]
    Log {
        /// The redb file the log belongs to.
        path: String,
        /// What went wrong.
        source: WalError,
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

/// A node's durable storage: one redb file (vote, snapshot), opened by one
/// process at a time, and the Raft log's segment files in the directory
/// beside it named like the file with `.wal` (`raft.wal/` for
/// `raft.redb`). Every write is fsync'd before it is acknowledged.
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
        Storage::open_with(path, crate::wal::SEGMENT_BYTES)
    }

    /// [`Storage::open`], starting a new log segment every `segment_bytes`.
    pub(crate) fn open_with(path: &Path, segment_bytes: u64) -> Result<Storage, StorageOpenError> {
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
        let log_dir = path.with_extension("wal");
        migrate(&db, &log_dir).map_err(|source| StorageOpenError::Log {
            path: shown.clone(),
            source,
        })?;
        let db = Arc::new(Db::new(db));
        let writer = Writer::start(Arc::clone(&db), &log_dir, segment_bytes).map_err(|source| {
            StorageOpenError::Log {
                path: shown.clone(),
                source,
            }
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

/// Moves a log that an earlier version kept in the redb file (the LOGS
/// table, and the last purged and committed log ids in META) into a new
/// segment, fsync'd, then empties those from the redb file. A crash in
/// between leaves both; the segment wins and the old copy is emptied again.
fn migrate(db: &redb::Database, log_dir: &std::path::Path) -> Result<(), WalError> {
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
    let corrupt = |reason: String| WalError::Corrupt {
        path: log_dir.display().to_string(),
        offset: 0,
        reason,
    };
    let redb_error = |e: redb::Error| corrupt(format!("reading the old log: {e}"));
    let old_log = || -> Result<bool, redb::Error> {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(!txn.open_table(LOGS)?.is_empty()?
            || meta.get(LAST_PURGED)?.is_some()
            || meta.get(COMMITTED)?.is_some())
    };
    if !old_log().map_err(redb_error)? {
        return Ok(());
    }
    if wal::segments_in(log_dir)?.is_empty() {
        let mut records = Vec::new();
        let read = |records: &mut Vec<u8>| -> Result<(), redb::Error> {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            if let Some(purged) = meta.get(LAST_PURGED)? {
                wal::put_record(records, Kind::Purge, &[purged.value()]);
            }
            for item in txn.open_table(LOGS)?.iter()? {
                let (_, bytes) = item?;
                let entry: crate::Entry = decode(bytes.value())
                    .map_err(|e| redb::Error::Corrupted(format!("old log entry: {e}")))?;
                wal::put_entry(records, &entry.log_id, bytes.value());
            }
            if let Some(committed) = meta.get(COMMITTED)? {
                wal::put_record(records, Kind::Committed, &[committed.value()]);
            }
            Ok(())
        };
        read(&mut records).map_err(redb_error)?;
        wal::create_with(log_dir, &records)?;
    }
    let empty = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        {
            txn.open_table(LOGS)?.retain(|_, _| false)?;
            let mut meta = txn.open_table(META)?;
            meta.remove(LAST_PURGED)?;
            meta.remove(COMMITTED)?;
        }
        txn.commit()?;
        Ok(())
    };
    empty().map_err(|e| corrupt(format!("emptying the old log: {e}")))
}
