//! A wire-compatible dflockd v2 server: distributed FIFO locks and counting
//! semaphores with leases and fencing tokens, over a three-line TCP protocol.
//!
//! Run it standalone as the `dflockd` binary, or embed it in-process — tests,
//! examples and quickstarts then need nothing installed:
//!
//! ```
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dflockd_server::{Server, ServerConfig};
//! let server = Server::start(ServerConfig::ephemeral()).await?;
//! println!("dflockd on {}", server.local_addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The lock rules live in `dflockd-core` and the wire format in
//! `dflockd-proto`; this crate adds sockets, TLS, auth, timeouts, caps,
//! timers, drain and configuration.
#![warn(missing_docs)]

pub mod cli;
mod clock;
mod config;
mod conn;
mod fence;
mod idle;
mod server;
mod session;
mod shared;
mod tls;

pub use config::{IdlePolicy, Secret, ServerConfig};
pub use fence::{FENCE_RANGE, FenceFile, FenceFileError};
pub use server::{Server, ServerHandle, StartError};
pub use tls::{TlsConfig, TlsError};
