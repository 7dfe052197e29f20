//! A multiplexed lane (docs/protocol-mux.md): one connection carries every
//! request of the process for its server — try-locks, renewals, releases,
//! and blocking waits too — because each request has an id and each reply
//! names the request it answers.
//!
//! The lane is negotiated per connection (`hello _ mux`); a plain dflockd
//! server refuses it and the client keeps using a plain lane plus a
//! connection per blocking wait (see `lane.rs` and `client.rs`).
//!
//! Like a plain lane it runs as two tasks. The writer assigns ids (or takes
//! the caller's, for requests it may cancel), batches everything queued into
//! one write and pings when quiet; the reader matches replies by id. Any
//! failure closes the lane, fails everything pending and reports the
//! closure once, so leases bound to the connection are known lost at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dflockd_proto::{
    Key, MUX_ACCEPTED, MUX_HELLO, Namespace, Reply, Request, encode_mux_request, parse_mux_reply,
    prefix_frames,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::connection::Connection;
use crate::lane::{
    Framing, LaneHandle, LaneId, LaneRef, LaneRequest, LaneTiming, LetGo, MuxSession, Outgoing,
    Pending, ReplyGuard, ReplyTo, TaggedRequest, spawn_framed,
};
use crate::renewal::RenewSink;
use crate::{ErrorKind, Result};

impl LaneHandle {
    /// Whether this lane speaks the multiplexed extension.
    pub(crate) fn is_mux(&self) -> bool {
        self.mux.is_some()
    }

    /// A ticket for a two-phase acquire on this (multiplexed) lane.
    pub(crate) fn new_ticket(&self) -> u64 {
        self.mux
            .as_ref()
            .map_or(0, |ids| ids.next_ticket.fetch_add(1, Ordering::Relaxed))
    }
}

/// Asks the server for the multiplexed extension on a fresh connection.
/// `Ok(true)`: accepted, every frame from now on carries an id. `Ok(false)`:
/// a plain server answered `error` and the connection stays usable as a
/// plain one. Anything else poisons the connection.
pub(crate) async fn negotiate(conn: &mut Connection, reply_timeout: Duration) -> Result<bool> {
    let line = conn.raw_exchange(MUX_HELLO, reply_timeout).await?;
    let line = String::from_utf8_lossy(&line);
    match line.trim_end_matches(['\r', '\n']) {
        MUX_ACCEPTED => Ok(true),
        "error" => Ok(false),
        // The server wanted `auth` first (no token configured), or drains.
        "error_auth" => Err(ErrorKind::Auth.into()),
        "error_draining" => Err(ErrorKind::Draining.into()),
        other => Err(ErrorKind::Protocol(format!(
            "unexpected answer to the mux hello: {:?}",
            other.chars().take(64).collect::<String>()
        ))
        .into()),
    }
}

/// What a dropped [`call`] leaves behind it.
#[derive(Clone, Copy)]
pub(crate) enum OnDrop {
    /// Withdraw the waiting request (`cancel`).
    Cancel,
    /// Give up the call's two-phase place: poll it with `w <key> 0` on its
    /// ticket, which withdraws it if still queued; a grant it had is
    /// released.
    Abandon,
}

struct DropGuard {
    lane: LaneHandle,
    id: u64,
    ticket: u64,
    resource: Option<(Key, Namespace)>,
    reply: ReplyGuard,
    /// `None` once the caller has its reply.
    action: Option<OnDrop>,
    let_go: LetGo,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        let Some(action) = self.action.take() else {
            return;
        };
        // A reply that arrived but was never read: its grant is released by
        // the reply guard, and the request is over — unless it left a queue
        // place behind.
        let arrived = self.reply.abandon();
        // The lane closed with the answer: what the request got, if
        // anything, is on the session's next connection.
        if arrived.is_none()
            && self.lane.is_closed()
            && let Some(session) = &self.lane.mux
            && let Some(message) = self.let_go.take()
        {
            session.send(message);
            return;
        }
        match (action, arrived) {
            (OnDrop::Cancel, None) => {
                if let Some(session) = &self.lane.mux {
                    session.send(Outgoing::Cancel(self.id));
                }
            }
            (OnDrop::Abandon, None | Some(Reply::Queued)) => {
                if let Some(resource) = self.resource.take() {
                    abandon(&self.lane, resource, self.ticket);
                }
            }
            _ => {}
        }
    }
}

/// Gives up the two-phase place `ticket` holds on `resource` (see
/// [`OnDrop`]), on the session's current lane.
pub(crate) fn abandon(lane: &LaneHandle, resource: (Key, Namespace), ticket: u64) {
    let Some(session) = &lane.mux else { return };
    session.send(give_up_place(session, ticket, resource));
}

