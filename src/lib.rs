//! dflockd for Rust: distributed FIFO locks and counting semaphores with
//! leases and fencing tokens, speaking the dflockd v2 line protocol — plus
//! coordination recipes built on them.
//!
//! * [`client`] — the actor-based client (`Client`, `Lock`, `Semaphore`, `Lease`);
//! * [`LeaderElection`], [`Singleton`], [`LeaseScope`] — coordination recipes;
//! * [`server`] — the wire-compatible server, embeddable in-process;
//! * [`proto`], [`core`] — the sans-I/O codec and the pure lock table.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dflockd::server::{Server, ServerConfig};
//! let server = Server::start(ServerConfig::ephemeral()).await?;
//! let client = dflockd::client::Client::builder().server(server.local_addr().into()).build()?;
//! let lease = client.lock("example")?.acquire().await?;
//! assert!(lease.fence() > 0);
//! lease.release().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod leader;
mod scope;
mod singleton;

pub use dflockd_client as client;
pub use dflockd_core as core;
pub use dflockd_proto as proto;
pub use dflockd_server as server;

pub use dflockd_proto::{Token, fence_from_token, shard};
pub use leader::{LeaderContext, LeaderElection, Leadership, Term};
pub use scope::{ABORT_MARGIN, LeaseScope};
pub use singleton::Singleton;
/// The cancellation token the recipes take and hand out (from
/// `tokio-util`), re-exported so callers need no extra dependency.
///
/// ```
/// let stop = dflockd::CancellationToken::new();
/// stop.cancel();
/// assert!(stop.is_cancelled());
/// ```
pub use tokio_util::sync::CancellationToken;

/// The README's Rust snippets, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
