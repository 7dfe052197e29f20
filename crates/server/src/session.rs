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
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, ConnId, EnqueueOutcome, Grant, LockError, Op, Outcome, ResourceId, WaitOutcome,
    WaiterId,
};
use dflockd_proto::{
    Decoded, FrameDecoder, Key, MUX_ACCEPTED, MuxBody, MuxError, MuxRequest, ProtoError, Reply,
    Request, Seconds, Stats, Status, Token, encode_mux_reply, is_mux_hello,
};
use subtle::ConstantTimeEq;

use crate::config::{Secret, ServerConfig};

/// What a session applies its commands through: the single-node server's
/// immediate log, or (in cluster mode) a replicated one. It also holds the
/// connection's grant inbox: grants for its waiting requests, delivered
/// when the command that made them was applied.
pub(crate) trait Log {
    /// Applies `op` to the table that holds `rid`.
    fn run(&mut self, rid: &ResourceId, op: Op) -> Result<Outcome, LockError>;
    /// Applies `op`, a request that may wait: if it queues, its grant will
    /// come to the inbox tagged `request`.
    fn run_waiting(&mut self, rid: &ResourceId, op: Op, request: u64)
    -> Result<Outcome, LockError>;
    /// Applies a withdraw of `request`. `true` if it was still queued;
    /// `false` if it was granted meanwhile (the grant is in the inbox).
    fn withdraw(&mut self, rid: &ResourceId, op: Op, request: u64) -> bool;
    /// A grant already in the inbox, if any.
    fn try_grant(&mut self) -> Option<(u64, ResourceId, Grant)>;
    /// How many waiters this connection has queued, exactly.
    fn waiters(&mut self) -> usize;
    /// The `stats` document.
    fn stats(&mut self) -> Stats;
    /// Whether the server is draining.
    fn is_draining(&self) -> bool;
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
    /// When its timeout ends; `None` once withdrawn too late (its grant is
    /// on the way and answers it).
    deadline: Option<Duration>,
}

/// Where [`Session::apply`] left a request.
enum Step {
    Reply(Reply),
    Waiting {
        rid: ResourceId,
        pending: Pending,
        timeout: Seconds,
    },
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
    drained: bool,
}

impl Session {
    /// A session for connection `id` under `config`'s rules.
    pub(crate) fn new(id: ConnId, config: &ServerConfig) -> Session {
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
            drained: false,
        }
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

