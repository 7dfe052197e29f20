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

mod clock;
mod cluster_config;
mod config;
mod conn;
mod events;
mod fence;
mod http;
mod idle;
mod ingress;
mod metrics;
mod replica;
mod server;
mod session;
mod shared;
mod tls;

pub use cluster_config::{
    ClusterConfig, ClusterPeer, DEFAULT_SNAPSHOT_EVERY, PeerListError, RaftTiming,
    parse_cluster_peers,
};
pub use config::{HttpConfig, IdlePolicy, Secret, ServerConfig};
pub use dflockd_cluster::RaftSecret;

/// Hooks for the fuzz targets (`crates/server/fuzz`), behind the `fuzzing`
/// feature; not part of the supported API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Serves `data` as one connection's bytes to an in-memory session on a
    /// virtual clock and returns the replies; panics if the session breaks
    /// a protocol rule (see the fuzz target `session_bytes`).
    ///
    /// ```
    /// let replies = dflockd_server::fuzzing::session_bytes(b"ping\n_\n\n");
    /// assert_eq!(replies, b"ok\n");
    /// ```
    pub fn session_bytes(data: &[u8]) -> Vec<u8> {
        crate::session::memory::serve_bytes(data)
    }
}
pub use fence::{FENCE_RANGE, FenceFile, FenceFileError};
pub use replica::ClusterStartError;
pub use server::{Listeners, Server, ServerHandle, StartError};
pub use tls::{TlsConfig, TlsError};
