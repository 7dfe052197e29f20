//! dflockd for Rust: distributed FIFO locks and counting semaphores with
//! leases and fencing tokens, speaking the dflockd v2 line protocol.
//!
//! This facade re-exports the workspace crates:
//!
//! * [`proto`] — the sans-I/O wire codec (requests, replies, keys, tokens,
//!   fences, CRC-32 sharding);
//! * [`core`] — the pure lock table (FIFO, leases, two-phase, caps, GC);
//! * [`server`] — the wire-compatible server, embeddable in-process and
//!   shipped as the `dflockd` binary.
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dflockd::server::{Server, ServerConfig};
//! let server = Server::start(ServerConfig::ephemeral()).await?;
//! assert!(server.local_addr().port() != 0);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub use dflockd_core as core;
pub use dflockd_proto as proto;
pub use dflockd_server as server;

pub use dflockd_proto::{Token, fence_from_token, shard};
