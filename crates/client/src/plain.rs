//! The plain-server half of the transport: on a dflockd server without the
//! multiplexed extension, a blocking request waits on a connection of its
//! own, owned by a task so that the caller can be cancelled at any point
//! without leaking a grant, and a two-phase queue place keeps its
//! connection alive (pinged) until the ticket waits or is dropped.

use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request};
use tokio::sync::oneshot;

use crate::connection::{Connection, REPLY_SLACK};
use crate::{ErrorKind, Result};

/// Sends a request that may block on a connection of its own, so that the
/// caller may be cancelled at any point without leaking a grant: the request
/// runs in a task that owns the connection; if the caller goes away, the
/// connection is closed (the server drops the waiter) — and a grant that
/// raced the cancellation is released explicitly, which also covers servers
/// running without auto-release-on-disconnect.
pub(crate) async fn guarded_request(
    mut conn: Connection,
    request: Request,
    orphan: (Key, Namespace),
    reply_timeout: Duration,
) -> Result<(Reply, Connection)> {
    const RACE_GRACE: Duration = Duration::from_millis(200);
    let (tx, rx) = oneshot::channel::<Result<(Reply, Connection)>>();
    let mut tx = tx;
    let mut result = Handover {
        rx: Some(rx),
        orphan: orphan.clone(),
    };
    tokio::spawn(async move {
        let reply = {
            let exchange = conn.request(&request, reply_timeout);
            tokio::pin!(exchange);
            tokio::select! {
                reply = &mut exchange => Some(reply),
                _ = tx.closed() => {
                    // The caller is gone. A grant may already be on the wire.
                    tokio::time::timeout(RACE_GRACE, &mut exchange).await.ok()
                }
            }
        };
        match reply {
            Some(Ok(reply)) => {
                if let Err(Ok((reply, conn))) = tx.send(Ok((reply, conn))) {
                    settle_orphaned(reply, conn, orphan).await;
                }
            }
            Some(Err(error)) => {
                let _ = tx.send(Err(error));
            }
            None => {} // dropping the connection withdraws the waiter
        }
    });
    result.recv().await?
}

/// The caller's end of a value a background task hands over: a reply and
/// its connection ([`guarded_request`]), or a queued ticket's connection
/// ([`QueuedConn::take`]). If the caller goes away after the value was
/// handed over but before reading it, dropping this settles the value in the
/// background (releases a grant, gives up a queue place) instead of leaving
/// it to the connection's close — which frees nothing on a server without
/// auto-release.
struct Handover<T: Orphan> {
    rx: Option<oneshot::Receiver<T>>,
    orphan: (Key, Namespace),
}

/// A handed-over value that must be settled if nobody reads it.
trait Orphan: Send + Sized + 'static {
    /// Frees whatever the value holds on the server for `orphan`'s key.
    fn settle(self, orphan: (Key, Namespace)) -> impl Future<Output = ()> + Send + 'static;
}

impl Orphan for Result<(Reply, Connection)> {
    async fn settle(self, orphan: (Key, Namespace)) {
        if let Ok((reply, conn)) = self {
            settle_orphaned(reply, conn, orphan).await;
        }
    }
}

impl Orphan for Connection {
    fn settle(self, orphan: (Key, Namespace)) -> impl Future<Output = ()> + Send + 'static {
        abandon_queued(self, orphan)
    }
}

impl<T: Orphan> Handover<T> {
    async fn recv(&mut self) -> Result<T> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(ErrorKind::ConnectionClosed.into());
        };
        let result = rx.await;
        self.rx = None;
        result.map_err(|_| ErrorKind::ConnectionClosed.into())
    }
}

impl<T: Orphan> Drop for Handover<T> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // From here on the task cannot hand the value over: it settles it
        // itself. One already handed over is settled here.
        rx.close();
        if let Ok(value) = rx.try_recv()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(value.settle(self.orphan.clone()));
        }
    }
}

