//! `LeaseSupervisor`: one actor per client renews every lease from one
//! table and one timer queue.
//!
//! Per lease it keeps two instants on the monotonic clock: when to renew
//! (≈ ttl × ratio, jittered early, capped) and the local expiry (measured from
//! the moment the last successful grant or renew request was *sent*, minus a
//! margin). Transient renew failures are retried until the local expiry; a
//! definitive refusal, a closed connection the lease is bound to, or the
//! local expiry passing marks the lease lost: its guard is cancelled and its
//! owner actor, if any, is told.
//!
//! Built to hold 100 000 leases cheaply (see `crates/client/benches/scale.rs`):
//!
//! * Timers live in a wheel of 10 ms slots (a heap only for the rare timer
//!   beyond its 41 s horizon) driven by one `Sleep`. Each lease has at most
//!   one live timer; re-arming leaves the old one behind, recognised as stale
//!   because the lease records the slot of its live timer.
//! * Renew times are rounded down to a slot, so renewals falling due
//!   together go out together: one message per server per wake-up carries
//!   the batch to the server actor, whose lane writes it in one go. Checks of
//!   the local expiry are rounded up, never early.
//! * Renew replies come back straight from the lane's reader over one
//!   channel — no task, oneshot or actor message per renewal — and are
//!   handled in batches.
//! * While a batch of renewals is in flight, one record per batch (not a
//!   timer per lease) watches the earliest local expiry among them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request, Token};
use kameo::error::{Infallible, SendError};
use kameo::mailbox::{MailboxReceiver, Signal};
use kameo::prelude::*;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::lane::LaneId;
use crate::lease::{LeaseLost, LeaseShared, LossReason};
use crate::server_conn::{Renewals, ServerConn};

/// A lease longer than this is simply re-checked this often.
const MAX_TIMER: Duration = Duration::from_secs(3600);
/// Width of a timer-wheel slot. Renewals are sent up to this much early so
/// that those falling due together share a batch; expiry checks may run up
/// to this much late (the local expiry already has a margin of ttl/10, at
/// most 1 s, before the server's).
const SLOT_MS: u64 = 10;
/// Slots in the wheel: a horizon of 40.96 s.
const SLOTS: u64 = 4096;
/// A wheel slot keeps at most this much capacity once drained.
const KEEP_SLOT_CAPACITY: usize = 64;
/// Chunks of renew replies (each what a lane read at once) taken from the
/// channel per wake-up.
const REPLY_BATCH: usize = 64;
/// `Entry::timer` of a lease with no live timer.
const NO_TIMER: u64 = u64::MAX;
/// `Entry::batch` of a lease with no renewal in flight.
const NO_BATCH: u32 = 0;

/// Identity of one tracked lease; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LeaseId(pub(crate) u64);

/// Hasher for the lease table: lease ids are a counter, so their low bits
/// already spread perfectly over the buckets; the high bits (hashbrown's
/// tag) are mixed in by a multiply. Far cheaper than SipHash, and the ids
/// are never chosen by a peer.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        (self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) & 0xFFFF_FFFF_0000_0000)
            | (self.0 & 0xFFFF_FFFF)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<LeaseId, V, BuildHasherDefault<IdHasher>>;
type IdSet = HashSet<LeaseId, BuildHasherDefault<IdHasher>>;

/// Renewal policy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RenewPolicy {
    /// Renew after ttl × ratio.
    pub(crate) ratio: f64,
    /// Never wait longer than this between renewals.
    pub(crate) max_interval: Duration,
    /// First retry delay after a transient failure.
    pub(crate) retry: Duration,
}

impl RenewPolicy {
    fn interval(&self, ttl: Duration) -> Duration {
        // Jitter early only: 90–100 % of the nominal interval.
        let nominal = ttl.mul_f64(self.ratio).min(self.max_interval);
        nominal
            .mul_f64(0.9 + 0.1 * fastrand::f64())
            .max(Duration::from_millis(10))
    }

    /// Safety margin subtracted from every local expiry.
    pub(crate) fn margin(ttl: Duration) -> Duration {
        (ttl / 10).min(Duration::from_secs(1))
    }
}

