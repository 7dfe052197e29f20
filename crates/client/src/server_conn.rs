//! `ServerConn`: one actor per server. It owns the control lane — one
//! pipelined connection for every non-blocking request of the process
//! (try-lock, renew, release, stats, ping) — connecting lazily and
//! reconnecting with backoff after a failure.
//!
//! A server may be a cluster: a set of nodes of which one leads. Then each
//! new connection first asks the node for `barrier`, which only the
//! leader answers `ok`; a follower's `error_not_leader <addr>` is followed
//! when `addr` is one of the configured nodes (never elsewhere); a bare
//! `error_not_leader` has the node asked for `stats`, whose cluster object
//! may name the leader; anything else moves on to the next node in order,
//! as the Go cluster client does.
//!
//! Each new connection first asks for the multiplexed extension
//! (docs/protocol-mux.md). Where the server accepts it, the control lane
//! carries blocking waits and two-phase tickets too, so the process needs
//! one connection per server; a plain dflockd server refuses it and the
//! lane stays plain (blocking waits then get connections of their own).

use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request, StableRef};
use kameo::error::Infallible;
use kameo::prelude::*;
use tokio::time::Instant;

use crate::connection::{Connection, failure};
use crate::lane::{LaneHandle, LaneId, LaneReply, LaneRequest, LaneTiming, MuxSession, spawn_lane};
use crate::mux_lane::{negotiate, spawn_mux_lane};
use crate::options::{ConnectOptions, ServerAddr};
use crate::renewal::RenewBatch;
use crate::{Error, ErrorKind, Result};

/// Called once when a lane closes, with whether the server can re-attach
/// its leases to a later connection (a cluster session, named by
/// `stable-ref`).
pub(crate) type OnLaneClosed = Arc<dyn Fn(LaneId, bool) + Send + Sync>;

pub(crate) struct ServerConnArgs {
    /// The server's nodes: one, or every node of a cluster.
    pub(crate) nodes: Vec<ServerAddr>,
    pub(crate) options: ConnectOptions,
    pub(crate) timing: LaneTiming,
    pub(crate) on_lane_closed: OnLaneClosed,
    /// Ask for the multiplexed extension on each new connection.
    pub(crate) multiplex: bool,
}

pub(crate) struct ServerConn {
    args: ServerConnArgs,
    lane: Option<LaneHandle>,
    /// The node the lane is (or was last) connected to, and the first one
    /// tried on reconnect: the leader, as far as this client knows.
    current: usize,
    /// For a cluster: the name (`stable-ref`) of this client's session,
    /// sent on every connection, so that the leases of a connection that
    /// broke are taken over by the next one.
    session: Option<StableRef>,
    /// A cluster session's ids, tickets and routing, shared by all its
    /// connections (a single server gets a fresh one per connection).
    mux_session: Option<Arc<MuxSession>>,
    /// This actor, for the lane's close to ask it to reconnect.
    me: WeakActorRef<ServerConn>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Why the last connect failed: reported again while backing off, so a
    /// definitive cause (say `ErrorKind::Auth`) is not hidden behind a generic
    /// "reconnect backoff".
    last_error: Option<Error>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A backoff with jitter: between half of `backoff` and all of it, by
/// `unit` in [0, 1), so clients cut off together do not come back in step.
fn jittered(backoff: Duration, unit: f64) -> Duration {
    backoff / 2 + (backoff / 2).mul_f64(unit.clamp(0.0, 1.0))
}

impl Actor for ServerConn {
    type Args = ServerConnArgs;
    type Error = Infallible;