fn give_up_place(session: &MuxSession, ticket: u64, resource: (Key, Namespace)) -> Outgoing {
    empty_handed(
        session.take_ids(1),
        ticket,
        poll(resource.clone()),
        resource,
    )
}

/// How to let go of what request `id` (`request`, on `ticket`) may have
/// got, once its answer is lost with its connection: a message for the
/// session's next connection, whose reply nobody waits for, so a grant in
/// it is released. An acquire or a `w` is sent again with its id and no
/// wait: the server answers it with the hold it got (or it tries once, and
/// a grant is released just the same). An enqueue's place is polled away
/// on its ticket. `None` for any other request, and off a session that
/// re-attaches (elsewhere the server releases what the connection had).
pub(crate) fn let_go(
    session: &MuxSession,
    id: u64,
    ticket: u64,
    request: &Request,
    resource: &(Key, Namespace),
) -> LetGo {
    let resource = resource.clone();
    let message = match request {
        _ if !session.reattaches() => None,
        Request::Acquire { .. } | Request::Wait { .. } => Some(empty_handed(
            id,
            ticket,
            with_timeout(request, dflockd_proto::Seconds::ZERO),
            resource,
        )),
        Request::Enqueue { .. } => Some(give_up_place(session, ticket, resource)),
        _ => None,
    };
    LetGo::new(message)
}

/// `request` (an acquire or a wait) with another timeout.
pub(crate) fn with_timeout(request: &Request, secs: dflockd_proto::Seconds) -> Request {
    let mut request = request.clone();
    if let Request::Acquire { timeout, .. } | Request::Wait { timeout, .. } = &mut request {
        *timeout = secs;
    }
    request
}

/// A zero-timeout `w` on a ticket: withdraws its place if still queued,
/// collects its grant otherwise.
fn poll((key, namespace): (Key, Namespace)) -> Request {
    Request::Wait {
        key,
        namespace,
        timeout: dflockd_proto::Seconds::ZERO,
    }
}

/// `request` as request `id`, with nobody waiting for its reply: a grant
/// in that reply is released.
fn empty_handed(id: u64, ticket: u64, request: Request, resource: (Key, Namespace)) -> Outgoing {
    Outgoing::Tagged(TaggedRequest {
        id,
        ticket,
        request: LaneRequest {
            request,
            reply: None,
            orphan: Some(resource),
        },
        let_go: None,
    })
}

/// Sends one request over a multiplexed lane, as request `id` of the
/// lane's session (a fresh id, or that of an earlier attempt whose answer
/// a failover lost), and waits up to `reply_timeout` for its reply. If the
/// caller goes away first (or the reply is late), `on_drop` runs: a
/// waiting request is cancelled, a two-phase place given up; a grant that
/// raced it is released by the lane (`orphan`). Nothing leaks and the
/// connection stays usable. If the lane closes with the answer and the
/// caller is gone, `let_go` is sent on the session's next connection.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call(
    lane: &LaneHandle,
    id: u64,
    request: Request,
    ticket: u64,
    orphan: Option<(Key, Namespace)>,
    reply_timeout: Duration,
    on_drop: OnDrop,
    let_go: LetGo,
) -> Result<(dflockd_proto::Reply, LaneRef)> {
    let (tx, rx) = oneshot::channel();
    let mut guard = DropGuard {
        lane: lane.clone(),
        id,
        ticket,
        resource: orphan.clone(),
        reply: ReplyGuard::new(rx, lane, orphan.clone()),
        action: Some(on_drop),
        let_go: let_go.clone(),
    };
    let tagged = Outgoing::Tagged(TaggedRequest {
        id,
        ticket,
        request: LaneRequest {
            request,
            reply: Some(tx),
            orphan,
        },
        let_go: Some(let_go),
    });
    if let Err(mpsc::error::SendError(outgoing)) = lane.tx.send(tagged) {
        guard.action = None;
        outgoing.fail(ErrorKind::ConnectionClosed.into());
        return Err(ErrorKind::ConnectionClosed.into());
    }
    match tokio::time::timeout(reply_timeout, guard.reply.recv()).await {
        Ok(result) => {
            guard.action = None;
            result
        }
        // Late: the guard cancels the request as it drops.
        Err(_) => Err(ErrorKind::ReplyTimeout.into()),
    }
}

/// Requests waiting for their replies, by id, plus the order in which the
/// ones with a reply deadline were sent (their deadlines grow in that
/// order, so the oldest one still pending is the next to check).
#[derive(Default)]
struct InFlight {
    by_id: HashMap<u64, Pending>,
    deadlines: VecDeque<(u64, Instant)>,
}

