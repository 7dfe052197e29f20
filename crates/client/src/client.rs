//! [`Client`]: one per process, cloned freely; it hands out the lock and
//! semaphore handles and answers stats and pings.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dflockd_proto::{Key, Kind, Limit, Request, Stats};

use crate::connection::expect_ok;
use crate::handles::{Lock, Semaphore};
use crate::inner::ClientInner;
use crate::options::{ServerAddr, Sharding};
use crate::target::Target;
use crate::{ErrorKind, Result};

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
    pub(crate) inner: Arc<ClientInner>,
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
            inner: Arc::clone(&self.inner),
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
        self.inner
            .stats_of(index)
            .await
            .map_err(|e| e.on(&self.inner.servers[index].label))
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
    /// server that offers it when [`ClientBuilder::multiplex`](crate::ClientBuilder::multiplex) is on,
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
        lane.map(|(lane, _)| lane.is_mux())
            .map_err(|e| e.on(&self.inner.servers[index].label))
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
            .map_err(|e| e.on(&self.inner.servers[index].label))
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.inner.servers.len() {
            return Err(ErrorKind::InvalidArgument(format!("no server {index}")).into());
        }
        Ok(())
    }
}
