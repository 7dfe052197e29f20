//! One connection's I/O: read bytes, decode frames and hand them to the
//! connection's [`Session`], write what it answers, and wake it for grants,
//! timeouts and the drain. Every protocol decision is the session's; this
//! driver only moves bytes and time (spec §1.9: one request at a time on a
//! plain connection, interleaved on a multiplexed one).

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use dflockd_core::{ConnId, Grant, LockError, Op, Outcome, ResourceId, Waiting};
use dflockd_proto::{FrameDecoder, Stats, Token};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::IdlePolicy;
use crate::idle::WatchGuard;
use crate::replica::ClusterLog;
use crate::session::{Answer, Close, Done, Log, ReadFailure, Session, answer};
use crate::shared::{MuxGrant, Notify, ShardSet, Shared};
use tokio_util::sync::CancellationToken;

/// Pause between an `error_auth` reply and the close (spec §2.1).
const AUTH_FAILURE_PAUSE: Duration = Duration::from_millis(100);

/// The server's log as one connection uses it: commands go to the table
/// that holds their resource (noting that this connection used it), and
/// grants for the connection's waiting requests arrive on its inbox.
///
/// Dropped however the connection's task ends (returned, panicked or
/// aborted by a force close), it releases grants that reached the inbox but
/// not the peer, then runs the connection's disconnect cleanup (spec §3.9),
/// so no grant leaks, even with auto-release off.
pub(crate) struct ConnLog {
    shared: Arc<Shared>,
    id: ConnId,
    /// The tables this connection's requests went to.
    used: ShardSet,
    inbox: mpsc::UnboundedReceiver<MuxGrant>,
    sink: mpsc::UnboundedSender<MuxGrant>,
}

impl ConnLog {
    fn new(shared: Arc<Shared>, id: ConnId) -> ConnLog {
        let (sink, inbox) = mpsc::unbounded_channel();
        ConnLog {
            shared,
            id,
            used: ShardSet::default(),
            inbox,
            sink,
        }
    }
}

impl Log for ConnLog {
    fn run(&mut self, rid: &ResourceId, op: Op, _: u64) -> Done<Answer> {
        let shard = self.shared.shard_of(rid);
        self.used.insert(shard);
        Done::Now(answer(
            self.shared.with_shard_at(shard, |shard| shard.run(op)),
        ))
    }

    fn run_waiting(&mut self, rid: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let shard = self.shared.shard_of(rid);
        self.used.insert(shard);
        let to = Waiting {
            conn: self.id,
            request,
        };
        let sink = &self.sink;
        let outcome = self.shared.with_shard_at(shard, |shard| {
            // The sink's handle is cloned only if the request queued.
            shard.run_waiting(op, to, || Notify {
                id: request,
                to: sink.clone(),
            })
        });
        Done::Now(answer(outcome))
    }

    fn withdraw(&mut self, rid: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let of = Waiting {
            conn: self.id,
            request,
        };
        let withdrawn = self.shared.with_shard(rid, |shard| shard.withdraw(op, of));
        Done::Now(Ok(Some(Outcome::Withdrawn(withdrawn))))
    }

    fn barrier(&mut self, _: u64) -> Done<Answer> {
        // One node applies every command at once: nothing to wait for.
        Done::Now(Ok(None))
    }

    fn bind(&mut self, _: dflockd_proto::StableRef, _: u64) -> Done<Answer> {
        // One node has no failover to survive: the name changes nothing.
        Done::Now(Ok(None))
    }

    fn observe(&mut self, rid: &ResourceId, grant: Grant) -> Result<Grant, LockError> {
        self.shared
            .with_shard(rid, |shard| shard.observe(rid, grant))
    }

    fn release_undelivered(&mut self, rid: &ResourceId, token: Token) {
        self.shared.release_undelivered(rid, token);
    }

    fn try_grant(&mut self) -> Option<(u64, ResourceId, Grant)> {
        self.inbox.try_recv().ok()
    }

    fn waiters(&mut self) -> usize {
        self.shared.waiters_of(self.id, &self.used)
    }

    fn stats(&mut self) -> Stats {
        self.shared.stats()
    }

    fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        self.inbox.close();
        while let Ok((_, rid, grant)) = self.inbox.try_recv() {
            self.shared.release_undelivered(&rid, grant.token);
        }
        let auto_release = self.shared.config.auto_release_on_disconnect;
        let id = self.id;
        // Only a request of this connection leaves state of it in a table,
        // and each marked the table it used.
        self.shared
            .each_shard_in(&self.used, |shard| shard.disconnect(id, auto_release));
        self.shared.telemetry.events.disconnected(id.0);
        if auto_release && !self.shared.config.disconnect_lock_delay.is_zero() {
            self.shared.delay_started.notify_one();
        }
    }
}

