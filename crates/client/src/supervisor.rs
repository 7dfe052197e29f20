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
//! * Timers live in one `tokio_util::time::DelayQueue` for the whole table
//!   (one runtime `Sleep` for all of them). Each lease has at most one live
//!   key in it: its renew time while idle, its local expiry while a renewal
//!   is in flight. The key is cleared from the table entry the moment the
//!   queue yields it, and removed from the queue whenever the entry is.
//! * Renew times are rounded down to a 10 ms grain, so renewals falling due
//!   together expire together; each wake-up drains every entry already
//!   expired and sends the renewals as one message per server, whose lane
//!   writes them in one go. Checks of the local expiry are rounded up, never
//!   early.
//! * Renew replies come back straight from the lane's reader over one
//!   channel — no task, oneshot or actor message per renewal — and are
//!   handled in batches.

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request, Token};
use kameo::error::{Infallible, SendError};
use kameo::mailbox::{MailboxReceiver, Signal};
use kameo::prelude::*;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::lane::LaneId;
use crate::lease_state::{LeaseLost, LeaseShared, LossReason};
use crate::renewal::{LeaseId, RenewBatch, RenewReply, RenewSink, RenewTag};
use crate::server_conn::{Renewals, ServerConn};

/// A lease longer than this is simply re-checked this often (the queue
/// cannot hold deadlines beyond about two years).
const MAX_TIMER: Duration = Duration::from_secs(3600);
/// Timer grain. Renewals are sent up to this much early so that those
/// falling due together share a batch; expiry checks may run up to this
/// much late (the local expiry already has a margin of ttl/10, at most 1 s,
/// before the server's).
const GRAIN: Duration = Duration::from_millis(10);
/// How long before its local expiry a lease is declared lost: expiry checks
/// are rounded up to the grain and the timer wheel adds up to a millisecond,
/// so without a lead the loss would be signalled up to ~12 ms after
/// `Lease::deadline()` (measured by tests/safety.rs). With it, `lost()`
/// fires by the deadline the guard shows.
const EXPIRY_LEAD: Duration = Duration::from_millis(20);
/// Chunks of renew replies (each what a lane read at once) taken from the
/// channel per wake-up.
const REPLY_BATCH: usize = 64;
/// Expired leases kept room for between wake-ups.
const KEEP_FIRED_CAPACITY: usize = 1024;
/// `Entry::batch` of a lease with no renewal in flight.
const NO_BATCH: u32 = 0;

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
    /// This lease's one live key in the timer queue, if any.
    timer: Option<delay_queue::Key>,
    /// The lease length to ask for on renewal (`None`: the server default).
    lease: Option<dflockd_proto::Lease>,
    /// The lease length the server last applied, in seconds (the protocol
    /// only speaks whole seconds).
    ttl_secs: u32,
    server: u32,
    /// The batch of the renewal in flight, or `NO_BATCH`.
    batch: u32,
    namespace: Namespace,
    /// Its connection closed and the session is re-attaching: the next
    /// successful renewal binds it to the connection that answered.
    detached: bool,
}

