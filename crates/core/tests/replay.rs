//! The table as a replicated state machine: a log of commands applied to
//! two tables gives byte-identical snapshots and identical effects, and a
//! table restored from a snapshot of a prefix, given the rest of the log,
//! ends where the whole log ends.
//!
//! The commands come from random scripts whose steps name earlier results
//! (the n-th token seen, the n-th queue place) rather than values, so they
//! keep hitting live holders and waiters: grants, promotions, withdrawals,
//! two-phase waits, renewals of live and expired leases, disconnects with
//! and without auto-release, lock-delays, sweeps, GC and policy changes,
//! named sessions taken over by other connections, orphaned and expired.

use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, Command, ConnId, Effects, FenceCounter, LockTable, Op, Outcome, Policy,
    ResourceId, Salt, TableConfig, TableSnapshot, WaiterId,
};
use dflockd_proto::{Key, Lease, Limit, Namespace, Token};
use proptest::prelude::*;

/// Resources: two locks and two semaphores (limits 2 and 3).
fn resource(index: u8) -> (ResourceId, Limit) {
    match index % 4 {
        0 => (lock("a"), Limit::ONE),
        1 => (lock("b"), Limit::ONE),
        2 => (semaphore("s"), Limit::new(2).unwrap()),
        _ => (semaphore("t"), Limit::new(3).unwrap()),
    }
}

fn lock(key: &str) -> ResourceId {
    ResourceId::new(Namespace::Lock, Key::new(key).unwrap())
}

fn semaphore(key: &str) -> ResourceId {
    ResourceId::new(Namespace::Semaphore, Key::new(key).unwrap())
}

/// One step of a script; numbers pick among what earlier steps produced.
#[derive(Debug, Clone)]
enum Step {
    Acquire {
        conn: u8,
        res: u8,
        lease: u8,
        wait: bool,
    },
    Enqueue {
        conn: u8,
        res: u8,
        ticket: u8,
    },
    Wait {
        conn: u8,
        res: u8,
        ticket: u8,
        wait: bool,
    },
    Release {
        nth: u8,
    },
    Undelivered {
        nth: u8,
    },
    Renew {
        nth: u8,
        lease: u8,
    },
    Observe {
        nth: u8,
    },
    Withdraw {
        nth: u8,
    },
    WithdrawPlace {
        conn: u8,
        res: u8,
        ticket: u8,
    },
    /// `reuse`: the id names a connection again afterwards.
    Disconnect {
        conn: u8,
        auto_release: Option<bool>,
        reuse: bool,
    },
    Advance {
        millis: u16,
    },
    Sweep,
    EndDelays,
    Gc,
    /// A new leader, whose clock reads `secs` (earlier or later).
    TakeOffice {
        secs: u8,
    },
    Policy {
        max_waiters: u8,
        delay_ms: u16,
        auto_release: bool,
        orphan_ms: u16,
    },
    /// Connection slot `conn` names session `name` (taking over whatever
    /// another connection of that name has).
    Bind {
        conn: u8,
        name: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..4u8, any::<u8>(), 1..6u8, any::<bool>())
            .prop_map(|(conn, res, lease, wait)| Step::Acquire { conn, res, lease, wait }),
        3 => (0..4u8, any::<u8>(), 0..2u8).prop_map(|(conn, res, ticket)| Step::Enqueue { conn, res, ticket }),
        3 => (0..4u8, any::<u8>(), 0..2u8, any::<bool>())
            .prop_map(|(conn, res, ticket, wait)| Step::Wait { conn, res, ticket, wait }),
        4 => any::<u8>().prop_map(|nth| Step::Release { nth }),
        1 => any::<u8>().prop_map(|nth| Step::Undelivered { nth }),
        3 => (any::<u8>(), 1..6u8).prop_map(|(nth, lease)| Step::Renew { nth, lease }),
        1 => any::<u8>().prop_map(|nth| Step::Observe { nth }),
        2 => any::<u8>().prop_map(|nth| Step::Withdraw { nth }),
        1 => (0..4u8, any::<u8>(), 0..2u8)
            .prop_map(|(conn, res, ticket)| Step::WithdrawPlace { conn, res, ticket }),
        2 => (0..4u8, proptest::option::of(any::<bool>()), any::<bool>())
            .prop_map(|(conn, auto_release, reuse)| Step::Disconnect { conn, auto_release, reuse }),
        4 => (0..4_000u16).prop_map(|millis| Step::Advance { millis }),
        2 => Just(Step::Sweep),
        1 => Just(Step::EndDelays),
        1 => Just(Step::Gc),
        1 => (0..20u8).prop_map(|secs| Step::TakeOffice { secs }),
        1 => (0..3u8, prop_oneof![Just(0u16), Just(1_500)], any::<bool>(), prop_oneof![Just(0u16), Just(2_500)])
            .prop_map(|(max_waiters, delay_ms, auto_release, orphan_ms)| Step::Policy { max_waiters, delay_ms, auto_release, orphan_ms }),
        2 => (0..4u8, 0..3u8).prop_map(|(conn, name)| Step::Bind { conn, name }),
    ]
}