    async fn on_start(args: ServerConnArgs, me: ActorRef<Self>) -> Result<Self, Infallible> {
        let session = (args.nodes.len() > 1).then(session_name);
        let mux_session = session.as_ref().map(|_| Arc::new(MuxSession::new(true)));
        Ok(ServerConn {
            args,
            lane: None,
            current: 0,
            session,
            mux_session,
            me: me.downgrade(),
            backoff: BACKOFF_MIN,
            retry_at: None,
            last_error: None,
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), Infallible> {
        if let Some(lane) = self.lane.take() {
            lane.close();
        }
        Ok(())
    }
}

impl ServerConn {
    /// The open control lane, connecting if there is none. Fails fast while
    /// a reconnect backoff is running.
    async fn lane(&mut self) -> Result<LaneHandle> {
        if let Some(lane) = &self.lane
            && !lane.is_closed()
        {
            return Ok(lane.clone());
        }
        self.lane = None;
        if let Some(retry_at) = self.retry_at
            && Instant::now() < retry_at
        {
            return Err(self.last_error.clone().unwrap_or_else(|| {
                ErrorKind::Connect {
                    addr: self.args.nodes[self.current].to_string(),
                    cause: "reconnect backoff".into(),
                }
                .into()
            }));
        }
        match self.connect().await {
            Ok((conn, mux)) => {
                let on_close = Arc::clone(&self.args.on_lane_closed);
                let reattach = self.session.is_some();
                let me = self.me.clone();
                let on_close = move |id| {
                    on_close(id, reattach);
                    if reattach && let Some(me) = me.upgrade() {
                        let _ = me.tell(Reconnect).try_send();
                    }
                };
                let lane = if mux {
                    let session = self
                        .mux_session
                        .clone()
                        .unwrap_or_else(|| Arc::new(MuxSession::new(false)));
                    spawn_mux_lane(conn, self.args.timing, on_close, session)
                } else {
                    spawn_lane(conn, self.args.timing, on_close)
                };
                tracing::debug!(server = %self.args.nodes[self.current], lane = lane.id.0, mux, "control lane connected");
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                self.last_error = None;
                self.lane = Some(lane.clone());
                Ok(lane)
            }
            Err(error) => {
                self.retry_at = Some(Instant::now() + jittered(self.backoff, fastrand::f64()));
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.last_error = Some(error.clone());
                Err(error)
            }
        }
    }
}

/// What a node said to the leadership probe.
enum Probe {
    /// It leads: the connection, ready for use.
    Leader(Connection),
    /// It does not; the leader's client address if it named one.
    Follower(Option<String>),
}

impl ServerConn {
    /// A new connection to the server (for a cluster: to its leader), and
    /// whether it speaks the multiplexed extension. `current` ends on the
    /// node connected to.
    async fn connect(&mut self) -> Result<(Connection, bool)> {
        let mut conn = if self.args.nodes.len() == 1 {
            Connection::connect(&self.args.nodes[0], &self.args.options).await?
        } else {
            self.connect_to_leader().await?
        };
        if !self.args.multiplex {
            return Ok((conn, false));
        }
        let mux = negotiate(&mut conn, self.args.timing.reply_timeout).await?;
        Ok((conn, mux))
    }

    /// Tries the nodes, from the current one, until one leads: a redirect
    /// to a configured node is followed, anything else (a redirect
    /// elsewhere, no leader known, a node that cannot be reached) moves on
    /// to the next node. At most two rounds.
    async fn connect_to_leader(&mut self) -> Result<Connection> {
        let nodes = self.args.nodes.len();
        let mut next = self.current;
        let mut last_error: Option<Error> = None;
        for _ in 0..2 * nodes {
            let node = &self.args.nodes[next];
            match self.probe(node).await {
                Ok(Probe::Leader(conn)) => {
                    self.current = next;
                    return Ok(conn);
                }
                Ok(Probe::Follower(hint)) => {
                    tracing::debug!(node = %node, leader = ?hint, "not the leader");
                    // A node that names itself (a deposed leader's stale
                    // view) is no lead to follow.
                    let known = hint
                        .as_deref()
                        .and_then(|hint| self.args.nodes.iter().position(|n| n.to_string() == hint))
                        .filter(|&known| known != next);
                    last_error = Some(ErrorKind::NotLeader { leader: hint }.into());
                    next = known.unwrap_or((next + 1) % nodes);
                }
                Err(error) => {
                    tracing::debug!(node = %node, %error, "node unavailable");
                    last_error = Some(error.on(node));
                    next = (next + 1) % nodes;
                }
            }
        }
        self.current = next;
        Err(last_error.unwrap_or_else(|| ErrorKind::NotLeader { leader: None }.into()))
    }

    /// Connects to `node` and asks whether it leads (`barrier`); on the
    /// leader, names the session (`stable-ref`), which takes over the
    /// holds of the session's previous connection.
    async fn probe(&self, node: &ServerAddr) -> Result<Probe> {
        let timeout = self.args.timing.reply_timeout;
        let mut conn = Connection::connect(node, &self.args.options).await?;
        match conn.request(&Request::Barrier, timeout).await? {
            Reply::Ok => {}
            Reply::NotLeader(Some(hint)) => return Ok(Probe::Follower(Some(hint))),
            // No leader named: the node's `stats` may know it.
            Reply::NotLeader(None) => {
                let leader = match conn.request(&Request::Stats, timeout).await {
                    Ok(reply) => crate::connection::expect_stats(reply)
                        .ok()
                        .and_then(|stats| stats.cluster)
                        .and_then(|cluster| cluster.leader_addr),
                    Err(_) => None,
                };
                return Ok(Probe::Follower(leader));
            }
            other => return Err(failure(other)),
        }
        if let Some(session) = &self.session {
            match conn
                .request(&Request::StableRef(session.clone()), timeout)
                .await?
            {
                Reply::Ok => {}
                Reply::NotLeader(hint) => return Ok(Probe::Follower(hint)),
                other => return Err(failure(other)),
            }
        }
        Ok(Probe::Leader(conn))
    }
}

/// Sent when a cluster session's lane closes: the session connects again
/// at once (to the new leader) rather than at its next request, retrying
/// after each backoff until it is connected, so that what waits for its
/// next connection (a queue place given up, a grant to let go of — see
/// `MuxSession::send`) reaches the server while the session's holds are
/// still kept for it.
struct Reconnect;

impl Message<Reconnect> for ServerConn {
    type Reply = ();

    async fn handle(&mut self, _: Reconnect, _: &mut Context<Self, ()>) {
        if self.lane().await.is_ok() {
            return;
        }
        let retry = self.retry_at.map_or(BACKOFF_MIN, |at| {
            at.saturating_duration_since(Instant::now())
        });
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(retry).await;
            if let Some(me) = me.upgrade() {
                let _ = me.tell(Reconnect).try_send();
            }
        });
    }
}

/// Asks for the control lane itself (connecting if needed), so a caller can
/// send requests that may wait over a multiplexed lane.
pub(crate) struct GetLane;

impl Message<GetLane> for ServerConn {
    /// The lane, and the node it is connected to.
    type Reply = Result<(LaneHandle, ServerAddr)>;

