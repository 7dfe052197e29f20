//! `Client`, its builder, and the `Lock` / `Semaphore` handles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dflockd_proto::{Key, Kind, Limit, Namespace, Request, Stats};
use kameo::actor::Spawn;
use kameo::prelude::*;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::connection::{expect_ok, expect_stats, lease_of, seconds};
use crate::inner::{ClientInner, ServerEntry};
use crate::lane::LaneTiming;
use crate::lease::Lease;
use crate::lease_state::{LeaseLost, LeaseShared};
use crate::options::{AuthToken, ConnectOptions, ServerAddr, Sharding, TlsOptions};
use crate::renewal::LeaseId;
use crate::server_conn::{ServerConn, ServerConnArgs};
use crate::supervisor::{LaneClosed, LeaseSupervisor, RenewPolicy, SupervisorArgs, Track};
use crate::transport::{Enqueueing, Grant, Place, Transport};
use crate::{Error, ErrorKind, Result};

/// Builds a [`Client`].
///
/// ```no_run
/// # async fn demo() -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// let client = dflockd_client::Client::builder()
///     .server("10.0.0.1:6388".parse()?)
///     .server("10.0.0.2:6388".parse()?)
///     .auth_token("s3cret")?
///     .default_lease(Duration::from_secs(30))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    servers: Vec<ServerAddr>,
    sharding: Sharding,
    options: ConnectOptions,
    renew_ratio: f64,
    default_lease: Option<Duration>,
    acquire_timeout: Duration,
    keepalive: Duration,
    max_renew_interval: Duration,
    renew_retry: Duration,
    reply_timeout: Duration,
    multiplex: bool,
}

impl Default for ClientBuilder {
    fn default() -> ClientBuilder {
        ClientBuilder {
            servers: Vec::new(),
            sharding: Sharding::Crc32,
            options: ConnectOptions::default(),
            renew_ratio: 1.0 / 3.0,
            default_lease: None,
            acquire_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            max_renew_interval: Duration::from_secs(15),
            renew_retry: Duration::from_millis(500),
            reply_timeout: Duration::from_secs(10),
            multiplex: true,
        }
    }
}

