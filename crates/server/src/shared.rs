//! State shared by the listener, the connection tasks and the timers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, Command, ConnId, Delivery, Effects, FenceSource, Grant, LockError, LockTable,
    Op, Outcome, ResourceId, WaitOutcome, Waiting,
};
use dflockd_proto::Stats;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::TableClock;
use crate::config::ServerConfig;
use dflockd_cluster::Salts;

use crate::events::EventBus;
use crate::fence::ServerMint;
use crate::idle::Reaper;
use crate::metrics::Metrics;

/// The observers every table reports to: the metrics and the event stream.
#[derive(Default)]
pub(crate) struct Telemetry {
    pub(crate) metrics: Metrics,
    pub(crate) events: Arc<EventBus>,
}

/// How a waiting request is woken: its grant goes to its connection's
/// inbox, tagged with the request id.
pub(crate) struct Notify {
    pub(crate) id: u64,
    pub(crate) to: mpsc::UnboundedSender<MuxGrant>,
}

/// A grant for a waiting request of a connection: the request id, the
/// resource (so a grant nobody waits for any more can still be released)
/// and the grant.
pub(crate) type MuxGrant = (u64, ResourceId, Grant);

impl Notify {
    /// Hands the grant over; gives it back if the connection is gone.
    pub(crate) fn send(self, resource: &ResourceId, grant: Grant) -> Result<(), Grant> {
        self.to
            .send((self.id, resource.clone(), grant))
            .map_err(|e| e.0.2)
    }
}
/// One table of the server with what it takes to apply commands to it
/// right away: the single-node server's log, which applies each command as
/// it is proposed. A command gets the table clock's time (read under the
/// shard's lock, so times grow in the order commands apply) and fresh salts;
/// its grants for waiting requests are handed to the notifications those
/// requests registered, and a grant nobody takes is released again.
pub(crate) struct Shard<F = ServerMint> {
    table: LockTable<F>,
    salts: Salts,
    /// The time of the commands applied under the current lock.
    now: Duration,
    /// Where the grant of each waiting request goes.
    waiting: HashMap<Waiting, Notify>,
    /// Told of every command applied.
    telemetry: Arc<Telemetry>,
}

impl<F: FenceSource> Shard<F> {
    pub(crate) fn new(table: LockTable<F>, telemetry: Arc<Telemetry>) -> Shard<F> {
        Shard {
            table,
            salts: Salts::default(),
            now: Duration::ZERO,
            waiting: HashMap::new(),
            telemetry,
        }
    }

    /// The table, to read.
    pub(crate) fn table(&self) -> &LockTable<F> {
        &self.table
    }

    /// The time commands get under the current lock.
    pub(crate) fn now(&self) -> Duration {
        self.now
    }

    /// Sets the time the next commands get.
    pub(crate) fn set_now(&mut self, now: Duration) {
        self.now = now;
    }

    /// Applies `op` now and delivers the grants it made.
    pub(crate) fn run(&mut self, op: Op) -> Result<Outcome, LockError> {
        let effects = self.apply(op);
        self.deliver(effects.grants);
        effects.outcome
    }

    /// [`run`](Self::run) for a request that may wait: if it queued, the
    /// notification `notify` makes (called only then) is registered for
    /// `to`, before any grant can be made for it.
    pub(crate) fn run_waiting(
        &mut self,
        op: Op,
        to: Waiting,
        notify: impl FnOnce() -> Notify,
    ) -> Result<Outcome, LockError> {
        let effects = self.apply(op);
        if matches!(
            effects.outcome,
            Ok(Outcome::Acquire(AcquireOutcome::Queued(_))
                | Outcome::Wait(WaitOutcome::Pending(_)))
        ) {
            self.waiting.insert(to, notify());
        }
        self.deliver(effects.grants);
        effects.outcome
    }

    /// Withdraws a waiting request (`op` is a withdraw). `true` if it was
    /// still queued; then its notification is dropped. `false` if it was
    /// granted meanwhile: the grant is in its notification already.
    pub(crate) fn withdraw(&mut self, op: Op, of: Waiting) -> bool {
        let withdrawn = matches!(self.run(op), Ok(Outcome::Withdrawn(true)));
        if withdrawn {
            self.waiting.remove(&of);
        }
        withdrawn
    }

    /// A waiting request takes its grant: its lease restarts now (see
    /// [`Op::Observe`]).
    pub(crate) fn observe(&mut self, rid: &ResourceId, grant: Grant) -> Result<Grant, LockError> {
        let op = Op::Observe {
            resource: rid.clone(),
            token: grant.token,
            lease: grant.lease,
        };
        match self.run(op)? {
            Outcome::Observed(grant) => Ok(grant),
            _ => Err(LockError::NotHeld),
        }
    }

    /// Releases a grant that reached no request (see
    /// [`Op::ReleaseUndelivered`]).
    pub(crate) fn release_undelivered(&mut self, rid: &ResourceId, token: dflockd_proto::Token) {
        // Answers `Released` whether or not the grant was still held.
        let _ = self.run(Op::ReleaseUndelivered {
            resource: rid.clone(),
            token,
        });
    }

