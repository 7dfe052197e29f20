//! The `Lease` guard: what a successful acquire returns.

use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{Key, Kind, Reply, Request, Token};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::inner::ClientInner;
use crate::lane::{LaneHandle, LaneRef};
use crate::lease_state::{LeaseShared, LossReason};
use crate::renewal::LeaseId;
use crate::resend;
use crate::supervisor::Untrack;
use crate::{ErrorKind, Result};

/// What [`Lease::release`] found.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
/// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
/// use dflockd_client::Released;
/// let lease = client.lock("deploy")?.acquire().await?;
/// assert_eq!(lease.release().await?, Released::Released);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The server released the grant.
    Released,
    /// The lease had already been lost; nothing was held any more.
    AlreadyLost,
}

/// A held lock or semaphore slot, renewed in the background until released
/// or lost.
///
/// * [`lost`](Self::lost) resolves, and [`cancellation_token`](Self::cancellation_token)
///   fires, the moment the lease is known lost — stop the protected work then.
/// * [`deadline`](Self::deadline) is the latest instant the lease is known to
///   be valid (measured from when the last grant or renew request was sent).
/// * [`release`](Self::release) frees it and tells whether it was still held.
/// * Dropping the guard releases it in the background.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// let lease = client.lock("reports/nightly")?.acquire().await?;
/// tokio::select! {
///     _ = lease.lost() => eprintln!("lost the lock; stopping"),
///     _ = async { /* the protected work, passing lease.fence() to storage */ } => {}
/// }
/// lease.release().await?;
/// # Ok(()) }
/// ```
pub struct Lease {
    inner: Option<Inner>,
}

struct Inner {
    id: LeaseId,
    server: usize,
    key: Key,
    kind: Kind,
    token: Token,
    shared: Arc<LeaseShared>,
    wait_lane: Option<LaneHandle>,
    client: Arc<ClientInner>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("Lease")
                .field("key", &inner.key)
                .field("fence", &inner.token.fence())
                .field("lost", &inner.shared.is_lost())
                .finish(),
            None => f.write_str("Lease(released)"),
        }
    }
}

