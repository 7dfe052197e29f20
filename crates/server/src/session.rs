//! One connection's protocol, without I/O: the quinn-proto shape.
//!
//! A [`Session`] takes decoded requests and events (a grant delivered, the
//! time passing a request's timeout, the drain, the peer going away) and
//! answers with reply bytes ([`Session::transmit`]), the commands it applies
//! through its [`Log`], and the time of its next timer
//! ([`Session::poll_timeout`]). It owns every protocol rule a connection
//! has: the auth handshake, the `hello _ mux` upgrade, the drain, the
//! per-connection waiting cap, and the races between a grant, a timeout, a
//! cancel and a close. The drivers in `conn.rs` only move bytes and wake it.
//!
//! A plain connection is a multiplexed session with a window of one: its
//! one waiting request has id 0, and while it waits the driver hands the
//! session no further request (spec §1.9).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, ConnId, EnqueueOutcome, Grant, LockError, Op, Outcome, ResourceId, WaitOutcome,
    WaiterId,
};
use dflockd_proto::{
    Decoded, FrameDecoder, Key, MUX_ACCEPTED, MuxBody, MuxError, MuxRequest, Namespace, ProtoError,
    Reply, Request, Seconds, StableRef, Stats, Status, Token, encode_mux_reply, is_mux_hello,
};
use subtle::ConstantTimeEq;

use crate::config::{Secret, ServerConfig};
use crate::metrics::{Command, Outcome as Counted, Transport};
use crate::shared::Telemetry;

/// Whether a command has its outcome yet: the single-node log applies at
/// once; a replicated log proposes, and the outcome comes later (to the
/// driver, which hands it to [`Session::handle_answer`]).
#[derive(Debug)]
pub(crate) enum Done<T> {
    /// Applied: here is the outcome.
    Now(T),
    /// Proposed: the outcome will come tagged with the request's id.
    Later,
}

/// Why a command got no outcome from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The table refused it.
    Lock(LockError),
    /// This node cannot commit it: the leader's client address, if known.
    NotLeader(Option<String>),
}

impl From<LockError> for Refusal {
    fn from(error: LockError) -> Refusal {
        Refusal::Lock(error)
    }
}

/// What a log answers for a command: the table's outcome, or why there is
/// none. `Ok(None)`: committed, with no outcome to report (a barrier).
pub(crate) type Answer = Result<Option<Outcome>, Refusal>;

/// A table's outcome as a session's answer.
pub(crate) fn answer(outcome: Result<Outcome, LockError>) -> Answer {
    outcome.map(Some).map_err(Refusal::Lock)
}

/// What a session applies its commands through: the single-node server's
/// immediate log, or (in cluster mode) a replicated one. It also holds the
/// connection's grant inbox: grants for its waiting requests, delivered
/// when the command that made them was applied.
pub(crate) trait Log {
    /// Applies `op` (for request `request`) to the table that holds `rid`.
    fn run(&mut self, rid: &ResourceId, op: Op, request: u64) -> Done<Answer>;
    /// Applies `op`, a request that may wait: if it queues, its grant will
    /// come to the inbox tagged `request`.
    fn run_waiting(&mut self, rid: &ResourceId, op: Op, request: u64) -> Done<Answer>;
    /// Applies a withdraw of `request`: `Withdrawn(true)` if it was still
    /// queued; `Withdrawn(false)` if it was granted meanwhile (the grant is
    /// in the inbox by the time the answer is).
    fn withdraw(&mut self, rid: &ResourceId, op: Op, request: u64) -> Done<Answer>;
    /// Commits nothing, for request `request`: answered once everything
    /// before it is applied.
    fn barrier(&mut self, request: u64) -> Done<Answer>;
    /// The connection names its session (`stable-ref`), for request
    /// `request`: a cluster writes it to the log, so that the session's
    /// next connection (after a failover) takes over what this one holds.
    fn bind(&mut self, reference: StableRef, request: u64) -> Done<Answer>;
    /// A waiting request takes its grant: the lease restarts now, when the
    /// request observes it (the single node), or runs from its commit (a
    /// cluster, where observing would cost a second commit).
    fn observe(&mut self, rid: &ResourceId, grant: Grant) -> Result<Grant, LockError>;
    /// Gives back a grant that reached no request (no answer).
    fn release_undelivered(&mut self, rid: &ResourceId, token: Token);
    /// A grant already in the inbox, if any.
    fn try_grant(&mut self) -> Option<(u64, ResourceId, Grant)>;
    /// How many waiters this connection has queued, exactly.
    fn waiters(&mut self) -> usize;
    /// The `stats` document.
    fn stats(&mut self) -> Stats;
    /// Whether the server is draining.
    fn is_draining(&self) -> bool;
    /// Whether a named session's queue places outlive its connection here:
    /// a cluster whose table keeps orphans (`--orphan-ttl`), where the
    /// session's next connection, on the next leader, claims them.
    fn keeps_orphans(&self) -> bool {
        false
    }
}