/// Turns a script into commands, applying each as it goes to learn the
/// tokens and queue places later steps pick from.
struct Scripter {
    table: LockTable,
    now: Duration,
    /// Connection ids in use for the four connection slots (a disconnect
    /// moves its slot to a new id).
    conns: [u64; 4],
    next_conn: u64,
    next_request: u64,
    tokens: Vec<(ResourceId, Token, Lease)>,
    waiters: Vec<(ConnId, ResourceId, WaiterId)>,
    log: Vec<Command>,
    effects: Vec<Effects>,
}

impl Scripter {
    fn new(config: TableConfig) -> Scripter {
        Scripter {
            table: LockTable::with_fences(config, FenceCounter::starting_after(1_000)),
            now: Duration::ZERO,
            conns: [1, 2, 3, 4],
            next_conn: 5,
            next_request: 0,
            tokens: Vec::new(),
            waiters: Vec::new(),
            log: Vec::new(),
            effects: Vec::new(),
        }
    }

    fn conn(&self, slot: u8) -> ConnId {
        ConnId(self.conns[slot as usize % 4])
    }

    fn pick<T: Clone>(list: &[T], nth: u8) -> Option<T> {
        (!list.is_empty()).then(|| list[nth as usize % list.len()].clone())
    }

    fn request(&mut self, wait: bool) -> Option<u64> {
        wait.then(|| {
            self.next_request += 1;
            self.next_request
        })
    }

    fn op(&mut self, step: &Step) -> Option<Op> {
        Some(match *step {
            Step::Acquire {
                conn,
                res,
                lease,
                wait,
            } => {
                let (resource, limit) = resource(res);
                Op::Acquire {
                    conn: self.conn(conn),
                    resource,
                    limit,
                    lease: Lease::new(u64::from(lease)).ok(),
                    wait: self.request(wait),
                    origin: None,
                }
            }
            Step::Enqueue { conn, res, ticket } => {
                let (resource, limit) = resource(res);
                Op::Enqueue {
                    conn: self.conn(conn),
                    ticket: u64::from(ticket),
                    resource,
                    limit,
                    lease: None,
                    origin: None,
                }
            }
            Step::Wait {
                conn,
                res,
                ticket,
                wait,
            } => Op::Wait {
                conn: self.conn(conn),
                ticket: u64::from(ticket),
                resource: resource(res).0,
                wait: self.request(wait),
                origin: None,
            },
            Step::Release { nth } => {
                let (resource, token, _) = Self::pick(&self.tokens, nth)?;
                Op::Release { resource, token }
            }
            Step::Undelivered { nth } => {
                let (resource, token, _) = Self::pick(&self.tokens, nth)?;
                Op::ReleaseUndelivered { resource, token }
            }
            Step::Renew { nth, lease } => {
                let (resource, token, _) = Self::pick(&self.tokens, nth)?;
                Op::Renew {
                    resource,
                    token,
                    lease: Lease::new(u64::from(lease)).ok(),
                }
            }
            Step::Observe { nth } => {
                let (resource, token, lease) = Self::pick(&self.tokens, nth)?;
                Op::Observe {
                    resource,
                    token,
                    lease,
                }
            }
            Step::Withdraw { nth } => {
                let (conn, resource, waiter) = Self::pick(&self.waiters, nth)?;
                Op::Withdraw {
                    conn,
                    resource,
                    waiter,
                }
            }
            Step::WithdrawPlace { conn, res, ticket } => Op::WithdrawPlace {
                conn: self.conn(conn),
                ticket: u64::from(ticket),
                resource: resource(res).0,
                waiter: None,
            },
            Step::Disconnect {
                conn,
                auto_release,
                reuse,
            } => {
                let id = self.conn(conn);
                if !reuse {
                    self.conns[conn as usize % 4] = self.next_conn;
                    self.next_conn += 1;
                }
                Op::Disconnect {
                    conn: id,
                    auto_release,
                }
            }
            Step::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                return None;
            }
            Step::Sweep => Op::Sweep,
            Step::TakeOffice { secs } => {
                self.now = Duration::from_secs(u64::from(secs));
                Op::TakeOffice
            }
            Step::EndDelays => Op::EndDelays,
            Step::Gc => Op::Gc,
            Step::Policy {
                max_waiters,
                delay_ms,
                auto_release,
                orphan_ms,
            } => Op::SetPolicy(Policy {
                max_waiters: usize::from(max_waiters),
                disconnect_lock_delay: Duration::from_millis(u64::from(delay_ms)),
                auto_release,
                orphan_ttl: Duration::from_millis(u64::from(orphan_ms)),
                ..Policy::of(self.table.config())
            }),
            Step::Bind { conn, name } => Op::Bind {
                conn: self.conn(conn),
                reference: dflockd_proto::StableRef::new(&format!("session-{name}")).unwrap(),
            },
        })
    }

    fn run(&mut self, script: &[(Step, u64, u64)]) {
        for (step, first, rest) in script {
            let Some(op) = self.op(step) else {
                continue;
            };
            let command = Command::new(self.now, Salt::new(*first, *rest), op);
            let effects = self.table.apply(&command);
            self.learn(&command, &effects);
            self.log.push(command);
            self.effects.push(effects);
        }
    }

    fn learn(&mut self, command: &Command, effects: &Effects) {
        if let Op::Acquire { conn, resource, .. } = &command.op
            && let Ok(Outcome::Acquire(AcquireOutcome::Queued(waiter))) = effects.outcome
        {
            self.waiters.push((*conn, resource.clone(), waiter));
        }
        let granted = match (&command.op, effects.outcome.clone()) {
            (Op::Acquire { resource, .. }, Ok(Outcome::Acquire(AcquireOutcome::Granted(g)))) => {
                Some((resource.clone(), g))
            }
            (
                Op::Enqueue { resource, .. },
                Ok(Outcome::Enqueue(dflockd_core::EnqueueOutcome::Acquired(g))),
            ) => Some((resource.clone(), g)),
            _ => None,
        };
        if let Some((resource, grant)) = granted {
            self.tokens.push((resource, grant.token, grant.lease));
        }
        for d in &effects.grants {
            self.tokens
                .push((d.resource.clone(), d.grant.token, d.grant.lease));
        }
    }
}

