//! One transport for the requests that may wait in a key's queue (acquire,
//! enqueue, wait), with two implementations behind one interface:
//!
//! * **mux**: the multiplexed connection (our server). Every request goes
//!   over the server's one lane with an id; a two-phase place is a ticket
//!   number on it.
//! * **plain**: any dflockd v2 server. An acquire first tries once on the
//!   pipelined control lane; if the key is busy it waits on a connection of
//!   its own ([`plain`](crate::plain)), which then stays open for as long
//!   as the lease lives, because the server ties auto-release to the
//!   connection that got the grant. A two-phase place is a connection kept
//!   alive by a task.
//!
//! Either way a grant comes back as a [`Grant`]: the reply, when its
//! request was sent, and the lane the lease is bound to.

use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Request, Seconds};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::Result;
use crate::connection::{
    Connection, Enqueued, Granted, REPLY_SLACK, expect_enqueued, grant_or_timeout,
};
use crate::inner::ClientInner;
use crate::lane::{LaneHandle, LaneRef, LaneRequest, ReplyGuard, spawn_lane};
use crate::mux_lane::{self, OnDrop, with_timeout};
use crate::options::ServerAddr;
use crate::plain::{QueuedConn, guarded_request};
use crate::resend;

/// A grant as the transport delivers it, before it becomes a `Lease`.
pub(crate) struct Grant {
    pub(crate) granted: Granted,
    /// When the request that got it was sent: the lease is counted from
    /// here.
    pub(crate) sent_at: Instant,
    /// The lane the lease is bound to: renewals go there, and its close is
    /// the lease's loss.
    pub(crate) lane: LaneRef,
    /// A lane of the lease's own (a plain server's blocking grant), kept
    /// open while the lease lives.
    pub(crate) own_lane: Option<LaneHandle>,
    /// Renew at once: the request waited in a queue for a real part of the
    /// lease, so counting from its send time would make the lease look
    /// nearly spent.
    pub(crate) renew_now: bool,
}

impl Grant {
    /// A grant answered at once on a shared lane.
    fn at_once(granted: Granted, lane: LaneRef, sent_at: Instant) -> Grant {
        Grant {
            granted,
            sent_at,
            lane,
            own_lane: None,
            renew_now: false,
        }
    }

    /// A grant from a request that may have waited in the queue on the
    /// multiplexed lane. Its lease restarted on the server when the grant
    /// was observed, which is after the request was sent, so counting from
    /// the send time is safe; when the wait took a real part of the lease,
    /// the lease is renewed at once instead of looking nearly spent.
    fn waited(granted: Granted, lane: LaneRef, sent_at: Instant) -> Grant {
        let renew_now = sent_at.elapsed() * 4 > granted.lease.as_duration();
        Grant {
            renew_now,
            ..Grant::at_once(granted, lane, sent_at)
        }
    }

    /// A grant on a connection of its own, which is kept open (pinged) for
    /// as long as the lease lives.
    fn owning(
        inner: &ClientInner,
        granted: Granted,
        conn: Connection,
        sent_at: Instant,
        renew_now: bool,
    ) -> Grant {
        let on_close = Arc::clone(&inner.on_lane_closed);
        let own = spawn_lane(conn, inner.timing, move |id| on_close(id, false));
        Grant {
            granted,
            sent_at,
            lane: own.lane_ref(),
            own_lane: Some(own),
            renew_now,
        }
    }
}

/// What an enqueue got.
pub(crate) enum Enqueueing {
    /// Granted at once.
    Acquired(Grant),
    /// In the queue at this place.
    Queued(Place),
}

/// Where a two-phase request's queue place lives.
pub(crate) enum Place {
    /// A ticket number of the multiplexed session of server `server`.
    Mux {
        lane: LaneHandle,
        server: usize,
        ticket: u64,
    },
    /// A connection of its own (plain servers), kept alive by a task.
    Plain(QueuedConn),
}

/// The transport to one server, chosen by what its connection speaks.
pub(crate) enum Transport<'a> {
    /// The multiplexed connection (for a cluster, its session, carried
    /// from leader to leader).
    Mux {
        lane: LaneHandle,
        inner: &'a ClientInner,
        server: usize,
    },
    /// A plain dflockd server: the control lane, and connections of their
    /// own for blocking requests.
    Plain {
        control: LaneHandle,
        /// The node the control lane is connected to (a cluster's leader):
        /// blocking requests connect there too.
        node: ServerAddr,
        inner: &'a ClientInner,
    },
}