impl ClientBuilder {
    /// Adds a server (default when none is added: `127.0.0.1:6388`).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder()
    ///     .server("10.0.0.1:6388".parse()?)
    ///     .server("10.0.0.2:6388".parse()?)
    ///     .build()?; // connects lazily, on first use
    /// assert_eq!(client.servers().len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn server(mut self, addr: ServerAddr) -> Self {
        self.servers.push(addr);
        self
    }

    /// Sets all servers at once.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// use dflockd_client::{Client, ServerAddr};
    /// let addrs = ["10.0.0.1:6388", "10.0.0.2:6388"].map(|a| a.parse::<ServerAddr>());
    /// let client = Client::builder().servers(addrs.into_iter().collect::<Result<Vec<_>, _>>()?).build()?;
    /// assert_eq!(client.servers()[1].host(), "10.0.0.2");
    /// # Ok(()) }
    /// ```
    pub fn servers(mut self, addrs: impl IntoIterator<Item = ServerAddr>) -> Self {
        self.servers = addrs.into_iter().collect();
        self
    }

    /// How keys map to servers (default CRC-32).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// use std::sync::Arc;
    /// use dflockd_client::{Client, Sharding};
    /// let client = Client::builder()
    ///     .servers(["10.0.0.1:6388".parse()?, "10.0.0.2:6388".parse()?])
    ///     .sharding(Sharding::Custom(Arc::new(|_key: &str, _n: usize| 1)))
    ///     .build()?;
    /// assert_eq!(client.server_for("anything")?, 1);
    /// # Ok(()) }
    /// ```
    pub fn sharding(mut self, sharding: Sharding) -> Self {
        self.sharding = sharding;
        self
    }

    /// Connect with TLS.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use dflockd_client::{Client, TlsOptions};
    /// let client = Client::builder()
    ///     .server("locks.internal:6388".parse()?)
    ///     .tls(TlsOptions::with_ca_file("/etc/dflockd/ca.pem")?)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.options.tls = Some(tls);
        self
    }

    /// Send this shared secret first on every connection.
    ///
    /// ```
    /// use dflockd_client::Client;
    /// let builder = Client::builder().auth_token("s3cret")?;
    /// // A token must be a single line.
    /// assert!(Client::builder().auth_token("two\nlines").is_err());
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn auth_token(mut self, token: &str) -> Result<Self> {
        self.options.auth_token = Some(AuthToken::new(token)?);
        Ok(self)
    }

    /// Bound on TCP connect + TLS + auth (default 10 s).
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // Fail fast when a server is unreachable.
    /// let client = dflockd_client::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
    /// # Ok(()) }
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Renew after this fraction of the lease (default 1/3; must be in (0, 1)).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use dflockd_client::{Client, ErrorKind};
    /// // Renew a 30 s lease every 15 s.
    /// assert!(Client::builder().renew_ratio(0.5).build().is_ok());
    /// let error = Client::builder().renew_ratio(1.5).build().unwrap_err();
    /// assert!(matches!(error.kind(), ErrorKind::InvalidArgument(_)));
    /// # }
    /// ```
    pub fn renew_ratio(mut self, ratio: f64) -> Self {
        self.renew_ratio = ratio;
        self
    }

    /// Lease to request when a handle names none (default: the server's, 33 s).
    ///
    /// ```no_run
    /// # async fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let client = dflockd_client::Client::builder().default_lease(Duration::from_secs(60)).build()?;
    /// let lease = client.lock("batch/import")?.acquire().await?; // asks for a 60 s lease
    /// assert_eq!(lease.ttl(), Duration::from_secs(60));
    /// # Ok(()) }
    /// ```
    pub fn default_lease(mut self, lease: Duration) -> Self {
        self.default_lease = Some(lease);
        self
    }

    /// How long `acquire()` waits by default (default 10 s).
    ///
    /// ```no_run
    /// # async fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let client = dflockd_client::Client::builder().acquire_timeout(Duration::from_secs(1)).build()?;
    /// // `acquire()` now gives up with `ErrorKind::Timeout` after one second.
    /// match client.lock("deploy")?.acquire().await {
    ///     Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::Timeout) => println!("someone else is deploying"),
    ///     other => { other?; }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Ping a connection after this much silence (default 10 s, below the
    /// server's 23 s idle timeout). Also caps the renew interval.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // A proxy in between closes connections silent for 5 s.
    /// let client = dflockd_client::Client::builder().keepalive(Duration::from_secs(3)).build()?;
    /// # Ok(()) }
    /// ```
    pub fn keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Longest wait for a non-blocking reply before the connection is
    /// dropped (default 10 s).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use std::time::Duration;
    /// use dflockd_client::Client;
    /// assert!(Client::builder().reply_timeout(Duration::from_secs(3)).build().is_ok());
    /// assert!(Client::builder().reply_timeout(Duration::ZERO).build().is_err());
    /// # }
    /// ```
    pub fn reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// Whether to ask each server for the multiplexed extension (default
    /// true). A server that speaks it (this crate's `dflockd`) then carries
    /// every request of the process — blocking waits and two-phase tickets
    /// included — over one connection; a plain dflockd server refuses it and
    /// the client falls back to a control connection plus one connection per
    /// blocking wait, with no visible difference. `false` always uses the
    /// plain protocol.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// let plain_only = dflockd_client::Client::builder().multiplex(false).build()?;
    /// # Ok(()) }
    /// ```
    pub fn multiplex(mut self, multiplex: bool) -> Self {
        self.multiplex = multiplex;
        self
    }

    /// Builds the client and starts its actors on the current tokio runtime.
    ///
    /// ```
    /// use dflockd_client::{Client, ErrorKind};
    /// // Outside a tokio runtime there is nothing to run the client's actors on.
    /// let error = Client::builder().build().unwrap_err();
    /// assert!(matches!(error.kind(), ErrorKind::InvalidArgument(_)));
    /// let runtime = tokio::runtime::Runtime::new()?;
    /// let client = runtime.block_on(async { Client::builder().build() })?;
    /// assert_eq!(client.servers()[0].to_string(), "127.0.0.1:6388");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build(self) -> Result<Client> {
        let runtime = Handle::try_current().map_err(|_| {
            ErrorKind::InvalidArgument("Client::build needs a tokio runtime".into())
        })?;
        if !(self.renew_ratio.is_finite() && self.renew_ratio > 0.0 && self.renew_ratio < 1.0) {
            return Err(ErrorKind::InvalidArgument(format!(
                "renew ratio must be in (0, 1), got {}",
                self.renew_ratio
            ))
            .into());
        }
        if self.keepalive.is_zero()
            || self.reply_timeout.is_zero()
            || self.options.connect_timeout.is_zero()
        {
            return Err(ErrorKind::InvalidArgument(
                "keepalive, reply and connect timeouts must be > 0".into(),
            )
            .into());
        }
        lease_of(self.default_lease)?;
        seconds(self.acquire_timeout)?;
        let servers = if self.servers.is_empty() {
            vec![ServerAddr::new("127.0.0.1", 6388)?]
        } else {
            self.servers
        };
        let timing = LaneTiming {
            keepalive: self.keepalive,
            reply_timeout: self.reply_timeout,
        };

        let supervisor_slot: Arc<OnceLock<WeakActorRef<LeaseSupervisor>>> =
            Arc::new(OnceLock::new());
        let on_lane_closed = {
            let slot = Arc::clone(&supervisor_slot);
            Arc::new(move |lane| {
                if let Some(supervisor) = slot.get().and_then(WeakActorRef::upgrade) {
                    let _ = supervisor.tell(LaneClosed(lane)).try_send();
                }
            })
        };
        let actors: Vec<ActorRef<ServerConn>> = servers
            .iter()
            .map(|addr| {
                let args = ServerConnArgs {
                    addr: addr.clone(),
                    options: self.options.clone(),
                    timing,
                    on_lane_closed: on_lane_closed.clone(),
                    multiplex: self.multiplex,
                };
                ServerConn::spawn_with_mailbox(args, kameo::mailbox::unbounded())
            })
            .collect();
        let policy = RenewPolicy {
            ratio: self.renew_ratio,
            max_interval: self.max_renew_interval.min(self.keepalive),
            retry: self.renew_retry,
        };
        let renewals = Arc::new(AtomicU64::new(0));
        let supervisor = LeaseSupervisor::spawn_with_mailbox(
            SupervisorArgs {
                servers: actors.clone(),
                policy,
                renewals: Arc::clone(&renewals),
            },
            kameo::mailbox::unbounded(),
        );
        let _ = supervisor_slot.set(supervisor.downgrade());
        let inner = ClientInner {
            servers: servers
                .into_iter()
                .zip(actors)
                .map(|(addr, actor)| ServerEntry { addr, actor })
                .collect(),
            supervisor,
            options: self.options,
            timing,
            on_lane_closed,
            sharding: self.sharding,
            default_lease: self.default_lease,
            acquire_timeout: self.acquire_timeout,
            runtime,
            next_lease: AtomicU64::new(1),
            renewals,
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }
}