/// What the driver needs of a connection's log beyond the session's
/// [`Log`]: where grants and answers arrive, and when the connection must
/// close because the node stopped (or started) leading.
pub(crate) trait DriverLog: Log {
    /// The grant inbox, and the answers to proposed commands (a
    /// replicated log only).
    fn inbox(&mut self) -> Inbox<'_>;
    /// Cancelled when the connection must close (a replicated log whose
    /// node's leadership changed).
    fn ended(&self) -> Option<CancellationToken>;
}

/// A connection log's incoming channels.
pub(crate) struct Inbox<'a> {
    pub(crate) grants: &'a mut mpsc::UnboundedReceiver<MuxGrant>,
    pub(crate) answers: Option<&'a mut mpsc::UnboundedReceiver<(u64, Answer)>>,
}

impl DriverLog for ConnLog {
    fn inbox(&mut self) -> Inbox<'_> {
        Inbox {
            grants: &mut self.inbox,
            answers: None,
        }
    }

    fn ended(&self) -> Option<CancellationToken> {
        None
    }
}

impl DriverLog for ClusterLog {
    fn inbox(&mut self) -> Inbox<'_> {
        Inbox {
            grants: &mut self.grants,
            answers: Some(&mut self.answers),
        }
    }

    fn ended(&self) -> Option<CancellationToken> {
        Some(self.ended.clone())
    }
}

/// The next answer, if answers come at all.
async fn next_answer(
    answers: Option<&mut mpsc::UnboundedReceiver<(u64, Answer)>>,
) -> Option<(u64, Answer)> {
    match answers {
        Some(answers) => answers.recv().await,
        None => std::future::pending().await,
    }
}