    /// Whether a request waits (then no read deadline runs).
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Whether the session takes no request now: a plain connection's one
    /// request is waiting.
    pub(crate) fn is_blocked(&self) -> bool {
        self.phase != Phase::Mux && !self.waiting.is_empty()
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
        tracing::info!("authentication failed");
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
        if log.is_draining() {
            Reply::Failure(Status::ErrorDraining).encode(&mut self.out);
            return Err(Close::Protocol);
        }
        match parsed {
            Ok(request) => {
                match self.apply(request, 0, 0, None, log) {
                    Step::Reply(reply) => reply.encode(&mut self.out),
                    Step::Waiting {
                        rid,
                        pending,
                        timeout,
                    } => self.wait(0, rid, pending, timeout, now()),
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
                Reply::Failure(Status::Error).encode(&mut self.out);
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
                encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
                // Reusing the id of a waiting request is a broken client.
                return if self.waiting.contains_key(&id) {
                    Err(Close::Protocol)
                } else {
                    Ok(())
                };
            }
        };
        let id = request.id;
        if log.is_draining() {
            encode_mux_reply(id, &Reply::Failure(Status::ErrorDraining), &mut self.out);
            return Err(Close::Protocol);
        }
        if self.waiting.contains_key(&id) {
            tracing::debug!(id, "duplicate id of a waiting request");
            encode_mux_reply(id, &Reply::Failure(Status::Error), &mut self.out);
            return Err(Close::Protocol);
        }
        let (body, ticket) = match request.body {
            MuxBody::Cancel(target) => {
                self.withdraw(target, Reply::Failure(Status::Timeout), log);
                encode_mux_reply(id, &Reply::Ok, &mut self.out);
                return Ok(());
            }
            MuxBody::Request(body) => (body, request.ticket),
        };
        // The cap counts what the connection has queued in the table —
        // blocking waits and two-phase places alike.
        let cap = Some(self.mux_max_waiting).filter(|&cap| cap > 0);
        match self.apply(body, id, ticket, cap, log) {
            Step::Reply(reply) => encode_mux_reply(id, &reply, &mut self.out),
            Step::Waiting {
                rid,
                pending,
                timeout,
            } => self.wait(id, rid, pending, timeout, now()),
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
            // Not expected (an entry leaves the map only when its grant is
            // read here, or when it was withdrawn and no grant comes), but
            // never leave a grant without an owner.
            tracing::warn!(request, "grant for a request that is not waiting: released");
            release_undelivered(log, &rid, grant.token);
            return;
        };
        if let Some(deadline) = waiting.deadline {
            self.timers.remove(&(deadline, request));
        }
        let reply = observe(log, &waiting.rid, grant);
        let id = self.is_mux().then_some(request);
        self.reply(id, &reply);
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

    /// The drain started: every waiting request is answered `error`.
    pub(crate) fn handle_drain(&mut self, log: &mut impl Log) {
        self.drained = true;
        let mut ids: Vec<u64> = self.waiting.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.withdraw(id, Reply::Failure(Status::Error), log);
        }
    }

    /// The peer went away: waiting requests are withdrawn (grants that race
    /// the close stay in the inbox, which the driver releases).
    pub(crate) fn handle_gone(&mut self, log: &mut impl Log) {
        let waiting = std::mem::take(&mut self.waiting);
        self.timers.clear();
        for (id, w) in waiting {
            let op = withdraw_op(self.id, &w.rid, w.pending);
            log.withdraw(&w.rid, op, id);
        }
    }

    /// Withdraws waiting request `id` and answers it with `reply`. If it was
    /// granted meanwhile, the grant is in the inbox already (the table
    /// delivers when it applies): it is answered now, so the grant's reply
    /// comes before whatever caused the withdrawal is answered.
    fn withdraw(&mut self, id: u64, reply: Reply, log: &mut impl Log) {
        let Some(waiting) = self.waiting.get_mut(&id) else {
            return;
        };
        if let Some(deadline) = waiting.deadline.take() {
            self.timers.remove(&(deadline, id));
        }
        let op = withdraw_op(self.id, &waiting.rid, waiting.pending);
        let rid = waiting.rid.clone();
        if log.withdraw(&rid, op, id) {
            self.waiting.remove(&id);
            let id = self.is_mux().then_some(id);
            self.reply(id, &reply);
            return;
        }
        while let Some((granted, rid, grant)) = log.try_grant() {
            self.handle_grant(granted, rid, grant, log);
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

    /// Applies the op `op(wait)` makes: a request that may wait on request
    /// `wait` (if given; its grant then comes to the inbox) unless the
    /// connection is at its waiting cap, or a try that never waits.
    fn run_may_wait(
        &mut self,
        rid: &ResourceId,
        wait: Option<u64>,
        queue_cap: Option<usize>,
        log: &mut impl Log,
        op: impl FnOnce(Option<u64>) -> Op,
    ) -> Result<Outcome, LockError> {
        if wait.is_some() && self.at_queue_cap(queue_cap, log) {
            return Err(LockError::MaxWaiters);
        }
        let op = op(wait);
        match wait {
            Some(request) => log.run_waiting(rid, op, request),
            None => log.run(rid, op),
        }
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

    /// Applies a request. One that must wait comes back as
    /// [`Step::Waiting`] (its grant will reach the inbox tagged `id`);
    /// everything else is answered at once. `ticket` names the two-phase
    /// state of `e`/`w` (always 0 on plain connections). With `queue_cap`,
    /// a request that may queue (a waiting `l`/`w`, any `e`) is refused with
    /// `error_max_waiters` while the connection already has that many
    /// waiters in the table (the mux per-connection cap).
    fn apply(
        &mut self,
        request: Request,
        id: u64,
        ticket: u64,
        queue_cap: Option<usize>,
        log: &mut impl Log,
    ) -> Step {
        let conn = self.id;
        match request {
            Request::Ping => Step::Reply(Reply::Ok),
            // The handshake consumed the only `auth` that is ever valid.
            Request::Auth { .. } => Step::Reply(Reply::Failure(Status::Error)),
            Request::Stats => Step::Reply(match serde_json::to_string(&log.stats()) {
                Ok(json) => Reply::Stats(json),
                Err(_) => Reply::Failure(Status::Error),
            }),
            Request::Acquire {
                key,
                kind,
                timeout,
                lease,
            } => self.with_resource(kind.namespace(), key, |this, rid| {
                let wait = (timeout != Seconds::ZERO).then_some(id);
                let outcome = this.run_may_wait(rid, wait, queue_cap, log, |wait| Op::Acquire {
                    conn,
                    resource: rid.clone(),
                    limit: kind.limit(),
                    lease,
                    wait,
                });
                match outcome {
                    Ok(Outcome::Acquire(AcquireOutcome::Queued(waiter))) => {
                        this.queued += 1;
                        Step::Waiting {
                            rid: rid.clone(),
                            pending: Pending::Acquire(waiter),
                            timeout,
                        }
                    }
                    Ok(Outcome::Acquire(AcquireOutcome::Granted(Grant { token, lease }))) => {
                        Step::Reply(Reply::Granted { token, lease })
                    }
                    Ok(_) => Step::Reply(Reply::Failure(Status::Timeout)),
                    Err(error) => Step::Reply(error_reply(&error)),
                }
            }),
            Request::Release {
                key,
                namespace,
                token,
            } => self.with_resource(namespace, key, |_, rid| {
                let released = run_with_token(log, rid, &token, |token| Op::Release {
                    resource: rid.clone(),
                    token,
                });
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
            } => self.with_resource(namespace, key, |_, rid| {
                let renewed = run_with_token(log, rid, &token, |token| Op::Renew {
                    resource: rid.clone(),
                    token,
                    lease,
                });
                Step::Reply(match renewed {
                    Ok(Outcome::Renewed(lease)) => {
                        Reply::Renewed(Seconds::new(lease.get()).unwrap_or(Seconds::ZERO))
                    }
                    Ok(_) => Reply::Failure(Status::Error),
                    Err(error) => error_reply(&error),
                })
            }),
            Request::Enqueue { key, kind, lease } => {
                self.with_resource(kind.namespace(), key, |this, rid| {
                    let outcome = if this.at_queue_cap(queue_cap, log) {
                        Err(LockError::MaxWaiters)
                    } else {
                        let op = Op::Enqueue {
                            conn,
                            ticket,
                            resource: rid.clone(),
                            limit: kind.limit(),
                            lease,
                        };
                        log.run(rid, op)
                    };
                    Step::Reply(match outcome {
                        Ok(Outcome::Enqueue(EnqueueOutcome::Acquired(Grant { token, lease }))) => {
                            Reply::Acquired { token, lease }
                        }
                        Ok(Outcome::Enqueue(EnqueueOutcome::Queued)) => {
                            this.queued += 1;
                            Reply::Queued
                        }
                        Ok(_) => Reply::Failure(Status::Error),
                        Err(error) => error_reply(&error),
                    })
                })
            }
            Request::Wait {
                key,
                namespace,
                timeout,
            } => self.with_resource(namespace, key, |this, rid| {
                let wait = (timeout != Seconds::ZERO).then_some(id);
                let outcome = this.run_may_wait(rid, wait, queue_cap, log, |wait| Op::Wait {
                    conn,
                    ticket,
                    resource: rid.clone(),
                    wait,
                });
                match outcome {
                    Ok(Outcome::Wait(WaitOutcome::Pending(waiter))) => Step::Waiting {
                        rid: rid.clone(),
                        pending: Pending::Wait { ticket, waiter },
                        timeout,
                    },
                    Ok(Outcome::Wait(WaitOutcome::Granted(Grant { token, lease }))) => {
                        Step::Reply(Reply::Granted { token, lease })
                    }
                    Ok(_) => Step::Reply(Reply::Failure(Status::Timeout)),
                    Err(error) => Step::Reply(error_reply(&error)),
                }
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
    token: &[u8],
    op: impl FnOnce(Token) -> Op,
) -> Result<Outcome, LockError> {
    match Token::parse_wire(token) {
        Some(token) => log.run(rid, op(token)),
        None => Err(LockError::NotHeld),
    }
}

/// The reply to a waiting request that has its grant: the lease restarts
/// now, when the request observes it.
fn observe(log: &mut impl Log, rid: &ResourceId, grant: Grant) -> Reply {
    let observed = log.run(
        rid,
        Op::Observe {
            resource: rid.clone(),
            token: grant.token,
            lease: grant.lease,
        },
    );
    match observed {
        Ok(Outcome::Observed(Grant { token, lease })) => Reply::Granted { token, lease },
        Ok(_) => Reply::Failure(Status::Error),
        Err(error) => error_reply(&error),
    }
}

/// Gives back a grant that reached no request.
pub(crate) fn release_undelivered(log: &mut impl Log, rid: &ResourceId, token: Token) {
    // Answers `Released` whether or not the grant was still held.
    let _ = log.run(
        rid,
        Op::ReleaseUndelivered {
            resource: rid.clone(),
            token,
        },
    );
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

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod memory;
#[cfg(test)]
mod tests;
