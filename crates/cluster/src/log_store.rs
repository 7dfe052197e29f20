//! The Raft log, the vote and the committed index of one node.
//!
//! The log lives in its own files (see `wal.rs`: segments of CRC-checked
//! records, appended and fsync'd); the vote lives in the node's redb file.
//! Writes go to one writer thread per node, in order; it writes whatever
//! has queued with one fsync and only then tells openraft an append is
//! durable, or returns from a vote, truncate or purge.
//!
//! An append returns at once: its entries are readable from memory until
//! their records are durable, then from the file, so openraft replicates a
//! new entry to the followers while the leader's own fsync runs (it counts
//! the leader's copy only once the callback says it is durable). The
//! committed index is not a write of its own: the newest one rides along
//! with the next write (openraft uses it only to apply sooner after a
//! restart, and learns it from the leader otherwise), which spares every
//! node a second write per command.
//!
//! Why not the redb file for the log too: a redb commit rewrites a
//! copy-on-write B-tree (about 11 pages, 44 KB, per one-entry commit)
//! where an append writes one record; docs/CLUSTER.md (Storage) has the
//! measurements.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::Database;
use serde::de::DeserializeOwned;

use crate::db::Db;
use crate::records::{META, VOTE, decode, encode, read_meta};
use crate::wal::{self, Appender, Kind, Located, WalError};
use crate::{Entry, NodeId, StorageError, TypeConfig};

/// The Raft log store of one node (cheap to clone: clones share the files
/// and their writer).
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
    db: Arc<Db>,
    writer: Arc<Writer>,
}

