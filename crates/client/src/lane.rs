//! A lane: one connection driven by two tasks so requests can be pipelined.
//! The writer batches queued requests into as few writes as possible and
//! pings when the connection has been quiet (the server drops connections
//! silent for its read timeout); the reader matches replies to requests in
//! order. Any failure closes the lane, fails every pending request, and
//! reports the closure once, so leases bound to the connection are known
//! lost at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use dflockd_proto::{Key, Namespace, Reply, Request};
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connection::{Connection, read_line};
use crate::renewal::{RenewBatch, RenewReply, RenewSink, RenewTag};
use crate::{Error, ErrorKind, Result};

pub(crate) use crate::lane_id::{LaneId, next_lane_id};

/// Which lane answered: its id and a token cancelled when it closes.
#[derive(Debug, Clone)]
pub(crate) struct LaneRef {
    pub(crate) id: LaneId,
    pub(crate) closed: CancellationToken,
}

/// A caller waiting for one reply.
pub(crate) type LaneReply = oneshot::Sender<Result<(Reply, LaneRef)>>;

/// Where a reply goes.
pub(crate) enum ReplyTo {
    /// A caller waiting on a oneshot.
    Caller(LaneReply),
    /// A renewal: its reply is batched with the others read at the same
    /// time and handed to the lease supervisor (see `RenewSink`).
    Renew(RenewTag),
}

/// A request for a lane. `orphan` names the resource of a request that may
/// be granted: if the caller is gone when the grant arrives, the lane
/// releases it instead of leaking it.
pub(crate) struct LaneRequest {
    pub(crate) request: Request,
    pub(crate) reply: Option<LaneReply>,
    pub(crate) orphan: Option<(Key, Namespace)>,
}

/// What a lane's writer takes: one request, or a batch of renewals already
/// encoded (the lease supervisor renews thousands of leases a second); on a
/// multiplexed lane also requests with a caller-chosen id (so the caller can
/// cancel them) and cancellations.
pub(crate) enum Outgoing {
    One(LaneRequest),
    Renewals(RenewBatch),
    Tagged(TaggedRequest),
    Cancel(u64),
}

/// A request for a multiplexed lane whose id the caller chose.
pub(crate) struct TaggedRequest {
    pub(crate) id: u64,
    /// Two-phase ticket (0 = none).
    pub(crate) ticket: u64,
    pub(crate) request: LaneRequest,
    /// For a request that may be granted: how to let go of what it got if
    /// the lane closes with its answer and its caller is gone.
    pub(crate) let_go: Option<LetGo>,
}

/// What lets go of whatever a request may have got when its answer is
/// lost with its connection and nobody is left to send it again
/// (`mux_lane::let_go`): a message for the session's next connection,
/// taken — and sent — at most once, by whichever side finds the caller
/// gone first.
#[derive(Clone)]
pub(crate) struct LetGo(Arc<Mutex<Option<Outgoing>>>);

impl LetGo {
    pub(crate) fn new(message: Option<Outgoing>) -> LetGo {
        LetGo(Arc::new(Mutex::new(message)))
    }

