//! Task trees that stop when their lease is lost.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dflockd_client::{Lease, LeaseMonitor};
use kameo::prelude::*;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs tasks and actors under a lease. When the lease is lost (or the scope
/// is closed), every child is asked to stop — tasks through their
/// cancellation token, actors with `stop_gracefully` — and whatever is still
/// running at the lease deadline minus a safety margin is aborted (tasks) or
/// killed (actors). The deadline is the latest instant the lease can still
/// be valid on the server, so children stop before anyone else could be
/// granted the key.
///
/// ```no_run
/// # async fn demo(lease: dflockd_client::Lease) {
/// let scope = dflockd_recipes::LeaseScope::new(&lease);
/// scope.spawn(|cancel| async move {
///     while !cancel.is_cancelled() {
///         // one unit of protected work
///         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
///     }
/// });
/// scope.stopped().await; // returns once the lease is lost and children stopped
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseScope {
    inner: Arc<Inner>,
}

struct Inner {
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Running tasks, to abort at the deadline; each leaves when it ends
    /// (recorded before it is spawned, its handle filled in after).
    aborts: Children<Option<AbortHandle>>,
    /// Adopted actors still alive, to kill at the deadline.
    kills: Children<Kill>,
    done: CancellationToken,
}

/// The scope's running children by a number of their own: a child leaves
/// when it ends, so a long-lived scope costs only what still runs.
struct Children<T> {
    next: std::sync::atomic::AtomicU64,
    running: Mutex<std::collections::HashMap<u64, T>>,
}

impl<T> Children<T> {
    fn new() -> Children<T> {
        Children {
            next: std::sync::atomic::AtomicU64::new(0),
            running: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, T>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Removes child `key` from `children` when dropped: when the child's
/// future ends, is aborted, or its runtime drops it.
struct Leave<T: Send + 'static> {
    inner: Arc<Inner>,
    key: u64,
    children: fn(&Inner) -> &Children<T>,
}

impl<T: Send + 'static> Drop for Leave<T> {
    fn drop(&mut self) {
        (self.children)(&self.inner).lock().remove(&self.key);
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseScope")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

type Kill = Box<dyn Fn() + Send + Sync>;

/// Time kept in hand before the lease deadline, for the abort itself.
///
/// ```
/// // Children still running 50 ms before the lease deadline are aborted.
/// assert_eq!(dflockd_recipes::ABORT_MARGIN, std::time::Duration::from_millis(50));
/// ```
pub const ABORT_MARGIN: Duration = Duration::from_millis(50);

impl LeaseScope {
    /// A scope bound to `lease`.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let lease = client.lock("jobs/compact")?.acquire().await?;
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// scope.spawn(|cancel| async move { cancel.cancelled().await });
    /// # Ok(()) }
    /// ```
    pub fn new(lease: &Lease) -> LeaseScope {
        LeaseScope::with_monitor(lease.monitor())
    }

    /// A scope bound to a lease through its monitor.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// // The monitor is 'static: the scope can be made where the lease is not at hand.
    /// let monitor = lease.monitor();
    /// let scope = tokio::spawn(async move { dflockd_recipes::LeaseScope::with_monitor(monitor) }).await.unwrap();
    /// # }
    /// ```
    pub fn with_monitor(monitor: LeaseMonitor) -> LeaseScope {
        let inner = Arc::new(Inner {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            aborts: Children::new(),
            kills: Children::new(),
            done: CancellationToken::new(),
        });
        let watcher = Arc::clone(&inner);
        tokio::spawn(async move {
            tokio::select! {
                _ = monitor.lost() => {}
                _ = watcher.cancel.cancelled() => {}
            }
            watcher
                .shut_down(
                    monitor
                        .deadline()
                        .checked_sub(ABORT_MARGIN)
                        .unwrap_or_else(Instant::now),
                )
                .await;
        });
        LeaseScope { inner }
    }

    /// Spawns a task; it receives a token cancelled when the scope stops.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lease = client.lock("jobs/compact")?.acquire().await?;
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// scope.spawn(|cancel| async move { cancel.cancelled().await });
    /// scope.close(); // e.g. before releasing: children are told to stop
    /// scope.stopped().await;
    /// lease.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let key = self.inner.aborts.key();
        let leave = Leave {
            inner: Arc::clone(&self.inner),
            key,
            children: |inner| &inner.aborts,
        };
        let child = task(self.inner.cancel.child_token());
        // Recorded before it runs, so that ending (leaving) cannot come
        // first; a task that ended already is not recorded again.
        self.inner.aborts.lock().insert(key, None);
        let handle = self.inner.tracker.spawn(async move {
            let _leave = leave;
            child.await;
        });
        if let Some(slot) = self.inner.aborts.lock().get_mut(&key) {
            *slot = Some(handle.abort_handle());
        }
        if self.inner.cancel.is_cancelled() {
            handle.abort();
        }
    }

    /// How many children (tasks and adopted actors) are still running.
    /// Children that ended are forgotten: a scope that spawns a task per
    /// request stays as small as what runs.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lease = client.lock("jobs/compact")?.acquire().await?;
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    /// scope.spawn(|_| async move { let _ = rx.await; });
    /// assert_eq!(scope.running(), 1);
    /// drop(tx);
    /// while scope.running() > 0 { tokio::task::yield_now().await; }
    /// # Ok(()) }
    /// ```
    pub fn running(&self) -> usize {
        self.inner.aborts.lock().len() + self.inner.kills.lock().len()
    }

    /// Puts a running actor under the scope: it is stopped gracefully when
    /// the scope stops, and killed at the deadline if still alive.
    ///
    /// ```no_run
    /// # use kameo::actor::ActorRef;
    /// # async fn demo<A: kameo::Actor>(lease: dflockd_client::Lease, indexer: ActorRef<A>) {
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// // Stopped gracefully when the lease is lost; killed at the deadline if still running.
    /// scope.adopt_actor(indexer);
    /// # }
    /// ```
    pub fn adopt_actor<A: Actor>(&self, actor: ActorRef<A>) {
        let graceful = actor.clone();
        let key = self.inner.kills.key();
        let leave = Leave {
            inner: Arc::clone(&self.inner),
            key,
            children: |inner| &inner.kills,
        };
        self.inner
            .kills
            .lock()
            .insert(key, Box::new(move || graceful.kill()));
        let cancel = self.inner.cancel.clone();
        // One task per actor, ending with it: it asks the actor to stop
        // when the scope stops.
        self.inner.tracker.spawn(async move {
            let _leave = leave;
            tokio::select! {
                _ = actor.wait_for_shutdown() => {}
                _ = cancel.cancelled() => {
                    let _ = actor.stop_gracefully().await;
                    actor.wait_for_shutdown().await;
                }
            }
        });
    }

    /// A token cancelled when the scope stops (lease lost or [`close`](Self::close)).
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// let stop = scope.token(); // for code not spawned through the scope
    /// while !stop.is_cancelled() {
    ///     tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    /// }
    /// # }
    /// ```
    pub fn token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Stops the scope now (as if the lease were lost), e.g. before a
    /// deliberate release.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) -> dflockd_client::Result<()> {
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// // … work in the scope; then finish deliberately:
    /// scope.close();
    /// scope.stopped().await;
    /// lease.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }

    /// Resolves when the scope has stopped and every child has ended.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// scope.spawn(|cancel| async move { cancel.cancelled().await });
    /// scope.stopped().await; // the lease was lost and the child has ended
    /// assert!(scope.is_stopped());
    /// # }
    /// ```
    pub async fn stopped(&self) {
        self.inner.done.cancelled().await;
    }

    /// Whether the scope has stopped and every child has ended.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let scope = dflockd_recipes::LeaseScope::new(&lease);
    /// assert!(!scope.is_stopped());
    /// scope.close();
    /// scope.stopped().await;
    /// assert!(scope.is_stopped());
    /// # }
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.inner.done.is_cancelled()
    }
}

impl Inner {
    async fn shut_down(&self, hard_deadline: Instant) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(hard_deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("lease scope: children still running at the deadline, aborting");
            // Taken out first: an aborted child leaves (locks) as it drops.
            let aborts: Vec<AbortHandle> =
                self.aborts.lock().drain().filter_map(|(_, a)| a).collect();
            for abort in aborts {
                abort.abort();
            }
            let kills: Vec<Kill> = self.kills.lock().drain().map(|(_, k)| k).collect();
            for kill in kills {
                kill();
            }
            self.tracker.wait().await;
        }
        self.done.cancel();
    }
}