fn config() -> impl Strategy<Value = TableConfig> {
    (
        0..3usize,
        prop_oneof![Just(0u64), Just(2_000)],
        any::<bool>(),
        prop_oneof![Just(3usize), Just(64)],
        prop_oneof![Just(0u64), Just(1_500)],
    )
        .prop_map(
            |(max_waiters, delay_ms, auto_release, max_locks, orphan_ms)| TableConfig {
                default_lease: Lease::new(3).unwrap(),
                max_locks,
                max_waiters,
                gc_max_idle: Duration::from_secs(2),
                disconnect_lock_delay: Duration::from_millis(delay_ms),
                clock_granularity: Duration::from_millis(4),
                auto_release,
                orphan_ttl: Duration::from_millis(orphan_ms),
            },
        )
}

fn script() -> impl Strategy<Value = Vec<(Step, u64, u64)>> {
    proptest::collection::vec((step(), any::<u64>(), any::<u64>()), 1..160)
}

/// Applies `log` to a fresh table like `scripter`'s.
fn replay(config: TableConfig, log: &[Command]) -> (LockTable, Vec<Effects>) {
    let mut table = LockTable::with_fences(config, FenceCounter::starting_after(1_000));
    let effects = log.iter().map(|c| table.apply(c)).collect();
    (table, effects)
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// (a) The same log on two tables: byte-identical snapshots after
    /// every command, and the same effects.
    #[test]
    fn replay_gives_identical_snapshots_and_effects(config in config(), script in script()) {
        let mut original = Scripter::new(config);
        original.run(&script);
        let mut copy = LockTable::with_fences(config, FenceCounter::starting_after(1_000));
        let mut shadow = LockTable::with_fences(config, FenceCounter::starting_after(1_000));
        for (i, command) in original.log.iter().enumerate() {
            // Each command also survives its own encoding.
            let decoded = Command::decode(&command.encode()).unwrap();
            prop_assert_eq!(&decoded, command);
            let effects = copy.apply(&decoded);
            prop_assert_eq!(&effects, &original.effects[i], "effects of command {} differ", i);
            let _ = shadow.apply(command);
            prop_assert_eq!(copy.snapshot().encode(), shadow.snapshot().encode(), "after command {}", i);
        }
        prop_assert_eq!(copy.snapshot().encode(), original.table.snapshot().encode());
    }

    /// (b) restore(snapshot of a prefix) + the suffix = the whole log: same
    /// snapshot bytes at the end and the same effects on the way.
    #[test]
    fn snapshot_then_suffix_matches_whole_log(config in config(), script in script(), cut in any::<prop::sample::Index>()) {
        let mut original = Scripter::new(config);
        original.run(&script);
        let cut = cut.index(original.log.len() + 1);
        let (prefix, _) = replay(config, &original.log[..cut]);
        let bytes = prefix.snapshot().encode();
        let snapshot = TableSnapshot::decode(&bytes).unwrap();
        let mut restored = LockTable::restore(&snapshot).unwrap();
        prop_assert_eq!(restored.snapshot().encode(), bytes);
        for (i, command) in original.log.iter().enumerate().skip(cut) {
            let effects = restored.apply(command);
            prop_assert_eq!(&effects, &original.effects[i], "effects of command {} differ after restore at {}", i, cut);
        }
        prop_assert_eq!(restored.snapshot().encode(), original.table.snapshot().encode());
    }
}

