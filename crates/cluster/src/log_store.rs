//! The Raft log, the vote and the committed index, in the node's redb file.
//!
//! Every write is one redb transaction committed with an fsync
//! (`Durability::Immediate`, redb's default) before openraft hears of it;
//! transactions are atomic, so a crash leaves either all of an append or
//! none of it. Writes are serialised by redb's single writer.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::records::{
    COMMITTED, LAST_PURGED, LOGS, META, VOTE, decode, encode, read_meta, write_meta,
};
use crate::{Entry, NodeId, StorageError, TypeConfig};

/// The Raft log store of one node (cheap to clone: clones share the file).
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use openraft::storage::RaftLogStorage;
/// let dir = tempfile::tempdir()?;
/// let mut log = dflockd_cluster::Storage::open(&dir.path().join("raft.redb"))?.log_store();
/// let state = log.get_log_state().await?;
/// assert_eq!(state.last_log_id, None);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> LogStore {
        LogStore { db }
    }

    fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, redb::Error> {
        read_meta(&self.db, name)?
            .map(|bytes| decode(&bytes).map_err(corrupt))
            .transpose()
    }

    fn set_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<(), redb::Error> {
        write_meta(&self.db, name, &encode(value))
    }

    fn entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, redb::Error> {
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        let mut entries = Vec::new();
        for item in logs.range(range)? {
            let (_, value) = item?;
            entries.push(decode(value.value()).map_err(corrupt)?);
        }
        Ok(entries)
    }

    fn last_entry(&self) -> Result<Option<Entry>, redb::Error> {
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        let last = logs.last()?;
        last.map(|(_, value)| decode(value.value()).map_err(corrupt))
            .transpose()
    }

    /// Keeps only the entries for which `keep(index)` holds, and records
    /// `purged` as the last purged log id if given: one transaction.
    fn remove_entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<&LogId<NodeId>>,
    ) -> Result<(), redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(true);
        {
            let mut logs = txn.open_table(LOGS)?;
            logs.retain_in(range, |_, _| false)?;
            if let Some(purged) = purged {
                let mut meta = txn.open_table(META)?;
                meta.insert(LAST_PURGED, encode(purged).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn append_entries(&self, entries: impl IntoIterator<Item = Entry>) -> Result<(), redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(true);
        {
            let mut logs = txn.open_table(LOGS)?;
            for entry in entries {
                logs.insert(entry.log_id.index, encode(&entry).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        self.entries(range)
            .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, redb::Error> {
            let last_purged: Option<LogId<NodeId>> = self.meta(LAST_PURGED)?;
            // With no entries left, the last log id is the last purged one.
            let last = self.last_entry()?.map(|entry| entry.log_id).or(last_purged);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        };
        read().map_err(|e| StorageIOError::read_logs(AnyError::new(&e)).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.set_meta(VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.set_meta(COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        self.meta::<Option<LogId<NodeId>>>(COMMITTED)
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(AnyError::new(&e)).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_entries(entries) {
            Ok(()) => {
                // Committed with an fsync: durable before openraft is told.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(AnyError::new(&e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.remove_entries((Bound::Included(log_id.index), Bound::Unbounded), None)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.remove_entries(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Some(&log_id),
        )
        .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }
}

/// A stored value that does not decode: the file is damaged.
fn corrupt(error: postcard::Error) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable Raft record: {error}"))
}