/// A dflockd client: build once per process and clone freely.
///
/// One `ServerConn` actor per server owns one pipelined connection. On a
/// server that offers the multiplexed extension (this project's `dflockd`)
/// that connection carries everything of the process, blocking waits and
/// two-phase tickets included; on a plain dflockd server it carries the
/// non-blocking requests and a blocking acquire gets a connection of its own
/// for as long as its lease lives. One `LeaseSupervisor` actor renews every
/// lease.
///
/// ```no_run
/// # async fn demo() -> dflockd_client::Result<()> {
/// let client = dflockd_client::Client::builder().server("127.0.0.1:6388".parse()?).build()?;
/// let lease = client.lock("deploy")?.acquire().await?;
/// println!("fence {}", lease.fence());
/// lease.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<String> = self
            .inner
            .servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        f.debug_struct("Client")
            .field("servers", &servers)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with the defaults.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder().server("127.0.0.1:6388".parse()?).build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The servers, in sharding order.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::Client) {
    /// for (index, addr) in client.servers().iter().enumerate() {
    ///     println!("server {index}: {addr}");
    /// }
    /// # }
    /// ```
    pub fn servers(&self) -> Vec<ServerAddr> {
        self.inner.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// The index of the server responsible for `key`.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder()
    ///     .servers(["10.0.0.1:6388".parse()?, "10.0.0.2:6388".parse()?])
    ///     .build()?;
    /// // CRC-32 sharding, the same as the other dflockd clients.
    /// assert_eq!(client.server_for("jobs/nightly")?, dflockd_proto::shard("jobs/nightly", 2).unwrap());
    /// # Ok(()) }
    /// ```
    pub fn server_for(&self, key: &str) -> Result<usize> {
        let n = self.inner.servers.len();
        let index = match &self.inner.sharding {
            Sharding::Crc32 => dflockd_proto::shard(key, n)
                .map_err(|e| ErrorKind::InvalidArgument(e.to_string()))?,
            Sharding::Custom(f) => f(key, n),
        };
        if index >= n {
            return Err(ErrorKind::InvalidArgument(format!(
                "sharding returned {index} for {n} servers"
            ))
            .into());
        }
        Ok(index)
    }

    /// A lock handle for `key` (validated like the server does).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let lock = client.lock("deploy/prod")?;
    /// let lease = lock.acquire().await?;
    /// assert!(lock.try_acquire().await?.is_none()); // held: a second try fails
    /// lease.release().await?;
    /// assert!(client.lock("bad key").is_err()); // keys cannot contain white space
    /// # Ok(()) }
    /// ```
    pub fn lock(&self, key: &str) -> Result<Lock> {
        Ok(Lock(self.target(key, Kind::Lock)?))
    }

    /// A counting-semaphore handle for `key` with `limit` slots.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let pool = client.semaphore("db/pool", 2)?;
    /// let a = pool.acquire().await?;
    /// let b = pool.acquire().await?;
    /// assert!(pool.try_acquire().await?.is_none()); // both slots taken
    /// # drop((a, b));
    /// # Ok(()) }
    /// ```
    pub fn semaphore(&self, key: &str, limit: u32) -> Result<Semaphore> {
        let limit = Limit::new(u64::from(limit))
            .map_err(|e| ErrorKind::InvalidArgument(format!("semaphore limit: {e}")))?;
        Ok(Semaphore(self.target(key, Kind::Semaphore(limit))?))
    }

    fn target(&self, key: &str, kind: Kind) -> Result<Target> {
        let parsed =
            Key::new(key).map_err(|e| ErrorKind::InvalidArgument(format!("key {key:?}: {e}")))?;
        Ok(Target {
            client: self.clone(),
            server: self.server_for(key)?,
            key: parsed,
            kind,
            lease: self.inner.default_lease,
            timeout: self.inner.acquire_timeout,
            owner: None,
        })
    }

    /// The `stats` document of server `index`.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// let _lease = client.lock("reports")?.acquire().await?;
    /// let stats = client.stats(0).await?;
    /// assert!(stats.locks.iter().any(|entry| entry.key == "reports"));
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self, index: usize) -> Result<Stats> {
        self.check_index(index)?;
        let reply = self.inner.control_call(index, Request::Stats, None).await;
        reply
            .and_then(|(reply, _)| expect_stats(reply))
            .map_err(|e| e.on(&self.inner.servers[index].addr))
    }

    /// How many renew requests this client has sent so far, over all
    /// servers and leases (retries included). A monotonic counter for
    /// metrics: sample it twice to get a renew rate.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) {
    /// let before = client.renewals_sent();
    /// tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    /// println!("{} renews/s", client.renewals_sent() - before);
    /// # }
    /// ```
    pub fn renewals_sent(&self) -> u64 {
        self.inner.renewals.load(Ordering::Relaxed)
    }

    /// Whether the connection to server `index` speaks the multiplexed
    /// extension (connecting if there is no connection yet): `true` on a
    /// server that offers it when [`ClientBuilder::multiplex`] is on,
    /// `false` on a plain dflockd server.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// if client.multiplexed(0).await? {
    ///     println!("one connection carries everything");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn multiplexed(&self, index: usize) -> Result<bool> {
        self.check_index(index)?;
        let lane = self.inner.lane(index).await;
        lane.map(|lane| lane.is_mux())
            .map_err(|e| e.on(&self.inner.servers[index].addr))
    }

    /// Pings server `index` over its control lane.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// // A health check over every server.
    /// for index in 0..client.servers().len() {
    ///     client.ping(index).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ping(&self, index: usize) -> Result<()> {
        self.check_index(index)?;
        let reply = self.inner.control_call(index, Request::Ping, None).await;
        reply
            .and_then(|(reply, _)| expect_ok(reply))
            .map_err(|e| e.on(&self.inner.servers[index].addr))
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.inner.servers.len() {
            return Err(ErrorKind::InvalidArgument(format!("no server {index}")).into());
        }
        Ok(())
    }
}