/// Settles a reply whose caller went away, on the connection it came from:
/// a grant is released; a queue place (`queued`) is given up.
async fn settle_orphaned(reply: Reply, mut conn: Connection, orphan: (Key, Namespace)) {
    match reply {
        Reply::Granted { token, .. } | Reply::Acquired { token, .. } => {
            tracing::debug!(
                fence = token.fence(),
                "releasing a grant whose caller went away"
            );
            let _ = conn.release(&orphan.0, orphan.1, token).await;
        }
        // An enqueue whose caller went away: its place may be granted
        // before the connection closes.
        Reply::Queued => abandon_queued(conn, orphan).await,
        _ => {}
    }
}

/// A plain-mode queue place: the connection that enqueued, owned by a task
/// that pings it every `keepalive` until the ticket waits (the connection
/// is handed back) or is dropped (the place is given up). Without the
/// pings a server with a read timeout (the Go server: 23 s) would close a
/// connection whose ticket is held longer than that, and the place with it.
pub(crate) struct QueuedConn {
    handback: oneshot::Sender<oneshot::Sender<Connection>>,
    orphan: (Key, Namespace),
}

impl QueuedConn {
    pub(crate) fn spawn(
        conn: Connection,
        keepalive: Duration,
        orphan: (Key, Namespace),
    ) -> QueuedConn {
        let (handback, requests) = oneshot::channel();
        tokio::spawn(keep_queued(conn, keepalive, orphan.clone(), requests));
        QueuedConn { handback, orphan }
    }

    /// The connection back, for the `w`. Fails if a ping found it broken
    /// (the place is gone with it).
    ///
    /// Cancel-safe: if the caller goes away after the connection was handed
    /// over but before reading it, the place is given up (and a grant it
    /// received meanwhile released) instead of the connection being dropped
    /// with the grant still held for it — which a server without
    /// auto-release-on-disconnect would keep until the lease ran out.
    pub(crate) async fn take(self) -> Result<Connection> {
        let (tx, rx) = oneshot::channel();
        let mut handback = Handover {
            rx: Some(rx),
            orphan: self.orphan,
        };
        self.handback
            .send(tx)
            .map_err(|_| ErrorKind::ConnectionClosed)?;
        handback.recv().await
    }
}

async fn keep_queued(
    mut conn: Connection,
    keepalive: Duration,
    orphan: (Key, Namespace),
    mut requests: oneshot::Receiver<oneshot::Sender<Connection>>,
) {
    loop {
        tokio::select! {
            request = &mut requests => {
                match request {
                    Ok(back) => {
                        if let Err(conn) = back.send(conn) {
                            abandon_queued(conn, orphan).await;
                        }
                    }
                    // The ticket was dropped.
                    Err(_) => abandon_queued(conn, orphan).await,
                }
                return;
            }
            _ = tokio::time::sleep(keepalive) => {
                if conn.request(&Request::Ping, REPLY_SLACK).await.is_err() {
                    tracing::debug!("queued ticket's connection failed a ping: place lost");
                    return;
                }
            }
        }
    }
}

/// Gives up the queue place `conn` holds for `orphan` (after an enqueue
/// answered `queued`). The place may already have been granted — the server
/// then holds the grant for this connection until a `w` collects it, and
/// without auto-release-on-disconnect it would outlive the connection until
/// its lease ran out. So collect it with a zero-timeout wait (which also
/// withdraws a place still queued), release any grant, then close.
async fn abandon_queued(mut conn: Connection, orphan: (Key, Namespace)) {
    let (key, namespace) = orphan;
    let poll = Request::Wait {
        key: key.clone(),
        namespace,
        timeout: dflockd_proto::Seconds::ZERO,
    };
    if let Ok(Reply::Granted { token, .. }) = conn.request(&poll, REPLY_SLACK).await {
        tracing::debug!(
            fence = token.fence(),
            "releasing the grant of an abandoned queue place"
        );
        let _ = conn.release(&key, namespace, token).await;
    }
}
