//! The node storage against openraft's own storage test suite, and what the
//! suite cannot check: entries carrying commands, snapshots carried to
//! another node, and everything surviving a restart.

use std::time::Duration;

use dflockd_cluster::{Batch, BatchEffects, Entry, LogStore, StateMachine, Storage, TypeConfig};
use dflockd_core::{AcquireOutcome, Command, ConnId, Op, Outcome, ResourceId, Salt, TableConfig};
use dflockd_proto::{Key, Limit, Namespace};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite, log_id};
use openraft::{EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};
use tempfile::TempDir;

/// A fresh store in a temporary directory per suite case.
struct Fresh;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Fresh {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachine), openraft::StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Storage::open(&dir.path().join("raft.redb")).expect("open");
        let machine = storage
            .state_machine(TableConfig::default())
            .expect("state machine");
        Ok((dir, storage.log_store(), machine))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Fresh).expect("openraft storage suite");
}

fn acquire(conn: u64, key: &str) -> Command {
    Command::new(
        Duration::from_secs(1),
        Salt::new(conn, 7),
        Op::Acquire {
            conn: ConnId(conn),
            resource: ResourceId::new(Namespace::Lock, Key::new(key).unwrap()),
            limit: Limit::ONE,
            lease: None,
            wait: Some(conn),
            origin: None,
        },
    )
}

/// A batch of `commands`, taking office at their time if it is the first
/// of its term.
fn batch(commands: Vec<Command>) -> Batch {
    let at = commands.first().map_or(Duration::ZERO, |c| c.at);
    Batch {
        proposer: 1 << 32,
        office: Command::new(at, Salt::new(0xaa, 0xbb), Op::TakeOffice),
        commands,
    }
}

fn entry(index: u64, batch: Batch) -> Entry {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(batch),
    }
}

fn granted(effects: &BatchEffects, at: usize) -> bool {
    matches!(
        effects.commands[at].outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))
    )
}

#[tokio::test]
async fn batches_apply_in_order_and_snapshots_carry_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&dir.path().join("raft.redb")).unwrap();
    let mut machine = storage.state_machine(TableConfig::default()).unwrap();
    // One entry, three commands: a grant, a waiter queued behind it, another key.
    let first = batch(vec![acquire(1, "a"), acquire(2, "a"), acquire(3, "b")]);
    let answers = machine.apply([entry(1, first)]).await.unwrap();
    assert_eq!(answers.len(), 1);
    assert!(granted(&answers[0], 0));
    assert!(matches!(
        answers[0].commands[1].outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))
    ));
    assert!(granted(&answers[0], 2));
    assert_eq!(
        machine.view().read(dflockd_core::LockTable::holder_count),
        2
    );

    // A new node installs the snapshot and has the same table.
    let snapshot = machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Storage::open(&other_dir.path().join("raft.redb")).unwrap();
    let mut copy = other.state_machine(TableConfig::default()).unwrap();
    copy.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(
        copy.view().read(|t| t.snapshot().encode()),
        machine.view().read(|t| t.snapshot().encode())
    );
    assert_eq!(copy.applied_state().await.unwrap().0, Some(log_id(1, 1, 1)));
    // And both go on to the same answers.
    let next = batch(vec![acquire(4, "b"), acquire(5, "c")]);
    let mine = machine.apply([entry(2, next.clone())]).await.unwrap();
    let theirs = copy.apply([entry(2, next)]).await.unwrap();
    assert_eq!(mine, theirs);
}

