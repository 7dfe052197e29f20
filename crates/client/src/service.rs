//! Grants by message, for kameo actors: a worker asks the [`GrantService`]
//! for a lease with [`RequestGrant`] and receives [`LeaseLost`] as a message
//! if the lease is later lost.

use std::time::Duration;

use kameo::error::Infallible;
use kameo::prelude::*;

use crate::{Client, Error, Lease, LeaseLost};

/// An actor that acquires leases on behalf of other actors.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use kameo::actor::Spawn;
/// use dflockd_client::{GrantService, RequestGrant};
/// let service = GrantService::spawn(client);
/// let lease = service.ask(RequestGrant::lock("jobs/compact")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GrantService {
    client: Client,
}

impl Actor for GrantService {
    type Args = Client;
    type Error = Infallible;

    async fn on_start(client: Client, _: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(GrantService { client })
    }
}

/// Ask for a lock or a semaphore slot. The reply is the [`Lease`] (or the
/// error, `ErrorKind::Timeout` if it stayed busy); `notify` receives
/// [`LeaseLost`] if the lease is lost later.
///
/// ```no_run
/// # use kameo::actor::ActorRef;
/// # async fn demo(service: ActorRef<dflockd_client::GrantService>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use dflockd_client::RequestGrant;
/// let request = RequestGrant::semaphore("encoders", 4).timeout(Duration::from_secs(30));
/// let lease = service.ask(request).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RequestGrant {
    /// The key.
    pub key: String,
    /// `None` for a lock, `Some(limit)` for a semaphore slot.
    pub limit: Option<u32>,
    /// How long to wait; `None` uses the client default.
    pub timeout: Option<Duration>,
    /// Lease length; `None` uses the client default.
    pub lease: Option<Duration>,
    /// Who hears about loss.
    pub notify: Option<Recipient<LeaseLost>>,
}

impl RequestGrant {
    /// A lock request with the client's defaults.
    ///
    /// ```
    /// let request = dflockd_client::RequestGrant::lock("jobs/compact");
    /// assert_eq!(request.key, "jobs/compact");
    /// assert_eq!(request.limit, None);
    /// ```
    pub fn lock(key: impl Into<String>) -> RequestGrant {
        RequestGrant {
            key: key.into(),
            limit: None,
            timeout: None,
            lease: None,
            notify: None,
        }
    }

    /// A semaphore-slot request with the client's defaults.
    ///
    /// ```
    /// let request = dflockd_client::RequestGrant::semaphore("encoders", 4);
    /// assert_eq!(request.limit, Some(4));
    /// ```
    pub fn semaphore(key: impl Into<String>, limit: u32) -> RequestGrant {
        RequestGrant {
            limit: Some(limit),
            ..RequestGrant::lock(key)
        }
    }

    /// Waits at most this long.
    ///
    /// ```
    /// use std::time::Duration;
    /// let request = dflockd_client::RequestGrant::lock("jobs/compact").timeout(Duration::from_secs(5));
    /// assert_eq!(request.timeout, Some(Duration::from_secs(5)));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> RequestGrant {
        self.timeout = Some(timeout);
        self
    }

    /// Requests this lease length.
    ///
    /// ```
    /// use std::time::Duration;
    /// let request = dflockd_client::RequestGrant::lock("jobs/compact").lease(Duration::from_secs(90));
    /// assert_eq!(request.lease, Some(Duration::from_secs(90)));
    /// ```
    pub fn lease(mut self, lease: Duration) -> RequestGrant {
        self.lease = Some(lease);
        self
    }

    /// Sends [`LeaseLost`] to `recipient` if the lease is lost.
    ///
    /// ```no_run
    /// # use kameo::actor::{ActorRef, Recipient};
    /// # use dflockd_client::{GrantService, LeaseLost, RequestGrant};
    /// # async fn demo(service: ActorRef<GrantService>, me: Recipient<LeaseLost>) -> Result<(), Box<dyn std::error::Error>> {
    /// // `me`: the asking actor's `actor_ref.recipient()`; it handles `LeaseLost`.
    /// let lease = service.ask(RequestGrant::lock("jobs/compact").notify(me)).await?;
    /// # Ok(()) }
    /// ```
    pub fn notify(mut self, recipient: Recipient<LeaseLost>) -> RequestGrant {
        self.notify = Some(recipient);
        self
    }
}

async fn grant(client: Client, request: RequestGrant) -> Result<Lease, Error> {
    macro_rules! acquire {
        ($handle:expr) => {{
            let mut handle = $handle;
            if let Some(lease) = request.lease {
                handle = handle.with_lease(lease);
            }
            if let Some(timeout) = request.timeout {
                handle = handle.with_timeout(timeout);
            }
            if let Some(notify) = request.notify {
                handle = handle.notify(notify);
            }
            handle.acquire().await
        }};
    }
    match request.limit {
        None => acquire!(client.lock(&request.key)?),
        Some(limit) => acquire!(client.semaphore(&request.key, limit)?),
    }
}

impl Message<RequestGrant> for GrantService {
    type Reply = DelegatedReply<Result<Lease, Error>>;

    async fn handle(
        &mut self,
        request: RequestGrant,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        // Acquiring may wait; do it off the actor so other requests proceed.
        ctx.spawn(grant(self.client.clone(), request))
    }
}
