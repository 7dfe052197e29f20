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

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request, Token};
use kameo::error::Infallible;
use kameo::mailbox::{MailboxReceiver, Signal};
use kameo::prelude::*;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::Error;
use crate::lane::LaneId;
use crate::lease::{LeaseLost, LeaseShared, LossReason};
use crate::server_conn::{Call, ServerConn};

const MAX_TIMER: Duration = Duration::from_secs(3600);

/// Identity of one tracked lease; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LeaseId(pub(crate) u64);

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

    fn margin(ttl: Duration) -> Duration {
        (ttl / 10).min(Duration::from_secs(1))
    }
}

struct Entry {
    server: usize,
    key: Key,
    namespace: Namespace,
    token: Token,
    lease: Option<Duration>,
    ttl: Duration,
    local_expiry: Instant,
    lane: LaneId,
    timer: Option<delay_queue::Key>,
    renewing: bool,
    shared: Arc<LeaseShared>,
    owner: Option<Recipient<LeaseLost>>,
}

pub(crate) struct SupervisorArgs {
    pub(crate) servers: Vec<ActorRef<ServerConn>>,
    pub(crate) policy: RenewPolicy,
}

pub(crate) struct LeaseSupervisor {
    servers: Vec<ActorRef<ServerConn>>,
    policy: RenewPolicy,
    leases: HashMap<LeaseId, Entry>,
    by_lane: HashMap<LaneId, HashSet<LeaseId>>,
    due: DelayQueue<LeaseId>,
    me: WeakActorRef<Self>,
}

impl Actor for LeaseSupervisor {
    type Args = SupervisorArgs;
    type Error = Infallible;

    async fn on_start(args: SupervisorArgs, me: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(LeaseSupervisor {
            servers: args.servers,
            policy: args.policy,
            leases: HashMap::new(),
            by_lane: HashMap::new(),
            due: DelayQueue::new(),
            me: me.downgrade(),
        })
    }

    async fn next(
        &mut self,
        _: WeakActorRef<Self>,
        mailbox: &mut MailboxReceiver<Self>,
    ) -> Result<Option<Signal<Self>>, Infallible> {
        loop {
            tokio::select! {
                // Timers first: a busy mailbox must not starve renewals.
                biased;
                Some(expired) = poll_fn(|cx| self.due.poll_expired(cx)), if !self.due.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(entry) = self.leases.get_mut(&id) {
                        entry.timer = None;
                    }
                    self.on_timer(id);
                }
                signal = mailbox.recv() => return Ok(signal),
            }
        }
    }
}

impl LeaseSupervisor {
    fn on_timer(&mut self, id: LeaseId) {
        let now = Instant::now();
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        if now >= entry.local_expiry {
            self.lose(id, LossReason::Expired);
            return;
        }
        if entry.renewing {
            // A renew is in flight; wake again at the local expiry.
            let at = entry.local_expiry;
            self.arm(id, at);
            return;
        }
        entry.renewing = true;
        let sent_at = now;
        let (tx, rx) = oneshot::channel();
        let request = Request::Renew {
            key: entry.key.clone(),
            namespace: entry.namespace,
            token: entry.token.to_string().into_bytes(),
            lease: entry
                .lease
                .and_then(|d| dflockd_proto::Lease::from_duration_ceil(d).ok()),
        };
        let sent = self.servers[entry.server]
            .tell(Call {
                request,
                orphan: None,
                reply: tx,
            })
            .try_send();
        let at = entry.local_expiry;
        if sent.is_err() {
            entry.renewing = false;
            self.lose(id, LossReason::ClientStopped);
            return;
        }
        self.arm(id, at);
        let me = self.me.clone();
        tokio::spawn(async move {
            let result = rx
                .await
                .unwrap_or(Err(Error::ConnectionClosed))
                .map(|(reply, _)| reply);
            if let Some(me) = me.upgrade() {
                let _ = me
                    .tell(RenewDone {
                        id,
                        sent_at,
                        result,
                    })
                    .try_send();
            }
        });
    }

