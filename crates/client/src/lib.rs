//! Rust client for dflockd: distributed FIFO locks and counting semaphores
//! with leases renewed in the background and lease-loss signalled to your
//! code.
#![warn(missing_docs)]

// Layers, bottom to top; no module imports one above it:
// error, options, pinned → connection → lane_id → renewal, lane → mux_lane →
// server_conn → lease_state → supervisor → inner → plain, resend → transport →
// lease → target → ticket → handles → client → builder → service,
// blocking.
pub mod blocking;
mod builder;
mod client;
mod connection;
mod error;
mod handles;
mod inner;
mod lane;
mod lane_id;
mod lease;
mod lease_state;
mod mux_lane;
mod options;
mod pinned;
mod plain;
mod renewal;
mod resend;
mod server_conn;
mod service;
mod supervisor;
mod target;
mod ticket;
mod transport;

/// The actor framework of this client's public API (`ActorRef`s of
/// [`GrantService`] and lease-lost notifications are kameo types),
/// re-exported so callers use the same version.
///
/// ```
/// use dflockd_client::kameo::prelude::Actor;
/// fn is_actor<A: Actor>() {}
/// ```
pub use kameo;

pub use builder::ClientBuilder;
pub use client::Client;
pub use connection::{Connection, Enqueued, Granted};
pub use dflockd_proto::{Key, Label, LockEntry, Stats, Token, fence_from_token};
pub use error::{Error, ErrorKind, Result};
pub use handles::{Lock, Semaphore};
pub use lease::{Lease, LeaseMonitor, Released};
pub use lease_state::{LeaseLost, LossReason};
pub use options::{
    AuthToken, ConnectOptions, IntoServerAddr, ServerAddr, ShardFn, Sharding, TlsOptions,
};
pub use service::{GrantService, RequestGrant};
pub use ticket::{Enqueue, Ticket};