impl Entry {
    /// When the lease is declared lost if no renewal extended it.
    fn lost_at(&self) -> Instant {
        self.local_expiry
            .checked_sub(EXPIRY_LEAD)
            .unwrap_or(self.local_expiry)
    }

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

/// `at` rounded down to the grain (counted from `epoch`): renewals.
fn grain_floor(epoch: Instant, at: Instant) -> Instant {
    let since = at.saturating_duration_since(epoch);
    let grain = GRAIN.as_nanos();
    let rounded = since.as_nanos() / grain * grain;
    epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

/// When to wake for a renewal wanted at `at`: rounded down to the grain,
/// but a renewal not yet due never becomes due at once by rounding (that
/// would turn a retry bounded by the local expiry into a busy loop): it
/// waits for the next grain instead.
fn renew_time(epoch: Instant, at: Instant, now: Instant) -> Instant {
    let when = grain_floor(epoch, at);
    if when <= now && at > now {
        grain_floor(epoch, now) + GRAIN
    } else {
        when
    }
}

/// `at` rounded up to the grain (counted from `epoch`): expiry checks,
/// never early.
fn grain_ceil(epoch: Instant, at: Instant) -> Instant {
    let since = at.saturating_duration_since(epoch);
    let grain = GRAIN.as_nanos();
    let rounded = since.as_nanos().div_ceil(grain) * grain;
    epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

/// Resolves once timers have expired, after handing every entry of `due`
/// that has already expired to `fired`, with the key it had — so that one
/// wake-up sees every lease falling due in it, and their renewals go out as
/// one batch per server.
///
/// Never await it on an empty queue: that is `Ready(None)` at once.
fn expired_timers<'a>(
    due: &'a mut DelayQueue<LeaseId>,
    mut fired: impl FnMut(LeaseId, delay_queue::Key) + 'a,
) -> impl Future<Output = ()> + 'a {
    // Past the first entry of each millisecond the queue re-polls its
    // `Sleep`, which spends the task's cooperative budget: constrained, a
    // wake-up would stop after 128 entries and split the batch. The drain
    // is bounded without it: at most one entry per lease, and nothing is
    // inserted while it runs.
    tokio::task::unconstrained(poll_fn(move |cx| {
        let mut any = false;
        while let Poll::Ready(Some(expired)) = due.poll_expired(cx) {
            any = true;
            let key = expired.key();
            fired(expired.into_inner(), key);
        }
        if any { Poll::Ready(()) } else { Poll::Pending }
    }))
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
    /// Every lease's one timer: renew-at or local-expiry check.
    due: DelayQueue<LeaseId>,
    /// Origin of the timer grain.
    epoch: Instant,
    /// Leases whose timer expired in this wake-up (their keys already
    /// cleared).
    fired: Vec<LeaseId>,
    /// Id of the latest wake-up that sent renewals.
    next_batch: u32,
    /// Renewals collected during one wake-up, per server.
    outbox: Vec<RenewBatch>,
    replies_tx: RenewSink,
    replies_rx: mpsc::UnboundedReceiver<Vec<RenewReply>>,
    reply_buf: Vec<Vec<RenewReply>>,
    renewals: Arc<AtomicU64>,
}

impl Actor for LeaseSupervisor {
    type Args = SupervisorArgs;
    type Error = Infallible;

    async fn on_start(args: SupervisorArgs, _: ActorRef<Self>) -> Result<Self, Infallible> {
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
            due: DelayQueue::new(),
            epoch: Instant::now(),
            fired: Vec::new(),
            next_batch: NO_BATCH,
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
                // Replies, then timers, then the mailbox: a busy mailbox
                // must not starve renewals, and a renew reply already read
                // must be applied before its lease's expiry check runs.
                biased;
                // Never 0: the supervisor holds a sender itself.
                _ = self.replies_rx.recv_many(&mut self.reply_buf, REPLY_BATCH) => {
                    self.on_replies();
                }
                // An empty queue is Ready(None) at once: never poll it.
                () = expired_timers(&mut self.due, |id, key| {
                    // Clear the key now: the queue may hand it to the next
                    // insert.
                    if let Some(entry) = self.leases.get_mut(&id)
                        && entry.timer == Some(key)
                    {
                        entry.timer = None;
                        self.fired.push(id);
                    }
                }), if !self.due.is_empty() => {
                    self.on_timers();
                }
                signal = mailbox.recv() => return Ok(signal),
            }
        }
    }
}

impl LeaseSupervisor {
    /// Sets the lease's one timer for a renewal at about `at` (up to one
    /// grain early, so that renewals batch up).
    fn arm_renew(&mut self, id: LeaseId, at: Instant, now: Instant) {
        let at = renew_time(self.epoch, at.min(now + MAX_TIMER), now);
        self.arm(id, at);
    }

    /// Sets the lease's one timer for a check at `at`, never earlier.
    fn arm_check(&mut self, id: LeaseId, at: Instant, now: Instant) {
        let at = grain_ceil(self.epoch, at.min(now + MAX_TIMER));
        self.arm(id, at);
    }