    fn arm(&mut self, id: LeaseId, at: Instant) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        if let Some(key) = entry.timer.take() {
            self.due.remove(&key);
        }
        // DelayQueue cannot hold delays beyond about two years; a lease that
        // long is simply re-checked every hour.
        let delay = at.saturating_duration_since(Instant::now()).min(MAX_TIMER);
        entry.timer = Some(self.due.insert(id, delay));
    }

    fn lose(&mut self, id: LeaseId, reason: LossReason) {
        let Some(entry) = self.leases.remove(&id) else {
            return;
        };
        if let Some(key) = entry.timer {
            self.due.remove(&key);
        }
        if let Some(ids) = self.by_lane.get_mut(&entry.lane) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_lane.remove(&entry.lane);
            }
        }
        tracing::warn!(key = %entry.key, fence = entry.token.fence(), ?reason, "lease lost");
        entry.shared.mark_lost(reason);
        if let Some(owner) = entry.owner {
            let lost = LeaseLost {
                key: entry.key.to_string(),
                fence: entry.token.fence(),
                token: entry.token,
                reason,
            };
            let _ = owner.tell(lost).try_send();
        }
    }

    fn forget(&mut self, id: LeaseId) {
        let Some(entry) = self.leases.remove(&id) else {
            return;
        };
        if let Some(key) = entry.timer {
            self.due.remove(&key);
        }
        if let Some(ids) = self.by_lane.get_mut(&entry.lane) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_lane.remove(&entry.lane);
            }
        }
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
        let local_expiry = t.sent_at + t.ttl.saturating_sub(RenewPolicy::margin(t.ttl));
        t.shared.set_deadline(local_expiry, t.ttl);
        let entry = Entry {
            server: t.server,
            key: t.key,
            namespace: t.namespace,
            token: t.token,
            lease: t.requested,
            ttl: t.ttl,
            // A queued grant is judged by its immediate renew, not by the
            // (possibly long past) send time of the acquire.
            local_expiry: if t.renew_now {
                Instant::now() + t.ttl
            } else {
                local_expiry
            },
            lane: t.lane,
            timer: None,
            renewing: false,
            shared: t.shared,
            owner: t.owner,
        };
        self.leases.insert(t.id, entry);
        self.by_lane.entry(t.lane).or_default().insert(t.id);
        if t.lane_closed.is_cancelled() {
            self.lose(t.id, LossReason::ConnectionLost);
            return;
        }
        let at = if t.renew_now {
            Instant::now()
        } else {
            t.sent_at + self.policy.interval(t.ttl)
        };
        self.arm(t.id, at);
    }
}

/// Stop renewing (the lease is being released).
pub(crate) struct Untrack(pub(crate) LeaseId);

impl Message<Untrack> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, Untrack(id): Untrack, _: &mut Context<Self, ()>) {
        self.forget(id);
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

/// Result of a renew request.
pub(crate) struct RenewDone {
    id: LeaseId,
    sent_at: Instant,
    result: Result<Reply, Error>,
}

impl Message<RenewDone> for LeaseSupervisor {
    type Reply = ();

    async fn handle(&mut self, done: RenewDone, _: &mut Context<Self, ()>) {
        let now = Instant::now();
        let policy = self.policy;
        let Some(entry) = self.leases.get_mut(&done.id) else {
            return;
        };
        entry.renewing = false;
        match done.result {
            Ok(Reply::Renewed(secs)) => {
                let ttl = Duration::from_secs(secs.get());
                if ttl.is_zero() {
                    // A server that grants nothing left: treat as refused.
                    self.lose(done.id, LossReason::Refused);
                    return;
                }
                entry.ttl = ttl;
                entry.local_expiry = done.sent_at + ttl.saturating_sub(RenewPolicy::margin(ttl));
                entry.shared.set_deadline(entry.local_expiry, ttl);
                let next = (done.sent_at + policy.interval(ttl)).max(now);
                self.arm(done.id, next);
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
                self.arm(done.id, retry);
            }
        }
    }
}
