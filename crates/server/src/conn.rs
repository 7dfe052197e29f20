//! One connection: read a frame, validate it, apply it to the table, write
//! the reply; in order, one request at a time (spec §1.9).

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, ConnId, EnqueueOutcome, Grant, LockError, Op, Outcome, ResourceId, WaitOutcome,
    Waiting,
};
use dflockd_proto::{
    Decoded, FrameDecoder, Key, MUX_ACCEPTED, RawFrame, Reply, Request, Seconds, Status, Token,
    is_mux_hello,
};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::oneshot;

use crate::config::IdlePolicy;
use crate::idle::WatchGuard;
use crate::shared::{Notify, Shard, ShardSet, Shared};

mod mux;

/// Pause between an `error_auth` reply and the close (spec §2.1).
const AUTH_FAILURE_PAUSE: Duration = Duration::from_millis(100);

/// Why the connection ends.
#[derive(Debug)]
enum Close {
    /// Peer closed, read/write failed, or the server is force-closing.
    Gone,
    /// Closed by protocol rule after a final reply (written or attempted).
    Protocol,
}

enum ReadFailure {
    Eof,
    Timeout,
    Oversize,
}

/// Disconnect cleanup (spec §3.9) for one connection, run on drop.
struct DisconnectOnDrop {
    shared: Arc<Shared>,
    id: ConnId,
    used: Arc<ShardSet>,
}

impl Drop for DisconnectOnDrop {
    fn drop(&mut self) {
        let auto_release = self.shared.config.auto_release_on_disconnect;
        let id = self.id;
        // Only a request of this connection leaves state of it in a table,
        // and each marked the table it used.
        self.shared
            .each_shard_in(&self.used, |shard| shard.disconnect(id, auto_release));
        if auto_release && !self.shared.config.disconnect_lock_delay.is_zero() {
            self.shared.delay_started.notify_one();
        }
    }
}

/// What a blocked request is waiting for, so it can be withdrawn.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Acquire(dflockd_core::WaiterId),
    /// A two-phase `w`: its ticket and the waiter holding the ticket's place.
    Wait {
        ticket: u64,
        waiter: dflockd_core::WaiterId,
    },
}

impl Pending {
    /// Withdraws request `request` of `conn` from the table. `false` if it
    /// was granted meanwhile (the grant is on its way to the request's
    /// notification).
    fn withdraw(self, shared: &Shared, conn: ConnId, request: u64, rid: &ResourceId) -> bool {
        let op = match self {
            Pending::Acquire(waiter) => Op::Withdraw {
                conn,
                resource: rid.clone(),
                waiter,
            },
            Pending::Wait { ticket, waiter } => Op::WithdrawPlace {
                conn,
                ticket,
                resource: rid.clone(),
                waiter: Some(waiter),
            },
        };
        shared.with_shard(rid, |shard| shard.withdraw(op, Waiting { conn, request }))
    }
}

/// A frame as [`Connection::next_frame`] hands it over: a common request
/// the decoder parsed on its fast path, or any other frame's lines.
enum Incoming<'a> {
    Parsed(Request),
    Raw(RawFrame<'a>),
}

impl Incoming<'_> {
    /// The request, or why the frame is none.
    fn parse(self) -> Result<Request, dflockd_proto::ProtoError> {
        match self {
            Incoming::Parsed(request) => Ok(request),
            Incoming::Raw(frame) => Request::parse(&frame),
        }
    }
}

/// A request that queued, as [`Connection::execute`] hands it to
/// [`Connection::block`].
struct Blocked {
    /// Where the grant will arrive.
    grant: oneshot::Receiver<Grant>,
    rid: ResourceId,
    pending: Pending,
    timeout: Seconds,
}

/// Where [`Connection::apply`] left a request.
enum Step {
    /// Answered.
    Reply(Reply),
    /// Queued: the grant will come through the notification.
    Waiting {
        rid: ResourceId,
        pending: Pending,
        timeout: Seconds,
    },
}

