//! The Raft log, the vote and the committed index, in the node's redb file.
//!
//! Writes go to one writer thread per file, in order; it commits whatever
//! has queued as one redb transaction with an fsync (`Durability::Immediate`)
//! and only then tells openraft an append is durable, or returns from a
//! vote, truncate or purge. Transactions are atomic, so a crash leaves
//! either all of a write or none of it.
//!
//! An append returns at once: its entries are readable from memory until
//! their transaction commits, so openraft replicates a new entry to the
//! followers while the leader's own fsync runs (it counts the leader's copy
//! only once the callback says it is durable). The committed index is
//! written without an fsync: openraft uses it only to apply sooner after a
//! restart, and learns it from the leader otherwise.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::de::DeserializeOwned;

use crate::db::Db;
use crate::records::{COMMITTED, LAST_PURGED, LOGS, META, VOTE, decode, encode, read_meta};
use crate::{Entry, NodeId, StorageError, TypeConfig};

/// The Raft log store of one node (cheap to clone: clones share the file
/// and its writer).
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
    /// A META value, durably.
    Meta(&'static str, Vec<u8>, Done),
    /// A META value that need not be durable at once.
    Lazy(&'static str, Vec<u8>),
}

type Done = std::sync::mpsc::SyncSender<Result<(), String>>;

/// The writer thread's queue, and the entries appended but not yet
/// committed (readable meanwhile).
pub(crate) struct Writer {
    /// `None` once dropped (the thread then ends).
    queue: Mutex<Option<std::sync::mpsc::Sender<Write>>>,
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Writer {
    /// Stops the thread and waits for it: once the last log store of a
    /// file is gone, the file can be opened again.
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
    /// Starts the writer thread of `db`; it ends when the last handle to
    /// the writer is dropped.
    pub(crate) fn start(db: Arc<Db>) -> std::io::Result<Arc<Writer>> {
        let (queue, writes) = std::sync::mpsc::channel();
        let pending = Arc::new(Mutex::new(BTreeMap::new()));
        let shared = Arc::clone(&pending);
        let thread = std::thread::Builder::new()
            .name("dflockd-raft-log".into())
            .spawn(move || write_loop(&db, &writes, &shared))?;
        Ok(Arc::new(Writer {
            queue: Mutex::new(Some(queue)),
            pending,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
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

/// Commits queued writes in order, each batch in one transaction.
fn write_loop(
    db: &Database,
    writes: &std::sync::mpsc::Receiver<Write>,
    pending: &Mutex<BTreeMap<u64, Entry>>,
) {
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        while let Ok(next) = writes.try_recv() {
            batch.push(next);
        }
        let durable = batch.iter().any(|w| !matches!(w, Write::Lazy(..)));
        let result = commit(db, &batch, durable).map_err(|e| e.to_string());
        let written: Vec<LogId<NodeId>> = batch
            .iter()
            .flat_map(|w| match w {
                Write::Append { entries, .. } => entries.iter().map(|(id, _)| *id).collect(),
                _ => Vec::new(),
            })
            .collect();
        // Committed: readable from the file now.
        if result.is_ok() {
            let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
            for id in written {
                if pending.get(&id.index).is_some_and(|e| e.log_id == id) {
                    pending.remove(&id.index);
                }
            }
        }
        for write in batch {
            match write {
                Write::Append { callback, .. } => {
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                }
                Write::Truncate(_, done) | Write::Purge(_, done) | Write::Meta(_, _, done) => {
                    let _ = done.send(result.clone());
                }
                Write::Lazy(..) => {}
            }
        }
    }
}

fn commit(db: &Database, batch: &[Write], durable: bool) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    // No quick repair: it writes the allocator state with every commit
    // and halved the throughput (docs/CLUSTER.md, Storage); a crash costs
    // a full check of the file on the next start instead.
    if !durable {
        txn.set_durability(redb::Durability::None)
            .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    }
    {
        let mut logs = txn.open_table(LOGS)?;
        let mut meta = txn.open_table(META)?;
        for write in batch {
            match write {
                Write::Append { entries, .. } => {
                    for (id, bytes) in entries {
                        logs.insert(id.index, bytes.as_slice())?;
                    }
                }
                Write::Truncate(from, _) => {
                    logs.retain_in(*from.., |_, _| false)?;
                }
                Write::Purge(upto, _) => {
                    logs.retain_in(..=upto.index, |_, _| false)?;
                    meta.insert(LAST_PURGED, encode(upto).as_slice())?;
                }
                Write::Meta(name, bytes, _) | Write::Lazy(name, bytes) => {
                    meta.insert(*name, bytes.as_slice())?;
                }
            }
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
            .map(|bytes| decode(&bytes).map_err(corrupt))
            .transpose()
    }

    /// Entries in `range`: the ones still only in memory, then the file
    /// (in that order: an entry leaves memory only after its transaction
    /// committed, so one is never missed between the two reads).
    fn entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<Entry>, redb::Error> {
        let mut found: BTreeMap<u64, Entry> = self
            .writer
            .pending()
            .range(range)
            .map(|(index, entry)| (*index, entry.clone()))
            .collect();
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        for item in logs.range(range)? {
            let (index, value) = item?;
            if let std::collections::btree_map::Entry::Vacant(slot) = found.entry(index.value()) {
                slot.insert(decode(value.value()).map_err(corrupt)?);
            }
        }
        Ok(found.into_values().collect())
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, redb::Error> {
        let pending = self
            .writer
            .pending()
            .last_key_value()
            .map(|(_, entry)| entry.log_id);
        if pending.is_some() {
            return Ok(pending);
        }
        let txn = self.db.begin_read()?;
        let logs = txn.open_table(LOGS)?;
        let last = logs.last()?;
        last.map(|(_, value)| {
            decode::<Entry>(value.value())
                .map(|e| e.log_id)
                .map_err(corrupt)
        })
        .transpose()
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
            let last = self.last_log_id()?.or(last_purged);
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
        // Not waited for and not fsync'd by itself (see the module doc).
        self.writer
            .send(Write::Lazy(COMMITTED, encode(&committed)))
            .map_err(|e| StorageIOError::write(AnyError::error(e)).into())
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let encoded = entries.iter().map(|e| (e.log_id, encode(e))).collect();
        {
            let mut pending = self.writer.pending();
            for entry in entries {
                pending.insert(entry.log_id.index, entry);
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
        self.writer
            .pending()
            .retain(|&index, _| index < log_id.index);
        self.writer
            .wait(|done| Write::Truncate(log_id.index, done))
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.writer
            .pending()
            .retain(|&index, _| index > log_id.index);
        self.writer
            .wait(|done| Write::Purge(log_id, done))
            .map_err(|e| StorageIOError::write_logs(AnyError::error(e)).into())
    }
}

/// A stored value that does not decode: the file is damaged.
fn corrupt(error: postcard::Error) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable Raft record: {error}"))
}