#[tokio::test]
async fn a_restarted_node_finds_its_log_vote_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let table_bytes;
    {
        let storage = Storage::open(&path).unwrap();
        let mut log = storage.log_store();
        let mut machine = storage.state_machine(TableConfig::default()).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        let entries = vec![
            entry(1, batch(vec![acquire(1, "a")])),
            entry(2, batch(vec![acquire(2, "b")])),
        ];
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, entries.clone())
            .await
            .unwrap();
        log.save_committed(Some(log_id(1, 1, 2))).await.unwrap();
        machine.apply(entries).await.unwrap();
        machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        table_bytes = machine.view().read(|t| t.snapshot().encode());
    }
    let storage = Storage::open(&path).unwrap();
    let mut log = storage.log_store();
    let mut machine = storage.state_machine(TableConfig::default()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 1, 2)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 2)));
    assert_eq!(log.try_get_log_entries(1..3).await.unwrap().len(), 2);
    assert_eq!(
        machine.applied_state().await.unwrap().0,
        Some(log_id(1, 1, 2))
    );
    assert_eq!(machine.view().read(|t| t.snapshot().encode()), table_bytes);
    // The fence counter came back with the table: the next grant's fence is
    // past both earlier ones.
    let answers = machine
        .apply([entry(3, batch(vec![acquire(3, "c")]))])
        .await
        .unwrap();
    let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = answers[0].commands[0].outcome
    else {
        panic!("not granted: {answers:?}");
    };
    assert_eq!(grant.token.fence(), 3);
}

#[tokio::test]
async fn an_older_snapshot_build_does_not_replace_a_newer_install() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&dir.path().join("raft.redb")).unwrap();
    let mut machine = storage.state_machine(TableConfig::default()).unwrap();
    machine
        .apply([entry(1, batch(vec![acquire(1, "a")]))])
        .await
        .unwrap();
    // A build of the state at index 1 starts (openraft runs it in a task).
    let mut old_build = machine.get_snapshot_builder().await;
    // Meanwhile the leader sends a snapshot at index 5, which is installed.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Storage::open(&other_dir.path().join("raft.redb")).unwrap();
    let mut leader = other.state_machine(TableConfig::default()).unwrap();
    let entries: Vec<Entry> = (1..=5)
        .map(|i| entry(i, batch(vec![acquire(i, &format!("k{i}"))])))
        .collect();
    leader.apply(entries).await.unwrap();
    let newer = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    machine
        .install_snapshot(&newer.meta, newer.snapshot)
        .await
        .unwrap();
    // The old build finishes last: the node keeps the newer snapshot.
    old_build.build_snapshot().await.unwrap();
    let current = machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 1, 5)));
}

/// A command at `secs` on the proposer's clock.
fn at(secs: u64, op: Op) -> Command {
    Command::new(Duration::from_secs(secs), Salt::new(secs, 3), op)
}

#[tokio::test]
async fn a_restarted_leader_of_the_same_term_takes_office_again() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&dir.path().join("raft.redb")).unwrap();
    let mut machine = storage.state_machine(TableConfig::default()).unwrap();
    let hold = |conn| Op::Acquire {
        conn: ConnId(conn),
        resource: ResourceId::new(Namespace::Lock, Key::new("k").unwrap()),
        limit: Limit::ONE,
        lease: Some(dflockd_proto::Lease::new(10).unwrap()),
        wait: None,
        origin: None,
    };
    // Process A of node 1 leads term 1 with its clock at 100 s: a 10 s lease.
    let first = Batch {
        proposer: (1 << 32) | 1,
        office: at(100, Op::TakeOffice),
        commands: vec![at(100, hold(1))],
    };
    let answers = machine.apply([entry(1, first)]).await.unwrap();
    assert!(granted(&answers[0], 0));
    // Node 1 restarts (process B) and is leader of term 1 again, its clock
    // back near 0. Its first entry takes office: the lease restarts in full
    // on B's clock instead of looking 90 s longer (or, on a later
    // leader's office, run out because B's times are small).
    let second = Batch {
        proposer: (1 << 32) | 2,
        office: at(1, Op::TakeOffice),
        commands: vec![at(1, Op::Sweep)],
    };
    let answers = machine.apply([entry(2, second)]).await.unwrap();
    assert!(answers[0].office.is_some(), "the new process took office");
    assert_eq!(
        machine.view().read(dflockd_core::LockTable::next_deadline),
        Some(Duration::from_secs(11))
    );
    // The same process again: no second office.
    let third = Batch {
        proposer: (1 << 32) | 2,
        office: at(2, Op::TakeOffice),
        commands: vec![at(2, Op::Sweep)],
    };
    let answers = machine.apply([entry(3, third)]).await.unwrap();
    assert!(answers[0].office.is_none());
}
