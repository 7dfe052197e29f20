//! Two-phase acquire: what an enqueue got ([`Enqueue`]) and the queue
//! place a caller keeps until it waits for the grant ([`Ticket`]).

use std::time::Duration;

use dflockd_proto::Request;

use crate::connection::seconds;
use crate::lease::Lease;
use crate::target::Target;
use crate::transport::{Enqueueing, Place, Transport};
use crate::{ErrorKind, Result};

/// Result of a two-phase [`Lock::enqueue`](crate::Lock::enqueue) / [`Semaphore::enqueue`](crate::Semaphore::enqueue).
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_client::Enqueue;
/// let lease = match client.lock("jobs/compact")?.enqueue().await? {
///     Enqueue::Acquired(lease) => lease,
///     Enqueue::Queued(ticket) => ticket.wait(Duration::from_secs(30)).await?,
/// };
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum Enqueue {
    /// Granted at once.
    Acquired(Lease),
    /// Queued: [`Ticket::wait`] for the grant. Dropping the ticket leaves the
    /// queue.
    Queued(Ticket),
}

/// A place in a key's queue: a ticket on the multiplexed connection, or (on
/// a plain server) a connection of its own, pinged while it waits.
///
/// Dropping a ticket without [`wait`](Self::wait)ing gives the place up in
/// the background; a grant the place may have received meanwhile is
/// released, not left to the server's auto-release (which may be off).
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// if let dflockd_client::Enqueue::Queued(ticket) = client.lock("jobs/compact")?.enqueue().await? {
///     // In the queue now; do other set-up while keeping the place.
///     let lease = ticket.wait(Duration::from_secs(60)).await?;
/// }
/// # Ok(()) }
/// ```
pub struct Ticket {
    pub(crate) target: Target,
    /// `None` only once `wait` has taken it.
    pub(crate) place: Option<Place>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            place.abandon(self.target.resource());
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.target.key)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// Waits up to `timeout` (rounded up to whole seconds) for the grant. On
    /// timeout the queue position is gone: an `ErrorKind::Timeout` error.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// use std::time::Duration;
    /// use dflockd_client::Enqueue;
    /// let lock = client.lock("jobs/compact")?;
    /// let first = lock.acquire().await?;
    /// let Enqueue::Queued(ticket) = lock.enqueue().await? else { panic!("the lock is held") };
    /// first.release().await?; // the queued place is next
    /// let second = ticket.wait(Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait(self, timeout: Duration) -> Result<Lease> {
        let target = self.target.clone();
        self.wait_for_grant(timeout)
            .await
            .map_err(|e| target.about(e))
    }

    async fn wait_for_grant(mut self, timeout: Duration) -> Result<Lease> {
        // Validate first: on error the ticket is dropped, which gives the
        // place up cleanly.
        let request = Request::Wait {
            key: self.target.key.clone(),
            namespace: self.target.kind.namespace(),
            timeout: seconds(timeout)?,
        };
        let place = self
            .place
            .take()
            .expect("a ticket owns its place until it waits");
        let target = self.target.clone();
        drop(self);
        let grant = place
            .wait(target.inner(), request, timeout, target.resource())
            .await?;
        match grant {
            Some(grant) => Ok(target.track(grant)),
            None => Err(ErrorKind::Timeout.into()),
        }
    }
}

/// Two-phase acquire, phase 1, for `target`: granted at once, or a ticket
/// for its place in the queue.
pub(crate) async fn enqueue(target: &Target) -> Result<Enqueue> {
    let request = Request::Enqueue {
        key: target.key.clone(),
        kind: target.kind,
        lease: target.lease()?,
    };
    let transport = Transport::open(target.inner(), target.server).await?;
    Ok(match transport.enqueue(request, target.resource()).await? {
        Enqueueing::Acquired(grant) => Enqueue::Acquired(target.track(grant)),
        Enqueueing::Queued(place) => Enqueue::Queued(Ticket {
            target: target.clone(),
            place: Some(place),
        }),
    })
}
