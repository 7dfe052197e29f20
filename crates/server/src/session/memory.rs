//! Sessions in memory on a virtual clock: bytes in, replies out, no
//! sockets and no runtime. Several sessions share one table through the
//! same `Shard` the server uses, so grants, withdrawals and their races go
//! through the server's own delivery code. Used by the session's tests and
//! by the `session_bytes` fuzz target.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use dflockd_core::{
    ConnId, FenceCounter, Grant, LockError, LockTable, Op, Outcome, ResourceId, TableConfig,
    Waiting,
};
use dflockd_proto::{FrameDecoder, Reply, Stats, Token, parse_mux_reply};
use tokio::sync::mpsc;

use super::{Answer, Close, Done, Log, Session, answer};
use crate::config::ServerConfig;
use crate::shared::{MuxGrant, Notify, Shard};

/// The table and the drain flag, shared by the sessions of one test.
pub(crate) struct World {
    pub(crate) shard: Shard<FenceCounter>,
    pub(crate) draining: bool,
    /// Whether commands wait in `proposals` until [`World::commit`], as a
    /// replicated log's do, rather than applying at once.
    pub(crate) deferred: bool,
    proposals: VecDeque<Proposal>,
    /// Answers to proposed commands, per connection.
    answers: HashMap<ConnId, VecDeque<(u64, Answer)>>,
}

/// A command proposed to the deferred log.
struct Proposal {
    conn: ConnId,
    request: u64,
    what: Proposed,
}

enum Proposed {
    Run(Op),
    RunWaiting(Op, Notify),
    Withdraw(Op),
    Barrier,
}

impl World {
    /// Applies the first `n` proposed commands in order and queues their
    /// answers for their connections. Returns how many it applied.
    pub(crate) fn commit(&mut self, n: usize) -> usize {
        let mut applied = 0;
        while applied < n {
            let Some(Proposal {
                conn,
                request,
                what,
            }) = self.proposals.pop_front()
            else {
                break;
            };
            let answer = match what {
                Proposed::Run(op) => answer(self.shard.run(op)),
                Proposed::RunWaiting(op, notify) => {
                    let to = Waiting { conn, request };
                    answer(self.shard.run_waiting(op, to, || notify))
                }
                Proposed::Withdraw(op) => {
                    let withdrawn = self.shard.withdraw(op, Waiting { conn, request });
                    Ok(Some(Outcome::Withdrawn(withdrawn)))
                }
                Proposed::Barrier => Ok(None),
            };
            self.answers
                .entry(conn)
                .or_default()
                .push_back((request, answer));
            applied += 1;
        }
        applied
    }

    /// Applies every proposed command.
    pub(crate) fn commit_all(&mut self) {
        self.commit(usize::MAX);
    }
}

pub(crate) type SharedWorld = Rc<RefCell<World>>;

pub(crate) fn world(config: TableConfig) -> SharedWorld {
    Rc::new(RefCell::new(World {
        shard: Shard::new(
            LockTable::with_fences(config, FenceCounter::starting_after(0)),
            Default::default(),
        ),
        draining: false,
        deferred: false,
        proposals: VecDeque::new(),
        answers: HashMap::new(),
    }))
}

/// A world whose commands apply only when committed (see [`World::commit`]).
#[cfg(test)]
pub(crate) fn deferred_world(config: TableConfig) -> SharedWorld {
    let w = world(config);
    w.borrow_mut().deferred = true;
    w
}

/// One connection's view of the world: the in-memory log.
pub(crate) struct MemLog {
    pub(crate) world: SharedWorld,
    pub(crate) id: ConnId,
    pub(crate) inbox: mpsc::UnboundedReceiver<MuxGrant>,
    sink: mpsc::UnboundedSender<MuxGrant>,
}

impl MemLog {
    /// Queues `what` if the world defers commands.
    fn propose(&mut self, request: u64, what: impl FnOnce(&Self) -> Proposed) -> bool {
        if !self.world.borrow().deferred {
            return false;
        }
        let proposal = Proposal {
            conn: self.id,
            request,
            what: what(self),
        };
        self.world.borrow_mut().proposals.push_back(proposal);
        true
    }

    /// The next answer to one of this connection's proposed commands.
    pub(crate) fn next_answer(&mut self) -> Option<(u64, Answer)> {
        self.world
            .borrow_mut()
            .answers
            .get_mut(&self.id)
            .and_then(VecDeque::pop_front)
    }
}