/// The invariants of a snapshot at every step of a random log: no resource
/// over its limit, fences only grow, no token held twice (checked through
/// the restore, which refuses a snapshot that breaks them).
#[test]
fn snapshots_of_random_logs_restore_cleanly() {
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&(config(), script()), |(config, script)| {
            let mut s = Scripter::new(config);
            let mut last_fence = 0;
            for item in script {
                s.run(std::slice::from_ref(&item));
                let snapshot = s.table.snapshot();
                prop_assert!(snapshot.last_fence() >= last_fence, "the fence went back");
                last_fence = snapshot.last_fence();
                let restored = LockTable::restore(&snapshot);
                prop_assert!(restored.is_ok(), "{:?}", restored.err());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_snapshot_from_another_version_is_refused() {
    let mut bytes = LockTable::new(TableConfig::default()).snapshot().encode();
    bytes[0] = dflockd_core::FORMAT_VERSION + 1;
    assert_eq!(
        TableSnapshot::decode(&bytes),
        Err(dflockd_core::DecodeError::UnknownVersion(
            dflockd_core::FORMAT_VERSION + 1
        ))
    );
    // A truncated log entry is refused, not misread.
    let command = Command::new(
        Duration::from_secs(1),
        Salt::new(1, 2),
        Op::Release {
            resource: lock("a"),
            token: Token::new(7, 9),
        },
    );
    let bytes = command.encode();
    assert!(Command::decode(&bytes[..bytes.len() - 1]).is_err());
    // A key that breaks the protocol's rules is refused on the way in.
    let bad = command
        .encode()
        .iter()
        .map(|&b| if b == b'a' { b' ' } else { b })
        .collect::<Vec<_>>();
    assert!(matches!(
        Command::decode(&bad),
        Err(dflockd_core::DecodeError::Malformed(_))
    ));
}

/// A connection id used again after its disconnect without auto-release:
/// the old lease stays on its own, the new ones in the id's new ring, and
/// the snapshot of that state restores (it once refused it as a stray).
#[test]
fn a_snapshot_restores_a_reused_connection_id() {
    let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(secs, secs), op);
    let acquire = |key: &str| Op::Acquire {
        conn: ConnId(1),
        resource: lock(key),
        limit: Limit::ONE,
        lease: None,
        wait: None,
        origin: None,
    };
    let mut table = LockTable::new(TableConfig::default());
    let log = [
        at(0, acquire("a")),
        at(
            1,
            Op::Disconnect {
                conn: ConnId(1),
                auto_release: Some(false),
            },
        ),
        at(2, acquire("b")),
    ];
    for command in &log {
        let _ = table.apply(command);
    }
    assert_eq!(table.holder_count(), 2);
    let restored = LockTable::restore(&table.snapshot()).expect("restores");
    assert_eq!(restored.snapshot().encode(), table.snapshot().encode());
    // And both go on alike: a second disconnect with auto-release frees
    // only the newer hold.
    let mut restored = restored;
    let close = at(
        3,
        Op::Disconnect {
            conn: ConnId(1),
            auto_release: Some(true),
        },
    );
    assert_eq!(restored.apply(&close), table.apply(&close));
    assert_eq!(table.holder_count(), 1);
    assert_eq!(restored.snapshot().encode(), table.snapshot().encode());
}
