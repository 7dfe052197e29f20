//! Leader election on a dflockd lock.

use std::future::Future;
use std::time::Duration;

use dflockd_client::{Client, Lease, LeaseMonitor, Lock, Released, Result, Token};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Who leads, as seen by one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// This candidate does not lead.
    Follower,
    /// This candidate leads, with the fence of its term.
    Leader {
        /// The term's fence: larger means a later term.
        fence: u64,
    },
}

/// Campaigns for leadership of `key`: whoever holds the lock leads.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// use tokio_util::sync::CancellationToken;
/// let election = dflockd::LeaderElection::new(&client, "service/leader")?;
/// let stop = CancellationToken::new();
/// election
///     .run_as_leader(stop, |ctx| async move {
///         // Lead until ctx is cancelled (leadership lost) — pass ctx.fence()
///         // to anything that must reject a deposed leader's writes.
///         ctx.cancelled().await;
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LeaderElection {
    lock: Lock,
    state: watch::Sender<Leadership>,
    poll: Duration,
    retry: Duration,
}

impl LeaderElection {
    /// A candidate for `key`, with the client's default lease.
    pub fn new(client: &Client, key: &str) -> Result<LeaderElection> {
        Ok(LeaderElection {
            lock: client.lock(key)?,
            state: watch::channel(Leadership::Follower).0,
            poll: Duration::from_secs(10),
            retry: Duration::from_millis(200),
        })
    }

    /// Leases of this length (shorter = faster failover, more renewals).
    pub fn with_lease(mut self, lease: Duration) -> LeaderElection {
        self.lock = self.lock.with_lease(lease);
        self
    }

    /// Current leadership, observable.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    /// Whether this candidate leads right now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.state.borrow(), Leadership::Leader { .. })
    }

    /// Waits until this candidate leads. Transport failures are retried;
    /// other errors are returned.
    pub async fn campaign(&self) -> Result<Term> {
        loop {
            match self.lock.acquire_within(self.poll).await {
                Ok(Some(lease)) => return Ok(Term::new(lease, self.state.clone())),
                Ok(None) => {}
                Err(error) if error.is_transient() => {
                    tracing::debug!(%error, "campaign: retrying");
                    tokio::time::sleep(self.retry).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Runs `lead` whenever this candidate leads: campaigns, runs it with a
    /// context that is cancelled when leadership is lost, and campaigns again
    /// after a loss. When `lead` returns on its own, leadership is resigned
    /// and this returns. When `stop` fires, the context is cancelled, `lead`
    /// gets until the lease deadline to finish, and leadership is resigned.
    ///
    /// After a loss, `lead` gets until the lease's deadline (the latest
    /// instant the lease could still be valid on the server) to notice its
    /// cancelled context; then its future is dropped.
    pub async fn run_as_leader<F, Fut>(&self, stop: CancellationToken, mut lead: F) -> Result<()>
    where
        F: FnMut(LeaderContext) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            let term = tokio::select! {
                term = self.campaign() => term?,
                _ = stop.cancelled() => return Ok(()),
            };
            let ctx = LeaderContext::new(&term, &stop);
            let work = lead(ctx.clone());
            tokio::pin!(work);
            enum Outcome {
                Lost,
                Stopped,
                Finished,
            }
            // Loss and stop first: work that ends *because* its context was
            // cancelled must not count as finishing on its own.
            let outcome = tokio::select! {
                biased;
                _ = term.lost() => Outcome::Lost,
                _ = stop.cancelled() => Outcome::Stopped,
                _ = &mut work => Outcome::Finished,
            };
            match outcome {
                Outcome::Finished if !term.monitor.is_lost() => {
                    term.resign().await?;
                    return Ok(());
                }
                Outcome::Finished => {
                    tracing::info!(fence = term.fence(), "leadership lost; campaigning again");
                }
                Outcome::Lost => {
                    finish_by(work, term.monitor.deadline()).await;
                    tracing::info!(fence = term.fence(), "leadership lost; campaigning again");
                }
                Outcome::Stopped => {
                    ctx.cancel.cancel();
                    finish_by(work, term.monitor.deadline()).await;
                    term.resign().await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Polls `work` until it finishes or `deadline` passes (then drops it).
pub(crate) async fn finish_by<F: Future<Output = ()>>(
    work: std::pin::Pin<&mut F>,
    deadline: Instant,
) {
    if tokio::time::timeout_at(deadline, work).await.is_err() {
        tracing::warn!("work did not stop by the lease deadline: aborted");
    }
}

/// One term of leadership: the lease that makes this candidate the leader.
#[derive(Debug)]
pub struct Term {
    lease: Option<Lease>,
    monitor: LeaseMonitor,
    fence: u64,
    token: Token,
    state: watch::Sender<Leadership>,
}

impl Term {
    fn new(lease: Lease, state: watch::Sender<Leadership>) -> Term {
        let fence = lease.fence();
        let monitor = lease.monitor();
        state.send_replace(Leadership::Leader { fence });
        // Step down in the observable state the moment the lease is lost.
        let watcher = monitor.clone();
        let watched = state.clone();
        tokio::spawn(async move {
            watcher.lost().await;
            watched.send_if_modified(|s| {
                let current = *s == Leadership::Leader { fence };
                if current {
                    *s = Leadership::Follower;
                }
                current
            });
        });
        Term {
            token: lease.token(),
            lease: Some(lease),
            monitor,
            fence,
            state,
        }
    }

    /// The term's fence.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The term's token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The lease behind the term.
    pub fn lease(&self) -> &Lease {
        self.lease.as_ref().expect("a live term holds its lease")
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&self) {
        self.monitor.lost().await
    }

    /// Gives leadership up.
    pub async fn resign(mut self) -> Result<Released> {
        let lease = self.lease.take().expect("a live term holds its lease");
        self.step_down();
        lease.release().await
    }

    fn step_down(&self) {
        let fence = self.fence;
        self.state.send_if_modified(|s| {
            let current = *s == Leadership::Leader { fence };
            if current {
                *s = Leadership::Follower;
            }
            current
        });
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.step_down();
    }
}

/// What the leader's work receives: the term's fence and token, and a
/// cancellation that fires when leadership is lost (or the election stops).
#[derive(Debug, Clone)]
pub struct LeaderContext {
    fence: u64,
    token: Token,
    cancel: CancellationToken,
    monitor: LeaseMonitor,
}

impl LeaderContext {
    fn new(term: &Term, stop: &CancellationToken) -> LeaderContext {
        let cancel = term.lease().cancellation_token();
        // Also cancel on stop.
        let linked = cancel.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => linked.cancel(),
                _ = linked.cancelled() => {}
            }
        });
        LeaderContext {
            fence: term.fence,
            token: term.token,
            cancel,
            monitor: term.monitor.clone(),
        }
    }

    /// The term's fence.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The term's token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether leadership is gone.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when leadership is gone.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// A token cancelled when leadership is gone.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The latest instant this term is known valid.
    pub fn deadline(&self) -> Instant {
        self.monitor.deadline()
    }
}
