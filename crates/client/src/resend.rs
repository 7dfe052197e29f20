//! Requests that may be granted (acquire, enqueue, wait), carried through a
//! cluster failover.
//!
//! A cluster session numbers its requests once for all its connections,
//! and the server answers an id it has already seen with what that request
//! got (docs/protocol-mux.md, *Sessions*). So when the connection to the
//! leader breaks before a request is answered — it may or may not have been
//! applied — the request is sent again, with the same id, on the session's
//! next connection: it either takes effect there or is answered with the
//! hold or queue place it already has. Nothing is acquired twice and
//! nothing is left behind.
//!
//! A caller that gives up meanwhile (drops the future, or the failover
//! outlasts its patience) lets go the same way (`mux_lane::let_go`): the
//! request is sent once more with its id, its wait at zero and nobody
//! waiting for the reply, so a grant it had is released by the lane.

use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request, Status};
use tokio::time::Instant;

use crate::inner::ClientInner;
use crate::lane::{LaneHandle, LaneRef, LetGo, MuxSession};
use crate::mux_lane::{self, OnDrop};
use crate::options::ServerAddr;
use crate::{ErrorKind, Result};

/// How long a request keeps being sent again through a failover, counted
/// from the first lost answer, when the caller's own deadline is sooner
/// (a try-lock's, say). Long enough for an election and a reconnect.
pub(crate) const FAILOVER_WINDOW: Duration = Duration::from_secs(10);

const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// One request that may be granted, for [`call`].
pub(crate) struct Call<F> {
    /// Two-phase ticket (0 = none).
    pub(crate) ticket: u64,
    /// The resource a grant would hold.
    pub(crate) resource: (Key, Namespace),
    /// The caller's deadline: a wait is sent for the time left until it.
    pub(crate) deadline: Instant,
    /// The request and its reply timeout: for the first attempt (`None`),
    /// then for the time left until the deadline.
    pub(crate) request: F,
    /// What the lane does if the caller leaves while the request is out.
    pub(crate) on_drop: OnDrop,
}

/// Sends `call` on `lane` (a multiplexed lane of `server`) and returns its
/// answer. On a cluster, an answer lost to a failover (the connection
/// broke, or the node stepped down) sends the request again, with the same
/// id, on the session's next connection, until the later of the caller's
/// deadline and [`FAILOVER_WINDOW`] after the first loss.
pub(crate) async fn call<F>(
    inner: &ClientInner,
    server: usize,
    mut lane: LaneHandle,
    call: Call<F>,
) -> Result<(Reply, LaneRef)>
where
    F: Fn(Option<Duration>) -> (Request, Duration),
{
    let Some(session) = lane.mux.clone() else {
        return Err(ErrorKind::Protocol("not a multiplexed lane".into()).into());
    };
    let id = session.take_ids(1);
    let resend = inner.servers[server].is_cluster;
    let mut attempt = (call.request)(None);
    let let_go = mux_lane::let_go(&session, id, call.ticket, &attempt.0, &call.resource);
    let mut lost = LostAnswer {
        session: None,
        let_go: let_go.clone(),
    };
    let mut give_up: Option<Instant> = None;
    loop {
        let (request, reply_timeout) = attempt;
        let result = mux_lane::call(
            &lane,
            id,
            request,
            call.ticket,
            Some(call.resource.clone()),
            reply_timeout,
            call.on_drop,
            let_go.clone(),
        )
        .await;
        if !resend || !lost_to_failover(&result) {
            lost.session = None;
            return result;
        }
        // The answer is lost: the request may have been applied. A node
        // that stepped down closes its connections; make sure of it.
        lane.close();
        lost.session = Some(std::sync::Arc::clone(&session));
        let give_up =
            *give_up.get_or_insert_with(|| call.deadline.max(Instant::now() + FAILOVER_WINDOW));
        tracing::debug!(
            id,
            "answer lost to a failover; sending again on the next connection"
        );
        lane = match next_lane(inner, server, give_up).await {
            Some(next) => next,
            None => return result,
        };
        let left = call.deadline.saturating_duration_since(Instant::now());
        attempt = (call.request)(Some(left));
    }
}

/// Whether `result` means the request's answer was lost to a failover:
/// the connection broke, the node no longer leads, or it is stopping — a
/// draining node answers a waiting request `error` (docs/protocol-mux.md),
/// and a request of a named session can always be sent again.
fn lost_to_failover(result: &Result<(Reply, LaneRef)>) -> bool {
    match result {
        Ok((Reply::Failure(Status::Error), _)) => true,
        Ok((reply, _)) => leader_gone(reply),
        Err(error) => matches!(
            error.kind(),
            ErrorKind::ConnectionClosed
                | ErrorKind::Io(_)
                | ErrorKind::Poisoned
                | ErrorKind::Draining
                | ErrorKind::NotLeader { .. }
        ),
    }
}

/// Whether `reply` says the node it came from no longer leads: it names
/// another leader (or none), or it is stopping (`error_draining`; a
/// stopping leader hands its leadership over). A request answered so is
/// sent again to the next leader.
pub(crate) fn leader_gone(reply: &Reply) -> bool {
    matches!(
        reply,
        Reply::NotLeader(_) | Reply::Failure(Status::ErrorDraining)
    )
}

/// Whether `error` is one a cluster's failover causes and outlasts: a
/// node that cannot be reached or answered in time, or that does not lead.
pub(crate) fn failing_over(error: &crate::Error) -> bool {
    error.is_transient() || matches!(error.kind(), ErrorKind::NotLeader { .. })
}

/// The server's next multiplexed lane (to the new leader), trying with
/// backoff until `give_up`.
async fn next_lane(inner: &ClientInner, server: usize, give_up: Instant) -> Option<LaneHandle> {
    match lane_through_failover(inner, server, give_up).await {
        Ok((lane, _)) if lane.is_mux() => Some(lane),
        // The cluster stopped speaking the extension, or is gone for good.
        _ => None,
    }
}

/// The server's control lane and the node it is connected to, as
/// [`ClientInner::lane`] — but for a cluster, a failover in progress (no
/// leader yet, nodes that refuse or cannot be reached) is waited out, with
/// backoff, until `give_up`; the last error comes back after that.
pub(crate) async fn lane_through_failover(
    inner: &ClientInner,
    server: usize,
    give_up: Instant,
) -> Result<(LaneHandle, ServerAddr)> {
    let cluster = inner.servers[server].is_cluster;
    let mut backoff = BACKOFF_MIN;
    loop {
        let error = match inner.lane(server).await {
            Ok((lane, node)) if !lane.is_closed() || !cluster => return Ok((lane, node)),
            Ok(_) => ErrorKind::ConnectionClosed.into(),
            Err(error) => error,
        };
        if !cluster || !failing_over(&error) || Instant::now() + backoff > give_up {
            return Err(error);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Armed while a request's answer is lost: if the caller leaves (or gives
/// up) then, what the request may have got is let go of on the session's
/// current lane, or its next one.
struct LostAnswer {
    /// Set while armed.
    session: Option<std::sync::Arc<MuxSession>>,
    let_go: LetGo,
}

impl Drop for LostAnswer {
    fn drop(&mut self) {
        // Disarmed: the request was answered, the let-go stays untaken.
        let Some(session) = self.session.take() else {
            return;
        };
        if let Some(message) = self.let_go.take() {
            tracing::debug!("letting go of a request whose answer was lost");
            session.send(message);
        }
    }
}