/// Why a session ends: the driver writes what [`Session::transmit`] holds
/// (if it can) and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// The peer went away, or a read or write failed.
    Gone,
    /// Closed by a protocol rule after a final reply.
    Protocol,
    /// The auth handshake failed: pause (spec §2.1), then close.
    AuthFailed,
}

/// Why a read ended without a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// End of stream or a read error.
    Eof,
    /// The read deadline passed.
    Timeout,
    /// A line longer than the protocol allows.
    Oversize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first frame must be `auth` with the secret.
    Auth,
    Plain,
    Mux,
}

/// What a queued request is waiting on, so it can be withdrawn.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Acquire(WaiterId),
    /// A two-phase `w`: its ticket and the place it waits on.
    Wait {
        ticket: u64,
        waiter: WaiterId,
    },
}

#[derive(Debug)]
struct Waiting {
    rid: ResourceId,
    pending: Pending,
    /// When its timeout ends; `None` once withdrawn (the withdraw's answer
    /// or the grant that won the race answers it).
    deadline: Option<Duration>,
}

impl Pending {
    /// The command that waits.
    fn command(self) -> Command {
        match self {
            Pending::Acquire(_) => Command::Acquire,
            Pending::Wait { .. } => Command::Wait,
        }
    }
}

/// What a request's answer means for the peer.
#[derive(Debug)]
enum Then {
    Acquire {
        rid: ResourceId,
        timeout: Seconds,
    },
    Enqueue,
    Wait {
        rid: ResourceId,
        ticket: u64,
        timeout: Seconds,
    },
    Release,
    Renew,
    Barrier,
    /// `stable-ref`: the session's name, written to the log.
    Bind,
    /// `label`.
    Label,
}

impl Then {
    /// The command whose answer this is.
    fn command(&self) -> Command {
        match self {
            Then::Acquire { .. } => Command::Acquire,
            Then::Enqueue => Command::Enqueue,
            Then::Wait { .. } => Command::Wait,
            Then::Release => Command::Release,
            Then::Renew => Command::Renew,
            Then::Barrier => Command::Barrier,
            Then::Bind => Command::StableRef,
            Then::Label => Command::Label,
        }
    }
}

/// A request whose command was proposed: its answer is still to come.
#[derive(Debug)]
struct Proposed {
    then: Then,
    /// When the request arrived (its timeout counts from here).
    started: Duration,
    /// A cancel (or the drain) reached it before its answer: if it queued,
    /// it is withdrawn at once and answered with this.
    cancelled: Option<Reply>,
}

/// Where [`Session::apply`] left a request.
enum Step {
    Reply(Reply),
    Waiting {
        rid: ResourceId,
        pending: Pending,
        timeout: Seconds,
    },
    /// Proposed: [`Session::handle_answer`] goes on.
    Proposed,
}

/// One connection's protocol state.
pub(crate) struct Session {
    id: ConnId,
    phase: Phase,
    auth: Option<Secret>,
    mux_allowed: bool,
    /// The mux per-connection cap on queued waiters (0 = none).
    mux_max_waiting: usize,
    out: Vec<u8>,
    /// The resource the last request named: the next request on the same
    /// key (a release after an acquire, a renew) shares its bytes and hash.
    recent: Option<ResourceId>,
    /// At least the number of waiters this connection has in the table
    /// (see [`Session::at_queue_cap`]).
    queued: usize,
    waiting: HashMap<u64, Waiting>,
    timers: BTreeSet<(Duration, u64)>,
    /// Requests whose answer is still to come (a replicated log).
    proposed: HashMap<u64, Proposed>,
    /// Waiting requests whose withdraw was proposed, with the reply they
    /// get if it withdraws them.
    withdrawing: HashMap<u64, Reply>,
    /// Grants that came before their request's answer said it queued.
    early: HashMap<u64, (ResourceId, Grant)>,
    /// Answers still to come for requests already answered (a withdraw
    /// that lost the race to a grant), to be dropped: the id may be in use
    /// again by then (a plain connection's is always 0).
    stale: HashMap<u64, usize>,
    /// The client session's name, once `stable-ref` gave it.
    stable_ref: Option<StableRef>,
    drained: bool,
    /// Where answered requests are counted.
    telemetry: Arc<Telemetry>,
    /// Whether this session's requests are counted (an HTTP session's
    /// connection is counted by the HTTP layer instead).
    counted: bool,
}

