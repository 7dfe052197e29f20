//! The [`Lock`] and [`Semaphore`] handles: a key on one server, with the
//! lease and wait settings of its requests.

use std::time::Duration;

use dflockd_proto::{Key, LockEntry};
use kameo::prelude::*;

use crate::lease::Lease;
use crate::lease_state::LeaseLost;
use crate::target::Target;
use crate::ticket::Enqueue;
use crate::{ErrorKind, Result};

macro_rules! handle_methods {
    ($handle:ident, $what:literal) => {
        impl $handle {
            /// The key.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// let lock = client.lock("jobs/nightly")?;
            /// assert_eq!(lock.key().as_bytes(), b"jobs/nightly");
            /// # Ok(()) }
            /// ```
            pub fn key(&self) -> &Key {
                &self.0.key
            }

            /// The index of the server this key lives on.
            ///
            /// ```no_run
            /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// let lock = client.lock("jobs/nightly")?;
            /// assert_eq!(lock.server(), client.server_for("jobs/nightly")?);
            /// # Ok(()) }
            /// ```
            pub fn server(&self) -> usize {
                self.0.server
            }

            /// Requests this lease length (rounded up to whole seconds)
            /// instead of the default.
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// let lease = client.lock("reindex")?.with_lease(Duration::from_secs(120)).acquire().await?;
            /// assert_eq!(lease.ttl(), Duration::from_secs(120));
            /// # Ok(()) }
            /// ```
            pub fn with_lease(mut self, lease: Duration) -> Self {
                self.0.lease = Some(lease);
                self
            }

            /// Waits this long in [`acquire`](Self::acquire) instead of the client default.
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// let slot = client.semaphore("gpu", 4)?.with_timeout(Duration::from_secs(60));
            /// let lease = slot.acquire().await?; // waits up to a minute for a free slot
            /// # Ok(()) }
            /// ```
            pub fn with_timeout(mut self, timeout: Duration) -> Self {
                self.0.timeout = timeout;
                self
            }

            /// Tells `owner` (any kameo actor handling [`LeaseLost`]) when a
            /// lease acquired through this handle is lost.
            ///
            /// ```no_run
            /// # use kameo::actor::Recipient;
            /// # use dflockd_client::LeaseLost;
            /// # async fn demo(client: dflockd_client::Client, worker: Recipient<LeaseLost>) -> dflockd_client::Result<()> {
            /// // `worker` is `actor_ref.recipient()` of an actor that handles `LeaseLost`.
            /// let lease = client.lock("jobs/compact")?.notify(worker).acquire().await?;
            /// # Ok(()) }
            /// ```
            pub fn notify(mut self, owner: Recipient<LeaseLost>) -> Self {
                self.0.owner = Some(owner);
                self
            }

            #[doc = concat!("Acquires the ", $what, ", waiting up to the handle's timeout; an `ErrorKind::Timeout` error if it stays busy.")]
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// match client.lock("deploy")?.acquire().await {
            ///     Ok(lease) => { /* deploy, then */ lease.release().await?; }
            ///     Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::Timeout) => eprintln!("still busy; try later"),
            ///     Err(other) => return Err(other),
            /// }
            /// # Ok(()) }
            /// ```
            pub async fn acquire(&self) -> Result<Lease> {
                let lease = self.0.acquire_within(self.0.timeout).await;
                lease
                    .and_then(|lease| lease.ok_or_else(|| ErrorKind::Timeout.into()))
                    .map_err(|e| self.0.about(e))
            }

            #[doc = concat!("Acquires the ", $what, " if it is free right now.")]
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// // Run the cron job on whichever host gets there first; the others skip it.
            /// if let Some(lease) = client.lock("cron/cleanup")?.try_acquire().await? {
            ///     lease.release().await?;
            /// }
            /// # Ok(()) }
            /// ```
            pub async fn try_acquire(&self) -> Result<Option<Lease>> {
                self.0.acquire_within(Duration::ZERO).await.map_err(|e| self.0.about(e))
            }

            #[doc = concat!("Acquires the ", $what, ", waiting up to `timeout` (rounded up to whole seconds); `None` if it stayed busy.")]
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// match client.semaphore("exports", 3)?.acquire_within(Duration::from_secs(5)).await? {
            ///     Some(lease) => { /* export, then */ lease.release().await?; }
            ///     None => eprintln!("all three export slots busy for 5 s"),
            /// }
            /// # Ok(()) }
            /// ```
            pub async fn acquire_within(&self, timeout: Duration) -> Result<Option<Lease>> {
                self.0.acquire_within(timeout).await.map_err(|e| self.0.about(e))
            }

            /// Two-phase acquire, phase 1: join the queue (or be granted at
            /// once) and come back for the grant with [`Ticket::wait`](crate::Ticket::wait).
            ///
            /// ```no_run
            /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
            /// use std::time::Duration;
            /// use dflockd_client::Enqueue;
            /// let lease = match client.semaphore("encoders", 2)?.enqueue().await? {
            ///     Enqueue::Acquired(lease) => lease,
            ///     Enqueue::Queued(ticket) => ticket.wait(Duration::from_secs(30)).await?,
            /// };
            /// # Ok(()) }
            /// ```
            pub async fn enqueue(&self) -> Result<Enqueue> {
                crate::ticket::enqueue(&self.0).await.map_err(|e| self.0.about(e))
            }
        }

        impl std::fmt::Debug for $handle {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($handle)).field("key", &self.0.key).field("kind", &self.0.kind).finish()
            }
        }
    };
}

/// A distributed FIFO lock on one key.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// let lock: dflockd_client::Lock = client.lock("billing/run")?;
/// let lease = lock.acquire().await?;
/// // … only one process in the cluster runs this section …
/// lease.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Lock(pub(crate) Target);

/// A distributed counting semaphore on one key.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// // At most 8 concurrent crawlers across all hosts.
/// let crawlers: dflockd_client::Semaphore = client.semaphore("crawlers", 8)?;
/// let slot = crawlers.acquire().await?;
/// slot.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Semaphore(pub(crate) Target);

handle_methods!(Lock, "lock");

impl Lock {
    /// Who holds this lock now, as the server's `stats` shows it: the
    /// holder's fence and the label it proclaimed
    /// ([`Lease::proclaim`](crate::Lease::proclaim)) — both only from this
    /// project's server over the multiplexed connection — the lease left
    /// and the waiters; `None` when nobody holds or waits. One `stats` request:
    /// it lists every busy key of the server, so poll it at human pace.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lock = client.lock("nightly/report")?;
    /// assert!(lock.holder().await?.is_none());
    /// let lease = lock.acquire().await?;
    /// assert_eq!(lock.holder().await?.and_then(|h| h.fence), Some(lease.fence()));
    /// # Ok(()) }
    /// ```
    pub async fn holder(&self) -> Result<Option<LockEntry>> {
        let target = &self.0;
        let stats = target
            .inner()
            .stats_of(target.server)
            .await
            .map_err(|e| target.about(e))?;
        let key = target.key.to_string_lossy();
        Ok(stats.locks.into_iter().find(|entry| entry.key == key))
    }
}
handle_methods!(Semaphore, "semaphore slot");