/// One write for the writer thread.
enum Write {
    Append {
        entries: Vec<(LogId<NodeId>, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Remove entries from this index on.
    Truncate(u64, Done),
    /// Remove entries up to this one, and remember it as purged.
    Purge(LogId<NodeId>, Done),
    /// A META value in the redb file, durably.
    Meta(&'static str, Vec<u8>, Done),
}

type Done = std::sync::mpsc::SyncSender<Result<(), String>>;

/// An entry of the log: still only in memory, or in a segment.
enum Stored {
    Memory(Entry),
    File(Located),
}

impl Stored {
    fn log_id(&self) -> LogId<NodeId> {
        match self {
            Stored::Memory(entry) => entry.log_id,
            Stored::File(located) => located.log_id,
        }
    }
}

/// The log as openraft sees it: what the writer thread and every log
/// store of the node share.
struct Shared {
    entries: BTreeMap<u64, Stored>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// `committed` changed since it was last written.
    committed_unwritten: bool,
}

/// The writer thread's queue, and the log it keeps.
pub(crate) struct Writer {
    /// `None` once dropped (the thread then ends).
    queue: Mutex<Option<std::sync::mpsc::Sender<Write>>>,
    shared: Arc<Mutex<Shared>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Writer {
    /// Stops the thread and waits for it (it writes the newest committed
    /// index first): once the last log store of a node is gone, its files
    /// can be opened again.
    fn drop(&mut self) {
        drop(
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(thread) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = thread.join();
        }
    }
}

impl Writer {
    /// Opens the log in `dir` (new segments every `segment_bytes`) and
    /// starts its writer thread, which also writes `db`'s META values; it
    /// ends when the last handle to the
    /// writer is dropped.
    pub(crate) fn start(
        db: Arc<Db>,
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<Arc<Writer>, WalError> {
        let recovered = wal::open(dir, segment_bytes)?;
        let shared = Arc::new(Mutex::new(Shared {
            entries: recovered
                .entries
                .into_iter()
                .map(|(index, located)| (index, Stored::File(located)))
                .collect(),
            last_purged: recovered.last_purged,
            committed: recovered.committed,
            committed_unwritten: false,
        }));
        let (queue, writes) = std::sync::mpsc::channel();
        let mut thread_state = WriteLoop {
            db,
            appender: recovered.appender,
            shared: Arc::clone(&shared),
            committed: recovered.committed,
        };
        let thread = std::thread::Builder::new()
            .name("dflockd-raft-log".into())
            .spawn(move || thread_state.run(&writes))
            .map_err(|source| WalError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        Ok(Arc::new(Writer {
            queue: Mutex::new(Some(queue)),
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, write: Write) -> Result<(), String> {
        match &*self.queue.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(queue) => queue
                .send(write)
                .map_err(|_| "the log writer stopped".to_string()),
            None => Err("the log writer stopped".to_string()),
        }
    }

    /// Queues a write and waits until it is durable.
    fn wait(&self, write: impl FnOnce(Done) -> Write) -> Result<(), String> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.send(write(done))?;
        result
            .recv()
            .map_err(|_| "the log writer stopped".to_string())?
    }
}

/// The writer thread: the segments, and the committed log id it wrote
/// last (a new segment starts with it).
struct WriteLoop {
    db: Arc<Db>,
    appender: Appender,
    shared: Arc<Mutex<Shared>>,
    committed: Option<LogId<NodeId>>,
}

impl WriteLoop {
    /// Writes queued writes in order, each batch with one fsync (and one
    /// redb transaction if it holds META values).
    fn run(&mut self, writes: &std::sync::mpsc::Receiver<Write>) {
        while let Ok(first) = writes.recv() {
            // Taken before the queue is drained: the entries a committed
            // index names were queued before it was set, so they are in
            // this batch or an earlier one, and the log never names an
            // entry it lacks.
            let committed = self.take_committed();
            let mut batch = vec![first];
            while let Ok(next) = writes.try_recv() {
                batch.push(next);
            }
            let result = self.write(&batch, committed);
            for write in batch {
                match write {
                    Write::Append { callback, .. } => {
                        callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                    }
                    Write::Truncate(_, done) | Write::Purge(_, done) | Write::Meta(_, _, done) => {
                        let _ = done.send(result.clone());
                    }
                }
            }
        }
        // Stopping: the newest committed index, so that a restart applies
        // as far as this run did without waiting for a leader.
        if let Some(committed) = self.take_committed() {
            let _ = self.write(&[], Some(committed));
        }
    }

    fn take_committed(&self) -> Option<Option<LogId<NodeId>>> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut shared.committed_unwritten).then_some(shared.committed)
    }

    fn write(
        &mut self,
        batch: &[Write],
        committed: Option<Option<LogId<NodeId>>>,
    ) -> Result<(), String> {
        let mut records = Vec::new();
        let mut placed = Vec::new();
        let mut purged = None;
        let mut metas = Vec::new();
        for write in batch {
            match write {
                Write::Append { entries, .. } => {
                    for (log_id, bytes) in entries {
                        let at = wal::put_entry(&mut records, log_id, bytes);
                        placed.push((*log_id, at, records.len() - at));
                    }
                }
                Write::Truncate(from, _) => {
                    wal::put_record(&mut records, Kind::Truncate, &[&encode(from)]);
                }
                Write::Purge(upto, _) => {
                    wal::put_record(&mut records, Kind::Purge, &[&encode(upto)]);
                    purged = Some(*upto);
                }
                Write::Meta(name, bytes, _) => metas.push((*name, bytes)),
            }
        }
        if let Some(committed) = committed {
            wal::put_record(&mut records, Kind::Committed, &[&encode(&committed)]);
        }
        if !records.is_empty() {
            let (file, path, start) = self.appender.write(&records).map_err(|e| e.to_string())?;
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            for (log_id, at, len) in placed {
                self.appender.wrote_entry(log_id.index);
                // Durable: read from the file from now on, unless it was
                // truncated (or replaced) meanwhile.
                if let Some(slot) = shared.entries.get_mut(&log_id.index)
                    && matches!(slot, Stored::Memory(entry) if entry.log_id == log_id)
                {
                    *slot = Stored::File(Located {
                        log_id,
                        file: Arc::clone(&file),
                        path: Arc::clone(&path),
                        offset: start + at as u64,
                        len: u32::try_from(len - wal::HEADER).unwrap_or(u32::MAX),
                    });
                }
            }
            drop(shared);
            if let Some(committed) = committed {
                self.committed = committed;
            }
            if let Some(upto) = purged {
                self.appender.delete_purged(upto.index);
            }
            let mut header = Vec::new();
            if self.committed.is_some() {
                wal::put_record(&mut header, Kind::Committed, &[&encode(&self.committed)]);
            }
            self.appender
                .roll_if_full(&header)
                .map_err(|e| e.to_string())?;
        }
        if !metas.is_empty() {
            write_metas(&self.db, &metas).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn write_metas(db: &Database, metas: &[(&str, &Vec<u8>)]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        for (name, bytes) in metas {
            meta.insert(*name, bytes.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

impl LogStore {
    pub(crate) fn new(db: Arc<Db>, writer: Arc<Writer>) -> LogStore {
        LogStore { db, writer }
    }

    fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, redb::Error> {
        read_meta(&self.db, name)?
            .map(|bytes| {
                decode(&bytes).map_err(|e| {
                    redb::Error::Corrupted(format!("undecodable Raft record {name}: {e}"))
                })
            })
            .transpose()
    }

    /// Entries in `range`: from memory, or read back from their segment
    /// (outside the lock; a segment deleted meanwhile stays readable
    /// through its open handle).
    fn entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, WalError> {
        enum Found {
            Entry(Entry),
            At(Located),
        }
        let found: Vec<Found> = self
            .writer
            .shared()
            .entries
            .range(range)
            .map(|(_, stored)| match stored {
                Stored::Memory(entry) => Found::Entry(entry.clone()),
                Stored::File(located) => Found::At(located.clone()),
            })
            .collect();
        found
            .into_iter()
            .map(|found| match found {
                Found::Entry(entry) => Ok(entry),
                Found::At(located) => located.read(),
            })
            .collect()
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
        let shared = self.writer.shared();
        // With no entries left, the last log id is the last purged one.
        let last = shared
            .entries
            .last_key_value()
            .map(|(_, stored)| stored.log_id())
            .or(shared.last_purged);
        Ok(LogState {
            last_purged_log_id: shared.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = encode(vote);
        self.writer
            .wait(|done| Write::Meta(VOTE, bytes, done))
            .map_err(|e| StorageIOError::write_vote(AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        // Written with the next write (see the module doc).
        let mut shared = self.writer.shared();
        shared.committed = committed;
        shared.committed_unwritten = true;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.writer.shared().committed)
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let encoded = entries.iter().map(|e| (e.log_id, encode(e))).collect();
        {
            let mut shared = self.writer.shared();
            for entry in entries {
                // An entry replaces any from its index on (as on replay).
                drop(shared.entries.split_off(&entry.log_id.index));
                shared
                    .entries
                    .insert(entry.log_id.index, Stored::Memory(entry));
            }
        }
        // Durable when the callback says so, not when this returns.
        self.writer
            .send(Write::Append {
                entries: encoded,
                callback,
            })
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        drop(self.writer.shared().entries.split_off(&log_id.index));
        self.writer
            .wait(|done| Write::Truncate(log_id.index, done))
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        {
            let mut shared = self.writer.shared();
            shared.entries = shared.entries.split_off(&log_id.index.saturating_add(1));
            shared.last_purged = Some(log_id);
        }
        self.writer
            .wait(|done| Write::Purge(log_id, done))
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into())
    }
}