impl Session {
    /// A session for connection `id` under `config`'s rules.
    pub(crate) fn new(id: ConnId, config: &ServerConfig, telemetry: Arc<Telemetry>) -> Session {
        Session {
            id,
            phase: if config.auth_token.is_some() {
                Phase::Auth
            } else {
                Phase::Plain
            },
            auth: config.auth_token.clone(),
            mux_allowed: config.mux,
            mux_max_waiting: config.mux_max_waiting,
            out: Vec::with_capacity(256),
            recent: None,
            queued: 0,
            waiting: HashMap::new(),
            timers: BTreeSet::new(),
            proposed: HashMap::new(),
            withdrawing: HashMap::new(),
            early: HashMap::new(),
            stale: HashMap::new(),
            stable_ref: None,
            drained: false,
            telemetry,
            counted: true,
        }
    }

    /// An HTTP session's connection: left out of the request counts, and
    /// allowed the multiplexed protocol whatever the configuration says.
    pub(crate) fn for_http(&mut self) {
        self.counted = false;
        self.mux_allowed = true;
    }

    /// Counts a request of `command` answered with `reply`.
    fn count(&self, command: Command, reply: &Reply) {
        if !self.counted {
            return;
        }
        self.telemetry
            .metrics
            .request(Transport::Tcp, command, Counted::of(reply));
    }

    /// Reply bytes to write. The driver writes them and clears the buffer.
    pub(crate) fn transmit(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// The key the last request named, for the decoder's fast path.
    pub(crate) fn recent_key(&self) -> Option<&Key> {
        self.recent.as_ref().map(ResourceId::key)
    }

    /// Whether the handshake is still to come.
    pub(crate) fn authenticating(&self) -> bool {
        self.phase == Phase::Auth
    }

    /// Whether the connection speaks the multiplexed extension.
    pub(crate) fn is_mux(&self) -> bool {
        self.phase == Phase::Mux
    }

    /// Whether this is a named multiplexed session: it numbers its
    /// requests uniquely over all its connections (docs/protocol-mux.md,
    /// *Sessions*), so an id seen again is a retry of the same request, and
    /// a request whose answer was lost is sent again on its next connection.
    fn resends_by_id(&self) -> bool {
        self.is_mux() && self.stable_ref.is_some()
    }

    /// Whether a request waits for a grant or its answer (then no read
    /// deadline runs).
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty() || !self.proposed.is_empty()
    }

    /// Whether answers to proposed commands are due.
    pub(crate) fn has_proposed(&self) -> bool {
        !self.proposed.is_empty() || !self.withdrawing.is_empty() || !self.stale.is_empty()
    }

    /// Whether the session takes no request now: a plain connection's one
    /// request is waiting or proposed.
    pub(crate) fn is_blocked(&self) -> bool {
        self.phase != Phase::Mux && (!self.waiting.is_empty() || !self.proposed.is_empty())
    }

    /// Whether the drain was handled already.
    pub(crate) fn drained(&self) -> bool {
        self.drained
    }

    /// When the earliest timeout of a waiting request ends.
    pub(crate) fn poll_timeout(&self) -> Option<Duration> {
        self.timers.first().map(|&(at, _)| at)
    }

    fn reply(&mut self, id: Option<u64>, reply: &Reply) {
        match id {
            Some(id) => encode_mux_reply(id, reply, &mut self.out),
            None => reply.encode(&mut self.out),
        }
    }

    /// A read ended without a frame.
    pub(crate) fn handle_read_failure(&mut self, failure: ReadFailure) -> Close {
        if self.phase == Phase::Auth {
            return self.auth_failed();
        }
        match failure {
            ReadFailure::Eof => Close::Gone,
            ReadFailure::Timeout | ReadFailure::Oversize => {
                self.out.extend_from_slice(b"error\n");
                Close::Protocol
            }
        }
    }

    fn auth_failed(&mut self) -> Close {
        // Logged with the peer's address once the connection closes.
        tracing::debug!("authentication failed");
        self.telemetry.metrics.auth_failure(Transport::Tcp);
        Reply::Failure(Status::ErrorAuth).encode(&mut self.out);
        Close::AuthFailed
    }

