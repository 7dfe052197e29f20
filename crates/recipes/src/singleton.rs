//! Exactly one running instance of a job across processes.

use std::future::Future;
use std::time::Duration;

use dflockd_client::{Client, Result};
use tokio_util::sync::CancellationToken;

use crate::leader::{LeaderContext, LeaderElection};

/// Runs a job in exactly one process at a time. Every process calls
/// [`run`](Self::run); one holds the key and runs the job, the others wait.
/// When the holder dies (its connection closes and the server releases the
/// key at once) or loses its lease (the server frees the key when the lease
/// expires), a waiting process starts the job — within one lease TTL.
///
/// ```no_run
/// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
/// use tokio_util::sync::CancellationToken;
/// let compactor = dflockd_recipes::Singleton::new(&client, "jobs/compactor")?;
/// compactor
///     .run(CancellationToken::new(), |ctx| async move {
///         while !ctx.is_cancelled() {
///             // compact one segment, fenced with ctx.fence()
///             tokio::time::sleep(std::time::Duration::from_secs(1)).await;
///         }
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Singleton {
    election: LeaderElection,
}

impl Singleton {
    /// A singleton job guarded by `key`.
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let compactor = dflockd_recipes::Singleton::new(&client, "jobs/compactor")?;
    /// # Ok(()) }
    /// ```
    pub fn new(client: &Client, key: &str) -> Result<Singleton> {
        Ok(Singleton {
            election: LeaderElection::new(client, key)?,
        })
    }

    /// Leases of this length: the longest a dead holder can keep the job
    /// from restarting elsewhere (when the server could not notice the death
    /// by a closed connection).
    ///
    /// ```no_run
    /// # fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let compactor = dflockd_recipes::Singleton::new(&client, "jobs/compactor")?.with_lease(Duration::from_secs(15));
    /// # Ok(()) }
    /// ```
    pub fn with_lease(self, lease: Duration) -> Singleton {
        Singleton {
            election: self.election.with_lease(lease),
        }
    }

    /// Whether this process runs the job right now.
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// use std::sync::Arc;
    /// let compactor = Arc::new(dflockd_recipes::Singleton::new(&client, "jobs/compactor")?);
    /// let probe = Arc::clone(&compactor); // e.g. for a /healthz handler
    /// println!("compactor here: {}", probe.is_running_here());
    /// # Ok(()) }
    /// ```
    pub fn is_running_here(&self) -> bool {
        self.election.is_leader()
    }

    /// Runs `job` whenever this process holds the key, until `job` completes
    /// (then the key is released) or `stop` fires. If the lease is lost the
    /// job's context is cancelled, the job gets until the lease deadline to
    /// stop, and this process queues for the key again.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// # let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
    /// use tokio_util::sync::CancellationToken;
    /// let once = dflockd_recipes::Singleton::new(&client, "jobs/migrate")?;
    /// let mut runs = 0;
    /// // The job returns on its own: the key is released and `run` returns.
    /// once.run(CancellationToken::new(), |_ctx| { runs += 1; async {} }).await?;
    /// assert_eq!(runs, 1);
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut>(&self, stop: CancellationToken, job: F) -> Result<()>
    where
        F: FnMut(LeaderContext) -> Fut,
        Fut: Future<Output = ()>,
    {
        self.election.run_as_leader(stop, job).await
    }
}