    /// A connection closed: its table state goes, and so do the
    /// notifications of its waiting requests.
    pub(crate) fn disconnect(&mut self, conn: ConnId, auto_release: bool) {
        if !self.waiting.is_empty() {
            self.waiting.retain(|to, _| to.conn != conn);
        }
        let _ = self.run(Op::Disconnect {
            conn,
            auto_release: Some(auto_release),
        });
    }

    fn apply(&mut self, op: Op) -> Effects {
        let command = Command::new(self.now, self.salts.next(), op);
        let effects = self.table.apply(&command);
        let (table, now) = (&self.table, self.now);
        crate::events::observe(
            &command.op,
            &effects,
            |rid| table.in_lock_delay(rid, now),
            &self.telemetry.metrics,
            &self.telemetry.events,
            false,
        );
        effects
    }

    /// Hands each grant to its request's notification. A grant whose
    /// request is gone is released, which may grant the next waiter:
    /// repeated until every grant found its request or was released.
    fn deliver(&mut self, mut grants: Vec<Delivery>) {
        while !grants.is_empty() {
            let mut released = Vec::new();
            for Delivery {
                to,
                resource,
                grant,
            } in grants
            {
                let sent = match self.waiting.remove(&to) {
                    Some(notify) => notify.send(&resource, grant),
                    None => Err(grant),
                };
                if let Err(grant) = sent {
                    let effects = self.apply(Op::ReleaseUndelivered {
                        resource,
                        token: grant.token,
                    });
                    released.extend(effects.grants);
                }
            }
            grants = released;
        }
    }
}

/// How many tables the keys are split over. Each has its own lock, so
/// requests on different keys rarely wait for each other, and above all not
/// for a thread the kernel preempted while it held the lock (with one table
/// that stall reached every connection and showed in the server's p99).
/// With 64, two busy threads rarely want the same table, an idle table
/// costs a few hundred bytes, and a connection's set of tables fits a
/// [`ShardSet`].
pub(crate) const SHARDS: usize = 64;
const _: () = assert!(SHARDS <= u64::BITS as usize, "a ShardSet is one u64");

/// The tables a connection has used (a bit per shard), so that its
/// disconnect visits only those. Kept by the connection's log, whose drop
/// runs the disconnect however the connection's task ends.
#[derive(Debug, Default)]
pub(crate) struct ShardSet(AtomicU64);

impl ShardSet {
    pub(crate) fn insert(&self, shard: usize) {
        let bit = 1u64 << shard;
        // Almost always set already: a load, not a read-modify-write.
        if self.0.load(Ordering::Relaxed) & bit == 0 {
            self.0.fetch_or(bit, Ordering::Relaxed);
        }
    }

    fn bits(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One value on cache lines of its own: two threads locking neighbouring
/// tables then never move each other's lines (128 bytes, since x86 fetches
/// lines in adjacent pairs).
#[repr(align(128))]
struct CacheAligned<T>(T);

impl<T> std::ops::Deref for CacheAligned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    /// The lock table, split by key (see [`SHARDS`]).
    shards: Box<[CacheAligned<Mutex<Shard>>]>,
    /// The tables' clock.
    clock: TableClock,
    next_conn: AtomicU64,
    connections: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Cancelled when the server starts draining (SIGTERM).
    pub(crate) drain: CancellationToken,
    /// The same fact as a plain flag, for the per-request check (a token's
    /// `is_cancelled` takes a lock).
    draining: AtomicBool,
    /// Signalled when a disconnect starts a lock-delay (wakes the timers).
    pub(crate) delay_started: tokio::sync::Notify,
    /// Cancelled when remaining connections must be closed at once.
    pub(crate) kill: CancellationToken,
    /// Read deadlines of all connections.
    pub(crate) reaper: Arc<Reaper>,
    /// Metrics and the event stream.
    pub(crate) telemetry: Arc<Telemetry>,
    /// Open HTTP sessions (each is also one of [`Self::connections`]).
    pub(crate) http_sessions: AtomicUsize,
}

impl Shared {
    /// A server state whose [`SHARDS`] tables come from `shard`; they must
    /// share one fence counter and one resource budget, and count time on
    /// `clock` (with its granularity in their configuration).
    pub(crate) fn new(
        config: ServerConfig,
        clock: TableClock,
        telemetry: Arc<Telemetry>,
        shard: impl FnMut() -> LockTable<ServerMint>,
    ) -> Shared {
        Shared {
            reaper: Arc::new(Reaper::new(config.read_timeout)),
            config,
            shards: std::iter::repeat_with(shard)
                .take(SHARDS)
                .map(|table| CacheAligned(Mutex::new(Shard::new(table, Arc::clone(&telemetry)))))
                .collect(),
            telemetry,
            http_sessions: AtomicUsize::new(0),
            clock,
            next_conn: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            drain: CancellationToken::new(),
            draining: AtomicBool::new(false),
            kill: CancellationToken::new(),
            delay_started: tokio::sync::Notify::new(),
        }
    }