/// What a lock or semaphore handle targets.
#[derive(Clone)]
struct Target {
    client: Client,
    server: usize,
    key: Key,
    kind: Kind,
    lease: Option<Duration>,
    timeout: Duration,
    owner: Option<Recipient<LeaseLost>>,
}

/// Result of a two-phase [`Lock::enqueue`] / [`Semaphore::enqueue`].
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
    target: Target,
    /// `None` only once `wait` has taken it.
    place: Option<Place>,
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

impl Target {
    fn inner(&self) -> &ClientInner {
        &self.client.inner
    }

    /// Names this handle's key and server in `error`.
    fn about(&self, error: Error) -> Error {
        error.about(&self.key, &self.inner().servers[self.server].addr)
    }

    /// The resource a grant for this handle holds (a grant nobody owns any
    /// more is released by it).
    fn resource(&self) -> (Key, Namespace) {
        (self.key.clone(), self.kind.namespace())
    }

    fn lease(&self) -> Result<Option<dflockd_proto::Lease>> {
        lease_of(self.lease)
    }

    /// Acquires, waiting up to `timeout` in the key's queue; `None` if it
    /// stayed busy.
    async fn acquire_within(&self, timeout: Duration) -> Result<Option<Lease>> {
        let wait = seconds(timeout)?;
        let lease = self.lease()?;
        let acquire = |timeout| Request::Acquire {
            key: self.key.clone(),
            kind: self.kind,
            timeout,
            lease,
        };
        let transport = Transport::open(self.inner(), self.server).await?;
        let grant = transport.acquire(acquire, wait, self.resource()).await?;
        Ok(grant.map(|grant| self.track(grant)))
    }