impl Log for MemLog {
    fn run(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let mut op = Some(op);
        if self.propose(request, |_| Proposed::Run(op.take().unwrap())) {
            return Done::Later;
        }
        Done::Now(answer(
            self.world.borrow_mut().shard.run(op.take().unwrap()),
        ))
    }

    fn run_waiting(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let mut op = Some(op);
        let deferred = self.propose(request, |log| {
            let notify = Notify {
                id: request,
                to: log.sink.clone(),
            };
            Proposed::RunWaiting(op.take().unwrap(), notify)
        });
        if deferred {
            return Done::Later;
        }
        let op = op.take().unwrap();
        let to = Waiting {
            conn: self.id,
            request,
        };
        let sink = &self.sink;
        let outcome = self
            .world
            .borrow_mut()
            .shard
            .run_waiting(op, to, || Notify {
                id: request,
                to: sink.clone(),
            });
        Done::Now(answer(outcome))
    }

    fn withdraw(&mut self, _: &ResourceId, op: Op, request: u64) -> Done<Answer> {
        let mut op = Some(op);
        if self.propose(request, |_| Proposed::Withdraw(op.take().unwrap())) {
            return Done::Later;
        }
        let op = op.take().unwrap();
        let of = Waiting {
            conn: self.id,
            request,
        };
        let withdrawn = self.world.borrow_mut().shard.withdraw(op, of);
        Done::Now(Ok(Some(Outcome::Withdrawn(withdrawn))))
    }

    fn barrier(&mut self, request: u64) -> Done<Answer> {
        if self.propose(request, |_| Proposed::Barrier) {
            return Done::Later;
        }
        Done::Now(Ok(None))
    }

    fn bind(&mut self, _: dflockd_proto::StableRef, request: u64) -> Done<Answer> {
        // The name changes no table in these tests: a barrier's answer.
        if self.propose(request, |_| Proposed::Barrier) {
            return Done::Later;
        }
        Done::Now(Ok(None))
    }

    fn observe(&mut self, rid: &ResourceId, grant: Grant) -> Result<Grant, LockError> {
        self.world.borrow_mut().shard.observe(rid, grant)
    }

    fn release_undelivered(&mut self, rid: &ResourceId, token: Token) {
        self.world
            .borrow_mut()
            .shard
            .release_undelivered(rid, token);
    }

    fn try_grant(&mut self) -> Option<(u64, ResourceId, Grant)> {
        self.inbox.try_recv().ok()
    }

    fn waiters(&mut self) -> usize {
        self.world.borrow().shard.table().waiters_of(self.id)
    }

    fn stats(&mut self) -> Stats {
        let world = self.world.borrow();
        world.shard.table().stats(0, world.shard.now())
    }

    fn is_draining(&self) -> bool {
        self.world.borrow().draining
    }
}

/// A connection in memory: decoder, session and log, as the driver has them.
pub(crate) struct Peer {
    pub(crate) session: Session,
    pub(crate) log: MemLog,
    decoder: FrameDecoder,
    pub(crate) closed: Option<Close>,
}

impl Peer {
    pub(crate) fn new(world: &SharedWorld, id: u64, config: &ServerConfig) -> Peer {
        let (sink, inbox) = mpsc::unbounded_channel();
        Peer {
            session: Session::new(ConnId(id), config, Default::default()),
            log: MemLog {
                world: Rc::clone(world),
                id: ConnId(id),
                inbox,
                sink,
            },
            decoder: FrameDecoder::new(),
            closed: None,
        }
    }

    /// Sends `bytes`; returns the replies written so far. While a plain
    /// request waits the rest stays unread, as the driver leaves it.
    pub(crate) fn send(&mut self, bytes: &[u8], now: Duration) -> String {
        self.feed(bytes, now);
        self.take()
    }