    /// The message, if nobody took it yet.
    pub(crate) fn take(&self) -> Option<Outgoing> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl Outgoing {
    pub(crate) fn fail(self, error: Error) {
        match self {
            Outgoing::One(request) | Outgoing::Tagged(TaggedRequest { request, .. }) => {
                if let Some(reply) = request.reply {
                    let _ = reply.send(Err(error));
                }
            }
            Outgoing::Renewals(batch) => batch.fail(error),
            Outgoing::Cancel(_) => {}
        }
    }
}

/// Fails requests whose replies will never come: the first gets `first`
/// (why the lane failed), the others `ConnectionClosed`.
fn fail_pending(entries: Vec<Pending>, mut first: Option<Error>, renew_to: &OnceLock<RenewSink>) {
    let mut renewed = Vec::new();
    for entry in entries {
        let error = first
            .take()
            .unwrap_or_else(|| ErrorKind::ConnectionClosed.into());
        match entry.reply {
            Some(ReplyTo::Caller(sender)) => {
                let _ = sender.send(Err(error));
            }
            Some(ReplyTo::Renew(tag)) => renewed.push(tag.reply(Err(error))),
            None => {}
        }
    }
    if !renewed.is_empty()
        && let Some(sink) = renew_to.get()
    {
        let _ = sink.send(renewed);
    }
}

pub(crate) struct Pending {
    pub(crate) reply: Option<ReplyTo>,
    pub(crate) orphan: Option<(Key, Namespace)>,
    pub(crate) deadline: Instant,
    /// See [`TaggedRequest::let_go`].
    pub(crate) let_go: Option<LetGo>,
}

impl Pending {
    /// Whether someone still waits for this reply.
    pub(crate) fn has_caller(&self) -> bool {
        matches!(&self.reply, Some(ReplyTo::Caller(tx)) if !tx.is_closed())
            || matches!(&self.reply, Some(ReplyTo::Renew(_)))
    }
}

/// Handle to a running lane. Dropping every handle does not stop the lane;
/// [`close`](Self::close) does.
#[derive(Clone, Debug)]
pub(crate) struct LaneHandle {
    pub(crate) id: LaneId,
    pub(crate) tx: mpsc::UnboundedSender<Outgoing>,
    pub(crate) closed: CancellationToken,
    /// Set on a multiplexed lane: its session (ids, tickets, routing).
    pub(crate) mux: Option<Arc<MuxSession>>,
}

impl LaneHandle {
    pub(crate) fn send(&self, request: LaneRequest) {
        if let Err(mpsc::error::SendError(outgoing)) = self.tx.send(Outgoing::One(request)) {
            outgoing.fail(ErrorKind::ConnectionClosed.into());
        }
    }