pub(crate) struct Connection<S> {
    stream: S,
    id: ConnId,
    shared: Arc<Shared>,
    buf: Vec<u8>,
    pos: usize,
    decoder: FrameDecoder,
    out: Vec<u8>,
    /// How much of `out` is written (see [`Self::poll_write_out`]).
    written: usize,
    /// The resource the last request named: the next request on the same
    /// key (a release after an acquire, a renew) shares its bytes and hash.
    recent: std::cell::Cell<Option<ResourceId>>,
    /// At least the number of waiters this connection has in the table (see
    /// [`Self::at_queue_cap`]).
    queued: std::cell::Cell<usize>,
    /// The tables this connection's requests went to.
    used: Arc<ShardSet>,
    /// The read deadline (see [`crate::idle`]).
    watch: WatchGuard,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(crate) fn new(stream: S, id: ConnId, shared: Arc<Shared>) -> Self {
        Connection {
            stream,
            id,
            shared: Arc::clone(&shared),
            buf: Vec::with_capacity(4096),
            pos: 0,
            decoder: FrameDecoder::new(),
            out: Vec::with_capacity(256),
            written: 0,
            recent: std::cell::Cell::new(None),
            queued: std::cell::Cell::new(0),
            used: Arc::default(),
            watch: shared.reaper.watch(id),
        }
    }

    /// Serves the connection until it ends, then runs disconnect cleanup
    /// (spec §3.9).
    pub(crate) async fn serve(mut self) {
        // Runs however the task ends: returned, panicked, or aborted by a
        // force close.
        let _cleanup = DisconnectOnDrop {
            shared: Arc::clone(&self.shared),
            id: self.id,
            used: Arc::clone(&self.used),
        };
        let outcome = self.run().await;
        tracing::debug!(?outcome, "connection closed");
    }

    async fn run(&mut self) -> Result<(), Close> {
        if self.shared.config.auth_token.is_some() {
            self.handshake().await?;
        }
        loop {
            let recent = self.recent.take();
            let hint = recent.as_ref().map(ResourceId::key);
            let parsed = self
                .next_frame(hint, |incoming| match incoming {
                    Incoming::Parsed(request) => Ok(request),
                    // `hello` is no v2 command: looked for only among the
                    // frames v2 refuses, off the hot path.
                    Incoming::Raw(frame) => Request::parse_reusing(&frame, hint)
                        .map_err(|error| (error, is_mux_hello(&frame))),
                })
                .await;
            self.recent.set(recent);
            let parsed = match parsed {
                Ok(parsed) => parsed,
                Err(ReadFailure::Eof) => return Err(Close::Gone),
                Err(ReadFailure::Timeout | ReadFailure::Oversize) => {
                    self.out.extend_from_slice(b"error\n");
                    let _ = self.flush().await;
                    return Err(Close::Protocol);
                }
            };
            if self.shared.is_draining() {
                Reply::Failure(Status::ErrorDraining).encode(&mut self.out);
                let _ = self.flush().await;
                return Err(Close::Protocol);
            }
            match parsed {
                Ok(request) => {
                    if let Some(blocked) = self.execute(request) {
                        let reply = self.block(blocked).await?;
                        reply.encode(&mut self.out);
                    }
                }
                Err((_, true)) if self.shared.config.mux => {
                    self.out.extend_from_slice(MUX_ACCEPTED.as_bytes());
                    self.out.push(b'\n');
                    return self.run_mux().await;
                }
                Err((error, _)) => {
                    tracing::debug!(code = error.code(), %error, "rejected request");
                    Reply::Failure(Status::Error).encode(&mut self.out);
                }
            }
        }
    }

    /// The first frame must be `auth` with the configured secret; anything
    /// else is answered `error_auth`, followed by a pause and a close.
    async fn handshake(&mut self) -> Result<(), Close> {
        let shared = Arc::clone(&self.shared);
        let authorised = self
            .next_frame(None, |incoming| match incoming.parse() {
                Ok(Request::Auth { token }) => {
                    let expected = shared
                        .config
                        .auth_token
                        .as_ref()
                        .map_or(&[][..], |s| s.expose().as_bytes());
                    !token.is_empty() && bool::from(token.as_slice().ct_eq(expected))
                }
                _ => false,
            })
            .await
            .unwrap_or(false);
        if authorised {
            Reply::Ok.encode(&mut self.out);
            return Ok(());
        }
        tracing::info!("authentication failed");
        Reply::Failure(Status::ErrorAuth).encode(&mut self.out);
        let _ = self.flush().await;
        tokio::time::sleep(AUTH_FAILURE_PAUSE).await;
        Err(Close::Protocol)
    }

