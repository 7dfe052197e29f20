//! Read deadlines for all connections from one coarse clock.
//!
//! A connection must complete each line within the read timeout (spec
//! §1.5). Arming a tokio timer per connection works, but then every request
//! polls that timer and every idle worker walks the timer wheel before it
//! parks, which showed up as a tenth of the server's tail latency at
//! 10 concurrent clients. Instead one task, the [`Reaper`], ticks a few
//! times per read timeout; a connection just stamps the current tick into
//! its [`Watch`] (one relaxed store) when it makes progress, and the reaper
//! wakes those whose stamp is too old.
//!
//! A deadline never fires early: a watch expires only once more than
//! `ceil(timeout / tick)` ticks have passed since its stamp, so the close
//! comes between the read timeout and one tick (an eighth of it, at most one
//! second) later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dflockd_core::ConnId;
use futures_util::task::AtomicWaker;

/// A watch's stamp while no deadline runs.
const UNBOUNDED: u64 = u64::MAX;

/// Finest and coarsest tick.
const MIN_TICK: Duration = Duration::from_millis(5);
const MAX_TICK: Duration = Duration::from_secs(1);

/// One connection's read deadline.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Tick of the last progress, or [`UNBOUNDED`].
    since: AtomicU64,
    /// Set by the reaper; cleared by the connection if the stamp moved on.
    expired: AtomicBool,
    waker: AtomicWaker,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            since: AtomicU64::new(UNBOUNDED),
            expired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Runs a deadline counted from tick `since`, or none.
    pub(crate) fn set(&self, since: Option<u64>) {
        self.since
            .store(since.unwrap_or(UNBOUNDED), Ordering::Relaxed);
    }

    /// Ready once the reaper has flagged the watch.
    pub(crate) fn poll_flagged(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.expired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.expired.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// After [`poll_flagged`](Self::poll_flagged): whether the deadline
    /// really passed. If the connection stamped progress after the reaper
    /// looked, the flag is cleared and `false` returned.
    pub(crate) fn confirm(&self, reaper: &Reaper) -> bool {
        self.expired.store(false, Ordering::Release);
        let since = self.since.load(Ordering::Relaxed);
        if reaper.overdue(since) {
            self.expired.store(true, Ordering::Release);
            true
        } else {
            false
        }
    }
}

/// The clock and the registry of watches.
#[derive(Debug)]
pub(crate) struct Reaper {
    tick: Duration,
    /// Ticks a deadline lasts; expired after strictly more have passed.
    timeout_ticks: u64,
    ticks: AtomicU64,
    watches: Mutex<HashMap<ConnId, Arc<Watch>>>,
}

impl Reaper {
    pub(crate) fn new(timeout: Duration) -> Reaper {
        let tick = (timeout / 8).clamp(MIN_TICK, MAX_TICK);
        let timeout_ticks = timeout.as_nanos().div_ceil(tick.as_nanos().max(1));
        Reaper {
            tick,
            timeout_ticks: u64::try_from(timeout_ticks).unwrap_or(u64::MAX),
            ticks: AtomicU64::new(0),
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// The current tick.
    pub(crate) fn now(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    fn overdue(&self, since: u64) -> bool {
        since != UNBOUNDED && self.now().saturating_sub(since) > self.timeout_ticks
    }

    /// A watch for connection `id`, registered until the guard drops.
    pub(crate) fn watch(self: &Arc<Self>, id: ConnId) -> WatchGuard {
        let watch = Arc::new(Watch::new());
        self.watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&watch));
        WatchGuard {
            reaper: Arc::clone(self),
            id,
            watch,
            armed_at: 0,
            since: self.now(),
            registered: None,
        }
    }

    /// Ticks the clock and flags overdue watches, forever (the server
    /// aborts it when it stops).
    pub(crate) async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            self.ticks.fetch_add(1, Ordering::Relaxed);
            let watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
            for watch in watches.values() {
                if self.overdue(watch.since.load(Ordering::Relaxed))
                    && !watch.expired.swap(true, Ordering::AcqRel)
                {
                    watch.waker.wake();
                }
            }
        }
    }
}