impl Lease {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: LeaseId,
        server: usize,
        key: Key,
        kind: Kind,
        token: Token,
        shared: Arc<LeaseShared>,
        wait_lane: Option<LaneHandle>,
        client: Arc<ClientInner>,
    ) -> Lease {
        Lease {
            inner: Some(Inner {
                id,
                server,
                key,
                kind,
                token,
                shared,
                wait_lane,
                client,
            }),
        }
    }

    fn inner(&self) -> &Inner {
        self.inner
            .as_ref()
            .expect("a live Lease always has its state")
    }

    /// The key.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let lease = client.lock("reports/nightly")?.acquire().await?;
    /// assert_eq!(lease.key().to_string_lossy(), "reports/nightly");
    /// # Ok(()) }
    /// ```
    pub fn key(&self) -> &Key {
        &self.inner().key
    }

    /// The grant token (send it with writes to fenced storage).
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// // The token's text form is what fenced storage (or `dflock fence`) checks.
    /// let header = format!("X-Lock-Token: {}", lease.token());
    /// assert_eq!(lease.token().fence(), lease.fence());
    /// # }
    /// ```
    pub fn token(&self) -> Token {
        self.inner().token
    }

    /// The fence: larger means a later grant of this key.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let lock = client.lock("ledger")?;
    /// let first = lock.acquire().await?;
    /// let first_fence = first.fence();
    /// first.release().await?;
    /// let second = lock.acquire().await?;
    /// assert!(second.fence() > first_fence); // storage can reject the older writer
    /// # Ok(()) }
    /// ```
    pub fn fence(&self) -> u64 {
        self.inner().token.fence()
    }

    /// The lease length the server last applied.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let lease = client.lock("ledger")?.with_lease(Duration::from_secs(45)).acquire().await?;
    /// assert_eq!(lease.ttl(), Duration::from_secs(45));
    /// # Ok(()) }
    /// ```
    pub fn ttl(&self) -> Duration {
        self.inner().shared.timing().1
    }

    /// The latest instant the lease is known valid; work must be finished
    /// (or checkpointed) before it. Renewals move it forward.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// // Stop in good time: never start a step that could outlast the lease.
    /// let left = lease.deadline().saturating_duration_since(tokio::time::Instant::now());
    /// println!("safe for another {left:?}");
    /// # }
    /// ```
    pub fn deadline(&self) -> Instant {
        self.inner().shared.timing().0
    }

    /// Whether the lease is known lost.
    ///
    /// ```no_run
    /// # fn demo(lease: dflockd_client::Lease, batches: Vec<Vec<u8>>) {
    /// for batch in batches {
    ///     if lease.is_lost() {
    ///         break; // another process may hold the lock now
    ///     }
    ///     // write the batch …
    /// }
    /// # }
    /// ```
    pub fn is_lost(&self) -> bool {
        self.inner().shared.is_lost()
    }

    /// Why the lease was lost, once it is.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// assert_eq!(lease.loss_reason(), None); // still held
    /// lease.lost().await;
    /// eprintln!("lost: {:?}", lease.loss_reason().unwrap());
    /// # }
    /// ```
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.inner().shared.reason()
    }

    /// Resolves when the lease is lost.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// tokio::select! {
    ///     _ = lease.lost() => eprintln!("lease lost; abandoning the work"),
    ///     _ = tokio::time::sleep(Duration::from_secs(10)) => { lease.release().await?; }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.inner().shared.lost_token().cancelled()
    }

    /// A token cancelled when the lease is lost; hand clones to tasks doing
    /// the protected work.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let stop = lease.cancellation_token();
    /// let worker = tokio::spawn(async move {
    ///     while !stop.is_cancelled() {
    ///         // one unit of protected work …
    ///     }
    /// });
    /// # }
    /// ```
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner().shared.lost_token().child_token()
    }

    /// A cheap, cloneable view of this lease's state (lost or not, deadline)
    /// that outlives borrows of the guard — for supervisors of the protected
    /// work, such as a task scope that must stop before the deadline.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let monitor = lease.monitor(); // 'static, unlike `lease.lost()`
    /// tokio::spawn(async move {
    ///     monitor.lost().await;
    ///     eprintln!("lease lost: {:?}", monitor.loss_reason());
    /// });
    /// # }
    /// ```
    pub fn monitor(&self) -> LeaseMonitor {
        LeaseMonitor {
            shared: Arc::clone(&self.inner().shared),
        }
    }

    /// Proclaims `label` as this lock's holder, for others to read with
    /// [`Lock::holder`](crate::Lock::holder) (and in `stats`): say, the
    /// address a leader serves on. Replicated with the hold, so it
    /// survives a cluster failover; gone when the lease ends. An
    /// extension of this project's server over the multiplexed connection:
    /// other servers answer it `ErrorKind::Server`.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lock = client.lock("service/leader")?;
    /// let lease = lock.acquire().await?;
    /// lease.proclaim("node-a:8080").await?;
    /// let holder = lock.holder().await?.expect("held");
    /// assert_eq!(holder.label.as_deref(), Some("node-a:8080"));
    /// assert_eq!(holder.fence, Some(lease.fence()));
    /// assert!(lease.proclaim("two words").await.is_err()); // 1–64 printable bytes, no spaces
    /// # Ok(()) }
    /// ```
    pub async fn proclaim(&self, label: &str) -> Result<()> {
        let inner = self.inner();
        let about = |error: crate::Error| {
            error.about(&inner.key, &inner.client.servers[inner.server].label)
        };
        let label = dflockd_proto::Label::new(label).ok_or_else(|| {
            about(
                ErrorKind::InvalidArgument(format!(
                    "label {label:?}: 1–64 printable ASCII bytes without spaces"
                ))
                .into(),
            )
        })?;
        if inner.kind != Kind::Lock {
            return Err(about(
                ErrorKind::InvalidArgument("only a lock's holder proclaims a label".into()).into(),
            ));
        }
        let request = Request::Label {
            key: inner.key.clone(),
            token: inner.token.into(),
            label,
        };
        match inner.client.control_call(inner.server, request, None).await {
            Ok((Reply::Ok, _)) => Ok(()),
            Ok((other, _)) => Err(about(crate::connection::failure(other))),
            Err(error) => Err(about(error)),
        }
    }

    /// Releases the lease. `Released::AlreadyLost` if it had been lost (or the
    /// server no longer knew the token).
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) -> dflockd_client::Result<()> {
    /// use dflockd_client::Released;
    /// if lease.release().await? == Released::AlreadyLost {
    ///     eprintln!("the lease had lapsed: the work may have overlapped another holder's");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<Released> {
        let inner = self
            .inner
            .take()
            .expect("a live Lease always has its state");
        let key = inner.key.clone();
        let client = Arc::clone(&inner.client);
        let server = inner.server;
        inner
            .release()
            .await
            .map_err(|e| e.about(&key, &client.servers[server].label))
    }
}

