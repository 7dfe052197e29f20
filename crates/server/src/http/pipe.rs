//! An HTTP session's connection to the lock table: an in-process
//! connection in the multiplexed protocol (docs/protocol-mux.md), served by
//! the same code as every TCP connection. So an HTTP waiter joins the same
//! FIFO queue as TCP waiters, and closing the session runs the same
//! disconnect cleanup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dflockd_proto::{Reply, Request, encode_mux_request, parse_mux_reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The connection closed (the server drains or stopped, or the session
/// was closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

type Waiters = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// One in-process mux connection. Requests may be made concurrently; each
/// gets its own id and waits for its own reply.
pub(crate) struct Pipe {
    writer: tokio::sync::Mutex<WriteHalf<DuplexStream>>,
    /// Replies still to come, by request id; `None` once the connection
    /// closed.
    waiters: Waiters,
    next_id: AtomicU64,
    /// Cancelled when the connection has closed and the server has cleaned
    /// up after it.
    closed: CancellationToken,
}

impl Pipe {
    /// Speaks the handshake on `stream` (`auth` when the server wants it,
    /// then `hello _ mux`) and starts reading replies. `cleaned_up` fires
    /// when the server has run the connection's disconnect.
    pub(crate) async fn open(
        stream: DuplexStream,
        auth: Option<&str>,
        keepalive: Duration,
        cleaned_up: oneshot::Receiver<()>,
    ) -> Result<Arc<Pipe>, Closed> {
        let (read, mut write) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        let mut handshake = Vec::new();
        if let Some(secret) = auth {
            handshake.extend_from_slice(b"auth\n_\n");
            handshake.extend_from_slice(secret.as_bytes());
            handshake.push(b'\n');
        }
        handshake.extend_from_slice(b"hello\n_\nmux\n");
        write.write_all(&handshake).await.map_err(|_| Closed)?;
        let mut line = String::new();
        if auth.is_some() {
            read.read_line(&mut line).await.map_err(|_| Closed)?;
            if line.trim_end() != "ok" {
                return Err(Closed);
            }
            line.clear();
        }
        read.read_line(&mut line).await.map_err(|_| Closed)?;
        if line.trim_end() != dflockd_proto::MUX_ACCEPTED {
            return Err(Closed);
        }
        let pipe = Arc::new(Pipe {
            writer: tokio::sync::Mutex::new(write),
            waiters: Arc::new(Mutex::new(Some(HashMap::new()))),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        tokio::spawn(read_replies(read, Arc::clone(&pipe), keepalive, cleaned_up));
        Ok(pipe)
    }

    /// Sends `request` and waits for its reply. Dropping the future before
    /// the reply came cancels a waiting request and gives back a grant that
    /// comes anyway (see [`Call`]).
    pub(crate) async fn call(
        self: &Arc<Self>,
        request: &Request,
        ticket: u64,
    ) -> Result<Reply, Closed> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(waiters) = waiters.as_mut() else {
                return Err(Closed);
            };
            waiters.insert(id, tx);
        }
        let mut call = Call {
            pipe: Arc::clone(self),
            id,
            release: release_of(request),
            rx: Some(rx),
        };
        let mut frame = Vec::with_capacity(64);
        encode_mux_request(id, ticket, request, &mut frame);
        self.send(&frame).await?;
        let reply = call.rx.as_mut().ok_or(Closed)?.await.map_err(|_| Closed);
        call.rx = None;
        reply
    }

    async fn send(&self, frame: &[u8]) -> Result<(), Closed> {
        let mut writer = self.writer.lock().await;
        writer.write_all(frame).await.map_err(|_| Closed)
    }

    /// Whether the connection has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the connection and waits until the server has cleaned up
    /// after it (every hold released, every waiter withdrawn).
    pub(crate) async fn close(&self) {
        {
            let mut writer = self.writer.lock().await;
            let _ = writer.shutdown().await;
        }
        self.closed.cancelled().await;
    }
}

/// How to give back what a request may be granted, if nobody takes it:
/// the release request for the key, without its token yet.
fn release_of(request: &Request) -> Option<(dflockd_proto::Key, dflockd_proto::Namespace)> {
    match request {
        Request::Acquire { key, kind, .. } | Request::Enqueue { key, kind, .. } => {
            Some((key.clone(), kind.namespace()))
        }
        Request::Wait { key, namespace, .. } => Some((key.clone(), *namespace)),
        _ => None,
    }
}

/// A request on its way. If the caller goes away first (the HTTP client
/// disconnected), its drop cancels the request on the connection, and a
/// grant that comes anyway is released: nothing is left held for nobody.
struct Call {
    pipe: Arc<Pipe>,
    id: u64,
    release: Option<(dflockd_proto::Key, dflockd_proto::Namespace)>,
    rx: Option<oneshot::Receiver<Reply>>,
}

impl Drop for Call {
    fn drop(&mut self) {
        let Some(rx) = self.rx.take() else {
            return;
        };
        let pipe = Arc::clone(&self.pipe);
        let target = self.id;
        let release = self.release.take();
        // No runtime (the process is ending): the connection closes with it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let id = pipe.next_id.fetch_add(1, Ordering::Relaxed);
            // The cancel's own reply has no waiter; the reader drops it.
            let frame = format!("{id} cancel\n_\n{target}\n");
            let _ = pipe.send(frame.as_bytes()).await;
            let token = match rx.await {
                Ok(Reply::Granted { token, .. } | Reply::Acquired { token, .. }) => token,
                _ => return,
            };
            if let Some((key, namespace)) = release {
                let request = Request::Release {
                    key,
                    namespace,
                    token: token.into(),
                };
                let _ = pipe.call(&request, 0).await;
            }
        });
    }
}

async fn read_replies(
    mut read: BufReader<ReadHalf<DuplexStream>>,
    pipe: Arc<Pipe>,
    keepalive: Duration,
    cleaned_up: oneshot::Receiver<()>,
) {
    let mut line = Vec::with_capacity(128);
    // The server closes a mux connection that is silent for its read
    // timeout while nothing waits: a ping now and then keeps an idle
    // session's connection open (sessions have their own idle timeout).
    let mut ping = tokio::time::interval(keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        line.clear();
        let read = tokio::select! {
            read = read.read_until(b'\n', &mut line) => read,
            _ = ping.tick() => {
                let id = pipe.next_id.fetch_add(1, Ordering::Relaxed);
                let frame = format!("{id} ping\n_\n\n");
                let _ = pipe.send(frame.as_bytes()).await;
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // The server's own replies; one that cannot be read ends the
        // connection (never trusted further).
        let Ok((id, reply)) = parse_mux_reply(&line) else {
            break;
        };
        let waiter = pipe
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(|waiters| waiters.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
    // Every caller still waiting learns the connection closed.
    drop(
        pipe.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(),
    );
    {
        let mut writer = pipe.writer.lock().await;
        let _ = writer.shutdown().await;
    }
    drop(read);
    // The server has released what the connection held once its task
    // ended (or the server is gone).
    let _ = cleaned_up.await;
    pipe.closed.cancel();
}