    /// Decodes the next frame at the start of `input` with `decoder` and
    /// serves it. `now` is read only if the request must wait (the common
    /// request needs no clock). Returns the bytes used and whether a frame was served
    /// (`false`: the decoder kept the partial frame and needs more bytes).
    pub(crate) fn serve_next(
        &mut self,
        decoder: &mut FrameDecoder,
        input: &[u8],
        now: &impl Fn() -> Duration,
        log: &mut impl Log,
    ) -> Result<(usize, bool), Close> {
        if self.phase == Phase::Mux {
            let (used, decoded) = decoder.decode(input);
            let parsed = match decoded {
                Decoded::Frame(frame) => MuxRequest::parse(&frame),
                Decoded::Oversize => return Err(self.handle_read_failure(ReadFailure::Oversize)),
                Decoded::NeedMore => return Ok((used, false)),
            };
            self.handle_mux(parsed, now, log)?;
            return Ok((used, true));
        }
        let authenticating = self.phase == Phase::Auth;
        let hint = if authenticating {
            None
        } else {
            self.recent_key()
        };
        // A common request is parsed on the decoder's fast path, sharing
        // the recent key as `Request::parse_reusing` does.
        let (used, parsed) = match decoder.decode_common(input, hint) {
            Some((used, request)) => (used, Ok(request)),
            None => {
                let (used, decoded) = decoder.decode(input);
                match decoded {
                    // `hello` is no v2 command: looked for only among the
                    // frames v2 refuses, off the hot path.
                    Decoded::Frame(frame) => (
                        used,
                        Request::parse_reusing(&frame, hint)
                            .map_err(|error| (error, !authenticating && is_mux_hello(&frame))),
                    ),
                    Decoded::Oversize => {
                        return Err(self.handle_read_failure(ReadFailure::Oversize));
                    }
                    Decoded::NeedMore => return Ok((used, false)),
                }
            }
        };
        self.handle_request(parsed, now, log)?;
        Ok((used, true))
    }

    /// A plain frame: the request, or why it is none (and whether it was
    /// the `hello _ mux` probe).
    pub(crate) fn handle_request(
        &mut self,
        parsed: Result<Request, (ProtoError, bool)>,
        now: &impl Fn() -> Duration,
        log: &mut impl Log,
    ) -> Result<(), Close> {
        debug_assert!(
            !self.is_blocked(),
            "a plain session takes one request at a time"
        );
        if self.phase == Phase::Auth {
            let authorised = match (&parsed, &self.auth) {
                (Ok(Request::Auth { token }), Some(secret)) => {
                    let expected = secret.expose().as_bytes();
                    !token.is_empty() && bool::from(token.as_slice().ct_eq(expected))
                }
                _ => false,
            };
            if !authorised {
                return Err(self.auth_failed());
            }
            Reply::Ok.encode(&mut self.out);
            self.phase = Phase::Plain;
            return Ok(());
        }
        let command = parsed.as_ref().map_or(Command::Invalid, Command::of);
        if log.is_draining() {
            let reply = Reply::Failure(Status::ErrorDraining);
            self.count(command, &reply);
            reply.encode(&mut self.out);
            return Err(Close::Protocol);
        }
        match parsed {
            Ok(request) => {
                match self.apply(request, 0, 0, None, now, log) {
                    Step::Reply(reply) => {
                        self.count(command, &reply);
                        reply.encode(&mut self.out);
                    }
                    Step::Waiting {
                        rid,
                        pending,
                        timeout,
                    } => self.wait(0, rid, pending, timeout, now()),
                    Step::Proposed => {}
                }
                Ok(())
            }
            Err((_, true)) if self.mux_allowed => {
                self.out.extend_from_slice(MUX_ACCEPTED.as_bytes());
                self.out.push(b'\n');
                self.phase = Phase::Mux;
                Ok(())
            }
            Err((error, _)) => {
                tracing::debug!(code = error.code(), %error, "rejected request");
                let reply = Reply::Failure(Status::Error);
                self.count(Command::Invalid, &reply);
                reply.encode(&mut self.out);
                Ok(())
            }
        }
    }

    /// A multiplexed frame. Errors close the connection: a frame without
    /// an id (its reply could not be addressed), a duplicate id of a
    /// waiting request, or a request after the drain started.
    pub(crate) fn handle_mux(
        &mut self,
        parsed: Result<MuxRequest, MuxError>,
        now: &impl Fn() -> Duration,
        log: &mut impl Log,
    ) -> Result<(), Close> {
        let request = match parsed {
            Ok(request) => request,
            Err(MuxError::NoId) => {
                tracing::debug!("mux frame without an id");
                self.out.extend_from_slice(b"error\n");
                return Err(Close::Protocol);
            }
            Err(MuxError::Invalid { id, error }) => {
                tracing::debug!(id, code = error.code(), %error, "rejected mux request");
                self.count(Command::Invalid, &Reply::Failure(Status::Error));
                encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
                // Reusing the id of a waiting request is a broken client.
                return if self.waiting.contains_key(&id) || self.proposed.contains_key(&id) {
                    Err(Close::Protocol)
                } else {
                    Ok(())
                };
            }
        };
        let id = request.id;
        let command = match &request.body {
            MuxBody::Cancel(_) => Command::Cancel,
            MuxBody::Request(body) => Command::of(body),
        };
        if log.is_draining() {
            self.count(command, &Reply::Failure(Status::ErrorDraining));
            encode_mux_reply(id, &Reply::Failure(Status::ErrorDraining), &mut self.out);
            return Err(Close::Protocol);
        }
        if self.waiting.contains_key(&id) || self.proposed.contains_key(&id) {
            tracing::debug!(id, "duplicate id of a waiting request");
            encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
            return Err(Close::Protocol);
        }
        let (body, ticket) = match request.body {
            MuxBody::Cancel(target) => {
                self.withdraw(target, Reply::Failure(Status::Timeout), log);
                self.count(Command::Cancel, &Reply::Ok);
                encode_mux_reply(id, &Reply::Ok, &mut self.out);
                return Ok(());
            }
            MuxBody::Request(body) => (body, request.ticket),
        };
        // The cap counts what the connection has queued in the table —
        // blocking waits and two-phase places alike.
        let cap = Some(self.mux_max_waiting).filter(|&cap| cap > 0);
        match self.apply(body, id, ticket, cap, now, log) {
            Step::Reply(reply) => {
                self.count(command, &reply);
                encode_mux_reply(id, &reply, &mut self.out);
            }
            Step::Waiting {
                rid,
                pending,
                timeout,
            } => self.wait(id, rid, pending, timeout, now()),
            Step::Proposed => {}
        }
        Ok(())
    }

