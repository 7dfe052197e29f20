//! What every handle of one client shares: the server actors, the lease
//! supervisor and the settings. Above the transport and the supervisor,
//! below the `Lease` guard and the `Client` handles.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request};
use kameo::prelude::*;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::lane::{LaneHandle, LaneRef, LaneTiming};
use crate::options::{ConnectOptions, ServerAddr, Sharding};
use crate::server_conn::{Call, GetLane, ServerConn};
use crate::supervisor::LeaseSupervisor;
use crate::{ErrorKind, Result};

/// One server of the client: its address and the actor owning its
/// connection.
pub(crate) struct ServerEntry {
    /// The first node: the address `Client::servers` reports.
    pub(crate) addr: ServerAddr,
    /// How errors name the server: its address, or a cluster's nodes.
    pub(crate) label: String,
    /// Several nodes: the client names its session, and leases survive a
    /// broken connection (see `supervisor::LaneClosed`).
    pub(crate) is_cluster: bool,
    pub(crate) actor: ActorRef<ServerConn>,
}

impl ServerEntry {
    /// A server of `nodes` (one, or a cluster's), served by `actor`.
    pub(crate) fn new(nodes: Vec<ServerAddr>, actor: ActorRef<ServerConn>) -> ServerEntry {
        let label = match nodes.as_slice() {
            [one] => one.to_string(),
            many => {
                let list: Vec<String> = many.iter().map(ToString::to_string).collect();
                format!("cluster {}", list.join(","))
            }
        };
        ServerEntry {
            addr: nodes[0].clone(),
            label,
            is_cluster: nodes.len() > 1,
            actor,
        }
    }
}

/// The state behind `Client` and every handle and lease made from it.
pub(crate) struct ClientInner {
    pub(crate) servers: Vec<ServerEntry>,
    pub(crate) supervisor: ActorRef<LeaseSupervisor>,
    pub(crate) options: ConnectOptions,
    pub(crate) timing: LaneTiming,
    pub(crate) on_lane_closed: crate::server_conn::OnLaneClosed,
    pub(crate) sharding: Sharding,
    pub(crate) default_lease: Option<Duration>,
    pub(crate) acquire_timeout: Duration,
    pub(crate) runtime: Handle,
    pub(crate) next_lease: AtomicU64,
    pub(crate) renewals: Arc<AtomicU64>,
}

impl ClientInner {
    /// The server's control lane (connecting if needed), and the node it
    /// is connected to (a cluster's leader).
    pub(crate) async fn lane(&self, server: usize) -> Result<(LaneHandle, ServerAddr)> {
        match self.servers[server].actor.ask(GetLane).await {
            Ok(lane) => Ok(lane),
            Err(kameo::error::SendError::HandlerError(error)) => Err(error),
            Err(_) => Err(ErrorKind::Shutdown.into()),
        }
    }

    /// The server's `stats`.
    pub(crate) async fn stats_of(&self, server: usize) -> Result<dflockd_proto::Stats> {
        let (reply, _) = self.control_call(server, Request::Stats, None).await?;
        crate::connection::expect_stats(reply)
    }

    /// Sends a non-blocking request over the server's control lane.
    pub(crate) async fn control_call(
        &self,
        server: usize,
        request: Request,
        orphan: Option<(Key, Namespace)>,
    ) -> Result<(Reply, LaneRef)> {
        let (tx, rx) = oneshot::channel();
        self.servers[server]
            .actor
            .tell(Call {
                request,
                orphan,
                reply: tx,
            })
            .try_send()
            .map_err(|_| ErrorKind::Shutdown)?;
        // A dropped reply means the lane died with the request queued.
        rx.await.map_err(|_| ErrorKind::ConnectionClosed)?
    }
}