    async fn enqueue(&self) -> Result<Enqueue> {
        let request = Request::Enqueue {
            key: self.key.clone(),
            kind: self.kind,
            lease: self.lease()?,
        };
        let transport = Transport::open(self.inner(), self.server).await?;
        Ok(match transport.enqueue(request, self.resource()).await? {
            Enqueueing::Acquired(grant) => Enqueue::Acquired(self.track(grant)),
            Enqueueing::Queued(place) => Enqueue::Queued(Ticket {
                target: self.clone(),
                place: Some(place),
            }),
        })
    }

    /// Makes a grant a `Lease` and hands it to the supervisor.
    fn track(&self, grant: Grant) -> Lease {
        let Grant {
            granted,
            sent_at,
            lane,
            own_lane: wait_lane,
            renew_now,
        } = grant;
        let inner = self.inner();
        let id = LeaseId(inner.next_lease.fetch_add(1, Ordering::Relaxed));
        let ttl = granted.lease.as_duration();
        // The latest instant the lease is known valid, minus the safety
        // margin: counted from the request's send time — or, for a grant
        // that waited in a queue (its send time may be long past), from its
        // arrival until the immediate renew counts from that renew's send
        // time. The supervisor uses the same instant, so `deadline()` never
        // moves backwards.
        let start = if renew_now { Instant::now() } else { sent_at };
        let local_expiry = start + ttl.saturating_sub(RenewPolicy::margin(ttl));
        let shared = Arc::new(LeaseShared::new(local_expiry, ttl));
        // The guard exists before anything can fail or be cancelled, so its
        // Drop releases the grant in every case.
        let lease = Lease::new(
            id,
            self.server,
            self.key.clone(),
            self.kind,
            granted.token,
            Arc::clone(&shared),
            wait_lane,
            Arc::clone(&self.client.inner),
        );
        let track = Track {
            id,
            server: self.server,
            key: self.key.clone(),
            namespace: self.kind.namespace(),
            token: granted.token,
            requested: self.lease,
            ttl,
            sent_at,
            local_expiry,
            lane: lane.id,
            lane_closed: lane.closed.clone(),
            renew_now,
            shared: Arc::clone(&shared),
            owner: self.owner.clone(),
        };
        if inner.supervisor.tell(track).try_send().is_err() {
            shared.mark_lost(crate::LossReason::ClientStopped);
        }
        lease
    }
}

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
            /// once) and come back for the grant with [`Ticket::wait`].
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
                self.0.enqueue().await.map_err(|e| self.0.about(e))
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
pub struct Lock(Target);

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
pub struct Semaphore(Target);

handle_methods!(Lock, "lock");
handle_methods!(Semaphore, "semaphore slot");