    fn wait(
        &mut self,
        id: u64,
        rid: ResourceId,
        pending: Pending,
        timeout: Seconds,
        now: Duration,
    ) {
        let deadline = now.saturating_add(timeout.as_duration());
        self.timers.insert((deadline, id));
        self.waiting.insert(
            id,
            Waiting {
                rid,
                pending,
                deadline: Some(deadline),
            },
        );
    }

    /// A grant reached this connection for request `request`: its lease
    /// restarts now, when the connection observes it.
    pub(crate) fn handle_grant(
        &mut self,
        request: u64,
        rid: ResourceId,
        grant: Grant,
        log: &mut impl Log,
    ) {
        let Some(waiting) = self.waiting.remove(&request) else {
            // A replicated log can apply a grant before the answer that
            // says the request queued reaches the session: keep it until
            // then.
            if let Some(Proposed {
                then: Then::Acquire { .. } | Then::Wait { .. },
                ..
            }) = self.proposed.get(&request)
            {
                self.early.insert(request, (rid, grant));
                return;
            }
            // Not expected (an entry leaves the map only when its grant is
            // read here, or when it was withdrawn and no grant comes), but
            // never leave a grant without an owner.
            tracing::warn!(request, "grant for a request that is not waiting: released");
            log.release_undelivered(&rid, grant.token);
            return;
        };
        if let Some(deadline) = waiting.deadline {
            self.timers.remove(&(deadline, request));
        }
        // The answer of a withdraw still on its way is not this request's.
        if self.withdrawing.remove(&request).is_some() {
            *self.stale.entry(request).or_default() += 1;
        }
        let reply = match log.observe(&waiting.rid, grant) {
            Ok(Grant { token, lease }) => Reply::Granted { token, lease },
            Err(error) => error_reply(&Refusal::Lock(error)),
        };
        self.count(waiting.pending.command(), &reply);
        let id = self.is_mux().then_some(request);
        self.reply(id, &reply);
    }

    /// The answer to request `request`'s proposed command came.
    pub(crate) fn handle_answer(&mut self, request: u64, answer: Answer, log: &mut impl Log) {
        // Answers come in the order their commands were proposed: the
        // stale ones for an id come before any for its next request.
        if let Some(count) = self.stale.get_mut(&request) {
            *count -= 1;
            if *count == 0 {
                self.stale.remove(&request);
            }
            return;
        }
        if let Some(reply) = self.withdrawing.remove(&request) {
            self.withdrawn(request, reply, answer, log);
            return;
        }
        let Some(proposed) = self.proposed.remove(&request) else {
            tracing::warn!(request, "an answer for no proposed request");
            return;
        };
        let id = self.is_mux().then_some(request);
        let command = proposed.then.command();
        match self.finish(proposed.then, answer) {
            Step::Reply(reply) => {
                self.count(command, &reply);
                self.reply(id, &reply);
            }
            Step::Waiting {
                rid,
                pending,
                timeout,
            } => {
                self.wait(request, rid, pending, timeout, proposed.started);
                if let Some((rid, grant)) = self.early.remove(&request) {
                    self.handle_grant(request, rid, grant, log);
                } else if let Some(reply) = proposed.cancelled {
                    self.withdraw(request, reply, log);
                } else if self.drained {
                    self.withdraw(request, Reply::Failure(Status::Error), log);
                }
            }
            Step::Proposed => {}
        }
    }