/// One tracked lease. Kept small: the table holds one per lease.
struct Entry {
    key: Key,
    token: Token,
    shared: Arc<LeaseShared>,
    local_expiry: Instant,
    lane: LaneId,
    /// Slot of this lease's one live timer, or `NO_TIMER`.
    timer: u64,
    /// The lease length to ask for on renewal (`None`: the server default).
    lease: Option<dflockd_proto::Lease>,
    /// The lease length the server last applied, in seconds (the protocol
    /// only speaks whole seconds).
    ttl_secs: u32,
    server: u32,
    /// The batch of the renewal in flight, or `NO_BATCH`.
    batch: u32,
    namespace: Namespace,
}

impl Entry {
    fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs))
    }
}

fn ttl_secs(ttl: Duration) -> u32 {
    // Round up (a sub-second ttl only comes from odd servers) and saturate:
    // 136 years is as good as forever here.
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Where the lanes hand renew replies: every reply read at once, together.
pub(crate) type RenewSink = mpsc::UnboundedSender<Vec<RenewReply>>;

/// Identifies one renew request in flight, to match its reply.
pub(crate) struct RenewTag {
    id: LeaseId,
    batch: u32,
    sent_at: Instant,
}

impl RenewTag {
    /// Pairs the tag with the outcome of its request.
    pub(crate) fn reply(self, result: Result<Reply, Error>) -> RenewReply {
        RenewReply {
            id: self.id,
            batch: self.batch,
            sent_at: self.sent_at,
            result,
        }
    }
}

/// Result of a renew request.
pub(crate) struct RenewReply {
    id: LeaseId,
    batch: u32,
    sent_at: Instant,
    result: Result<Reply, Error>,
}

/// Renew requests for one server, encoded back to back, with a tag per
/// request in the same order and the sink for their replies.
pub(crate) struct RenewBatch {
    wire: Vec<u8>,
    tags: Vec<RenewTag>,
    sink: RenewSink,
}

impl RenewBatch {
    fn new(sink: RenewSink) -> RenewBatch {
        RenewBatch {
            wire: Vec::new(),
            tags: Vec::new(),
            sink,
        }
    }

    pub(crate) fn into_parts(self) -> (Vec<u8>, Vec<RenewTag>, RenewSink) {
        (self.wire, self.tags, self.sink)
    }

    /// None of these requests will be answered.
    pub(crate) fn fail(self, error: Error) {
        let replies = self
            .tags
            .into_iter()
            .map(|tag| tag.reply(Err(error.clone())))
            .collect();
        let _ = self.sink.send(replies);
    }
}

/// Renewals sent in one wake-up, while any is unanswered.
struct Batch {
    id: u32,
    /// The earliest local expiry among them: check them then.
    deadline: Instant,
    ids: Vec<LeaseId>,
    outstanding: usize,
}

/// Timer wheel keyed by slot number (`SLOT_MS` since the epoch).
struct Wheel {
    slots: Vec<Vec<LeaseId>>,
    /// Timers beyond the horizon: `(slot, id)`.
    far: BinaryHeap<Reverse<(u64, u64)>>,
    /// The first slot not yet expired.
    cursor: u64,
    /// No timer sits in a slot before this one (a search hint).
    first: u64,
    len: usize,
}

impl Wheel {
    fn new() -> Wheel {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            far: BinaryHeap::new(),
            cursor: 0,
            first: 0,
            len: 0,
        }
    }

    /// Files `id` under `slot` (a past slot counts as the current one) and
    /// returns the slot it went to.
    fn insert(&mut self, slot: u64, id: LeaseId) -> u64 {
        let slot = slot.max(self.cursor);
        if slot - self.cursor < SLOTS {
            self.slots[(slot % SLOTS) as usize].push(id);
            self.len += 1;
            self.first = self.first.min(slot);
        } else {
            self.far.push(Reverse((slot, id.0)));
        }
        slot
    }

    /// The earliest slot holding a timer (possibly stale).
    fn next_slot(&mut self) -> Option<u64> {
        let near = if self.len > 0 {
            let from = self.first.max(self.cursor);
            let found =
                (from..self.cursor + SLOTS).find(|s| !self.slots[(s % SLOTS) as usize].is_empty());
            if let Some(slot) = found {
                self.first = slot;
            }
            found
        } else {
            None
        };
        let far = self.far.peek().map(|Reverse((slot, _))| *slot);
        match (near, far) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves every timer of slots up to `now` into `due`, as `(slot, id)`.
    fn expire(&mut self, now: u64, due: &mut Vec<(u64, LeaseId)>) {
        if now < self.cursor {
            return;
        }
        let last = now.min(self.cursor + SLOTS - 1);
        for slot in self.cursor..=last {
            let bucket = &mut self.slots[(slot % SLOTS) as usize];
            if !bucket.is_empty() {
                self.len -= bucket.len();
                if bucket.capacity() > KEEP_SLOT_CAPACITY {
                    // Give a big batch's memory back rather than keep it in
                    // every slot the wheel turns through.
                    due.extend(std::mem::take(bucket).into_iter().map(|id| (slot, id)));
                } else {
                    due.extend(bucket.drain(..).map(|id| (slot, id)));
                }
            }
        }
        self.cursor = now + 1;
        self.first = self.first.max(self.cursor);
        while let Some(&Reverse((slot, id))) = self.far.peek() {
            if slot >= self.cursor + SLOTS {
                break;
            }
            self.far.pop();
            if slot <= now {
                due.push((slot, LeaseId(id)));
            } else {
                self.slots[(slot % SLOTS) as usize].push(LeaseId(id));
                self.len += 1;
                self.first = self.first.min(slot);
            }
        }
    }
}

pub(crate) struct SupervisorArgs {
    pub(crate) servers: Vec<ActorRef<ServerConn>>,
    pub(crate) policy: RenewPolicy,
    /// Incremented for every renew request handed to a server actor.
    pub(crate) renewals: Arc<AtomicU64>,
}

pub(crate) struct LeaseSupervisor {
    servers: Vec<ActorRef<ServerConn>>,
    policy: RenewPolicy,
    leases: IdMap<Entry>,
    /// Owner actors to tell of a loss (few leases have one: kept apart to
    /// keep `Entry` small).
    owners: IdMap<Recipient<LeaseLost>>,
    by_lane: HashMap<LaneId, IdSet>,
    wheel: Wheel,
    epoch: Instant,
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` is set to fire, if at all.
    sleep_at: Option<Instant>,
    /// Batches with renewals in flight, oldest first, ids ascending.
    inflight: VecDeque<Batch>,
    next_batch: u32,
    /// Renewals collected during one wake-up, per server.
    outbox: Vec<RenewBatch>,
    /// Leases renewed during one wake-up, and the earliest of their local
    /// expiries.
    sending: Vec<LeaseId>,
    sending_deadline: Option<Instant>,
    due: Vec<(u64, LeaseId)>,
    replies_tx: RenewSink,
    replies_rx: mpsc::UnboundedReceiver<Vec<RenewReply>>,
    reply_buf: Vec<Vec<RenewReply>>,
    renewals: Arc<AtomicU64>,
}

impl Actor for LeaseSupervisor {
    type Args = SupervisorArgs;
    type Error = Infallible;

    async fn on_start(args: SupervisorArgs, _: ActorRef<Self>) -> Result<Self, Infallible> {
        let epoch = Instant::now();
        let (replies_tx, replies_rx) = mpsc::unbounded_channel();
        Ok(LeaseSupervisor {
            outbox: args
                .servers
                .iter()
                .map(|_| RenewBatch::new(replies_tx.clone()))
                .collect(),
            servers: args.servers,
            policy: args.policy,
            leases: IdMap::default(),
            owners: IdMap::default(),
            by_lane: HashMap::new(),
            wheel: Wheel::new(),
            epoch,
            sleep: Box::pin(tokio::time::sleep_until(epoch)),
            sleep_at: None,
            inflight: VecDeque::new(),
            next_batch: NO_BATCH,
            sending: Vec::new(),
            sending_deadline: None,
            due: Vec::new(),
            replies_tx,
            replies_rx,
            reply_buf: Vec::with_capacity(REPLY_BATCH),
            renewals: args.renewals,
        })
    }

    async fn next(
        &mut self,
        _: WeakActorRef<Self>,
        mailbox: &mut MailboxReceiver<Self>,
    ) -> Result<Option<Signal<Self>>, Infallible> {
        loop {
            tokio::select! {
                // Replies and timers first: a busy mailbox must not starve
                // renewals.
                biased;
                // Never 0: the supervisor holds a sender itself.
                _ = self.replies_rx.recv_many(&mut self.reply_buf, REPLY_BATCH) => {
                    self.on_replies();
                }
                () = self.sleep.as_mut(), if self.sleep_at.is_some() => {
                    self.on_timers();
                }
                signal = mailbox.recv() => return Ok(signal),
            }
        }
    }
}

impl LeaseSupervisor {
    fn slot_floor(&self, at: Instant) -> u64 {
        let ms = at.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(ms / u128::from(SLOT_MS)).unwrap_or(NO_TIMER - 1)
    }

    fn slot_ceil(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        let slot_nanos = u128::from(SLOT_MS) * 1_000_000;
        u64::try_from(nanos.div_ceil(slot_nanos)).unwrap_or(NO_TIMER - 1)
    }

    fn slot_start(&self, slot: u64) -> Instant {
        self.epoch + Duration::from_millis(slot.saturating_mul(SLOT_MS))
    }

    /// Arms the lease's one timer for a renewal at about `at` (up to one
    /// slot early, so that renewals batch up).
    fn arm_renew(&mut self, id: LeaseId, at: Instant, now: Instant) {
        let slot = self.slot_floor(at.min(now + MAX_TIMER));
        self.arm_slot(id, slot);
    }

    /// Arms the lease's one timer for a check at `at`, never earlier.
    fn arm_check(&mut self, id: LeaseId, at: Instant, now: Instant) {
        let slot = self.slot_ceil(at.min(now + MAX_TIMER));
        self.arm_slot(id, slot);
    }

    fn arm_slot(&mut self, id: LeaseId, slot: u64) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        let slot = slot.max(self.wheel.cursor);
        if entry.timer == slot {
            return;
        }
        entry.timer = self.wheel.insert(slot, id);
    }

    /// Points the sleep at the earliest timer or in-flight deadline.
    fn rearm_sleep(&mut self) {
        let wheel = self.wheel.next_slot().map(|slot| self.slot_start(slot));
        let batch = self
            .inflight
            .iter()
            .filter(|b| b.outstanding > 0)
            .map(|b| b.deadline)
            .min();
        let next = match (wheel, batch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            Some(at) => {
                if self.sleep_at != Some(at) || self.sleep.is_elapsed() {
                    self.sleep_at = Some(at);
                    self.sleep.as_mut().reset(at);
                }
            }
            None => self.sleep_at = None,
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        self.check_inflight(now);
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(self.slot_floor(now), &mut due);
        for (slot, id) in due.drain(..) {
            match self.leases.get_mut(&id) {
                Some(entry) if entry.timer == slot => entry.timer = NO_TIMER,
                _ => continue, // stale
            }
            self.on_timer(id, now);
        }
        if due.capacity() > 4 * KEEP_SLOT_CAPACITY {
            due = Vec::new();
        }
        self.due = due;
        self.flush_renewals(now);
        self.rearm_sleep();
    }

    fn on_timer(&mut self, id: LeaseId, now: Instant) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        if now >= entry.local_expiry {
            self.lose(id, LossReason::Expired);
            return;
        }
        let at = entry.local_expiry;
        if entry.batch != NO_BATCH {
            // A renew is in flight; check again at the local expiry.
            self.arm_check(id, at, now);
            return;
        }
        if self.sending.is_empty() {
            self.next_batch = self.next_batch.wrapping_add(1).max(1);
        }
        entry.batch = self.next_batch;
        let batch = &mut self.outbox[entry.server as usize];
        Request::encode_renew(
            &mut batch.wire,
            &entry.key,
            entry.namespace,
            entry.token,
            entry.lease,
        );
        batch.tags.push(RenewTag {
            id,
            batch: self.next_batch,
            sent_at: now,
        });
        self.sending.push(id);
        self.sending_deadline = Some(self.sending_deadline.map_or(at, |d| d.min(at)));
    }

    /// Hands each server its batch of renewals and records them in flight.
    fn flush_renewals(&mut self, now: Instant) {
        if self.sending.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.sending);
        let deadline = self.sending_deadline.take().unwrap_or(now);
        self.inflight.push_back(Batch {
            id: self.next_batch,
            deadline,
            outstanding: ids.len(),
            ids,
        });
        for server in 0..self.outbox.len() {
            if self.outbox[server].tags.is_empty() {
                continue;
            }
            let mut next = RenewBatch::new(self.replies_tx.clone());
            // Size the next batch like this one.
            next.wire.reserve(self.outbox[server].wire.len());
            next.tags.reserve(self.outbox[server].tags.len());
            let batch = std::mem::replace(&mut self.outbox[server], next);
            let n = batch.tags.len() as u64;
            match self.servers[server].tell(Renewals(batch)).try_send() {
                Ok(()) => {
                    self.renewals.fetch_add(n, Ordering::Relaxed);
                }
                Err(error) => {
                    // The server actor is gone: the client is shutting down.
                    let ids: Vec<LeaseId> = match error {
                        SendError::ActorNotRunning(Renewals(batch))
                        | SendError::ActorRestarting(Renewals(batch))
                        | SendError::MailboxFull(Renewals(batch))
                        | SendError::Timeout(Some(Renewals(batch))) => {
                            batch.tags.into_iter().map(|tag| tag.id).collect()
                        }
                        _ => self
                            .leases
                            .iter()
                            .filter(|(_, e)| e.server as usize == server && e.batch != NO_BATCH)
                            .map(|(id, _)| *id)
                            .collect(),
                    };
                    for id in ids {
                        self.lose(id, LossReason::ClientStopped);
                    }
                }
            }
        }
    }

    /// Checks in-flight batches whose earliest local expiry has come: a
    /// lease still waiting for its renew reply past its own local expiry is
    /// lost; one with time left gets a timer of its own.
    fn check_inflight(&mut self, now: Instant) {
        for i in 0..self.inflight.len() {
            let batch = &mut self.inflight[i];
            if batch.outstanding == 0 || batch.deadline > now {
                continue;
            }
            batch.outstanding = 0;
            let (id, ids) = (batch.id, std::mem::take(&mut batch.ids));
            for lease in ids {
                let Some(entry) = self.leases.get(&lease) else {
                    continue;
                };
                if entry.batch != id {
                    continue;
                }
                if now >= entry.local_expiry {
                    self.lose(lease, LossReason::Expired);
                } else {
                    let at = entry.local_expiry;
                    self.arm_check(lease, at, now);
                }
            }
        }
        self.pop_done_batches();
    }

    fn pop_done_batches(&mut self) {
        while self.inflight.front().is_some_and(|b| b.outstanding == 0) {
            self.inflight.pop_front();
        }
    }

    /// Counts one reply of batch `id`.
    fn batch_answered(&mut self, id: u32) {
        let Some(front) = self.inflight.front() else {
            return;
        };
        // Batch ids are consecutive (but for skipping 0 on wrap-around).
        let guess = id.wrapping_sub(front.id) as usize;
        let index = match self.inflight.get(guess) {
            Some(batch) if batch.id == id => Some(guess),
            _ => self.inflight.iter().position(|b| b.id == id),
        };
        if let Some(batch) = index.and_then(|i| self.inflight.get_mut(i))
            && batch.outstanding > 0
        {
            batch.outstanding -= 1;
            if batch.outstanding == 0 {
                batch.ids = Vec::new();
                self.pop_done_batches();
            }
        }
    }

    fn on_replies(&mut self) {
        let now = Instant::now();
        let mut replies = std::mem::take(&mut self.reply_buf);
        for chunk in replies.drain(..) {
            for reply in chunk {
                self.on_reply(reply, now);
            }
        }
        self.reply_buf = replies;
        self.rearm_sleep();
    }

    fn on_reply(&mut self, done: RenewReply, now: Instant) {
        self.batch_answered(done.batch);
        let policy = self.policy;
        let Some(entry) = self.leases.get_mut(&done.id) else {
            return;
        };
        if entry.batch != done.batch {
            return;
        }
        entry.batch = NO_BATCH;
        match done.result {
            Ok(Reply::Renewed(secs)) => {
                let ttl = Duration::from_secs(secs.get());
                if ttl.is_zero() {
                    // A server that grants nothing left: treat as refused.
                    self.lose(done.id, LossReason::Refused);
                    return;
                }
                entry.ttl_secs = ttl_secs(ttl);
                let ttl = entry.ttl();
                entry.local_expiry = done.sent_at + ttl.saturating_sub(RenewPolicy::margin(ttl));
                entry.shared.set_deadline(entry.local_expiry, ttl);
                let next = (done.sent_at + policy.interval(ttl)).max(now);
                self.arm_renew(done.id, next, now);
            }
            Ok(Reply::Failure(dflockd_proto::Status::Error)) => {
                self.lose(done.id, LossReason::Refused)
            }
            Ok(_) | Err(_) => {
                // Transient (connection trouble, draining, odd reply): retry
                // until the local expiry.
                if now >= entry.local_expiry {
                    self.lose(done.id, LossReason::Expired);
                    return;
                }
                let retry = (now + policy.retry).min(entry.local_expiry);
                self.arm_renew(done.id, retry, now);
            }
        }
    }

    fn lose(&mut self, id: LeaseId, reason: LossReason) {
        let owner = self.owners.remove(&id);
        let Some(entry) = self.remove(id) else {
            return;
        };
        tracing::warn!(key = %entry.key, fence = entry.token.fence(), ?reason, "lease lost");
        entry.shared.mark_lost(reason);
        if let Some(owner) = owner {
            let lost = LeaseLost {
                key: entry.key.to_string(),
                fence: entry.token.fence(),
                token: entry.token,
                reason,
            };
            let _ = owner.tell(lost).try_send();
        }
    }

    /// Stops tracking; its timer, if any, goes stale.
    fn remove(&mut self, id: LeaseId) -> Option<Entry> {
        let entry = self.leases.remove(&id)?;
        if !self.owners.is_empty() {
            self.owners.remove(&id);
        }
        if let Some(ids) = self.by_lane.get_mut(&entry.lane) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_lane.remove(&entry.lane);
            }
        }
        if self.leases.is_empty() {
            self.leases.shrink_to(64);
        }
        Some(entry)
    }
}

/// Start renewing a lease.
pub(crate) struct Track {
    pub(crate) id: LeaseId,
    pub(crate) server: usize,
    pub(crate) key: Key,
    pub(crate) namespace: Namespace,
    pub(crate) token: Token,
    pub(crate) requested: Option<Duration>,
    pub(crate) ttl: Duration,
    /// When the request that produced the grant was sent.
    pub(crate) sent_at: Instant,
    /// The local expiry the guard was created with (see `Target::track`).
    pub(crate) local_expiry: Instant,
    pub(crate) lane: LaneId,
    pub(crate) lane_closed: CancellationToken,
    /// The grant may have waited in a queue: renew at once.
    pub(crate) renew_now: bool,
    pub(crate) shared: Arc<LeaseShared>,
    pub(crate) owner: Option<Recipient<LeaseLost>>,
}

impl Message<Track> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, t: Track, _: &mut Context<Self, ()>) {
        let entry = Entry {
            key: t.key,
            token: t.token,
            shared: t.shared,
            local_expiry: t.local_expiry,
            lane: t.lane,
            timer: NO_TIMER,
            lease: t
                .requested
                .and_then(|d| dflockd_proto::Lease::from_duration_ceil(d).ok()),
            ttl_secs: ttl_secs(t.ttl),
            server: u32::try_from(t.server).expect("server index fits u32"),
            batch: NO_BATCH,
            namespace: t.namespace,
        };
        self.leases.insert(t.id, entry);
        if let Some(owner) = t.owner {
            self.owners.insert(t.id, owner);
        }
        self.by_lane.entry(t.lane).or_default().insert(t.id);
        if t.lane_closed.is_cancelled() {
            self.lose(t.id, LossReason::ConnectionLost);
            return;
        }
        let now = Instant::now();
        let at = if t.renew_now {
            now
        } else {
            t.sent_at + self.policy.interval(t.ttl)
        };
        self.arm_renew(t.id, at, now);
        self.rearm_sleep();
    }
}

/// Stop renewing (the lease is being released).
pub(crate) struct Untrack(pub(crate) LeaseId);

impl Message<Untrack> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, Untrack(id): Untrack, _: &mut Context<Self, ()>) {
        self.remove(id);
    }
}

/// A connection closed: every lease bound to it is lost (the server
/// auto-releases them at once).
pub(crate) struct LaneClosed(pub(crate) LaneId);

impl Message<LaneClosed> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, LaneClosed(lane): LaneClosed, _: &mut Context<Self, ()>) {
        let ids: Vec<LeaseId> = self
            .by_lane
            .remove(&lane)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        for id in ids {
            self.lose(id, LossReason::ConnectionLost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expire(wheel: &mut Wheel, now: u64) -> Vec<(u64, u64)> {
        let mut due = Vec::new();
        wheel.expire(now, &mut due);
        let mut due: Vec<(u64, u64)> = due.into_iter().map(|(s, id)| (s, id.0)).collect();
        due.sort_unstable();
        due
    }

    #[test]
    fn wheel_expires_in_slot_order_across_the_horizon() {
        let mut wheel = Wheel::new();
        assert_eq!(wheel.next_slot(), None);
        assert_eq!(wheel.insert(5, LeaseId(1)), 5);
        assert_eq!(wheel.insert(3, LeaseId(2)), 3);
        // Beyond the horizon: kept in the heap until the wheel gets there.
        let far = SLOTS + 100;
        assert_eq!(wheel.insert(far, LeaseId(3)), far);
        assert_eq!(wheel.next_slot(), Some(3));
        assert_eq!(expire(&mut wheel, 2), vec![]);
        assert_eq!(expire(&mut wheel, 4), vec![(3, 2)]);
        assert_eq!(wheel.next_slot(), Some(5));
        // A slot already passed counts as the current one.
        assert_eq!(wheel.insert(1, LeaseId(4)), 5);
        assert_eq!(expire(&mut wheel, 5), vec![(5, 1), (5, 4)]);
        assert_eq!(wheel.next_slot(), Some(far));
        assert_eq!(expire(&mut wheel, far - 1), vec![]);
        assert_eq!(wheel.next_slot(), Some(far));
        assert_eq!(expire(&mut wheel, far), vec![(far, 3)]);
        assert_eq!(wheel.next_slot(), None);
        assert_eq!(wheel.len, 0);
    }

    #[test]
    fn wheel_catches_up_after_a_long_sleep() {
        let mut wheel = Wheel::new();
        for i in 0..3 * SLOTS {
            wheel.insert(i, LeaseId(i));
        }
        let due = expire(&mut wheel, 10 * SLOTS);
        assert_eq!(due.len() as u64, 3 * SLOTS);
        assert!(due.iter().all(|&(slot, id)| slot == id));
        assert_eq!(wheel.next_slot(), None);
    }

    #[test]
    fn id_hasher_keeps_low_bits_and_mixes_the_tag() {
        let hash = |n: u64| {
            let mut h = IdHasher::default();
            h.write_u64(n);
            h.finish()
        };
        assert_eq!(hash(12345) & 0xFFFF_FFFF, 12345);
        let tags: HashSet<u64> = (0..1000).map(|n| hash(n) >> 57).collect();
        assert!(tags.len() > 64, "{} distinct tags", tags.len());
    }

    #[tokio::test]
    async fn slots_round_renewals_down_and_checks_up() {
        let wheel_owner = LeaseSupervisor {
            servers: Vec::new(),
            policy: RenewPolicy {
                ratio: 1.0 / 3.0,
                max_interval: Duration::from_secs(10),
                retry: Duration::from_millis(500),
            },
            leases: IdMap::default(),
            owners: IdMap::default(),
            by_lane: HashMap::new(),
            wheel: Wheel::new(),
            epoch: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            sleep_at: None,
            inflight: VecDeque::new(),
            next_batch: NO_BATCH,
            outbox: Vec::new(),
            sending: Vec::new(),
            sending_deadline: None,
            due: Vec::new(),
            replies_tx: mpsc::unbounded_channel().0,
            replies_rx: mpsc::unbounded_channel().1,
            reply_buf: Vec::new(),
            renewals: Arc::new(AtomicU64::new(0)),
        };
        let epoch = wheel_owner.epoch;
        let at = epoch + Duration::from_micros(25_001);
        assert_eq!(wheel_owner.slot_floor(at), 2);
        assert_eq!(wheel_owner.slot_ceil(at), 3);
        assert!(wheel_owner.slot_start(wheel_owner.slot_ceil(at)) >= at);
        assert!(wheel_owner.slot_start(wheel_owner.slot_floor(at)) <= at);
        let exact = epoch + Duration::from_millis(30);
        assert_eq!(wheel_owner.slot_ceil(exact), 3);
    }
}