pub(crate) struct Connection<S, L> {
    stream: S,
    shared: Arc<Shared>,
    session: Session,
    log: L,
    buf: Vec<u8>,
    pos: usize,
    decoder: FrameDecoder,
    /// How much of the session's reply bytes is written (see
    /// [`Self::poll_write_out`]).
    written: usize,
    /// The read deadline (see [`crate::idle`]).
    watch: WatchGuard,
    /// Session time 0 (its timeouts count from here).
    origin: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S, ConnLog> {
    /// A connection of a single-node server.
    pub(crate) fn new(stream: S, id: ConnId, shared: Arc<Shared>) -> Self {
        let log = ConnLog::new(Arc::clone(&shared), id);
        Connection::with_log(stream, id, shared, log)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, L: DriverLog> Connection<S, L> {
    /// A connection whose commands go through `log`.
    pub(crate) fn with_log(stream: S, id: ConnId, shared: Arc<Shared>, log: L) -> Self {
        Connection {
            stream,
            session: Session::new(id, &shared.config, Arc::clone(&shared.telemetry)),
            log,
            watch: shared.reaper.watch(id),
            shared,
            buf: Vec::with_capacity(4096),
            pos: 0,
            decoder: FrameDecoder::new(),
            written: 0,
            origin: Instant::now(),
        }
    }

    /// An HTTP session's connection: its requests are left out of the
    /// request counts (the HTTP layer counts them), and it speaks the
    /// multiplexed protocol even under `--no-mux` (which is about what
    /// TCP clients get).
    pub(crate) fn for_http(mut self) -> Self {
        self.session.for_http();
        self
    }

    /// Serves the connection until it ends; dropping it runs the
    /// disconnect cleanup.
    pub(crate) async fn serve(mut self) -> Close {
        let outcome = self.run().await;
        let outcome = match outcome {
            Ok(never) => match never {},
            Err(close) => self.finish(close).await,
        };
        tracing::debug!(?outcome, "connection closed");
        outcome
    }

    /// The session's clock: time since the connection started.
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    async fn run(&mut self) -> Result<std::convert::Infallible, Close> {
        self.watch.restart(self.decoder.lines_completed());
        loop {
            // Serve every complete frame already buffered while the session
            // takes requests, then write the replies in one go.
            while !self.session.is_blocked() && self.serve_buffered()? {
                self.watch.restart(self.decoder.lines_completed());
            }
            if self.flush().await.is_err() {
                self.session.handle_gone(&mut self.log);
                return Err(Close::Gone);
            }
            self.wait_for_input().await?;
        }
    }

    /// Decodes the next buffered frame and hands it to the session; `false`
    /// when no complete frame is buffered.
    fn serve_buffered(&mut self) -> Result<bool, Close> {
        let input = &self.buf[self.pos..];
        // Empty after the last buffered frame: straight to the read.
        if input.is_empty() {
            return Ok(false);
        }
        let origin = self.origin;
        let now = || origin.elapsed();
        let (used, served) =
            self.session
                .serve_next(&mut self.decoder, input, &now, &mut self.log)?;
        self.pos += used;
        Ok(served)
    }

    /// Waits for bytes, a grant, a timeout, the drain or the read deadline,
    /// and hands what came to the session.
    async fn wait_for_input(&mut self) -> Result<(), Close> {
        let blocked = self.session.is_blocked();
        if blocked {
            // Keep the unserved pipelined bytes at the front of the buffer.
            self.buf.drain(..self.pos);
        } else {
            // The decoder took every byte (it keeps a partial frame itself).
            self.buf.clear();
        }
        self.pos = 0;
        let waiting = self.session.has_waiting();
        // No read deadline while a request waits; a frame once started
        // must complete in time.
        let bounded = (self.shared.config.idle == IdlePolicy::ReadTimeout && !waiting)
            || self.decoder.in_frame();
        self.watch.arm(self.decoder.lines_completed(), bounded);
        let timer = self.session.poll_timeout().map(|at| self.origin + at);
        let timeout = async {
            match timer {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let drain_pending = waiting && !self.session.drained();
        let proposed = self.session.has_proposed();
        let ended = self.log.ended();
        let ending = async {
            match &ended {
                Some(ended) => ended.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let inbox = self.log.inbox();
        tokio::select! {
            // The grants first, then answers, then the read: no random
            // branch order per request, and the deadline is not polled when
            // bytes are there.
            biased;
            Some((request, rid, grant)) = inbox.grants.recv(), if waiting => {
                self.session.handle_grant(request, rid, grant, &mut self.log);
                self.restart_idle();
            }
            Some((request, answer)) = next_answer(inbox.answers), if proposed => {
                self.session.handle_answer(request, answer, &mut self.log);
                self.restart_idle();
            }
            _ = ending => {
                // This node's leadership began or ended: the client moves
                // on to the leader (its next connection hears where).
                tracing::debug!("leadership changed: connection closed");
                return Err(Close::Protocol);
            }
            _ = timeout, if timer.is_some() => {
                let now = self.now();
                self.session.handle_timeout(now, &mut self.log);
                self.restart_idle();
            }
            _ = self.shared.drain.cancelled(), if drain_pending => {
                self.session.handle_drain(&mut self.log);
            }
            read = self.stream.read_buf(&mut self.buf) => match read {
                Ok(0) | Err(_) if self.session.authenticating() => {
                    return Err(self.session.handle_read_failure(ReadFailure::Eof));
                }
                Ok(0) | Err(_) => {
                    self.session.handle_gone(&mut self.log);
                    return Err(Close::Gone);
                }
                Ok(_) if blocked && self.buf.len() > self.shared.config.pipeline_limit => {
                    tracing::debug!("pipeline overflow during a blocking request");
                    self.session.handle_gone(&mut self.log);
                    return Err(Close::Gone);
                }
                Ok(_) => {}
            },
            _ = poll_fn(|cx| self.watch.poll_flagged(cx)), if bounded => {
                if self.watch.overdue() {
                    return Err(self.session.handle_read_failure(ReadFailure::Timeout));
                }
            }
        }
        Ok(())
    }

    /// Idle time restarts after a waiting request is answered; a frame once
    /// started keeps its deadline.
    fn restart_idle(&mut self) {
        if !self.decoder.in_frame() {
            self.watch.restart(self.decoder.lines_completed());
        }
    }

    /// Ends the connection: writes the final replies (unless the peer is
    /// gone) and, after a failed handshake, pauses before the close.
    async fn finish(&mut self, close: Close) -> Close {
        match close {
            Close::Gone => {}
            Close::Protocol => {
                let _ = self.flush().await;
            }
            Close::AuthFailed => {
                let _ = self.flush().await;
                tokio::time::sleep(AUTH_FAILURE_PAUSE).await;
            }
        }
        close
    }

    /// Writes the session's replies out. A write that cannot finish at once
    /// is bounded by the write timeout.
    async fn flush(&mut self) -> Result<(), std::io::Error> {
        if self.session.transmit().is_empty() {
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
        self.session.transmit().clear();
        self.written = 0;
        result.inspect_err(|error| tracing::debug!(%error, "write failed"))
    }

    /// Writes the replies from `written` on, then flushes (a TLS stream
    /// holds records until then); `written` keeps the progress across polls.
    fn poll_write_out(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        let mut stream = std::pin::Pin::new(&mut self.stream);
        let out = self.session.transmit();
        while self.written < out.len() {
            match stream.as_mut().poll_write(cx, &out[self.written..]) {
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
}