    /// Serves frames from `bytes` until they run out, the session blocks or
    /// closes; returns what it left unread.
    pub(crate) fn feed<'a>(&mut self, bytes: &'a [u8], now: Duration) -> &'a [u8] {
        let mut input = bytes;
        while self.closed.is_none() && !self.session.is_blocked() && !input.is_empty() {
            match self
                .session
                .serve_next(&mut self.decoder, input, &|| now, &mut self.log)
            {
                Ok((used, _)) => input = &input[used..],
                Err(close) => self.closed = Some(close),
            }
        }
        input
    }

    /// Delivers grants from the inbox and fires due timeouts, as the
    /// driver's wait does.
    pub(crate) fn poll(&mut self, now: Duration) -> String {
        if self.log.is_draining() && self.session.has_waiting() && !self.session.drained() {
            self.session.handle_drain(&mut self.log);
        }
        // Grants first, then answers, as the driver's biased wait does.
        loop {
            if let Ok((request, rid, grant)) = self.log.inbox.try_recv() {
                self.session
                    .handle_grant(request, rid, grant, &mut self.log);
            } else if let Some((request, answer)) = self.log.next_answer() {
                self.session.handle_answer(request, answer, &mut self.log);
            } else {
                break;
            }
        }
        if self.session.poll_timeout().is_some_and(|at| at <= now) {
            self.session.handle_timeout(now, &mut self.log);
        }
        self.take()
    }

    pub(crate) fn take(&mut self) -> String {
        String::from_utf8(std::mem::take(self.session.transmit())).unwrap()
    }

    /// The peer goes away: what the driver and its log's drop do.
    pub(crate) fn close(mut self) {
        self.session.handle_gone(&mut self.log);
        self.log.inbox.close();
        let mut world = self.log.world.borrow_mut();
        // The disconnect comes after every command already proposed.
        world.commit_all();
        world.answers.remove(&self.log.id);
        while let Ok((_, rid, grant)) = self.log.inbox.try_recv() {
            world.shard.release_undelivered(&rid, grant.token);
        }
        world.shard.disconnect(self.log.id, true);
    }
}

/// Serves `data` as one plain connection's bytes (which may upgrade to
/// mux) on a virtual clock, beside a second connection that holds the lock
/// and the semaphore `k` (so requests on `k` queue). Whenever the session
/// waits, time jumps past every timeout. Returns the reply bytes.
///
/// Panics if the session breaks a rule: a reply line that is not a reply,
/// more replies than frames, a session still waiting after every timeout
/// ended, or a table not empty once both connections are gone.
pub(crate) fn serve_bytes(data: &[u8]) -> Vec<u8> {
    let config = ServerConfig::ephemeral();
    let w = world(TableConfig::default());
    let mut holder = Peer::new(&w, 1, &config);
    let held = holder.send(b"l\nk\n0\nsl\nk\n0 1\n", Duration::ZERO);
    assert_eq!(held.lines().count(), 2, "{held}");
    let mut peer = Peer::new(&w, 2, &config);
    let mut out = String::new();
    let mut now = Duration::ZERO;
    let mut rest = data;
    while peer.closed.is_none() {
        let before = rest.len();
        rest = peer.feed(rest, now);
        out.push_str(&peer.take());
        if !peer.session.is_blocked() && rest.is_empty() {
            break;
        }
        // Past every timeout the bytes can ask for (292 years at most).
        now = now.saturating_add(Duration::from_secs(10_000_000_000));
        out.push_str(&peer.poll(now));
        assert!(
            rest.len() < before || !peer.session.is_blocked(),
            "the session stays blocked after every timeout ended"
        );
    }
    now = now.saturating_add(Duration::from_secs(10_000_000_000));
    out.push_str(&peer.poll(now));
    if peer.closed.is_none() {
        assert!(
            !peer.session.has_waiting(),
            "a request still waits after every timeout"
        );
    }
    let frames = data.iter().filter(|&&b| b == b'\n').count() / 3 + 1;
    let mut replies = 0;
    for line in out.lines() {
        replies += 1;
        let ok = Reply::parse(line.as_bytes()).is_ok()
            || parse_mux_reply(line.as_bytes()).is_ok()
            || line == "ok mux 1";
        assert!(ok, "not a reply: {line:?}");
    }
    assert!(
        replies <= frames,
        "{replies} replies to at most {frames} frames"
    );
    peer.close();
    holder.close();
    let world = w.borrow();
    assert_eq!(
        world.shard.table().holder_count(),
        0,
        "a hold outlived its connection"
    );
    assert_eq!(
        world.shard.table().waiter_count(),
        0,
        "a waiter outlived its connection"
    );
    out.into_bytes()
}