    /// Reads until the decoder completes a frame. Replies queued so far are
    /// written only when no complete frame is buffered, so pipelined
    /// requests get their replies in as few writes as possible.
    ///
    /// The frame is handed to `on_frame` (a raw frame borrows the read
    /// buffer, so it is looked at there and then) and its result returned.
    /// A common request is parsed on the decoder's fast path, sharing
    /// `recent` as [`Request::parse_reusing`] does.
    async fn next_frame<T>(
        &mut self,
        recent: Option<&Key>,
        mut on_frame: impl FnMut(Incoming<'_>) -> T,
    ) -> Result<T, ReadFailure> {
        self.watch.restart(self.decoder.lines_completed());
        loop {
            let input = &self.buf[self.pos..];
            // Empty after the last buffered frame: straight to the read.
            if !input.is_empty() {
                if let Some((used, request)) = self.decoder.decode_common(input, recent) {
                    self.pos += used;
                    return Ok(on_frame(Incoming::Parsed(request)));
                }
                let (used, decoded) = self.decoder.decode(input);
                self.pos += used;
                match decoded {
                    Decoded::Frame(frame) => return Ok(on_frame(Incoming::Raw(frame))),
                    Decoded::Oversize => return Err(ReadFailure::Oversize),
                    Decoded::NeedMore => {}
                }
            }
            self.buf.clear();
            self.pos = 0;
            if self.flush().await.is_err() {
                return Err(ReadFailure::Eof);
            }
            let bounded =
                self.shared.config.idle == IdlePolicy::ReadTimeout || self.decoder.in_frame();
            self.watch.arm(self.decoder.lines_completed(), bounded);
            let read = tokio::select! {
                // The read first: no random branch order per request, and
                // the deadline is not polled when bytes are already there.
                biased;
                read = self.stream.read_buf(&mut self.buf) => read,
                _ = poll_fn(|cx| self.watch.poll_flagged(cx)), if bounded => {
                    if self.watch.overdue() {
                        return Err(ReadFailure::Timeout);
                    }
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => return Err(ReadFailure::Eof),
                Ok(_) => {}
            }
        }
    }

    /// Writes the queued replies out. A write that cannot finish at once is
    /// bounded by the write timeout.
    async fn flush(&mut self) -> Result<(), Close> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Fast path: the socket is almost always writable, so the replies go
        // out on the first poll and no timer is needed.
        let first = poll_fn(|cx| Poll::Ready(self.poll_write_out(cx))).await;
        let result = match first {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let limit = self.shared.config.write_timeout;
                let expiry = async {
                    match limit {
                        Some(limit) => tokio::time::sleep(limit).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    result = poll_fn(|cx| self.poll_write_out(cx)) => result,
                    _ = expiry => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timeout")),
                }
            }
        };
        self.out.clear();
        self.written = 0;
        result.map_err(|error| {
            tracing::debug!(%error, "write failed");
            Close::Gone
        })
    }

    /// Writes `out` from `written` on, then flushes (a TLS stream holds
    /// records until then); `written` keeps the progress across polls.
    fn poll_write_out(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let mut stream = std::pin::Pin::new(&mut self.stream);
        while self.written < self.out.len() {
            match stream.as_mut().poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        stream.poll_flush(cx)
    }

    /// Applies a request. An immediate reply is queued for writing; a
    /// request that must wait comes back as [`Blocked`], for
    /// [`Self::block`]. Synchronous, so the common case builds no future.
    fn execute(&mut self, request: Request) -> Option<Blocked> {
        let mut receiver = None;
        let step = self.apply(request, 0, 0, None, || {
            let (tx, rx) = oneshot::channel();
            receiver = Some(rx);
            Notify::Once(tx)
        });
        match (step, receiver) {
            (Step::Reply(reply), _) => {
                reply.encode(&mut self.out);
                None
            }
            (
                Step::Waiting {
                    rid,
                    pending,
                    timeout,
                },
                Some(grant),
            ) => Some(Blocked {
                grant,
                rid,
                pending,
                timeout,
            }),
            (Step::Waiting { .. }, None) => {
                Reply::Failure(Status::Error).encode(&mut self.out);
                None
            }
        }
    }

    /// Runs `f` on the table that holds `rid`, noting that this connection
    /// used it (see [`ShardSet`]).
    fn table<R>(&self, rid: &ResourceId, f: impl FnOnce(&mut Shard) -> R) -> R {
        let shard = self.shared.shard_of(rid);
        self.used.insert(shard);
        self.shared.with_shard_at(shard, f)
    }

    /// Whether the connection already has `cap` requests queued in the
    /// table (the mux per-connection cap). Only a request of this connection
    /// adds a waiter of it, so [`Self::queued`], raised by each one that
    /// queued, bounds the true count from above; the true count is summed
    /// over the shards only when that bound reaches the cap.
    fn at_queue_cap(&self, cap: Option<usize>) -> bool {
        let Some(cap) = cap else {
            return false;
        };
        if self.queued.get() < cap {
            return false;
        }
        let exact = self.shared.waiters_of(self.id, &self.used);
        self.queued.set(exact);
        exact >= cap
    }

    /// Runs `f` with the resource `key` names in `namespace`: the recent one
    /// again if it is the same (no new hash, no new allocation), else a new
    /// one, which becomes the recent. The id is lent, not cloned, so a
    /// request costs no reference-count traffic for it.
    fn with_resource<R>(
        &self,
        namespace: dflockd_proto::Namespace,
        key: dflockd_proto::Key,
        f: impl FnOnce(&ResourceId) -> R,
    ) -> R {
        let rid = match self.recent.take() {
            Some(recent) if recent.namespace() == namespace && *recent.key() == key => recent,
            _ => ResourceId::new(namespace, key),
        };
        let result = f(&rid);
        self.recent.set(Some(rid));
        result
    }

    /// Applies a request to the table. A request that must wait registers
    /// the notification `notify` makes (called only then) for its id
    /// `request` and comes back as [`Step::Waiting`]; everything else is
    /// answered at once. `ticket`
    /// names the two-phase state of `e`/`w` (always 0 on plain connections).
    /// With `queue_cap`, a request that may queue (a waiting `l`/`w`, any
    /// `e`) is refused with `error_max_waiters` while the connection already
    /// has that many waiters in the table (the mux per-connection cap).
    fn apply(
        &self,
        request: Request,
        id_on_conn: u64,
        ticket: u64,
        queue_cap: Option<usize>,
        notify: impl FnOnce() -> Notify,
    ) -> Step {
        let id = self.id;
        let to = Waiting {
            conn: id,
            request: id_on_conn,
        };
        match request {
            Request::Ping => Step::Reply(Reply::Ok),
            // The handshake consumed the only `auth` that is ever valid.
            Request::Auth { .. } => Step::Reply(Reply::Failure(Status::Error)),
            Request::Stats => Step::Reply(match serde_json::to_string(&self.shared.stats()) {
                Ok(json) => Reply::Stats(json),
                Err(_) => Reply::Failure(Status::Error),
            }),
            Request::Acquire {
                key,
                kind,
                timeout,
                lease,
            } => self.with_resource(kind.namespace(), key, |rid| {
                let limit = kind.limit();
                // The wake-up channel is made only if the request queues.
                let may_wait = timeout != Seconds::ZERO;
                let outcome = if may_wait && self.at_queue_cap(queue_cap) {
                    Err(LockError::MaxWaiters)
                } else {
                    let op = Op::Acquire {
                        conn: id,
                        resource: rid.clone(),
                        limit,
                        lease,
                        wait: may_wait.then_some(id_on_conn),
                    };
                    self.table(rid, |shard| {
                        if may_wait {
                            shard.run_waiting(op, to, notify)
                        } else {
                            shard.run(op)
                        }
                    })
                };
                let outcome = outcome.map(|outcome| match outcome {
                    Outcome::Acquire(outcome) => outcome,
                    _ => AcquireOutcome::Timeout,
                });
                match outcome {
                    Ok(AcquireOutcome::Queued(waiter)) => {
                        self.queued.set(self.queued.get() + 1);
                        Step::Waiting {
                            rid: rid.clone(),
                            pending: Pending::Acquire(waiter),
                            timeout,
                        }
                    }
                    other => Step::Reply(acquire_reply(other)),
                }
            }),
            Request::Release {
                key,
                namespace,
                token,
            } => self.with_resource(namespace, key, |rid| {
                // Parsed before the table lock is taken; a malformed token
                // holds nothing.
                let released = match Token::parse_wire(&token) {
                    Some(token) => self.table(rid, |shard| {
                        shard.run(Op::Release {
                            resource: rid.clone(),
                            token,
                        })
                    }),
                    None => Err(LockError::NotHeld),
                };
                Step::Reply(match released {
                    Ok(_) => Reply::Ok,
                    Err(error) => error_reply(&error),
                })
            }),
            Request::Renew {
                key,
                namespace,
                token,
                lease,
            } => self.with_resource(namespace, key, |rid| {
                let renewed = match Token::parse_wire(&token) {
                    Some(token) => self.table(rid, |shard| {
                        shard.run(Op::Renew {
                            resource: rid.clone(),
                            token,
                            lease,
                        })
                    }),
                    None => Err(LockError::NotHeld),
                };
                Step::Reply(match renewed {
                    Ok(Outcome::Renewed(lease)) => {
                        Reply::Renewed(Seconds::new(lease.get()).unwrap_or(Seconds::ZERO))
                    }
                    Ok(_) => Reply::Failure(Status::Error),
                    Err(error) => error_reply(&error),
                })
            }),
            Request::Enqueue { key, kind, lease } => {
                self.with_resource(kind.namespace(), key, |rid| {
                    let limit = kind.limit();
                    let outcome = if self.at_queue_cap(queue_cap) {
                        Err(LockError::MaxWaiters)
                    } else {
                        self.table(rid, |shard| {
                            shard.run(Op::Enqueue {
                                conn: id,
                                ticket,
                                resource: rid.clone(),
                                limit,
                                lease,
                            })
                        })
                        .map(|outcome| match outcome {
                            Outcome::Enqueue(outcome) => outcome,
                            _ => EnqueueOutcome::Queued,
                        })
                    };
                    Step::Reply(match outcome {
                        Ok(EnqueueOutcome::Acquired(Grant { token, lease })) => {
                            Reply::Acquired { token, lease }
                        }
                        Ok(EnqueueOutcome::Queued) => {
                            self.queued.set(self.queued.get() + 1);
                            Reply::Queued
                        }
                        Err(error) => error_reply(&error),
                    })
                })
            }
            Request::Wait {
                key,
                namespace,
                timeout,
            } => self.with_resource(namespace, key, |rid| {
                let may_wait = timeout != Seconds::ZERO;
                let (outcome, place) = if may_wait && self.at_queue_cap(queue_cap) {
                    (Err(LockError::MaxWaiters), None)
                } else {
                    let op = Op::Wait {
                        conn: id,
                        ticket,
                        resource: rid.clone(),
                        wait: may_wait.then_some(id_on_conn),
                    };
                    self.table(rid, |shard| {
                        let outcome = if may_wait {
                            shard.run_waiting(op, to, notify)
                        } else {
                            shard.run(op)
                        };
                        let place = shard.table().queued_place(id, ticket, rid);
                        (outcome, place)
                    })
                };
                let outcome = outcome.map(|outcome| match outcome {
                    Outcome::Wait(outcome) => outcome,
                    _ => WaitOutcome::Timeout,
                });
                match (outcome, place) {
                    (Ok(WaitOutcome::Pending), Some(waiter)) => Step::Waiting {
                        rid: rid.clone(),
                        pending: Pending::Wait { ticket, waiter },
                        timeout,
                    },
                    // A pending wait always has a queued place.
                    (Ok(WaitOutcome::Pending), None) => Step::Reply(Reply::Failure(Status::Error)),
                    (other, _) => Step::Reply(wait_reply(other)),
                }
            }),
        }
    }

    /// Waits for a queued request's grant, its timeout, the drain, or the
    /// peer going away. Meanwhile pipelined bytes are buffered (bounded) and
    /// a peer close cancels the wait at once (spec §1.9). No read deadline
    /// runs during the wait.
    async fn block(&mut self, blocked: Blocked) -> Result<Reply, Close> {
        let Blocked {
            grant: mut rx,
            rid,
            pending,
            timeout,
        } = blocked;
        let rid = &rid;
        self.flush().await?;
        // No read deadline while the request waits.
        self.watch.set(None);
        // Keep unprocessed pipelined bytes at the front of the buffer.
        self.buf.drain(..self.pos);
        self.pos = 0;
        let expiry = tokio::time::sleep(timeout.as_duration());
        tokio::pin!(expiry);
        let limit = self.shared.config.pipeline_limit;
        enum Woken {
            Granted(Grant),
            Expired,
            Drained,
            Gone,
        }
        let woken = loop {
            tokio::select! {
                biased;
                grant = &mut rx => break match grant {
                    Ok(grant) => Woken::Granted(grant),
                    // The table dropped the waiter without a grant: not expected,
                    // but answer rather than hang.
                    Err(_) => Woken::Drained,
                },
                _ = self.shared.drain.cancelled() => break Woken::Drained,
                _ = &mut expiry => break Woken::Expired,
                read = self.stream.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => break Woken::Gone,
                    Ok(_) if self.buf.len() > limit => {
                        tracing::debug!("pipeline overflow during a blocking request");
                        break Woken::Gone;
                    }
                    Ok(_) => {}
                },
            }
        };
        let id = self.id;
        let grant = match woken {
            Woken::Granted(grant) => Some(grant),
            Woken::Expired | Woken::Drained | Woken::Gone => {
                // Withdraw; if the grant raced us it is already in `rx`.
                let withdrawn = pending.withdraw(&self.shared, id, 0, rid);
                let raced = if withdrawn { None } else { rx.try_recv().ok() };
                match (woken, raced) {
                    (Woken::Expired, Some(grant)) => Some(grant),
                    (Woken::Expired, None) => return Ok(Reply::Failure(Status::Timeout)),
                    (woken, raced) => {
                        if let Some(grant) = raced {
                            self.shared.release_undelivered(rid, grant.token);
                        }
                        return match woken {
                            Woken::Drained => Ok(Reply::Failure(Status::Error)),
                            _ => Err(Close::Gone),
                        };
                    }
                }
            }
        };
        let Some(grant) = grant else {
            return Ok(Reply::Failure(Status::Timeout));
        };
        // The lease restarts when the waiting request observes its grant.
        Ok(observe(&self.shared, rid, grant))
    }
}

/// The reply to a waiting request that has its grant: the lease restarts
/// now, when the request observes it.
fn observe(shared: &Shared, rid: &ResourceId, grant: Grant) -> Reply {
    let observed = shared.with_shard(rid, |shard| {
        shard.run(Op::Observe {
            resource: rid.clone(),
            token: grant.token,
            lease: grant.lease,
        })
    });
    match observed {
        Ok(Outcome::Observed(Grant { token, lease })) => Reply::Granted { token, lease },
        Ok(_) => Reply::Failure(Status::Error),
        Err(error) => error_reply(&error),
    }
}

fn acquire_reply(outcome: Result<AcquireOutcome, LockError>) -> Reply {
    match outcome {
        Ok(AcquireOutcome::Granted(Grant { token, lease })) => Reply::Granted { token, lease },
        Ok(AcquireOutcome::Timeout | AcquireOutcome::Queued(_)) => Reply::Failure(Status::Timeout),
        Err(error) => error_reply(&error),
    }
}

fn wait_reply(outcome: Result<WaitOutcome, LockError>) -> Reply {
    match outcome {
        Ok(WaitOutcome::Granted(Grant { token, lease })) => Reply::Granted { token, lease },
        Ok(WaitOutcome::Timeout | WaitOutcome::Pending) => Reply::Failure(Status::Timeout),
        Err(error) => error_reply(&error),
    }
}

fn error_reply(error: &LockError) -> Reply {
    Reply::Failure(match error {
        LockError::MaxLocks => Status::ErrorMaxLocks,
        LockError::MaxWaiters => Status::ErrorMaxWaiters,
        LockError::LimitMismatch => Status::ErrorLimitMismatch,
        LockError::NotEnqueued => Status::ErrorNotEnqueued,
        LockError::AlreadyEnqueued => Status::ErrorAlreadyEnqueued,
        LockError::LeaseExpired => Status::ErrorLeaseExpired,
        LockError::NotHeld => Status::Error,
        LockError::Mint(error) => {
            tracing::error!(%error, "could not mint a token");
            Status::Error
        }
    })
}