    /// Runs `f` on the table that holds `rid` (see [`Self::with_table`]).
    pub(crate) fn with_shard<R>(&self, rid: &ResourceId, f: impl FnOnce(&mut Shard) -> R) -> R {
        self.with_shard_at(self.shard_of(rid), f)
    }

    /// Releases a grant that reached no request (see
    /// [`Op::ReleaseUndelivered`]).
    pub(crate) fn release_undelivered(&self, rid: &ResourceId, token: dflockd_proto::Token) {
        self.with_shard(rid, |shard| shard.release_undelivered(rid, token));
    }

    /// Which table holds `rid`.
    pub(crate) fn shard_of(&self, rid: &ResourceId) -> usize {
        rid.shard(self.shards.len())
    }

    /// Runs `f` on table `shard` (see [`Self::with_table`]).
    pub(crate) fn with_shard_at<R>(&self, shard: usize, f: impl FnOnce(&mut Shard) -> R) -> R {
        Self::with_table(&self.shards[shard], &self.clock, f)
    }

    /// Runs `f` on each table in `set`, one lock at a time.
    pub(crate) fn each_shard_in(&self, set: &ShardSet, mut f: impl FnMut(&mut Shard)) {
        let bits = set.bits();
        for (index, shard) in self.shards.iter().enumerate() {
            if bits & (1 << index) != 0 {
                Self::with_table(shard, &self.clock, &mut f);
            }
        }
    }

    /// Runs `f` on every table in turn, one lock at a time (so never two
    /// locks at once, and no lock order to get wrong).
    pub(crate) fn each_shard(&self, mut f: impl FnMut(&mut Shard)) {
        for shard in self.shards.iter() {
            Self::with_table(shard, &self.clock, &mut f);
        }
    }

    /// The `stats` document, table by table: each table's part is
    /// consistent, but the tables are read one after another, not at one
    /// instant.
    pub(crate) fn stats(&self) -> Stats {
        let connections = self.connections() as u64;
        let mut all = Stats {
            connections,
            ..Stats::default()
        };
        self.each_shard(|shard| {
            let part = shard.table().stats(connections, shard.now());
            all.locks.extend(part.locks);
            all.semaphores.extend(part.semaphores);
            all.idle_locks.extend(part.idle_locks);
            all.idle_semaphores.extend(part.idle_semaphores);
        });
        all
    }

    /// How many waiters connection `conn` has queued, over the tables it
    /// has used.
    pub(crate) fn waiters_of(&self, conn: ConnId, used: &ShardSet) -> usize {
        let mut total = 0;
        self.each_shard_in(used, |shard| total += shard.table().waiters_of(conn));
        total
    }

    /// The earliest end of a lock-delay, over all tables.
    pub(crate) fn next_delay_end(&self) -> Option<Duration> {
        let mut earliest: Option<Duration> = None;
        self.each_shard(|shard| {
            if let Some(end) = shard.table().next_delay_end() {
                earliest = Some(earliest.map_or(end, |e| e.min(end)));
            }
        });
        earliest
    }

    /// Runs `f` on one shard, locked, with the current time.
    fn with_table<R>(
        shard: &Mutex<Shard>,
        clock: &TableClock,
        f: impl FnOnce(&mut Shard) -> R,
    ) -> R {
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        shard.set_now(clock.now());
        f(&mut shard)
    }

    /// A runtime instant by which the tables' clock has reached `time`.
    pub(crate) fn instant_after(&self, time: Duration) -> Instant {
        self.clock.instant_after(time)
    }

    /// Admits a new connection if the caps allow it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let max = self.config.max_connections;
        // HTTP sessions are counted among the connections but capped by
        // the session caps, not this one.
        let http = self.http_sessions.load(Ordering::Acquire);
        let admitted = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n.saturating_sub(http) < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        let per_ip_max = self.config.max_connections_per_ip;
        if per_ip_max > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= per_ip_max {
                drop(per_ip);
                self.connections.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *count += 1;
        }
        let id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        Some(ConnGuard {
            shared: Arc::clone(self),
            ip: Some(ip),
            id,
        })
    }

    /// Admits an HTTP session's in-process connection: counted among the
    /// connections, but under the session caps rather than the
    /// connection caps.
    pub(crate) fn admit_http(self: &Arc<Self>) -> ConnGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        self.http_sessions.fetch_add(1, Ordering::AcqRel);
        let id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        ConnGuard {
            shared: Arc::clone(self),
            ip: None,
            id,
        }
    }

    /// Starts the drain.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    /// Whether the drain has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// One admitted connection; dropping it frees its cap slots.
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    /// The peer's address; `None` for an HTTP session (counted in
    /// [`Shared::http_sessions`] instead).
    ip: Option<IpAddr>,
    pub(crate) id: ConnId,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let Some(ip) = self.ip else {
            self.shared.http_sessions.fetch_sub(1, Ordering::AcqRel);
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        if self.shared.config.max_connections_per_ip > 0 {
            let mut per_ip = self
                .shared
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}