    /// Queues a batch of renewals; their replies go to the batch's sink.
    pub(crate) fn send_renewals(&self, batch: RenewBatch) {
        if let Err(mpsc::error::SendError(outgoing)) = self.tx.send(Outgoing::Renewals(batch)) {
            outgoing.fail(ErrorKind::ConnectionClosed.into());
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub(crate) fn lane_ref(&self) -> LaneRef {
        LaneRef {
            id: self.id,
            closed: self.closed.clone(),
        }
    }

    pub(crate) fn close(&self) {
        self.closed.cancel();
    }
}

/// Timing of a lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneTiming {
    /// Ping after this much silence.
    pub(crate) keepalive: Duration,
    /// Give up on the connection if a reply takes longer than this.
    pub(crate) reply_timeout: Duration,
}

/// Starts a plain lane on `conn`. `on_close` runs once when the lane ends.
pub(crate) fn spawn_lane(
    conn: Connection,
    timing: LaneTiming,
    on_close: impl FnOnce(LaneId) + Send + 'static,
) -> LaneHandle {
    let renew_to = Arc::new(OnceLock::<RenewSink>::new());
    let framing = PlainFraming {
        queue: VecDeque::new(),
        renew_to: Arc::clone(&renew_to),
    };
    spawn_framed(conn, timing, on_close, framing, renew_to, None)
}

/// Starts a lane with any framing: a writer task and a reader task sharing
/// `framing`. `renew_to` is where renew replies go (set from the first
/// renewal batch: a lane belongs to one client, so to one supervisor).
pub(crate) fn spawn_framed<F: Framing>(
    conn: Connection,
    timing: LaneTiming,
    on_close: impl FnOnce(LaneId) + Send + 'static,
    framing: F,
    renew_to: Arc<OnceLock<RenewSink>>,
    mux: Option<Arc<MuxSession>>,
) -> LaneHandle {
    let id = next_lane_id();
    let (tx, rx) = mpsc::unbounded_channel();
    let closed = CancellationToken::new();
    let pushed = Arc::new(Notify::new());
    let framing = Arc::new(Mutex::new(framing));
    let (reader, writer) = conn.into_parts();
    let handle = LaneHandle {
        id,
        tx: tx.clone(),
        closed: closed.clone(),
        mux,
    };
    tokio::spawn(write_loop(
        writer,
        rx,
        Arc::clone(&framing),
        Arc::clone(&pushed),
        closed.clone(),
        timing,
    ));
    tokio::spawn(async move {
        let lane = LaneRef {
            id,
            closed: closed.clone(),
        };
        let mut line = Vec::with_capacity(128);
        // Renew replies read in one go, handed over together.
        let mut renewed: Vec<RenewReply> = Vec::new();
        let mut reader = reader;
        let failure = read_replies(
            &lane,
            &mut reader,
            &mut line,
            &tx,
            &framing,
            &pushed,
            &renew_to,
            &closed,
            &mut renewed,
        )
        .await;
        flush_renewed(&mut renewed, &renew_to);
        closed.cancel();
        let failed = framing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain();
        // The failure concerns the oldest request (its reply was late,
        // malformed or cut off); the ones behind it just lost the connection.
        fail_pending(failed, failure, &renew_to);
        tracing::debug!(lane = id.0, "lane closed");
        on_close(id);
    });
    handle
}

/// How a lane turns what it is asked to send into bytes, and remembers what
/// each reply will be for. The writer holds the lock on it while it batches,
/// the reader while it matches a reply.
pub(crate) trait Framing: Send + 'static {
    /// Appends `outgoing` to `out` and records its pending replies, which
    /// are late after `deadline`.
    fn push(&mut self, outgoing: Outgoing, deadline: Instant, out: &mut Vec<u8>);
    /// The earliest reply deadline still pending.
    fn next_deadline(&mut self) -> Option<Instant>;
    /// Parses one reply line and takes the request it answers. An error
    /// (malformed, or answering nothing) means the stream is out of step.
    fn take_reply(&mut self, line: &[u8]) -> Result<(Pending, Reply)>;
    /// Everything still pending, for failing it when the lane closes.
    fn drain(&mut self) -> Vec<Pending>;
}

/// A plain lane's framing: v2 frames, replies in request order.
pub(crate) struct PlainFraming {
    pub(crate) queue: VecDeque<Pending>,
    /// Where renew replies go: set from the first batch (a lane belongs to
    /// one client, so to one lease supervisor).
    pub(crate) renew_to: Arc<OnceLock<RenewSink>>,
}

impl Framing for PlainFraming {
    fn push(&mut self, outgoing: Outgoing, deadline: Instant, out: &mut Vec<u8>) {
        match outgoing {
            Outgoing::One(request) => {
                // A request that may wait is bounded by its own timeout
                // (it has a connection of its own), not the reply timeout.
                let deadline = if request.request.may_block() {
                    deadline + Duration::from_secs(86_400 * 365)
                } else {
                    deadline
                };
                request.request.encode(out);
                self.queue.push_back(Pending {
                    reply: request.reply.map(ReplyTo::Caller),
                    orphan: request.orphan,
                    deadline,
                    let_go: None,
                });
            }
            // Only multiplexed lanes take these.
            Outgoing::Tagged(tagged) => Outgoing::Tagged(tagged)
                .fail(ErrorKind::Protocol("tagged request on a plain lane".into()).into()),
            Outgoing::Cancel(_) => {}
            Outgoing::Renewals(batch) => {
                let (wire, tags, sink) = batch.into_parts();
                out.extend_from_slice(&wire);
                if self.renew_to.get().is_none() {
                    let _ = self.renew_to.set(sink);
                }
                self.queue.extend(tags.into_iter().map(|tag| Pending {
                    reply: Some(ReplyTo::Renew(tag)),
                    orphan: None,
                    deadline,
                    let_go: None,
                }));
            }
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        self.queue.front().map(|p| p.deadline)
    }

    fn take_reply(&mut self, line: &[u8]) -> Result<(Pending, Reply)> {
        let reply = Reply::parse(line).map_err(|e| ErrorKind::Protocol(e.to_string()))?;
        // In order: the oldest pending request is the one answered.
        let entry = self
            .queue
            .pop_front()
            .ok_or_else(|| ErrorKind::Protocol("reply to no request".into()))?;
        Ok((entry, reply))
    }

    fn drain(&mut self) -> Vec<Pending> {
        self.queue.drain(..).collect()
    }
}

/// A lane's writer: batches everything queued into one write (up to 64 KiB),
/// pings after `keepalive` of silence, and closes the lane when a write
/// fails or takes longer than the reply timeout. Requests still queued when
/// it stops never reached the wire and are failed.
async fn write_loop<W: tokio::io::AsyncWrite + Unpin, F: Framing>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    framing: Arc<Mutex<F>>,
    pushed: Arc<Notify>,
    closed: CancellationToken,
    timing: LaneTiming,
) {
    let mut out = Vec::with_capacity(4096);
    let mut quiet_since = Instant::now();
    loop {
        let first = tokio::select! {
            _ = closed.cancelled() => break,
            request = rx.recv() => match request {
                Some(request) => request,
                None => break,
            },
            _ = tokio::time::sleep_until(quiet_since + timing.keepalive) => {
                Outgoing::One(LaneRequest { request: Request::Ping, reply: None, orphan: None })
            }
        };
        out.clear();
        {
            let mut framing = framing.lock().unwrap_or_else(PoisonError::into_inner);
            let deadline = Instant::now() + timing.reply_timeout;
            let mut next = Some(first);
            while let Some(outgoing) = next.take() {
                framing.push(outgoing, deadline, &mut out);
                if out.len() < 64 * 1024 {
                    next = rx.try_recv().ok();
                }
            }
        }
        pushed.notify_one();
        if out.is_empty() {
            continue;
        }
        let write = async {
            writer.write_all(&out).await?;
            writer.flush().await
        };
        let written = tokio::select! {
            _ = closed.cancelled() => break,
            written = tokio::time::timeout(timing.reply_timeout, write) => written,
        };
        if !matches!(written, Ok(Ok(()))) {
            break;
        }
        quiet_since = Instant::now();
    }
    closed.cancel();
    rx.close();
    while let Ok(outgoing) = rx.try_recv() {
        outgoing.fail(ErrorKind::ConnectionClosed.into());
    }
}

fn flush_renewed(renewed: &mut Vec<RenewReply>, renew_to: &OnceLock<RenewSink>) {
    if !renewed.is_empty()
        && let Some(sink) = renew_to.get()
    {
        let _ = sink.send(std::mem::take(renewed));
    }
}

/// Matches replies to pending requests until the lane fails or is closed.
/// Returns why it failed, for the oldest pending request: the reply timed
/// out, was malformed or too long, or the connection ended.
#[allow(clippy::too_many_arguments)]
async fn read_replies<R: AsyncRead + Unpin, F: Framing>(
    lane: &LaneRef,
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    pending: &Mutex<F>,
    pushed: &Notify,
    renew_to: &OnceLock<RenewSink>,
    closed: &CancellationToken,
    renewed: &mut Vec<RenewReply>,
) -> Option<Error> {
    loop {
        // Renew replies read so far go to the supervisor before waiting.
        flush_renewed(renewed, renew_to);
        let deadline = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_deadline();
        let read = tokio::select! {
            _ = closed.cancelled() => return None,
            read = read_line(reader, line) => read,
            _ = pushed.notified() => continue,
            _ = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::debug!("reply timeout: closing lane");
                return Some(ErrorKind::ReplyTimeout.into());
            }
        };
        if let Err(error) = read {
            return Some(error);
        }
        // Handle this reply and every further complete one already
        // buffered before going back to the select: one read often brings
        // hundreds of pipelined replies (renewals), and the select's timer
        // and notification are not worth setting up for each.
        loop {
            let taken = pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take_reply(line);
            line.clear();
            let (entry, reply) = match taken {
                Ok(taken) => taken,
                Err(error) => return Some(error),
            };
            deliver(lane, entry, reply, tx, renewed);
            if !reader.buffer().contains(&b'\n') {
                break;
            }
            // Completes at once: the whole line is already buffered.
            if let Err(error) = read_line(reader, line).await {
                return Some(error);
            }
        }
    }
}

