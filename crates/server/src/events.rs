//! What the lock table did, as events for watchers (`GET /v1/events`) and
//! counters for `/metrics`: derived from each applied command and its
//! effects, after the fact, so the table never waits for an observer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dflockd_core::{AcquireOutcome, Effects, EnqueueOutcome, Op, Outcome, ResourceId, WaitOutcome};
use dflockd_proto::Namespace;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::metrics::Metrics;

/// How many events a subscriber may fall behind before it is dropped.
pub(crate) const SUBSCRIBER_BUFFER: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// A hold was granted (at once or to a waiter).
    Grant,
    /// A hold was released by its holder.
    Release,
    /// A lease ran out.
    Expire,
    /// A request joined a key's queue.
    Enqueue,
    /// A connection (or HTTP session) closed; what it held or queued was
    /// cleaned up.
    Disconnect,
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl EventKind {
    /// The kind's name: the SSE message's `event` and the data's `type`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventKind::Grant => "grant",
            EventKind::Release => "release",
            EventKind::Expire => "expire",
            EventKind::Enqueue => "enqueue",
            EventKind::Disconnect => "disconnect",
        }
    }
}

/// One event of the stream: JSON in the `data` line of an SSE message
/// whose `event` is the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Event {
    #[serde(rename = "type")]
    pub(crate) kind: EventKind,
    /// The key (absent on `disconnect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    /// `lock` or `semaphore` (absent on `disconnect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) namespace: Option<&'static str>,
    /// The grant's fence (grant, release, expire).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fence: Option<u64>,
    /// The connection the event concerns, where the table knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) conn: Option<u64>,
    /// The lease in seconds (grant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lease_s: Option<u64>,
    /// Milliseconds since the Unix epoch, when the server saw it.
    pub(crate) at_ms: u64,
}

impl Event {
    fn new(kind: EventKind, rid: Option<&ResourceId>) -> Event {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        Event {
            kind,
            key: rid.map(|rid| rid.key().to_string_lossy()),
            namespace: rid.map(|rid| match rid.namespace() {
                Namespace::Lock => "lock",
                Namespace::Semaphore => "semaphore",
            }),
            fence: None,
            conn: None,
            lease_s: None,
            at_ms: u64::try_from(at_ms).unwrap_or(u64::MAX),
        }
    }
}

/// The event stream's fan-out: a broadcast channel whose subscribers each
/// buffer [`SUBSCRIBER_BUFFER`] events; one that falls further behind
/// loses its place (the HTTP layer then ends its stream).
pub(crate) struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    /// Open subscriptions: while there are none, no event is built.
    subscribers: AtomicUsize,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(SUBSCRIBER_BUFFER).0,
            subscribers: AtomicUsize::new(0),
        }
    }
}

/// One subscriber's end of the [`EventBus`].
pub(crate) struct Subscription {
    bus: Arc<EventBus>,
    pub(crate) rx: broadcast::Receiver<Arc<Event>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EventBus {
    /// A new subscription, receiving events from now on.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        Subscription {
            bus: Arc::clone(self),
            rx: self.tx.subscribe(),
        }
    }

    /// Connection `conn` closed and its table state was cleaned up.
    pub(crate) fn disconnected(&self, conn: u64) {
        if self.watched() {
            self.send(Event {
                conn: Some(conn),
                ..Event::new(EventKind::Disconnect, None)
            });
        }
    }

    fn watched(&self) -> bool {
        self.subscribers.load(Ordering::Acquire) > 0
    }

    fn send(&self, event: Event) {
        // No subscriber left: nothing to do.
        let _ = self.tx.send(Arc::new(event));
    }
}

/// Counts what applying `op` did and, while anyone watches, publishes it.
/// `in_lock_delay` tells whether a key is in its disconnect lock-delay
/// now (the table after the command). `disconnects`: whether an
/// `Op::Disconnect` is reported here (a cluster applies one per
/// connection; a single node applies one per table the connection used,
/// and reports the connection once with [`EventBus::disconnected`]).
pub(crate) fn observe(
    op: &Op,
    effects: &Effects,
    in_lock_delay: impl Fn(&ResourceId) -> bool,
    metrics: &Metrics,
    bus: &EventBus,
    disconnects: bool,
) {
    let watched = bus.watched();
    let publish = |event: Event| {
        if watched {
            bus.send(event);
        }
    };
    let grant_event = |rid: &ResourceId, conn: Option<u64>, fence: u64, lease: u64| Event {
        fence: Some(fence),
        conn,
        lease_s: Some(lease),
        ..Event::new(EventKind::Grant, Some(rid))
    };
    match (op, &effects.outcome) {
        (
            Op::Acquire { conn, resource, .. },
            Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))),
        )
        | (
            Op::Enqueue { conn, resource, .. },
            Ok(Outcome::Enqueue(EnqueueOutcome::Acquired(grant))),
        ) => {
            metrics.grants.inc();
            if watched {
                publish(grant_event(
                    resource,
                    Some(conn.0),
                    grant.token.fence(),
                    grant.lease.get(),
                ));
            }
        }
        (
            Op::Acquire { conn, resource, .. },
            Ok(Outcome::Acquire(outcome @ (AcquireOutcome::Queued(_) | AcquireOutcome::Timeout))),
        ) => {
            if in_lock_delay(resource) {
                metrics.lock_delay_hits.inc();
            }
            if watched && matches!(outcome, AcquireOutcome::Queued(_)) {
                publish(Event {
                    conn: Some(conn.0),
                    ..Event::new(EventKind::Enqueue, Some(resource))
                });
            }
        }
        (Op::Enqueue { conn, resource, .. }, Ok(Outcome::Enqueue(EnqueueOutcome::Queued))) => {
            if in_lock_delay(resource) {
                metrics.lock_delay_hits.inc();
            }
            if watched {
                publish(Event {
                    conn: Some(conn.0),
                    ..Event::new(EventKind::Enqueue, Some(resource))
                });
            }
        }
        // A two-phase grant made while nobody waited is collected here.
        (Op::Wait { conn, resource, .. }, Ok(Outcome::Wait(WaitOutcome::Granted(grant))))
            if watched =>
        {
            publish(grant_event(
                resource,
                Some(conn.0),
                grant.token.fence(),
                grant.lease.get(),
            ));
        }
        (Op::Release { resource, token }, Ok(Outcome::Released)) => {
            metrics.releases.inc();
            if watched {
                publish(Event {
                    fence: Some(token.fence()),
                    ..Event::new(EventKind::Release, Some(resource))
                });
            }
        }
        (Op::Disconnect { conn, .. }, _) if disconnects => bus.disconnected(conn.0),
        _ => {}
    }
    // Expiries first: a grant they made possible comes after them.
    for expired in &effects.expired {
        metrics.expirations.inc();
        if watched {
            publish(Event {
                fence: Some(expired.token.fence()),
                conn: Some(expired.conn.0),
                ..Event::new(EventKind::Expire, Some(&expired.resource))
            });
        }
    }
    for delivery in &effects.grants {
        metrics.grants.inc();
        if watched {
            publish(grant_event(
                &delivery.resource,
                Some(delivery.to.conn.0),
                delivery.grant.token.fence(),
                delivery.grant.lease.get(),
            ));
        }
    }
}
