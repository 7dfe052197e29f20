//! The log's files through the log store: what a reopen finds, torn tails,
//! damage, segments made and deleted, and a log moved out of an old redb
//! file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader};
use proptest::prelude::*;

use crate::storage::{Storage, StorageOpenError};
use crate::wal::{self, WalError};
use crate::{Entry, LogStore, NodeId};

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(e) => panic!("runtime: {e}"),
    }
}

/// What the log should hold.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    entries: BTreeMap<u64, LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl Model {
    fn last(&self) -> u64 {
        self.entries
            .keys()
            .next_back()
            .copied()
            .or(self.last_purged.map(|p| p.index))
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// This many entries after the last, in this term.
    Append(u8, u64),
    /// Truncate from the last index minus this many (kept past the purge).
    Truncate(u8),
    /// Purge up to the last index minus this many.
    Purge(u8),
    /// Save the last index minus this many as committed.
    Commit(u8),
    /// Close and open again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..6, 1u64..4).prop_map(|(n, term)| Op::Append(n, term)),
        1 => (0u8..4).prop_map(Op::Truncate),
        1 => (0u8..8).prop_map(Op::Purge),
        2 => (0u8..4).prop_map(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

async fn apply(log: &mut LogStore, model: &mut Model, op: &Op) {
    let last = model.last();
    let live_from = model.last_purged.map_or(1, |p| p.index + 1);
    match *op {
        Op::Append(n, term) => {
            let entries: Vec<Entry> = (last + 1..=last + u64::from(n))
                .map(|index| blank(term, index))
                .collect();
            for entry in &entries {
                model.entries.insert(entry.log_id.index, entry.log_id);
            }
            log.blocking_append(entries).await.unwrap();
        }
        Op::Truncate(back) => {
            let from = last.saturating_sub(u64::from(back)).max(live_from);
            if let Some(&id) = model.entries.get(&from) {
                drop(model.entries.split_off(&from));
                log.truncate(id).await.unwrap();
            }
        }
        Op::Purge(back) => {
            let upto = last.saturating_sub(u64::from(back));
            if let Some(&id) = model.entries.get(&upto) {
                model.entries = model.entries.split_off(&(upto + 1));
                model.last_purged = Some(id);
                log.purge(id).await.unwrap();
            }
        }
        Op::Commit(back) => {
            let at = last.saturating_sub(u64::from(back));
            if let Some(&id) = model.entries.get(&at) {
                model.committed = Some(id);
                log.save_committed(Some(id)).await.unwrap();
            }
        }
        Op::Reopen => {}
    }
}

async fn found(log: &mut LogStore) -> Model {
    let state = log.get_log_state().await.unwrap();
    let entries = log.try_get_log_entries(..).await.unwrap();
    let model = Model {
        entries: entries.iter().map(|e| (e.log_id.index, e.log_id)).collect(),
        last_purged: state.last_purged_log_id,
        committed: log.read_committed().await.unwrap(),
    };
    let last = entries
        .last()
        .map(|e| e.log_id)
        .or(state.last_purged_log_id);
    assert_eq!(state.last_log_id, last);
    model
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    wal::segments_in(&dir.join("raft.wal"))
        .unwrap()
        .into_iter()
        .map(|seq| dir.join("raft.wal").join(format!("{seq:020}.wal")))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever appends, truncations, purges and commits happen, with
    /// small segments made and deleted on the way, every reopen finds the
    /// log the operations describe.
    #[test]
    fn a_reopened_log_is_the_log_that_was_written(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        runtime().block_on(async {
            let mut model = Model::default();
            let mut log = Storage::open_with(&path, 400).unwrap().log_store();
            for op in &ops {
                apply(&mut log, &mut model, op).await;
                if let Op::Reopen = op {
                    drop(log);
                    log = Storage::open_with(&path, 400).unwrap().log_store();
                }
                assert_eq!(found(&mut log).await, model, "after {op:?}");
            }
            drop(log);
            let mut log = Storage::open_with(&path, 400).unwrap().log_store();
            assert_eq!(found(&mut log).await, model, "reopened at the end");
        });
    }
}

/// A closed log of three entries, one write each: the storage path, its
/// one segment and the segment's length after each write.
async fn three_entries(dir: &Path) -> (PathBuf, PathBuf, Vec<u64>) {
    let path = dir.join("raft.redb");
    let mut log = Storage::open(&path).unwrap().log_store();
    let segment = segments(dir)[0].clone();
    let mut lengths = Vec::new();
    for index in 1..=3 {
        log.blocking_append([blank(1, index)]).await.unwrap();
        lengths.push(std::fs::metadata(&segment).unwrap().len());
    }
    (path, segment, lengths)
}

#[test]
fn a_torn_last_record_is_cut_off_and_the_log_goes_on() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, segment, lengths) = three_entries(dir.path()).await;
        let whole = std::fs::read(&segment).unwrap();
        // Every cut inside the last record, and garbage or zeros after it.
        let mut tails: Vec<Vec<u8>> = (lengths[1]..lengths[2])
            .map(|cut| whole[..cut as usize].to_vec())
            .collect();
        let mut zeros = whole[..lengths[1] as usize].to_vec();
        zeros.extend_from_slice(&[0; 100]);
        tails.push(zeros);
        let mut flipped = whole.clone();
        if let Some(last) = flipped.last_mut() {
            *last ^= 0xff;
        }
        tails.push(flipped);
        for tail in tails {
            std::fs::write(&segment, &tail).unwrap();
            let mut log = Storage::open(&path).unwrap().log_store();
            let state = log.get_log_state().await.unwrap();
            assert_eq!(
                state.last_log_id,
                Some(log_id(1, 2)),
                "cut at {}",
                tail.len()
            );
            assert_eq!(std::fs::metadata(&segment).unwrap().len(), lengths[1]);
            // The place is reused: a new third entry, read back after a reopen.
            log.blocking_append([blank(2, 3)]).await.unwrap();
            drop(log);
            let mut log = Storage::open(&path).unwrap().log_store();
            let entries = log.try_get_log_entries(1..).await.unwrap();
            let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
            assert_eq!(ids, [log_id(1, 1), log_id(1, 2), log_id(2, 3)]);
        }
    });
}

