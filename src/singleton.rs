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
/// let compactor = dflockd::Singleton::new(&client, "jobs/compactor")?;
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
    pub fn new(client: &Client, key: &str) -> Result<Singleton> {
        Ok(Singleton {
            election: LeaderElection::new(client, key)?,
        })
    }

    /// Leases of this length: the longest a dead holder can keep the job
    /// from restarting elsewhere (when the server could not notice the death
    /// by a closed connection).
    pub fn with_lease(self, lease: Duration) -> Singleton {
        Singleton {
            election: self.election.with_lease(lease),
        }
    }

    /// Whether this process runs the job right now.
    pub fn is_running_here(&self) -> bool {
        self.election.is_leader()
    }

    /// Runs `job` whenever this process holds the key, until `job` completes
    /// (then the key is released) or `stop` fires. If the lease is lost the
    /// job's context is cancelled, the job gets until the lease deadline to
    /// stop, and this process queues for the key again.
    pub async fn run<F, Fut>(&self, stop: CancellationToken, job: F) -> Result<()>
    where
        F: FnMut(LeaderContext) -> Fut,
        Fut: Future<Output = ()>,
    {
        self.election.run_as_leader(stop, job).await
    }
}
