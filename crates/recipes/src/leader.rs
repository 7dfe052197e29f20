//! Leader election on a dflockd lock.

use std::future::Future;
use std::time::Duration;

use dflockd_client::{Client, ErrorKind, Lease, LeaseMonitor, Lock, Released, Result, Token};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Who leads, as seen by one candidate.
///
/// ```no_run
/// # async fn demo(election: &dflockd_recipes::LeaderElection) {
/// use dflockd_recipes::Leadership;
/// let mut leadership = election.leadership();
/// while leadership.changed().await.is_ok() {
///     match *leadership.borrow() {
///         Leadership::Leader { fence } => println!("leading, term fence {fence}"),
///         Leadership::Follower => println!("following"),
///     }
/// }
/// # }
/// ```
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
/// let election = dflockd_recipes::LeaderElection::new(&client, "service/leader")?;
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
    /// Proclaimed by each term (`Lease::proclaim`).
    label: Option<String>,
}

/// Who leads an election, as anyone can see it: the term's fence and the
/// label its leader proclaimed
/// ([`LeaderElection::with_label`]).
///
/// ```
/// let leader = dflockd_recipes::Leader { fence: Some(42), label: Some("node-a:8080".into()) };
/// assert_eq!(leader.label.as_deref(), Some("node-a:8080"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The term's fence (larger means a later term); `None` where the
    /// server does not show it (a server other than this project's, or a
    /// client without the multiplexed connection).
    pub fence: Option<u64>,
    /// What the leader proclaimed; `None` before it did (or if it never
    /// does).
    pub label: Option<String>,
}

/// How often [`LeaderElection::observe`] asks who leads.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

impl LeaderElection {
    /// A candidate for `key`, with the client's default lease.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let election = dflockd_recipes::LeaderElection::new(&client, "service/leader")?;
    /// assert!(dflockd_recipes::LeaderElection::new(&client, "bad key").is_err()); // no white space in keys
    /// # Ok(()) }
    /// ```
    pub fn new(client: &Client, key: &str) -> Result<LeaderElection> {
        Ok(LeaderElection {
            lock: client.lock(key)?,
            state: watch::channel(Leadership::Follower).0,
            poll: Duration::from_secs(10),
            retry: Duration::from_millis(200),
            label: None,
        })
    }