impl Inner {
    async fn release(self) -> Result<Released> {
        let _ = self.client.supervisor.tell(Untrack(self.id)).try_send();
        let was_lost = self.shared.is_lost();
        let result = self.send_release().await;
        // Mark it lost for anyone still watching the token: it is gone now.
        self.shared.mark_lost(LossReason::ClientStopped);
        if let Some(lane) = &self.wait_lane {
            lane.close();
        }
        match result {
            Ok((dflockd_proto::Reply::Ok, _)) if !was_lost => Ok(Released::Released),
            Ok((dflockd_proto::Reply::Ok, _)) => Ok(Released::AlreadyLost),
            Ok((dflockd_proto::Reply::Failure(dflockd_proto::Status::Error), _)) => {
                Ok(Released::AlreadyLost)
            }
            Ok((dflockd_proto::Reply::Failure(dflockd_proto::Status::ErrorDraining), _)) => {
                Err(ErrorKind::Draining.into())
            }
            Ok((other, _)) => {
                Err(ErrorKind::Protocol(format!("unexpected reply to release: {other:?}")).into())
            }
            // The connection the lease was bound to is gone: so is the lease
            // (with auto-release), or it will expire.
            Err(_) if was_lost => Ok(Released::AlreadyLost),
            Err(error) => Err(error),
        }
    }
}

impl Inner {
    /// Sends the release. On a cluster session's connection it is retried
    /// through a failover (a broken connection, `error_not_leader`, a
    /// leader answering `error_draining` as it stops) until
    /// it is answered, for at most one lease length: by then the server
    /// has let the lease go by itself.
    async fn send_release(&self) -> Result<(Reply, LaneRef)> {
        let retry = self.client.servers[self.server].is_cluster && self.wait_lane.is_none();
        let give_up = Instant::now() + self.shared.timing().1;
        let mut backoff = RELEASE_RETRY_MIN;
        loop {
            let result = self
                .client
                .control_call(
                    self.server,
                    Request::Release {
                        key: self.key.clone(),
                        namespace: self.kind.namespace(),
                        token: self.token.into(),
                    },
                    None,
                )
                .await;
            let failed_over = match &result {
                Ok((reply, _)) => resend::leader_gone(reply),
                Err(error) => resend::failing_over(error),
            };
            if !retry || !failed_over || Instant::now() + backoff > give_up {
                return result;
            }
            tracing::debug!(key = %self.key, "release interrupted by a failover; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RELEASE_RETRY_MAX);
        }
    }
}

/// First and longest pause between attempts of a release through a
/// failover.
const RELEASE_RETRY_MIN: Duration = Duration::from_millis(50);
const RELEASE_RETRY_MAX: Duration = Duration::from_secs(1);

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let runtime = inner.client.runtime.clone();
            runtime.spawn(async move {
                if let Err(error) = inner.release().await {
                    tracing::warn!(%error, "background release failed; the lease will expire on the server");
                }
            });
        }
    }
}

/// A read-only view of a lease's state, from [`Lease::monitor`].
///
/// ```no_run
/// # async fn demo(lease: dflockd_client::Lease) {
/// let monitor = lease.monitor();
/// tokio::spawn(async move {
///     monitor.lost().await;
///     eprintln!("lost; the lease was valid until {:?}", monitor.deadline());
/// });
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseMonitor {
    shared: Arc<LeaseShared>,
}

impl LeaseMonitor {
    /// Whether the lease is known lost (or released).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lease = client.lock("jobs/compact")?.acquire().await?;
    /// let monitor = lease.monitor();
    /// assert!(!monitor.is_lost());
    /// lease.release().await?;
    /// assert!(monitor.is_lost()); // a released lease counts as lost
    /// # Ok(()) }
    /// ```
    pub fn is_lost(&self) -> bool {
        self.shared.is_lost()
    }

    /// Resolves when the lease is lost (or released).
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let monitor = lease.monitor();
    /// tokio::spawn(async move {
    ///     monitor.lost().await;
    ///     eprintln!("stop writing: the lease is gone");
    /// });
    /// # }
    /// ```
    pub async fn lost(&self) {
        self.shared.lost_token().cancelled().await;
    }

    /// The latest instant the lease is known valid.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let monitor = lease.monitor();
    /// // Wake up shortly before the lease could run out.
    /// tokio::time::sleep_until(monitor.deadline()).await;
    /// # }
    /// ```
    pub fn deadline(&self) -> Instant {
        self.shared.timing().0
    }

    /// Why it was lost, once it is.
    ///
    /// ```no_run
    /// # async fn demo(lease: dflockd_client::Lease) {
    /// let monitor = lease.monitor();
    /// monitor.lost().await;
    /// if monitor.loss_reason() == Some(dflockd_client::LossReason::Refused) {
    ///     eprintln!("the server gave the lock to someone else");
    /// }
    /// # }
    /// ```
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.shared.reason()
    }
}