    /// Time has reached `now`: every waiting request whose timeout ended is
    /// withdrawn and answered `timeout`, unless its grant won the race.
    pub(crate) fn handle_timeout(&mut self, now: Duration, log: &mut impl Log) {
        while let Some(&(deadline, id)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.withdraw(id, Reply::Failure(Status::Timeout), log);
        }
    }

    /// The drain started: every waiting request is answered `error`,
    /// withdrawn from its queue. Not those of a named multiplexed session
    /// on a log that keeps orphans: the node is leaving the cluster, and
    /// its connections close when its leadership ends; the session sends
    /// them again on its next connection, to the next leader, and claims
    /// the places they kept (withdrawing them here would send the session
    /// to the back of each queue).
    pub(crate) fn handle_drain(&mut self, log: &mut impl Log) {
        self.drained = true;
        if self.resends_by_id() && log.keeps_orphans() {
            return;
        }
        let mut ids: Vec<u64> = self.waiting.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.withdraw(id, Reply::Failure(Status::Error), log);
        }
    }

    /// The peer went away: waiting requests are withdrawn (grants that race
    /// the close stay in the inbox, which the driver releases; requests
    /// still proposed are cleaned up by the connection's disconnect, which
    /// the log orders after them).
    pub(crate) fn handle_gone(&mut self, log: &mut impl Log) {
        let waiting = std::mem::take(&mut self.waiting);
        self.timers.clear();
        self.withdrawing.clear();
        for (id, w) in waiting {
            let op = withdraw_op(self.id, &w.rid, w.pending);
            let _ = log.withdraw(&w.rid, op, id);
        }
        for (_, (rid, grant)) in self.early.drain() {
            log.release_undelivered(&rid, grant.token);
        }
    }

    /// Withdraws waiting request `id` and answers it with `reply`, unless
    /// its grant won the race: then the grant answers it, before whatever
    /// caused the withdrawal is answered.
    fn withdraw(&mut self, id: u64, reply: Reply, log: &mut impl Log) {
        let Some(waiting) = self.waiting.get_mut(&id) else {
            // Not queued yet: withdrawn as soon as its answer says it is.
            if let Some(proposed) = self.proposed.get_mut(&id) {
                proposed.cancelled.get_or_insert(reply);
            }
            return;
        };
        // Withdrawn already: that withdraw's answer (or the grant) comes.
        let Some(deadline) = waiting.deadline.take() else {
            return;
        };
        self.timers.remove(&(deadline, id));
        let op = withdraw_op(self.id, &waiting.rid, waiting.pending);
        let rid = waiting.rid.clone();
        match log.withdraw(&rid, op, id) {
            Done::Now(answer) => self.withdrawn(id, reply, answer, log),
            Done::Later => {
                self.withdrawing.insert(id, reply);
            }
        }
    }

    /// The answer to the withdraw of waiting request `id`. If it was
    /// granted meanwhile, the grant is in the inbox already (the table
    /// delivers when it applies) and answers it now.
    fn withdrawn(&mut self, id: u64, reply: Reply, answer: Answer, log: &mut impl Log) {
        if let Ok(Some(Outcome::Withdrawn(false))) = answer {
            while let Some((granted, rid, grant)) = log.try_grant() {
                self.handle_grant(granted, rid, grant, log);
            }
            return;
        }
        // Withdrawn, or the log could not tell (a node that lost its
        // leadership, whose connections close): answered as withdrawn.
        if let Some(waiting) = self.waiting.remove(&id) {
            self.count(waiting.pending.command(), &reply);
            let id = self.is_mux().then_some(id);
            self.reply(id, &reply);
        }
    }

    /// Whether the connection already has `cap` requests queued in the
    /// table. Only a request of this connection adds a waiter of it, so
    /// [`Self::queued`], raised by each one that queued, bounds the true
    /// count from above; the true count is asked for only when that bound
    /// reaches the cap.
    fn at_queue_cap(&mut self, cap: Option<usize>, log: &mut impl Log) -> bool {
        let Some(cap) = cap else {
            return false;
        };
        if self.queued < cap {
            return false;
        }
        let exact = log.waiters();
        self.queued = exact;
        exact >= cap
    }

    /// Runs `f` with the resource `key` names in `namespace`: the recent
    /// one again if it is the same (no new hash, no new allocation), else a
    /// new one, which becomes the recent. The id is lent, not cloned.
    fn with_resource<R>(
        &mut self,
        namespace: dflockd_proto::Namespace,
        key: Key,
        f: impl FnOnce(&mut Session, &ResourceId) -> R,
    ) -> R {
        let rid = match self.recent.take() {
            Some(recent) if recent.namespace() == namespace && *recent.key() == key => recent,
            _ => ResourceId::new(namespace, key),
        };
        let result = f(self, &rid);
        self.recent = Some(rid);
        result
    }

    /// Goes on with request `id` as its log did: answered now, or proposed
    /// (then its answer comes to [`Self::handle_answer`]).
    fn submit(
        &mut self,
        id: u64,
        then: Then,
        done: Done<Answer>,
        now: &impl Fn() -> Duration,
    ) -> Step {
        match done {
            Done::Now(answer) => self.finish(then, answer),
            Done::Later => {
                let proposed = Proposed {
                    then,
                    started: now(),
                    cancelled: None,
                };
                self.proposed.insert(id, proposed);
                Step::Proposed
            }
        }
    }

    /// What a request's answer means: its reply, or its wait.
    fn finish(&mut self, then: Then, answer: Answer) -> Step {
        let outcome = match answer {
            Ok(Some(outcome)) => outcome,
            Ok(None) if matches!(then, Then::Barrier | Then::Bind) => {
                return Step::Reply(Reply::Ok);
            }
            Ok(None) => return Step::Reply(Reply::Failure(Status::Error)),
            Err(refusal) => {
                if matches!(then, Then::Bind) {
                    // Not named after all (a follower, say): it may try again.
                    self.stable_ref = None;
                }
                return Step::Reply(error_reply(&refusal));
            }
        };
        let reply = match (then, outcome) {
            (Then::Acquire { rid, timeout }, Outcome::Acquire(AcquireOutcome::Queued(waiter))) => {
                self.queued += 1;
                return Step::Waiting {
                    rid,
                    pending: Pending::Acquire(waiter),
                    timeout,
                };
            }
            (
                Then::Acquire { .. },
                Outcome::Acquire(AcquireOutcome::Granted(Grant { token, lease })),
            ) => Reply::Granted { token, lease },
            (
                Then::Wait {
                    rid,
                    ticket,
                    timeout,
                },
                Outcome::Wait(WaitOutcome::Pending(waiter)),
            ) => {
                return Step::Waiting {
                    rid,
                    pending: Pending::Wait { ticket, waiter },
                    timeout,
                };
            }
            (Then::Wait { .. }, Outcome::Wait(WaitOutcome::Granted(Grant { token, lease }))) => {
                Reply::Granted { token, lease }
            }
            (Then::Acquire { .. } | Then::Wait { .. }, _) => Reply::Failure(Status::Timeout),
            (Then::Enqueue, Outcome::Enqueue(EnqueueOutcome::Acquired(Grant { token, lease }))) => {
                Reply::Acquired { token, lease }
            }
            (Then::Enqueue, Outcome::Enqueue(EnqueueOutcome::Queued)) => {
                self.queued += 1;
                Reply::Queued
            }
            (Then::Renew, Outcome::Renewed(lease)) => {
                Reply::Renewed(Seconds::new(lease.get()).unwrap_or(Seconds::ZERO))
            }
            (Then::Enqueue | Then::Renew, _) => Reply::Failure(Status::Error),
            (Then::Release | Then::Barrier | Then::Bind | Then::Label, _) => Reply::Ok,
        };
        Step::Reply(reply)
    }

    /// Applies a request. One that must wait comes back as
    /// [`Step::Waiting`] (its grant will reach the inbox tagged `id`), one
    /// a replicated log proposed as [`Step::Proposed`]; everything else is
    /// answered at once. `ticket` names the two-phase state of `e`/`w`
    /// (always 0 on plain connections). With `queue_cap`, a request that
    /// may queue (a waiting `l`/`w`, any `e`) is refused with
    /// `error_max_waiters` while the connection already has that many
    /// waiters in the table (the mux per-connection cap).
    fn apply(
        &mut self,
        request: Request,
        id: u64,
        ticket: u64,
        queue_cap: Option<usize>,
        now: &impl Fn() -> Duration,
        log: &mut impl Log,
    ) -> Step {
        let conn = self.id;
        // Marks a request that may be a retry of one applied before.
        let origin = self.resends_by_id().then_some(id);
        match request {
            Request::Ping => Step::Reply(Reply::Ok),
            // The handshake consumed the only `auth` that is ever valid.
            Request::Auth { .. } => Step::Reply(Reply::Failure(Status::Error)),
            Request::Stats => {
                let mut stats = log.stats();
                // The holder's fence and label are an extension of the
                // multiplexed protocol: a plain connection gets v2's
                // document, member for member.
                if !self.is_mux() {
                    for entry in &mut stats.locks {
                        entry.fence = None;
                        entry.label = None;
                    }
                }
                Step::Reply(match serde_json::to_string(&stats) {
                    Ok(json) => Reply::Stats(json),
                    Err(_) => Reply::Failure(Status::Error),
                })
            }
            Request::StableRef(name) => {
                // The first binds the connection; a second is refused.
                if self.stable_ref.is_some() {
                    return Step::Reply(Reply::Failure(Status::Error));
                }
                tracing::debug!(stable_ref = %name, "connection named");
                self.stable_ref = Some(name.clone());
                let done = log.bind(name, id);
                self.submit(id, Then::Bind, done, now)
            }
            Request::Barrier => {
                let done = log.barrier(id);
                self.submit(id, Then::Barrier, done, now)
            }
            Request::Acquire {
                key,
                kind,
                timeout,
                lease,
            } => self.with_resource(kind.namespace(), key, |this, rid| {
                let wait = (timeout != Seconds::ZERO).then_some(id);
                if wait.is_some() && this.at_queue_cap(queue_cap, log) {
                    return Step::Reply(error_reply(&Refusal::Lock(LockError::MaxWaiters)));
                }
                let op = Op::Acquire {
                    conn,
                    resource: rid.clone(),
                    limit: kind.limit(),
                    lease,
                    wait,
                    origin,
                };
                let done = match wait {
                    Some(request) => log.run_waiting(rid, op, request),
                    None => log.run(rid, op, id),
                };
                let then = Then::Acquire {
                    rid: rid.clone(),
                    timeout,
                };
                this.submit(id, then, done, now)
            }),
            Request::Release {
                key,
                namespace,
                token,
            } => self.with_resource(namespace, key, |this, rid| {
                let done = run_with_token(log, rid, id, &token, |token| Op::Release {
                    resource: rid.clone(),
                    token,
                });
                this.submit(id, Then::Release, done, now)
            }),
            // An extension of the multiplexed protocol: a plain
            // connection answers it as v2 answers an unknown command.
            Request::Label { .. } if !self.is_mux() => Step::Reply(Reply::Failure(Status::Error)),
            Request::Label { key, token, label } => {
                self.with_resource(Namespace::Lock, key, |this, rid| {
                    let done = run_with_token(log, rid, id, &token, |token| Op::Label {
                        resource: rid.clone(),
                        token,
                        label: label.clone(),
                    });
                    this.submit(id, Then::Label, done, now)
                })
            }
            Request::Renew {
                key,
                namespace,
                token,
                lease,
            } => self.with_resource(namespace, key, |this, rid| {
                let done = run_with_token(log, rid, id, &token, |token| Op::Renew {
                    resource: rid.clone(),
                    token,
                    lease,
                });
                this.submit(id, Then::Renew, done, now)
            }),
            Request::Enqueue { key, kind, lease } => {
                self.with_resource(kind.namespace(), key, |this, rid| {
                    if this.at_queue_cap(queue_cap, log) {
                        return Step::Reply(error_reply(&Refusal::Lock(LockError::MaxWaiters)));
                    }
                    let op = Op::Enqueue {
                        conn,
                        ticket,
                        resource: rid.clone(),
                        limit: kind.limit(),
                        lease,
                        origin,
                    };
                    let done = log.run(rid, op, id);
                    this.submit(id, Then::Enqueue, done, now)
                })
            }
            Request::Wait {
                key,
                namespace,
                timeout,
            } => self.with_resource(namespace, key, |this, rid| {
                let wait = (timeout != Seconds::ZERO).then_some(id);
                if wait.is_some() && this.at_queue_cap(queue_cap, log) {
                    return Step::Reply(error_reply(&Refusal::Lock(LockError::MaxWaiters)));
                }
                let op = Op::Wait {
                    conn,
                    ticket,
                    resource: rid.clone(),
                    wait,
                    origin,
                };
                let done = match wait {
                    Some(request) => log.run_waiting(rid, op, request),
                    None => log.run(rid, op, id),
                };
                let then = Then::Wait {
                    rid: rid.clone(),
                    ticket,
                    timeout,
                };
                this.submit(id, then, done, now)
            }),
        }
    }
}

/// The command that withdraws a waiting request of `conn`: only the queue
/// place it waits on (a multiplexed ticket may have been granted and
/// enqueued again since; that newer place is left alone).
fn withdraw_op(conn: ConnId, rid: &ResourceId, pending: Pending) -> Op {
    match pending {
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
    }
}

/// Applies the op that `token` (as the client sent it) names. The token is
/// parsed outside the table; a malformed one holds nothing.
fn run_with_token(
    log: &mut impl Log,
    rid: &ResourceId,
    request: u64,
    token: &[u8],
    op: impl FnOnce(Token) -> Op,
) -> Done<Answer> {
    match Token::parse_wire(token) {
        Some(token) => log.run(rid, op(token), request),
        None => Done::Now(Err(Refusal::Lock(LockError::NotHeld))),
    }
}

fn error_reply(refusal: &Refusal) -> Reply {
    let error = match refusal {
        Refusal::Lock(error) => error,
        Refusal::NotLeader(leader) => return Reply::NotLeader(leader.clone()),
    };
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

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod memory;
#[cfg(test)]
mod tests;