impl<'a> Transport<'a> {
    /// The transport to `server` (connecting if needed; for a cluster,
    /// waiting out a failover for up to [`resend::FAILOVER_WINDOW`]).
    pub(crate) async fn open(inner: &'a ClientInner, server: usize) -> Result<Transport<'a>> {
        let give_up = Instant::now() + resend::FAILOVER_WINDOW;
        let (lane, node) = resend::lane_through_failover(inner, server, give_up).await?;
        Ok(if lane.is_mux() {
            Transport::Mux {
                lane,
                inner,
                server,
            }
        } else {
            Transport::Plain {
                control: lane,
                node,
                inner,
            }
        })
    }

    /// Acquires, waiting up to `wait` in the key's queue; `None` on
    /// timeout. `acquire` builds the request for a given wait.
    pub(crate) async fn acquire(
        &self,
        acquire: impl Fn(Seconds) -> Request,
        wait: Seconds,
        orphan: (Key, Namespace),
    ) -> Result<Option<Grant>> {
        match self {
            Transport::Mux {
                lane,
                inner,
                server,
            } => {
                let sent_at = Instant::now();
                let call = resend::Call {
                    ticket: 0,
                    resource: orphan,
                    deadline: sent_at + wait.as_duration(),
                    request: |left| waiting(&acquire, wait, left),
                    on_drop: OnDrop::Cancel,
                };
                let (reply, lane) = resend::call(inner, *server, lane.clone(), call).await?;
                Ok(grant_or_timeout(reply)?.map(|granted| Grant::waited(granted, lane, sent_at)))
            }
            Transport::Plain {
                control,
                node,
                inner,
            } => {
                // Try once on the control lane; an uncontended acquire
                // never needs a connection of its own.
                let sent_at = Instant::now();
                let (tx, rx) = oneshot::channel();
                let mut pending = ReplyGuard::new(rx, control, Some(orphan.clone()));
                control.send(LaneRequest {
                    request: acquire(Seconds::ZERO),
                    reply: Some(tx),
                    orphan: Some(orphan.clone()),
                });
                let (reply, lane) = pending.recv().await?;
                if let Some(granted) = grant_or_timeout(reply)? {
                    return Ok(Some(Grant::at_once(granted, lane, sent_at)));
                }
                if wait == Seconds::ZERO {
                    return Ok(None);
                }
                let conn = Connection::connect(node, &inner.options).await?;
                let sent_at = Instant::now();
                let (reply, conn) = guarded_request(
                    conn,
                    acquire(wait),
                    orphan,
                    wait.as_duration() + REPLY_SLACK,
                )
                .await?;
                Ok(grant_or_timeout(reply)?
                    .map(|granted| Grant::owning(inner, granted, conn, sent_at, true)))
            }
        }
    }

    /// Two-phase acquire, phase 1: granted at once, or a place in the
    /// queue.
    pub(crate) async fn enqueue(
        &self,
        request: Request,
        orphan: (Key, Namespace),
    ) -> Result<Enqueueing> {
        match self {
            Transport::Mux {
                lane,
                inner,
                server,
            } => {
                let ticket = lane.new_ticket();
                let sent_at = Instant::now();
                let call = resend::Call {
                    ticket,
                    resource: orphan,
                    deadline: sent_at,
                    request: |_: Option<Duration>| (request.clone(), REPLY_SLACK),
                    on_drop: OnDrop::Abandon,
                };
                let (reply, lane_ref) = resend::call(inner, *server, lane.clone(), call).await?;
                Ok(match expect_enqueued(reply)? {
                    Enqueued::Acquired(granted) => {
                        Enqueueing::Acquired(Grant::at_once(granted, lane_ref, sent_at))
                    }
                    Enqueued::Queued => Enqueueing::Queued(Place::Mux {
                        lane: lane.clone(),
                        server: *server,
                        ticket,
                    }),
                })
            }
            Transport::Plain { node, inner, .. } => {
                let conn = Connection::connect(node, &inner.options).await?;
                let sent_at = Instant::now();
                let (reply, conn) =
                    guarded_request(conn, request, orphan.clone(), REPLY_SLACK).await?;
                Ok(match expect_enqueued(reply)? {
                    Enqueued::Acquired(granted) => {
                        Enqueueing::Acquired(Grant::owning(inner, granted, conn, sent_at, false))
                    }
                    Enqueued::Queued => Enqueueing::Queued(Place::Plain(QueuedConn::spawn(
                        conn,
                        inner.timing.keepalive,
                        orphan,
                    ))),
                })
            }
        }
    }
}

impl Place {
    /// Two-phase acquire, phase 2: waits up to `timeout` for the grant;
    /// `None` on timeout (the place is gone).
    pub(crate) async fn wait(
        self,
        inner: &ClientInner,
        request: Request,
        timeout: Duration,
        orphan: (Key, Namespace),
    ) -> Result<Option<Grant>> {
        let sent_at = Instant::now();
        match self {
            Place::Mux {
                lane,
                server,
                ticket,
            } => {
                let wait = Seconds::from_duration_ceil(timeout).unwrap_or(Seconds::ZERO);
                let with = |timeout| with_timeout(&request, timeout);
                let call = resend::Call {
                    ticket,
                    resource: orphan,
                    deadline: sent_at + timeout,
                    request: |left| waiting(&with, wait, left),
                    on_drop: OnDrop::Cancel,
                };
                let (reply, lane) = resend::call(inner, server, lane, call).await?;
                Ok(grant_or_timeout(reply)?.map(|granted| Grant::waited(granted, lane, sent_at)))
            }
            Place::Plain(queued) => {
                let conn = queued.take().await?;
                let (reply, conn) =
                    guarded_request(conn, request, orphan, timeout + REPLY_SLACK).await?;
                Ok(grant_or_timeout(reply)?
                    .map(|granted| Grant::owning(inner, granted, conn, sent_at, true)))
            }
        }
    }

    /// Gives the place up in the background (a grant it may have received
    /// meanwhile is released).
    pub(crate) fn abandon(self, orphan: (Key, Namespace)) {
        match self {
            Place::Mux { lane, ticket, .. } => mux_lane::abandon(&lane, orphan, ticket),
            // Its task gives the place up when the handle drops.
            Place::Plain(queued) => drop(queued),
        }
    }
}

/// A waiting request built by `build` — for the whole `wait` on the first
/// attempt, for `left` of the caller's time when sent again (whole
/// seconds, rounded down: a resend never waits past the caller's
/// deadline) — with its reply timeout. A try (`wait` zero) stays a try.
fn waiting(
    build: &impl Fn(Seconds) -> Request,
    wait: Seconds,
    left: Option<Duration>,
) -> (Request, Duration) {
    let secs = match left {
        None => wait,
        Some(left) => Seconds::new(left.as_secs().min(wait.get())).unwrap_or(Seconds::ZERO),
    };
    (build(secs), secs.as_duration() + REPLY_SLACK)
}
