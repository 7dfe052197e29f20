//! dflockd for Rust: distributed FIFO locks and counting semaphores with
//! leases and fencing tokens, speaking the dflockd v2 line protocol — plus
//! coordination recipes built on them.
//!
//! * [`client`] — the actor-based client (`Client`, `Lock`, `Semaphore`, `Lease`);
//! * [`LeaderElection`], [`Singleton`], [`LeaseScope`] — coordination recipes
//!   (the [`recipes`] crate, which needs only the client);
//! * `server` — the wire-compatible server, embeddable in-process, and
//!   `core`, its lock table (both behind the default `server` feature:
//!   `default-features = false` for a client-only build);
//! * [`proto`] — the sans-I/O codec.
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

pub use dflockd_client as client;
#[cfg(feature = "server")]
pub use dflockd_core as core;
pub use dflockd_proto as proto;
pub use dflockd_recipes as recipes;
#[cfg(feature = "server")]
pub use dflockd_server as server;

pub use dflockd_proto::{Token, fence_from_token, shard};
pub use dflockd_recipes::{
    ABORT_MARGIN, CancellationToken, LeaderContext, LeaderElection, Leadership, LeaseScope,
    Singleton, Term,
};

/// The README's Rust snippets, compiled as doc tests.
#[cfg(all(doctest, feature = "server"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
