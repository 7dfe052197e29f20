//! An HTTP session's connection to the lock table: an in-process
//! connection in the multiplexed protocol (docs/protocol-mux.md), served by
//! the same code as every TCP connection. So an HTTP waiter joins the same
//! FIFO queue as TCP waiters, and closing the session runs the same
//! disconnect cleanup.
//!
//! One task writes (whole frames from a channel, so a caller that goes
//! away mid-request never leaves half a frame, plus keep-alive pings),
//! one task reads replies and hands each to its caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dflockd_proto::{Reply, Request, encode_mux_request, parse_mux_reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The connection closed (the server drains or stopped, or the session
/// was closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

type Waiters = Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>;

/// What the writer task is asked to do.
enum Out {
    /// Write this whole frame.
    Frame(Vec<u8>),
    /// Close the connection's write side (the server then cleans up).
    Close,
}

/// One in-process mux connection. Requests may be made concurrently; each
/// gets its own id and waits for its own reply.
pub(crate) struct Pipe {
    out: mpsc::UnboundedSender<Out>,
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
    /// then `hello _ mux`) and starts the writer and reader tasks.
    /// `cleaned_up` fires when the server has run the connection's
    /// disconnect.
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
        let (out, frames) = mpsc::unbounded_channel();
        let pipe = Arc::new(Pipe {
            out,
            waiters: Mutex::new(Some(HashMap::new())),
            // A named session (`stable-ref`) must never use an id again,
            // even on its next connection (docs/protocol-mux.md,
            // *Sessions*): each connection starts at a random point.
            next_id: AtomicU64::new(random_start()),
            closed: CancellationToken::new(),
        });
        tokio::spawn(write_frames(write, frames, Arc::clone(&pipe), keepalive));
        tokio::spawn(read_replies(read, Arc::clone(&pipe), cleaned_up));
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
        let id = self.next_id();
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
        // Queued whole, at once: nothing to interrupt.
        self.send(frame)?;
        let reply = call.rx.as_mut().ok_or(Closed)?.await.map_err(|_| Closed);
        call.rx = None;
        reply
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, frame: Vec<u8>) -> Result<(), Closed> {
        self.out.send(Out::Frame(frame)).map_err(|_| Closed)
    }

    /// Whether the connection has closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the connection and waits until the server has cleaned up
    /// after it (every hold released, every waiter withdrawn).
    pub(crate) async fn close(&self) {
        let _ = self.out.send(Out::Close);
        self.closed.cancelled().await;
    }
}

/// A random first request id, leaving room to count up for ever.
fn random_start() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1;
    }
    (u64::from_le_bytes(bytes) >> 2).max(1)
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
        // The cancel's own reply has no waiter; the reader drops it.
        let cancel = format!("{} cancel\n_\n{}\n", pipe.next_id(), self.id);
        if pipe.send(cancel.into_bytes()).is_err() {
            // The connection is gone: the server cleans up after it.
            return;
        }
        let release = self.release.take();
        // No runtime (the process is ending): the connection closes with it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
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

/// Writes whole frames as they come, and a ping now and then: the server
/// closes a mux connection that is silent for its read timeout while
/// nothing waits (sessions have their own idle timeout). Ends on
/// [`Out::Close`], when every [`Pipe`] is gone, or when a write fails.
async fn write_frames(
    mut write: WriteHalf<DuplexStream>,
    mut frames: mpsc::UnboundedReceiver<Out>,
    pipe: Arc<Pipe>,
    keepalive: Duration,
) {
    let mut ping = tokio::time::interval(keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    // The writer's own handle would keep the channel open: the pipe's id
    // counter is all it needs.
    let pipe = Arc::downgrade(&pipe);
    loop {
        let frame = tokio::select! {
            next = frames.recv() => match next {
                Some(Out::Frame(frame)) => frame,
                Some(Out::Close) | None => break,
            },
            _ = ping.tick() => {
                let Some(pipe) = pipe.upgrade() else { break };
                format!("{} ping\n_\n\n", pipe.next_id()).into_bytes()
            }
        };
        if write.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = write.shutdown().await;
}

async fn read_replies(
    mut read: BufReader<ReadHalf<DuplexStream>>,
    pipe: Arc<Pipe>,
    cleaned_up: oneshot::Receiver<()>,
) {
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
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
    // Stop the writer too (the server closed the connection).
    let _ = pipe.out.send(Out::Close);
    drop(read);
    // The server has released what the connection held once its task
    // ended (or the server is gone).
    let _ = cleaned_up.await;
    pipe.closed.cancel();
}