fn deliver(
    lane: &LaneRef,
    entry: Pending,
    reply: Reply,
    tx: &mpsc::UnboundedSender<Outgoing>,
    renewed: &mut Vec<RenewReply>,
) {
    let undelivered = match entry.reply {
        Some(ReplyTo::Caller(sender)) => sender
            .send(Ok((reply, lane.clone())))
            .err()
            .and_then(std::result::Result::ok)
            .map(|(reply, _)| reply),
        Some(ReplyTo::Renew(tag)) => {
            renewed.push(tag.reply_on(lane.id, reply));
            None
        }
        // Nobody waits for this reply (a ping, or the poll that abandons a
        // queue place): a grant in it has no owner.
        None => Some(reply),
    };
    // The caller gave up (its future was dropped) but was granted: release.
    if let (Some(reply), Some(orphan)) = (undelivered, entry.orphan) {
        release_orphan(tx, &reply, orphan);
    }
}

/// Releases the grant in `reply`, if any, over the lane: its caller is gone.
fn release_orphan(tx: &mpsc::UnboundedSender<Outgoing>, reply: &Reply, orphan: (Key, Namespace)) {
    if let Some(release) = orphan_release(reply, orphan) {
        let _ = tx.send(release);
    }
}

/// The release of the grant in `reply`, if it holds one.
fn orphan_release(reply: &Reply, orphan: (Key, Namespace)) -> Option<Outgoing> {
    let (Reply::Granted { token, .. } | Reply::Acquired { token, .. }) = reply else {
        return None;
    };
    tracing::debug!(
        fence = token.fence(),
        "releasing a grant whose caller went away"
    );
    let (key, namespace) = orphan;
    let request = Request::Release {
        key,
        namespace,
        token: (*token).into(),
    };
    Some(Outgoing::One(LaneRequest {
        request,
        reply: None,
        orphan: None,
    }))
}