    async fn handle(
        &mut self,
        _: GetLane,
        _: &mut Context<Self, Self::Reply>,
    ) -> Result<(LaneHandle, ServerAddr)> {
        let lane = self.lane().await?;
        Ok((lane, self.args.nodes[self.current].clone()))
    }
}

/// A non-blocking request for the control lane.
pub(crate) struct Call {
    pub(crate) request: Request,
    pub(crate) orphan: Option<(Key, Namespace)>,
    pub(crate) reply: LaneReply,
}

impl Message<Call> for ServerConn {
    type Reply = ();

    async fn handle(&mut self, call: Call, _: &mut Context<Self, ()>) {
        debug_assert!(
            !call.request.may_block(),
            "blocking requests never go on the control lane"
        );
        match self.lane().await {
            Ok(lane) => lane.send(LaneRequest {
                request: call.request,
                reply: Some(call.reply),
                orphan: call.orphan,
            }),
            Err(error) => {
                let _ = call.reply.send(Err(error));
            }
        }
    }
}

/// A batch of renew requests from the lease supervisor: every renewal that
/// fell due at the same moment, already encoded, written to the control
/// lane together. The replies go straight back to the supervisor.
pub(crate) struct Renewals(pub(crate) RenewBatch);

impl Message<Renewals> for ServerConn {
    type Reply = ();

    async fn handle(&mut self, Renewals(batch): Renewals, _: &mut Context<Self, ()>) {
        match self.lane().await {
            Ok(lane) => lane.send_renewals(batch),
            Err(error) => batch.fail(error),
        }
    }
}

/// A fresh session name: 32 hex digits from the OS's random source, so
/// that no other client can guess it and take this one's holds over.
fn session_name() -> StableRef {
    let mut bytes = [0u8; 16];
    if let Err(error) = getrandom::fill(&mut bytes) {
        // Never expected on a supported OS; still unique per process.
        tracing::error!(%error, "OS random source failed; naming the session from the clock");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ u128::from(std::process::id()) << 64).to_le_bytes();
    }
    let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    StableRef::new(&name).expect("32 hex digits are a valid stable-ref")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_is_jittered_between_half_and_all_of_it() {
        let backoff = Duration::from_millis(800);
        assert_eq!(jittered(backoff, 0.0), Duration::from_millis(400));
        assert_eq!(jittered(backoff, 0.5), Duration::from_millis(600));
        assert!(jittered(backoff, 0.999) <= backoff);
        // Two clients with different draws wait differently.
        assert_ne!(jittered(backoff, 0.1), jittered(backoff, 0.9));
    }
}
