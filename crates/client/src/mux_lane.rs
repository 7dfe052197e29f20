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
    Framing, LaneHandle, LaneId, LaneRef, LaneRequest, LaneTiming, MuxIds, Outgoing, Pending,
    ReplyGuard, ReplyTo, TaggedRequest, spawn_framed,
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
        match (action, arrived) {
            (OnDrop::Cancel, None) => {
                let _ = self.lane.tx.send(Outgoing::Cancel(self.id));
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
/// [`OnDrop`]).
pub(crate) fn abandon(lane: &LaneHandle, resource: (Key, Namespace), ticket: u64) {
    let Some(ids) = &lane.mux else { return };
    let (key, namespace) = resource;
    let poll = Request::Wait {
        key: key.clone(),
        namespace,
        timeout: dflockd_proto::Seconds::ZERO,
    };
    let _ = lane.tx.send(Outgoing::Tagged(TaggedRequest {
        id: ids.take_ids(1),
        ticket,
        request: LaneRequest {
            request: poll,
            reply: None,
            orphan: Some((key, namespace)),
        },
    }));
}

/// Sends one request over a multiplexed lane and waits up to
/// `reply_timeout` for its reply. If the caller goes away first (or the
/// reply is late), `on_drop` runs: a waiting request is cancelled, a
/// two-phase place given up; a grant that raced it is released by the
/// lane (`orphan`). Nothing leaks and the connection stays usable.
pub(crate) async fn call(
    lane: &LaneHandle,
    request: Request,
    ticket: u64,
    orphan: Option<(Key, Namespace)>,
    reply_timeout: Duration,
    on_drop: OnDrop,
) -> Result<(dflockd_proto::Reply, LaneRef)> {
    let Some(ids) = &lane.mux else {
        return Err(ErrorKind::Protocol("not a multiplexed lane".into()).into());
    };
    let id = ids.take_ids(1);
    let (tx, rx) = oneshot::channel();
    let mut guard = DropGuard {
        lane: lane.clone(),
        id,
        ticket,
        resource: orphan.clone(),
        reply: ReplyGuard::new(rx, lane, orphan.clone()),
        action: Some(on_drop),
    };
    let tagged = Outgoing::Tagged(TaggedRequest {
        id,
        ticket,
        request: LaneRequest {
            request,
            reply: Some(tx),
            orphan,
        },
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

/// Starts a multiplexed lane on a connection whose `hello` was accepted.
pub(crate) fn spawn_mux_lane(
    conn: Connection,
    timing: LaneTiming,
    on_close: impl FnOnce(LaneId) + Send + 'static,
) -> LaneHandle {
    let renew_to = Arc::new(OnceLock::<RenewSink>::new());
    let ids = Arc::new(MuxIds::new());
    let framing = MuxFraming {
        in_flight: InFlight::default(),
        ids: Arc::clone(&ids),
        renew_to: Arc::clone(&renew_to),
    };
    spawn_framed(conn, timing, on_close, framing, renew_to, Some(ids))
}

/// A multiplexed lane's framing: ids on every frame, replies matched by id.
struct MuxFraming {
    in_flight: InFlight,
    ids: Arc<MuxIds>,
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
            }) => {
                encode_mux_request(id, ticket, &request.request, out);
                // A waiting request's caller bounds it (and cancels).
                let bounded = !request.request.may_block();
                self.in_flight
                    .insert(id, pending(request, deadline), bounded);
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
        self.in_flight.by_id.drain().map(|(_, p)| p).collect()
    }
}

fn pending(request: LaneRequest, deadline: Instant) -> Pending {
    Pending {
        reply: request.reply.map(ReplyTo::Caller),
        orphan: request.orphan,
        deadline,
    }
}