/// A caller's end of one request's reply. If the caller goes away after
/// the reply arrived but before reading it (say a `select!` whose other
/// branch won in the same tick), a grant in it would have no owner while
/// its connection stays open: dropping the guard releases it. A reply that
/// arrives after that finds the channel closed, and the lane releases it
/// (the request's `orphan`).
pub(crate) struct ReplyGuard {
    rx: Option<oneshot::Receiver<Result<(Reply, LaneRef)>>>,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// A multiplexed lane's session: releases go through it, so they reach
    /// the server even after the lane closed.
    session: Option<Arc<MuxSession>>,
    orphan: Option<(Key, Namespace)>,
}

impl ReplyGuard {
    /// Guards `rx`, the reply channel of a request sent on `lane` for
    /// `orphan` (the resource a grant in the reply would hold).
    pub(crate) fn new(
        rx: oneshot::Receiver<Result<(Reply, LaneRef)>>,
        lane: &LaneHandle,
        orphan: Option<(Key, Namespace)>,
    ) -> ReplyGuard {
        ReplyGuard {
            rx: Some(rx),
            tx: lane.tx.clone(),
            session: lane.mux.clone(),
            orphan,
        }
    }

    /// Waits for the reply. A dropped channel means the lane died with the
    /// request queued.
    pub(crate) async fn recv(&mut self) -> Result<(Reply, LaneRef)> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(ErrorKind::ConnectionClosed.into());
        };
        let reply = rx.await;
        self.rx = None;
        reply.map_err(|_| ErrorKind::ConnectionClosed)?
    }

    /// Gives the reply up. Returns it if it had already arrived (after
    /// releasing a grant in it); `None` if it had not, in which case the
    /// lane will release a grant that comes later.
    pub(crate) fn abandon(&mut self) -> Option<Reply> {
        let mut rx = self.rx.take()?;
        rx.close();
        let (reply, _) = rx.try_recv().ok()?.ok()?;
        if let Some(release) = self
            .orphan
            .clone()
            .and_then(|orphan| orphan_release(&reply, orphan))
        {
            match &self.session {
                Some(session) => session.send(release),
                None => {
                    let _ = self.tx.send(release);
                }
            }
        }
        Some(reply)
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// What the connections of one multiplexed session share: request ids and
/// two-phase tickets, unique over all of them — a cluster session's server
/// answers an id it has seen with what that request already got
/// (docs/protocol-mux.md, *Sessions*) — and the lane that carries the
/// session now. Messages that must reach the server even if the lane they
/// were meant for has closed (a cancel, a queue place given up, the release
/// of a grant nobody took) go through [`send`](Self::send): on the current
/// lane, or, for a session that re-attaches, on the next one.
pub(crate) struct MuxSession {
    next_id: AtomicU64,
    pub(crate) next_ticket: AtomicU64,
    /// Whether the server re-attaches the session to its next connection
    /// (a cluster session): only then are messages kept for it.
    reattaches: bool,
    route: Mutex<Route>,
}

#[derive(Default)]
struct Route {
    current: Option<(mpsc::UnboundedSender<Outgoing>, CancellationToken)>,
    /// Waiting for the next lane.
    deferred: Vec<Outgoing>,
}

/// At most this many messages wait for a session's next lane; beyond it
/// the oldest grant left behind runs out with its lease instead.
const MAX_DEFERRED: usize = 100_000;

impl std::fmt::Debug for MuxSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxSession")
            .field("reattaches", &self.reattaches)
            .finish_non_exhaustive()
    }
}

