//! Coordination recipes on the dflockd client: leader election, singleton
//! jobs and task trees that stop when their lease is lost.
//!
//! * [`LeaderElection`]: campaign for a key, lead with its lease's fence as
//!   the term, step down on loss; `run_as_leader` runs your code only while
//!   leading.
//! * [`Singleton`]: one instance of a job across processes, restarted
//!   elsewhere when its holder dies.
//! * [`LeaseScope`]: tasks and kameo actors that are stopped (gracefully,
//!   then by abort) before the lease could expire on the server.
//!
//! They depend on the client only; the `dflockd` crate re-exports them.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
//! use dflockd_recipes::{LeaderElection, Leadership};
//! let client = dflockd_client::Client::builder().server(server.local_addr().into()).build()?;
//! let election = LeaderElection::new(&client, "service/leader")?;
//! let term = election.campaign().await?;
//! assert!(matches!(*election.leadership().borrow(), Leadership::Leader { .. }));
//! term.resign().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod leader;
mod scope;
mod singleton;

pub use leader::{Leader, LeaderContext, LeaderElection, Leadership, Term};
pub use scope::{ABORT_MARGIN, LeaseScope};
pub use singleton::Singleton;
/// The cancellation token the recipes take and hand out (from
/// `tokio-util`), re-exported so callers need no extra dependency.
///
/// ```
/// let stop = dflockd_recipes::CancellationToken::new();
/// stop.cancel();
/// assert!(stop.is_cancelled());
/// ```
pub use tokio_util::sync::CancellationToken;