#[test]
fn a_damaged_record_before_the_end_refuses_to_open() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, segment, lengths) = three_entries(dir.path()).await;
        let mut bytes = std::fs::read(&segment).unwrap();
        // A byte in the middle of the second record: the third is intact,
        // so no crash explains it.
        let second = lengths[0] as usize;
        bytes[second + 12] ^= 0x01;
        std::fs::write(&segment, &bytes).unwrap();
        match Storage::open(&path) {
            Err(StorageOpenError::Log {
                source: WalError::Corrupt { path, offset, .. },
                ..
            }) => {
                assert_eq!(offset, lengths[0]);
                assert!(path.ends_with(".wal"), "{path}");
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a damaged log opened"),
        }
        // Nothing was cut off.
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    });
}

#[test]
fn purged_segments_are_deleted_and_the_rest_reads_back() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let mut log = Storage::open_with(&path, 256).unwrap().log_store();
        for index in 1..=200 {
            log.blocking_append([blank(1, index)]).await.unwrap();
        }
        let made = segments(dir.path()).len();
        assert!(made > 10, "only {made} segments");
        log.save_committed(Some(log_id(1, 200))).await.unwrap();
        log.purge(log_id(1, 190)).await.unwrap();
        let left = segments(dir.path()).len();
        assert!(left <= 2, "{left} of {made} segments left");
        drop(log);
        let mut log = Storage::open_with(&path, 256).unwrap().log_store();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 190)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 200)));
        let entries = log.try_get_log_entries(..).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (191..=200).collect::<Vec<_>>());
    });
}

#[test]
fn a_log_kept_in_the_redb_file_by_an_earlier_version_moves_to_segments() {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut logs = txn.open_table(crate::records::LOGS).unwrap();
            for index in 4..=6 {
                let bytes = crate::records::encode(&blank(1, index));
                logs.insert(index, bytes.as_slice()).unwrap();
            }
            let mut meta = txn.open_table(crate::records::META).unwrap();
            let purged = crate::records::encode(&log_id(1, 3));
            meta.insert(crate::records::LAST_PURGED, purged.as_slice())
                .unwrap();
            let committed = crate::records::encode(&Some(log_id(1, 5)));
            meta.insert(crate::records::COMMITTED, committed.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    runtime().block_on(async {
        let storage = Storage::open(&path).unwrap();
        let mut log = storage.log_store();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(state.last_log_id, Some(log_id(1, 6)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 5)));
        assert_eq!(log.try_get_log_entries(4..7).await.unwrap().len(), 3);
        drop((log, storage));
        // The old copy is gone from the redb file.
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            txn.open_table(crate::records::LOGS)
                .unwrap()
                .is_empty()
                .unwrap()
        );
    });
}

#[test]
fn a_write_torn_between_sectors_is_cut_where_it_tore() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let before = {
            let mut log = Storage::open(&path).unwrap().log_store();
            log.blocking_append([blank(1, 1)]).await.unwrap();
            let before = std::fs::metadata(&segments(dir.path())[0]).unwrap().len();
            // One write of 100 entries spanning several sectors.
            log.blocking_append((2..=101).map(|index| blank(1, index)))
                .await
                .unwrap();
            before
        };
        let segment = segments(dir.path())[0].clone();
        let mut bytes = std::fs::read(&segment).unwrap();
        // The disk wrote the write's last sectors but not its second one.
        let sector = (before as usize / 512 + 1) * 512;
        assert!(
            bytes.len() > sector + 1024,
            "the write spans too few sectors"
        );
        bytes[sector..sector + 512].fill(0);
        std::fs::write(&segment, &bytes).unwrap();
        let mut log = Storage::open(&path).unwrap().log_store();
        let state = log.get_log_state().await.unwrap();
        let last = state.last_log_id.unwrap().index;
        // What lay before the torn sector is kept, the rest cut off.
        assert!((2..101).contains(&last), "last entry {last}");
        let length = std::fs::metadata(&segment).unwrap().len() as usize;
        assert!(
            length <= sector,
            "cut at {length}, the zeroed sector at {sector}"
        );
        let entries = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(entries.len() as u64, last);
    });
}

#[test]
fn a_damaged_length_before_the_end_refuses_to_open() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, segment, lengths) = three_entries(dir.path()).await;
        let mut bytes = std::fs::read(&segment).unwrap();
        // The second record claims to run past the end of the file; the
        // third, intact, shows it was written whole once.
        let second = lengths[0] as usize;
        bytes[second + 3] = 0x7f;
        std::fs::write(&segment, &bytes).unwrap();
        match Storage::open(&path) {
            Err(StorageOpenError::Log {
                source: WalError::Corrupt { offset, .. },
                ..
            }) => assert_eq!(offset, lengths[0]),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a damaged log opened"),
        }
    });
}