impl MuxSession {
    pub(crate) fn new(reattaches: bool) -> MuxSession {
        MuxSession {
            next_id: AtomicU64::new(1),
            next_ticket: AtomicU64::new(1),
            reattaches,
            route: Mutex::new(Route::default()),
        }
    }

    /// Whether the server re-attaches the session to its next connection.
    pub(crate) fn reattaches(&self) -> bool {
        self.reattaches
    }

    pub(crate) fn take_ids(&self, n: u64) -> u64 {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }

    /// `lane` carries the session from now on; what waited for it is sent.
    pub(crate) fn attach(&self, lane: &LaneHandle) {
        let mut route = self.route.lock().unwrap_or_else(PoisonError::into_inner);
        for outgoing in route.deferred.drain(..) {
            if let Err(mpsc::error::SendError(outgoing)) = lane.tx.send(outgoing) {
                outgoing.fail(ErrorKind::ConnectionClosed.into());
            }
        }
        route.current = Some((lane.tx.clone(), lane.closed.clone()));
    }

    /// Sends on the session's current lane; with none open, keeps the
    /// message for the next one (a session that re-attaches) or drops it.
    pub(crate) fn send(&self, outgoing: Outgoing) {
        let mut route = self.route.lock().unwrap_or_else(PoisonError::into_inner);
        let outgoing = match &route.current {
            Some((tx, closed)) if !closed.is_cancelled() => match tx.send(outgoing) {
                Ok(()) => return,
                Err(mpsc::error::SendError(outgoing)) => outgoing,
            },
            _ => outgoing,
        };
        if self.reattaches && route.deferred.len() < MAX_DEFERRED {
            route.deferred.push(outgoing);
        } else {
            outgoing.fail(ErrorKind::ConnectionClosed.into());
        }
    }
}