    fn arm(&mut self, id: LeaseId, at: Instant) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        match entry.timer {
            // Live by the invariant: cleared when it expires or is removed.
            Some(key) => self.due.reset_at(&key, at),
            None => entry.timer = Some(self.due.insert_at(id, at)),
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        self.next_batch = self.next_batch.wrapping_add(1).max(1);
        let mut fired = std::mem::take(&mut self.fired);
        for id in fired.drain(..) {
            self.on_timer(id, now);
        }
        if fired.capacity() > KEEP_FIRED_CAPACITY {
            fired = Vec::new();
        }
        self.fired = fired;
        self.flush_renewals();
    }

    fn on_timer(&mut self, id: LeaseId, now: Instant) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        if now >= entry.lost_at() {
            self.lose(id, LossReason::Expired);
            return;
        }
        let at = entry.lost_at();
        if entry.batch != NO_BATCH {
            // A renew is in flight; check again at the local expiry.
            self.arm_check(id, at, now);
            return;
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
        // Until the reply, the lease's timer watches its local expiry.
        self.arm_check(id, at, now);
    }

    /// Hands each server its batch of renewals.
    fn flush_renewals(&mut self) {
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

    fn on_replies(&mut self) {
        let now = Instant::now();
        let mut replies = std::mem::take(&mut self.reply_buf);
        for chunk in replies.drain(..) {
            for reply in chunk {
                self.on_reply(reply, now);
            }
        }
        self.reply_buf = replies;
    }

    fn on_reply(&mut self, done: RenewReply, now: Instant) {
        let policy = self.policy;
        let Some(entry) = self.leases.get_mut(&done.id) else {
            return;
        };
        if entry.batch != done.batch {
            return;
        }
        entry.batch = NO_BATCH;
        if entry.detached
            && matches!(done.result, Ok(Reply::Renewed(_)))
            && let Some(lane) = done.lane
        {
            // Renewed through the session's new connection: the lease is
            // bound to it from now on.
            entry.detached = false;
            entry.lane = lane;
            self.by_lane.entry(lane).or_default().insert(done.id);
        }
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
                self.lose(done.id, LossReason::Refused);
            }
            Ok(_) | Err(_) => {
                // Transient (connection trouble, draining, odd reply): retry
                // until the local expiry.
                if now >= entry.lost_at() {
                    self.lose(done.id, LossReason::Expired);
                    return;
                }
                let retry = (now + policy.retry).min(entry.lost_at());
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

    /// Stops tracking: the table entry and its timer go together.
    fn remove(&mut self, id: LeaseId) -> Option<Entry> {
        let entry = self.leases.remove(&id)?;
        if let Some(key) = entry.timer {
            // `try_remove`: a broken invariant must not panic the actor.
            let removed = self.due.try_remove(&key);
            debug_assert!(removed.is_some_and(|e| *e.get_ref() == id));
        }
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
            self.due.shrink_to_fit();
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
    /// The lane is a cluster session's (see [`LaneClosed`]): if it closed
    /// already, the next connection takes the lease over.
    pub(crate) reattach: bool,
    /// The grant may have waited in a queue: renew at once.
    pub(crate) renew_now: bool,
    pub(crate) shared: Arc<LeaseShared>,
    pub(crate) owner: Option<Recipient<LeaseLost>>,
}

impl Message<Track> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, t: Track, _: &mut Context<Self, ()>) {
        // A lane that closed before the lease was tracked (its `LaneClosed`
        // may have been handled already) is handled as that would.
        let closed = t.lane_closed.is_cancelled();
        let entry = Entry {
            key: t.key,
            token: t.token,
            shared: t.shared,
            local_expiry: t.local_expiry,
            lane: t.lane,
            timer: None,
            lease: t
                .requested
                .and_then(|d| dflockd_proto::Lease::from_duration_ceil(d).ok()),
            ttl_secs: ttl_secs(t.ttl),
            server: u32::try_from(t.server).expect("server index fits u32"),
            batch: NO_BATCH,
            namespace: t.namespace,
            detached: closed && t.reattach,
        };
        self.leases.insert(t.id, entry);
        if let Some(owner) = t.owner {
            self.owners.insert(t.id, owner);
        }
        self.by_lane.entry(t.lane).or_default().insert(t.id);
        let now = Instant::now();
        if closed && !t.reattach {
            self.lose(t.id, LossReason::ConnectionLost);
            return;
        }
        let at = if t.renew_now || closed {
            now
        } else {
            t.sent_at + self.policy.interval(t.ttl)
        };
        self.arm_renew(t.id, at, now);
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

/// A connection closed. Without re-attachment every lease bound to it is
/// lost (the server auto-releases them at once). A cluster session's
/// connection (`reattach`) is different: the next connection, to whichever
/// node leads, names the same session and takes its holds over, so each
/// lease is renewed at once through it and lost only if that cannot
/// happen before its local expiry.
pub(crate) struct LaneClosed {
    pub(crate) lane: LaneId,
    pub(crate) reattach: bool,
}

impl Message<LaneClosed> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, closed: LaneClosed, _: &mut Context<Self, ()>) {
        let ids: Vec<LeaseId> = self
            .by_lane
            .remove(&closed.lane)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let now = Instant::now();
        for id in ids {
            if !closed.reattach {
                self.lose(id, LossReason::ConnectionLost);
                continue;
            }
            let Some(entry) = self.leases.get_mut(&id) else {
                continue;
            };
            entry.detached = true;
            if entry.batch == NO_BATCH {
                self.arm_renew(id, now, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn grain_rounds_renewals_down_and_checks_up() {
        let epoch = Instant::now();
        let at = epoch + Duration::from_micros(25_001);
        assert_eq!(grain_floor(epoch, at), epoch + Duration::from_millis(20));
        assert_eq!(grain_ceil(epoch, at), epoch + Duration::from_millis(30));
        let exact = epoch + Duration::from_millis(30);
        assert_eq!(grain_floor(epoch, exact), exact);
        assert_eq!(grain_ceil(epoch, exact), exact);
        // Before the epoch (cannot happen in use): the epoch itself.
        assert_eq!(grain_floor(epoch + GRAIN, epoch), epoch + GRAIN);
        assert_eq!(grain_ceil(epoch + GRAIN, epoch), epoch + GRAIN);
        for micros in (0..100_000).step_by(997) {
            let at = epoch + Duration::from_micros(micros);
            let (down, up) = (grain_floor(epoch, at), grain_ceil(epoch, at));
            assert!(down <= at && at - down < GRAIN, "{micros} µs down");
            assert!(up >= at && up - at < GRAIN, "{micros} µs up");
        }
    }

    #[tokio::test]
    async fn renewals_not_yet_due_are_not_rounded_into_the_past() {
        let epoch = Instant::now();
        let ms = |n: u64| epoch + Duration::from_millis(n);
        // Due later: rounded down.
        assert_eq!(renew_time(epoch, ms(57), ms(40)), ms(50));
        // Due now or before: at once (rounded down).
        assert_eq!(renew_time(epoch, ms(43), ms(43)), ms(40));
        assert_eq!(renew_time(epoch, ms(12), ms(43)), ms(10));
        // Due later in the current grain: the next grain, not at once.
        assert_eq!(renew_time(epoch, ms(47), ms(43)), ms(50));
        assert_eq!(renew_time(epoch, ms(47), ms(40)), ms(50));
    }

    /// Timers falling due in one grain come out of the queue in one
    /// wake-up, however many there are; later ones stay.
    #[tokio::test(start_paused = true)]
    async fn one_wake_up_drains_every_expired_timer() {
        let epoch = Instant::now();
        let mut due = DelayQueue::new();
        let n = 5_000;
        for i in 0..n {
            // Spread over 10–20 ms, rounded down like renewals.
            let at = epoch + GRAIN + Duration::from_micros(i * 2);
            due.insert_at(LeaseId(i), grain_floor(epoch, at));
        }
        let late = due.insert_at(LeaseId(n), epoch + 3 * GRAIN);
        let mut fired = Vec::new();
        expired_timers(&mut due, |id, _| fired.push(id.0)).await;
        assert_eq!(fired.len() as u64, n, "one batch");
        assert!(Instant::now() < epoch + 2 * GRAIN);
        fired.sort_unstable();
        assert!(fired.iter().copied().eq(0..n));
        assert_eq!(due.len(), 1);
        assert!(due.try_remove(&late).is_some());
        assert!(due.is_empty());
    }
}