impl InFlight {
    fn insert(&mut self, id: u64, pending: Pending, bounded: bool) {
        if bounded {
            self.deadlines.push_back((id, pending.deadline));
        }
        self.by_id.insert(id, pending);
    }

    /// The earliest reply deadline still pending.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(id, deadline)) = self.deadlines.front() {
            if self.by_id.contains_key(&id) {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }
}

/// Starts a multiplexed lane on a connection whose `hello` was accepted,
/// carrying `session` from now on.
pub(crate) fn spawn_mux_lane(
    conn: Connection,
    timing: LaneTiming,
    on_close: impl FnOnce(LaneId) + Send + 'static,
    session: Arc<MuxSession>,
) -> LaneHandle {
    let renew_to = Arc::new(OnceLock::<RenewSink>::new());
    let framing = MuxFraming {
        in_flight: InFlight::default(),
        ids: Arc::clone(&session),
        renew_to: Arc::clone(&renew_to),
    };
    let lane = spawn_framed(
        conn,
        timing,
        on_close,
        framing,
        renew_to,
        Some(Arc::clone(&session)),
    );
    session.attach(&lane);
    lane
}

/// A multiplexed lane's framing: ids on every frame, replies matched by id.
struct MuxFraming {
    in_flight: InFlight,
    ids: Arc<MuxSession>,
    renew_to: Arc<OnceLock<RenewSink>>,
}

impl Framing for MuxFraming {
    fn push(&mut self, outgoing: Outgoing, deadline: Instant, out: &mut Vec<u8>) {
        match outgoing {
            Outgoing::One(request) => {
                let id = self.ids.take_ids(1);
                encode_mux_request(id, 0, &request.request, out);
                self.in_flight.insert(id, pending(request, deadline), true);
            }
            Outgoing::Tagged(TaggedRequest {
                id,
                ticket,
                request,
                let_go,
            }) => {
                encode_mux_request(id, ticket, &request.request, out);
                // A waiting request's caller bounds it (and cancels).
                let bounded = !request.request.may_block();
                let mut entry = pending(request, deadline);
                entry.let_go = let_go;
                self.in_flight.insert(id, entry, bounded);
            }
            Outgoing::Cancel(target) => {
                if self.in_flight.by_id.contains_key(&target) {
                    let id = self.ids.take_ids(1);
                    dflockd_proto::MuxRequest {
                        id,
                        ticket: 0,
                        body: dflockd_proto::MuxBody::Cancel(target),
                    }
                    .encode(out);
                    let cancel = LaneRequest {
                        request: Request::Ping,
                        reply: None,
                        orphan: None,
                    };
                    self.in_flight.insert(id, pending(cancel, deadline), true);
                }
            }
            Outgoing::Renewals(batch) => {
                let (wire, tags, sink) = batch.into_parts();
                if self.renew_to.get().is_none() {
                    let _ = self.renew_to.set(sink);
                }
                let first_id = self.ids.take_ids(tags.len() as u64);
                prefix_frames(&wire, first_id, out);
                for (i, tag) in tags.into_iter().enumerate() {
                    let entry = Pending {
                        reply: Some(ReplyTo::Renew(tag)),
                        orphan: None,
                        deadline,
                        let_go: None,
                    };
                    self.in_flight.insert(first_id + i as u64, entry, true);
                }
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        self.in_flight.next_deadline()
    }

    fn take_reply(&mut self, line: &[u8]) -> Result<(Pending, Reply)> {
        let (id, reply) = parse_mux_reply(line).map_err(|e| ErrorKind::Protocol(e.to_string()))?;
        let entry = self
            .in_flight
            .by_id
            .remove(&id)
            .ok_or_else(|| ErrorKind::Protocol(format!("reply to unknown request {id}")))?;
        Ok((entry, reply))
    }

    fn drain(&mut self) -> Vec<Pending> {
        self.in_flight.deadlines.clear();
        let mut failed = Vec::with_capacity(self.in_flight.by_id.len());
        for (_, mut entry) in self.in_flight.by_id.drain() {
            // Lost with the lane, and nobody will send it again: let go of
            // what it got on the session's next connection.
            if !entry.has_caller()
                && let Some(message) = entry.let_go.take().and_then(|l| l.take())
            {
                self.ids.send(message);
            }
            failed.push(entry);
        }
        failed
    }
}

fn pending(request: LaneRequest, deadline: Instant) -> Pending {
    Pending {
        reply: request.reply.map(ReplyTo::Caller),
        orphan: request.orphan,
        deadline,
        let_go: None,
    }
}