    /// Each term this candidate wins proclaims `label` (say, the address
    /// it serves on), for [`leader`](Self::leader) and
    /// [`observe`](Self::observe) to show to everyone. 1–64 printable ASCII
    /// bytes without spaces; needs this project's server (others refuse
    /// the proclamation, which is logged and leaves the term unlabelled).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// use dflockd_recipes::LeaderElection;
    /// let election = LeaderElection::new(&client, "service/leader")?.with_label("node-a:8080")?;
    /// let term = election.campaign().await?;
    /// let leader = election.leader().await?.expect("someone leads");
    /// assert_eq!((leader.fence, leader.label.as_deref()), (Some(term.fence()), Some("node-a:8080")));
    /// assert!(LeaderElection::new(&client, "x")?.with_label("has spaces").is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_label(mut self, label: &str) -> Result<LeaderElection> {
        if dflockd_client::Label::new(label).is_none() {
            return Err(ErrorKind::InvalidArgument(format!(
                "label {label:?}: 1–64 printable ASCII bytes without spaces"
            ))
            .into());
        }
        self.label = Some(label.to_string());
        Ok(self)
    }

    /// Who leads now (anyone's view, not only this candidate's): the
    /// term's fence and proclaimed label; `None` while nobody leads. One
    /// `stats` request to the election's server.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// match election.leader().await? {
    ///     Some(leader) => println!("led by {:?} (term fence {:?})", leader.label, leader.fence),
    ///     None => println!("no leader right now"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn leader(&self) -> Result<Option<Leader>> {
        leader_of(&self.lock).await
    }

    /// Who leads, kept up to date: a receiver whose value changes when the
    /// leader (its fence or label) does, from a task that asks every
    /// second while any receiver lives. Failed polls are skipped (the
    /// value stays as last seen). Needs a Tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) {
    /// let mut leader = election.observe();
    /// while leader.changed().await.is_ok() {
    ///     match &*leader.borrow() {
    ///         Some(now) => println!("leader: {:?}, term fence {:?}", now.label, now.fence),
    ///         None => println!("no leader"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn observe(&self) -> watch::Receiver<Option<Leader>> {
        let (tx, rx) = watch::channel(None);
        let lock = self.lock.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                match leader_of(&lock).await {
                    Ok(now) => {
                        tx.send_if_modified(|seen| {
                            let changed = *seen != now;
                            *seen = now;
                            changed
                        });
                    }
                    Err(error) => tracing::debug!(%error, "observe: poll failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(OBSERVE_EVERY) => {}
                    _ = tx.closed() => {}
                }
            }
        });
        rx
    }

    /// Leases of this length (shorter = faster failover, more renewals).
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // A crashed leader that cannot be noticed by a closed connection is replaced within 10 s.
    /// let election = dflockd_recipes::LeaderElection::new(&client, "service/leader")?.with_lease(Duration::from_secs(10));
    /// # Ok(()) }
    /// ```
    pub fn with_lease(mut self, lease: Duration) -> LeaderElection {
        self.lock = self.lock.with_lease(lease);
        self
    }

    /// Current leadership, observable.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// use dflockd_recipes::{LeaderElection, Leadership};
    /// let election = LeaderElection::new(&client, "service/leader")?;
    /// let leadership = election.leadership();
    /// assert_eq!(*leadership.borrow(), Leadership::Follower);
    /// let term = election.campaign().await?;
    /// assert_eq!(*leadership.borrow(), Leadership::Leader { fence: term.fence() });
    /// # Ok(()) }
    /// ```
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    /// Whether this candidate leads right now.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// assert!(!election.is_leader());
    /// let term = election.campaign().await?;
    /// assert!(election.is_leader());
    /// term.resign().await?;
    /// assert!(!election.is_leader());
    /// # Ok(()) }
    /// ```
    pub fn is_leader(&self) -> bool {
        matches!(*self.state.borrow(), Leadership::Leader { .. })
    }

    /// Waits until this candidate leads. Transport failures are retried;
    /// other errors are returned — among them `ErrorKind::NotLeader` from a
    /// cluster follower, which would answer it forever.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let election = dflockd_recipes::LeaderElection::new(&client, "service/leader")?;
    /// let term = election.campaign().await?; // waits while someone else leads
    /// assert!(election.is_leader());
    /// term.resign().await?;
    /// # Ok(()) }
    /// ```
    pub async fn campaign(&self) -> Result<Term> {
        loop {
            match self.lock.acquire_within(self.poll).await {
                Ok(Some(lease)) => {
                    if let Some(label) = &self.label
                        && let Err(error) = lease.proclaim(label).await
                    {
                        tracing::warn!(%error, "the new term could not proclaim its label");
                    }
                    return Ok(Term::new(lease, self.state.clone()));
                }
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
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// let election = dflockd_recipes::LeaderElection::new(&client, "scheduler/leader")?;
    /// let stop = CancellationToken::new(); // cancel on SIGTERM to resign cleanly
    /// election
    ///     .run_as_leader(stop, |ctx| async move {
    ///         while !ctx.is_cancelled() {
    ///             // schedule one round, tagging writes with ctx.fence()
    ///             tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
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
///
/// ```no_run
/// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
/// let term = election.campaign().await?;
/// println!("leading with fence {}", term.fence());
/// tokio::select! {
///     _ = term.lost() => println!("deposed"),
///     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => { term.resign().await?; }
/// }
/// # Ok(()) }
/// ```
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
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// let first = election.campaign().await?;
    /// let first_fence = first.fence();
    /// first.resign().await?;
    /// let second = election.campaign().await?;
    /// assert!(second.fence() > first_fence); // a later term has a larger fence
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The term's token.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// let term = election.campaign().await?;
    /// let token = term.token();
    /// assert_eq!(token.fence(), term.fence());
    /// println!("publish leader token {token}");
    /// # Ok(()) }
    /// ```
    pub fn token(&self) -> Token {
        self.token
    }

    /// The lease behind the term.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// let term = election.campaign().await?;
    /// let scope = dflockd_recipes::LeaseScope::new(term.lease()); // leader-only tasks stop with the term
    /// # Ok(()) }
    /// ```
    pub fn lease(&self) -> &Lease {
        self.lease.as_ref().expect("a live term holds its lease")
    }

    /// Resolves when leadership is lost.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// let term = election.campaign().await?;
    /// term.lost().await;
    /// assert!(!election.is_leader());
    /// # Ok(()) }
    /// ```
    pub async fn lost(&self) {
        self.monitor.lost().await;
    }

    /// Gives leadership up.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// use dflockd_client::Released;
    /// let election = dflockd_recipes::LeaderElection::new(&client, "service/leader")?;
    /// let term = election.campaign().await?;
    /// assert_eq!(term.resign().await?, Released::Released);
    /// assert!(!election.is_leader());
    /// # Ok(()) }
    /// ```
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
///
/// ```no_run
/// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
/// use tokio_util::sync::CancellationToken;
/// election
///     .run_as_leader(CancellationToken::new(), |ctx: dflockd_recipes::LeaderContext| async move {
///         println!("term {} until at least {:?}", ctx.fence(), ctx.deadline());
///         ctx.cancelled().await;
///     })
///     .await?;
/// # Ok(()) }
/// ```
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
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         // Storage rejects writes carrying a smaller fence than it has seen.
    ///         let write = format!("UPDATE config SET v = 2 WHERE fence <= {}", ctx.fence());
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The term's token.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         assert_eq!(ctx.token().fence(), ctx.fence());
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether leadership is gone.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         for shard in 0..64 {
    ///             if ctx.is_cancelled() { break; }
    ///             // rebalance `shard` …
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when leadership is gone.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         // Serve as leader until deposed or stopped.
    ///         ctx.cancelled().await;
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// A token cancelled when leadership is gone.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         let stop = ctx.cancellation_token();
    ///         let worker = tokio::spawn(async move { stop.cancelled().await });
    ///         let _ = worker.await;
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The latest instant this term is known valid.
    ///
    /// ```no_run
    /// # async fn demo(election: dflockd_recipes::LeaderElection) -> dflockd_client::Result<()> {
    /// use tokio_util::sync::CancellationToken;
    /// election
    ///     .run_as_leader(CancellationToken::new(), |ctx| async move {
    ///         // Flush before the term could end, even if renewals fail.
    ///         tokio::time::sleep_until(ctx.deadline()).await;
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn deadline(&self) -> Instant {
        self.monitor.deadline()
    }
}

/// The leader of the election on `lock`: its holder, if any.
async fn leader_of(lock: &Lock) -> Result<Option<Leader>> {
    Ok(lock
        .holder()
        .await?
        .filter(|entry| entry.owner_conn_id != 0)
        .map(|entry| Leader {
            fence: entry.fence,
            label: entry.label,
        }))
}