/// A registered [`Watch`]; unregisters on drop. It also keeps the
/// connection's side of the bookkeeping: the decoder's line count when the
/// deadline was last restarted, and the tick it was restarted at.
#[derive(Debug)]
pub(crate) struct WatchGuard {
    reaper: Arc<Reaper>,
    id: ConnId,
    watch: Arc<Watch>,
    armed_at: u64,
    since: u64,
    /// The waker last handed to the watch, while the reaper has not used
    /// it: a connection's task keeps one waker, so most polls need not
    /// register it again (two atomic swaps per request saved).
    registered: Option<Waker>,
}

impl WatchGuard {
    /// Starts the deadline afresh from now; `lines` is the decoder's count
    /// of completed lines.
    pub(crate) fn restart(&mut self, lines: u64) {
        self.armed_at = lines;
        self.since = self.reaper.now();
    }

    /// Runs the deadline if `bounded`, else none; a line completed since the
    /// last restart restarts it (the deadline is per line).
    pub(crate) fn arm(&mut self, lines: u64, bounded: bool) {
        if lines != self.armed_at {
            self.restart(lines);
        }
        self.watch.set(bounded.then_some(self.since));
    }

    /// Ready once the reaper has flagged the watch (see
    /// [`Watch::poll_flagged`]); registers `cx`'s waker only if it is not
    /// the one registered already.
    pub(crate) fn poll_flagged(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.watch.expired.load(Ordering::Acquire) {
            // The reaper flags before it wakes, and a wake uses up the
            // registration: the next poll registers afresh.
            self.registered = None;
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let flagged = self.watch.poll_flagged(cx);
        self.registered = flagged.is_pending().then(|| cx.waker().clone());
        flagged
    }

    /// After [`Self::poll_flagged`]: whether the deadline really passed
    /// (see [`Watch::confirm`]).
    pub(crate) fn overdue(&self) -> bool {
        self.watch.confirm(&self.reaper)
    }
}

impl std::ops::Deref for WatchGuard {
    type Target = Watch;
    fn deref(&self) -> &Watch {
        &self.watch
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.reaper
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_after_the_timeout_never_before() {
        let timeout = Duration::from_millis(800);
        let reaper = Arc::new(Reaper::new(timeout));
        let task = tokio::spawn(Arc::clone(&reaper).run());
        let mut watch = reaper.watch(ConnId(1));
        // Stamped at every offset within a tick, including just before the
        // clock ticks (the case a `>=` comparison would close early).
        for offset_ms in [0, 30, 60, 99] {
            tokio::time::sleep(Duration::from_millis(offset_ms)).await;
            let started = tokio::time::Instant::now();
            watch.set(Some(reaper.now()));
            // Each round needs a fresh wake: a registration the previous
            // wake used up must not be taken for a live one.
            let flagged = std::future::poll_fn(|cx| watch.poll_flagged(cx));
            let woken = tokio::time::timeout(timeout * 2, flagged).await;
            assert!(woken.is_ok(), "no wake in round {offset_ms}");
            assert!(watch.confirm(&reaper));
            let waited = started.elapsed();
            assert!(waited >= timeout, "fired after {waited:?}");
            assert!(waited <= timeout + timeout / 4, "fired after {waited:?}");
            watch.set(None);
            watch.expired.store(false, Ordering::Release);
        }
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn progress_and_unbounded_watches_do_not_expire() {
        let timeout = Duration::from_millis(400);
        let reaper = Arc::new(Reaper::new(timeout));
        let task = tokio::spawn(Arc::clone(&reaper).run());
        let busy = reaper.watch(ConnId(1));
        let idle = reaper.watch(ConnId(2));
        idle.set(None);
        for _ in 0..20 {
            busy.set(Some(reaper.now()));
            tokio::time::sleep(timeout / 4).await;
        }
        assert!(!busy.expired.load(Ordering::Acquire));
        assert!(!idle.expired.load(Ordering::Acquire));
        // A flag raised just before progress is withdrawn by `confirm`.
        busy.expired.store(true, Ordering::Release);
        busy.set(Some(reaper.now()));
        assert!(!busy.confirm(&reaper));
        drop(busy);
        assert_eq!(reaper.watches.lock().unwrap().len(), 1);
        task.abort();
    }
}
