//! Property tests: random operation sequences over a few connections and
//! resources, checked step by step against a reference model.
//!
//! The model mirrors the rules of spec §2–§3 (FIFO promotion, lazy and
//! swept lease eviction, two-phase state, caps, disconnect, idle GC) and
//! predicts every reply. On top of "the table answered what the model
//! predicted", each step checks invariants read off the public API:
//!
//! * a lock never has two holders and a semaphore never more than `limit`
//!   (derived from `holder_count()` and the `stats()` document);
//! * no free capacity while somebody waits;
//! * per resource, grants follow queue order (delivery order and fences);
//! * every fence is new, and fences minted by a later operation are larger;
//! * at the end, disconnecting everyone with auto-release and sweeping far
//!   in the future leaves no holder and no waiter, and GC leaves no resource.
//!
//! The model cannot predict the order in which one operation promotes
//! waiters of *different* resources (disconnect walks hash maps), so fences
//! are checked against the range minted by their operation, and per
//! resource against grant order.
//!
//! `DFLOCKD_TRACE=1` prints every operation as it is applied (useful with a
//! shrunk failing case).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, ConnId, EnqueueOutcome, LockError, ResourceId, TableConfig, WaitOutcome,
    WaiterId,
};
use dflockd_proto::{Key, Lease, Limit, Namespace, Token};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod support;
use support::{Delivery, Driver};

const SEED: u64 = 5_000;
const SALT: u64 = 0x00c0_ffee;
const SLOTS: usize = 4;
/// (namespace, key, limit). Lock `a` and semaphore `a` share a key but are
/// independent resources (§3.1).
const RESOURCES: [(Namespace, &str, u32); 4] = [
    (Namespace::Lock, "a", 1),
    (Namespace::Lock, "b", 1),
    (Namespace::Semaphore, "a", 2),
    (Namespace::Semaphore, "s", 3),
];
const DEFAULT_LEASE: u64 = 4;

fn rid(res: usize) -> ResourceId {
    let (ns, key, _) = RESOURCES[res];
    ResourceId::new(ns, Key::new(key).unwrap())
}

fn limit_of(res: usize) -> u32 {
    RESOURCES[res].2
}

fn res_of(rid: &ResourceId) -> usize {
    (0..RESOURCES.len())
        .find(|&r| self::rid(r) == *rid)
        .expect("known resource")
}

// ----------------------------------------------------------------- ops

#[derive(Debug, Clone, Copy)]
enum TokenPick {
    /// A token the model knows is currently held (falls back to `Any`).
    Live(usize),
    /// Any token ever seen, held or not.
    Any(usize),
    /// Something that is not a held token.
    Bogus(u8),
}

#[derive(Debug, Clone, Copy)]
enum ResPick {
    /// The resource the token was granted on.
    Own,
    /// Some resource, possibly the wrong one (or the other namespace).
    Other(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        slot: usize,
        res: usize,
        lease: Option<u64>,
        blocking: bool,
    },
    AcquireWrongLimit {
        slot: usize,
        res: usize,
    },
    Enqueue {
        slot: usize,
        res: usize,
        lease: Option<u64>,
    },
    EnqueueWrongLimit {
        slot: usize,
        res: usize,
    },
    Wait {
        slot: usize,
        res: usize,
        blocking: bool,
    },
    Release {
        token: TokenPick,
        res: ResPick,
    },
    Renew {
        token: TokenPick,
        res: ResPick,
        lease: Option<u64>,
    },
    /// The blocked request of a slot times out (cancel_acquire/cancel_wait).
    Cancel {
        slot: usize,
    },
    Disconnect {
        slot: usize,
        auto_release: bool,
    },
    Advance {
        ms: u64,
    },
    Sweep,
    Gc,
    /// Take the deliveries; bit `i % 8` set = delivering the i-th one fails.
    Deliver {
        fail: u8,
    },
}

fn lease_opt() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), (1..=6u64).prop_map(Some)]
}

fn token_pick() -> impl Strategy<Value = TokenPick> {
    prop_oneof![
        5 => any::<usize>().prop_map(TokenPick::Live),
        2 => any::<usize>().prop_map(TokenPick::Any),
        1 => (0..6u8).prop_map(TokenPick::Bogus),
    ]
}

fn res_pick() -> impl Strategy<Value = ResPick> {
    prop_oneof![6 => Just(ResPick::Own), 1 => (0..RESOURCES.len()).prop_map(ResPick::Other)]
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let res = 0..RESOURCES.len();
    prop_oneof![
        5 => (slot.clone(), res.clone(), lease_opt(), any::<bool>())
            .prop_map(|(slot, res, lease, blocking)| Op::Acquire { slot, res, lease, blocking }),
        1 => (slot.clone(), 2..RESOURCES.len()).prop_map(|(slot, res)| Op::AcquireWrongLimit { slot, res }),
        3 => (slot.clone(), res.clone(), lease_opt()).prop_map(|(slot, res, lease)| Op::Enqueue { slot, res, lease }),
        1 => (slot.clone(), 2..RESOURCES.len()).prop_map(|(slot, res)| Op::EnqueueWrongLimit { slot, res }),
        3 => (slot.clone(), res, any::<bool>()).prop_map(|(slot, res, blocking)| Op::Wait { slot, res, blocking }),
        4 => (token_pick(), res_pick()).prop_map(|(token, res)| Op::Release { token, res }),
        2 => (token_pick(), res_pick(), lease_opt()).prop_map(|(token, res, lease)| Op::Renew { token, res, lease }),
        2 => slot.clone().prop_map(|slot| Op::Cancel { slot }),
        1 => (slot, any::<bool>()).prop_map(|(slot, auto_release)| Op::Disconnect { slot, auto_release }),
        3 => prop_oneof![0..1_500u64, Just(1_000u64), 1_000..7_000u64].prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::Sweep),
        1 => Just(Op::Gc),
        3 => any::<u8>().prop_map(|fail| Op::Deliver { fail }),
    ]
}

fn config() -> impl Strategy<Value = TableConfig> {
    (
        prop_oneof![Just(3usize), Just(1024)],
        0..=2usize,
        prop_oneof![Just(0u64), Just(3_000)],
    )
        .prop_map(|(max_locks, max_waiters, gc_ms)| TableConfig {
            default_lease: Lease::new(DEFAULT_LEASE).unwrap(),
            max_locks,
            max_waiters,
            gc_max_idle: Duration::from_millis(gc_ms),
            disconnect_lock_delay: Duration::ZERO,
            clock_granularity: Duration::ZERO,
            auto_release: true,
            orphan_ttl: Duration::ZERO,
        })
}

// --------------------------------------------------------------- model

#[derive(Debug)]
struct MHolder {
    /// Grant id: the model's order of grants (per resource = FIFO order).
    gid: u64,
    conn: ConnId,
    deadline: Duration,
    /// Unknown until the grant is observed (a promoted `e` waiter's token).
    token: Option<Token>,
}

#[derive(Debug)]
enum MKind {
    Blocking(u64),
    TwoPhase,
}

#[derive(Debug)]
struct MWaiter {
    conn: ConnId,
    lease: Lease,
    kind: MKind,
}

#[derive(Debug, Default)]
struct MRes {
    holders: Vec<MHolder>,
    queue: VecDeque<MWaiter>,
    idle_since: Option<Duration>,
}

impl MRes {
    fn busy(&self) -> bool {
        !self.holders.is_empty() || !self.queue.is_empty()
    }
}

#[derive(Debug)]
struct MPhase1 {
    queued: bool,
    gid: Option<u64>,
    lease: Lease,
    blocked: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    Acquire {
        res: usize,
        wid: WaiterId,
        notify: u64,
    },
    Wait {
        res: usize,
        notify: u64,
    },
}

impl Pending {
    fn notify(self) -> u64 {
        match self {
            Pending::Acquire { notify, .. } | Pending::Wait { notify, .. } => notify,
        }
    }
}

#[derive(Debug)]
struct MConn {
    id: ConnId,
    pending: Option<Pending>,
    phase1: HashMap<usize, MPhase1>,
}

impl MConn {
    fn new(id: u64) -> MConn {
        MConn {
            id: ConnId(id),
            pending: None,
            phase1: HashMap::new(),
        }
    }
}

/// A grant the table owes to a waiting request.
#[derive(Debug)]
struct Expected {
    notify: u64,
    res: usize,
    gid: u64,
    lease: Lease,
    conn: ConnId,
    /// The request is gone (cancelled or disconnected): the grant must be
    /// handed back with `release_undelivered`.
    orphan: bool,
}

struct Harness {
    table: Driver<u64>,
    config: TableConfig,
    now: Duration,
    res: BTreeMap<usize, MRes>,
    conns: Vec<MConn>,
    next_conn: u64,
    next_notify: u64,
    next_gid: u64,
    minted: u64,
    op: usize,
    gid_op: HashMap<u64, usize>,
    op_start_minted: u64,
    /// Per operation, the fences it minted: (exclusive low, inclusive high).
    op_ranges: Vec<(u64, u64)>,
    learned_this_op: Vec<(u64, u64)>,
    seen_fences: HashSet<u64>,
    /// Per resource, gid -> fence of every observed grant.
    fences_by_res: HashMap<usize, BTreeMap<u64, u64>>,
    known: Vec<(usize, Token)>,
    deliveries: Vec<Expected>,
    trace: bool,
}

type Step = Result<(), TestCaseError>;

impl Harness {
    fn new(config: TableConfig) -> Harness {
        Harness {
            table: Driver::new(config, SEED, SALT),
            config,
            now: Duration::ZERO,
            res: BTreeMap::new(),
            conns: (1..=SLOTS as u64).map(MConn::new).collect(),
            next_conn: SLOTS as u64 + 1,
            next_notify: 1,
            next_gid: 1,
            minted: 0,
            op: 0,
            gid_op: HashMap::new(),
            op_start_minted: 0,
            op_ranges: Vec::new(),
            learned_this_op: Vec::new(),
            seen_fences: HashSet::new(),
            fences_by_res: HashMap::new(),
            known: Vec::new(),
            deliveries: Vec::new(),
            trace: std::env::var_os("DFLOCKD_TRACE").is_some(),
        }
    }

    fn slot_of(&self, id: ConnId) -> Option<usize> {
        self.conns.iter().position(|c| c.id == id)
    }

    fn notify(&mut self) -> u64 {
        self.next_notify += 1;
        self.next_notify
    }

    // ----- model primitives (mirroring spec §3)

    fn mint(&mut self) -> u64 {
        self.minted += 1;
        let gid = self.next_gid;
        self.next_gid += 1;
        self.gid_op.insert(gid, self.op);
        gid
    }

    fn grant_now(&mut self, res: usize, conn: ConnId, lease: Lease) -> u64 {
        let gid = self.mint();
        let deadline = self.now + lease.as_duration();
        self.res.get_mut(&res).unwrap().holders.push(MHolder {
            gid,
            conn,
            deadline,
            token: None,
        });
        gid
    }

    fn holder(&self, res: usize, gid: u64) -> Option<&MHolder> {
        self.res.get(&res)?.holders.iter().find(|h| h.gid == gid)
    }

    /// Removes a holder and any phase-1 state that points at it.
    fn evict(&mut self, res: usize, gid: u64) -> Option<MHolder> {
        let r = self.res.get_mut(&res)?;
        let i = r.holders.iter().position(|h| h.gid == gid)?;
        let h = r.holders.remove(i);
        if let Some(slot) = self.slot_of(h.conn) {
            let phase1 = &mut self.conns[slot].phase1;
            if phase1.get(&res).is_some_and(|p| p.gid == Some(gid)) {
                phase1.remove(&res);
            }
        }
        Some(h)
    }

    /// FIFO promotion into free capacity (§3.2).
    fn promote(&mut self, res: usize) {
        loop {
            let Some(r) = self.res.get_mut(&res) else {
                return;
            };
            if r.holders.len() >= limit_of(res) as usize {
                return;
            }
            let Some(w) = r.queue.pop_front() else { return };
            let gid = self.grant_now(res, w.conn, w.lease);
            match w.kind {
                MKind::Blocking(notify) => self.deliveries.push(Expected {
                    notify,
                    res,
                    gid,
                    lease: w.lease,
                    conn: w.conn,
                    orphan: false,
                }),
                MKind::TwoPhase => {
                    let slot = self
                        .slot_of(w.conn)
                        .expect("a queued `e` waiter's connection is live");
                    let p = self.conns[slot]
                        .phase1
                        .get_mut(&res)
                        .expect("an `e` waiter has phase-1 state");
                    match p.blocked {
                        Some(notify) => {
                            self.conns[slot].phase1.remove(&res);
                            self.deliveries.push(Expected {
                                notify,
                                res,
                                gid,
                                lease: w.lease,
                                conn: w.conn,
                                orphan: false,
                            });
                        }
                        None => {
                            p.queued = false;
                            p.gid = Some(gid);
                        }
                    }
                }
            }
        }
    }

    fn evict_expired(&mut self, res: usize) -> usize {
        let now = self.now;
        let expired: Vec<u64> = self.res[&res]
            .holders
            .iter()
            .filter(|h| h.deadline <= now)
            .map(|h| h.gid)
            .collect();
        for &gid in &expired {
            self.evict(res, gid);
        }
        self.promote(res);
        expired.len()
    }

    /// Resolve/create, check the limit, evict expired holders (§2.5 steps 2–3).
    fn prepare(&mut self, res: usize, limit: u32) -> Result<(), LockError> {
        if self.res.contains_key(&res) {
            if limit != limit_of(res) {
                return Err(LockError::LimitMismatch);
            }
            self.evict_expired(res);
        } else {
            if self.res.len() >= self.config.max_locks {
                return Err(LockError::MaxLocks);
            }
            self.res.insert(res, MRes::default());
        }
        Ok(())
    }

    fn grantable(&self, res: usize) -> bool {
        let r = &self.res[&res];
        r.holders.len() < limit_of(res) as usize && r.queue.is_empty()
    }

    fn queue_full(&self, res: usize) -> bool {
        self.config.max_waiters > 0 && self.res[&res].queue.len() >= self.config.max_waiters
    }

    /// The requester observes a grant: restart its lease, or fail if it ran out.
    fn observe(&mut self, res: usize, gid: u64, lease: Lease) -> Result<(), ()> {
        let now = self.now;
        let Some(h) = self.holder(res, gid) else {
            return Err(());
        };
        if h.deadline <= now {
            self.evict(res, gid);
            self.promote(res);
            return Err(());
        }
        let r = self.res.get_mut(&res).unwrap();
        r.holders
            .iter_mut()
            .find(|h| h.gid == gid)
            .unwrap()
            .deadline = now + lease.as_duration();
        Ok(())
    }

    fn remove_two_phase_waiter(&mut self, res: usize, conn: ConnId) {
        if let Some(r) = self.res.get_mut(&res) {
            let i = r
                .queue
                .iter()
                .position(|w| w.conn == conn && matches!(w.kind, MKind::TwoPhase));
            r.queue.remove(i.expect("queued `e` waiter"));
        }
    }

    fn orphan(&mut self, notify: u64) -> Step {
        let d = self.deliveries.iter_mut().find(|d| d.notify == notify);
        prop_assert!(
            d.is_some(),
            "request {} is not queued, so its grant must be pending delivery",
            notify
        );
        d.unwrap().orphan = true;
        Ok(())
    }

    /// A token the table handed out: new fence, right salt, FIFO per resource.
    fn learn(&mut self, res: usize, gid: u64, token: Token) -> Step {
        let fence = token.fence();
        let per_res = self.fences_by_res.entry(res).or_default();
        if let Some(&f) = per_res.get(&gid) {
            prop_assert_eq!(f, fence, "grant {} came back with another token", gid);
            return Ok(());
        }
        // The salt came from the command: its first grant's salt, or one
        // derived from the fence for a further grant of the same command.
        let salts = support::salts(SALT);
        prop_assert!(
            token.salt() == salts.for_grant(0, fence) || token.salt() == salts.for_grant(1, fence),
            "token {} has a salt its command did not give",
            token
        );
        prop_assert!(
            self.seen_fences.insert(fence),
            "fence {} minted twice",
            fence
        );
        if let Some((g, &f)) = per_res.range(..gid).next_back() {
            prop_assert!(
                f < fence,
                "res {}: grant {} (fence {}) before grant {} (fence {})",
                res,
                g,
                f,
                gid,
                fence
            );
        }
        if let Some((g, &f)) = per_res.range(gid + 1..).next() {
            prop_assert!(
                fence < f,
                "res {}: grant {} (fence {}) after grant {} (fence {})",
                res,
                g,
                f,
                gid,
                fence
            );
        }
        per_res.insert(gid, fence);
        self.learned_this_op.push((gid, fence));
        if let Some(h) = self
            .res
            .get_mut(&res)
            .and_then(|r| r.holders.iter_mut().find(|h| h.gid == gid))
        {
            h.token = Some(token);
        }
        self.known.push((res, token));
        Ok(())
    }

    fn pick(&self, token: TokenPick, res: ResPick) -> Option<(usize, Vec<u8>)> {
        let live: Vec<(usize, Token)> = self
            .res
            .iter()
            .flat_map(|(&r, m)| {
                m.holders
                    .iter()
                    .filter_map(move |h| h.token.map(|t| (r, t)))
            })
            .collect();
        let (own, bytes) = match token {
            TokenPick::Live(i) if !live.is_empty() => {
                let (r, t) = live[i % live.len()];
                (r, t.to_string().into_bytes())
            }
            TokenPick::Live(i) | TokenPick::Any(i) => {
                if self.known.is_empty() {
                    return None;
                }
                let (r, t) = self.known[i % self.known.len()];
                (r, t.to_string().into_bytes())
            }
            TokenPick::Bogus(kind) => {
                let base = self.known.last().copied();
                let r = base.map_or(0, |(r, _)| r);
                let bytes = match (kind, base) {
                    (1, _) => Vec::new(),
                    (2, _) => b"not-a-token".to_vec(),
                    (3, Some((_, t))) => t.to_string().to_uppercase().into_bytes(),
                    (4, Some((_, t))) => {
                        Token::new(t.fence(), t.salt() ^ 1).to_string().into_bytes()
                    }
                    (5, Some((_, t))) => format!("{t} 60").into_bytes(),
                    _ => b"00000000000000000000000000000000".to_vec(),
                };
                (r, bytes)
            }
        };
        let r = match res {
            ResPick::Own => own,
            ResPick::Other(r) => r,
        };
        Some((r, bytes))
    }

    /// The holder of `res` whose token is exactly these wire bytes.
    fn holder_by_wire(&self, res: usize, bytes: &[u8]) -> Option<u64> {
        let r = self.res.get(&res)?;
        r.holders
            .iter()
            .find(|h| h.token.is_some_and(|t| t.to_string().as_bytes() == bytes))
            .map(|h| h.gid)
    }

    // ----- operations

    fn apply(&mut self, op: &Op) -> Step {
        self.op_start_minted = self.minted;
        self.learned_this_op.clear();
        if self.trace {
            eprintln!("[{:>3}] t={:?} {op:?}", self.op, self.now);
        }
        self.step(op)?;
        self.finish_op()
    }

    fn step(&mut self, op: &Op) -> Step {
        let now = self.now;
        match *op {
            Op::Acquire {
                slot,
                res,
                lease,
                blocking,
            } => self.acquire(slot, res, limit_of(res), lease, blocking),
            Op::AcquireWrongLimit { slot, res } => {
                // Only against an existing semaphore: otherwise it would create
                // the resource with another limit, which the model keeps fixed.
                if !self.res.contains_key(&res) {
                    return Ok(());
                }
                self.acquire(slot, res, limit_of(res) + 1, None, true)
            }
            Op::Enqueue { slot, res, lease } => self.enqueue(slot, res, limit_of(res), lease),
            Op::EnqueueWrongLimit { slot, res } => {
                if !self.res.contains_key(&res) {
                    return Ok(());
                }
                self.enqueue(slot, res, limit_of(res) + 1, None)
            }
            Op::Wait {
                slot,
                res,
                blocking,
            } => self.wait(slot, res, blocking),
            Op::Release { token, res } => {
                let Some((r, bytes)) = self.pick(token, res) else {
                    return Ok(());
                };
                let actual = self.table.release(&rid(r), &bytes, now);
                match self.holder_by_wire(r, &bytes) {
                    Some(gid) => {
                        prop_assert_eq!(
                            actual,
                            Ok(()),
                            "release of a held token (§2.3, deadline not looked at)"
                        );
                        self.evict(r, gid);
                        self.promote(r);
                    }
                    None => prop_assert_eq!(actual, Err(LockError::NotHeld)),
                }
                Ok(())
            }
            Op::Renew { token, res, lease } => {
                let Some((r, bytes)) = self.pick(token, res) else {
                    return Ok(());
                };
                let lease = lease.map(|s| Lease::new(s).unwrap());
                let effective = lease.unwrap_or(self.config.default_lease);
                let actual = self.table.renew(&rid(r), &bytes, lease, now);
                match self.holder_by_wire(r, &bytes) {
                    Some(gid) if self.holder(r, gid).unwrap().deadline <= now => {
                        prop_assert_eq!(
                            actual,
                            Err(LockError::NotHeld),
                            "renew at/after the deadline (§2.4)"
                        );
                        self.evict(r, gid);
                        self.promote(r);
                    }
                    Some(gid) => {
                        prop_assert_eq!(actual, Ok(effective));
                        let h = self
                            .res
                            .get_mut(&r)
                            .unwrap()
                            .holders
                            .iter_mut()
                            .find(|h| h.gid == gid)
                            .unwrap();
                        h.deadline = now + effective.as_duration();
                    }
                    None => prop_assert_eq!(actual, Err(LockError::NotHeld)),
                }
                Ok(())
            }
            Op::Cancel { slot } => self.cancel(slot),
            Op::Disconnect { slot, auto_release } => {
                let fresh = MConn::new(self.next_conn);
                self.next_conn += 1;
                let gone = std::mem::replace(&mut self.conns[slot], fresh);
                self.table.disconnect(gone.id, auto_release, now);
                for r in self.res.values_mut() {
                    r.queue.retain(|w| w.conn != gone.id);
                }
                if auto_release {
                    let owned: Vec<(usize, u64)> = self
                        .res
                        .iter()
                        .flat_map(|(&r, m)| {
                            m.holders
                                .iter()
                                .filter(|h| h.conn == gone.id)
                                .map(move |h| (r, h.gid))
                        })
                        .collect();
                    for (r, gid) in owned {
                        self.evict(r, gid);
                    }
                }
                for d in &mut self.deliveries {
                    if d.conn == gone.id {
                        d.orphan = true;
                    }
                }
                let all: Vec<usize> = self.res.keys().copied().collect();
                for r in all {
                    self.promote(r);
                }
                Ok(())
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(ms);
                Ok(())
            }
            Op::Sweep => {
                let actual = self.table.sweep(now);
                let all: Vec<usize> = self.res.keys().copied().collect();
                let mut expected = 0;
                for r in all {
                    expected += self.evict_expired(r);
                }
                prop_assert_eq!(
                    actual,
                    expected,
                    "sweep evicts every lease at or before now (§3.3)"
                );
                Ok(())
            }
            Op::Gc => {
                let actual = self.table.gc(now);
                let max_idle = self.config.gc_max_idle;
                let before = self.res.len();
                self.res
                    .retain(|_, r| r.busy() || now - r.idle_since.expect("idle since") < max_idle);
                prop_assert_eq!(
                    actual,
                    before - self.res.len(),
                    "gc deletes idle resources only (§3.8)"
                );
                Ok(())
            }
            Op::Deliver { fail } => self.deliver(fail),
        }
    }

    fn acquire(
        &mut self,
        slot: usize,
        res: usize,
        limit: u32,
        lease: Option<u64>,
        blocking: bool,
    ) -> Step {
        if self.conns[slot].pending.is_some() {
            return Ok(()); // one request at a time per connection (§1.9)
        }
        let conn = self.conns[slot].id;
        let lease = lease.map(|s| Lease::new(s).unwrap());
        let effective = lease.unwrap_or(self.config.default_lease);
        let notify = self.notify();
        let limit_v = Limit::new(u64::from(limit)).unwrap();
        let actual = self.table.acquire(
            conn,
            &rid(res),
            limit_v,
            lease,
            self.now,
            blocking.then_some(notify),
        );
        if let Err(e) = self.prepare(res, limit) {
            prop_assert_eq!(actual, Err(e));
            return Ok(());
        }
        if self.grantable(res) {
            let gid = self.grant_now(res, conn, effective);
            match actual {
                Ok(AcquireOutcome::Granted(g)) => {
                    prop_assert_eq!(g.lease, effective);
                    self.learn(res, gid, g.token)?;
                }
                other => prop_assert!(
                    false,
                    "expected an immediate grant (§3.2 fast path), got {:?}",
                    other
                ),
            }
        } else if self.queue_full(res) {
            prop_assert_eq!(
                actual,
                Err(LockError::MaxWaiters),
                "§3.6: a full queue answers max_waiters"
            );
        } else if !blocking {
            prop_assert_eq!(
                actual,
                Ok(AcquireOutcome::Timeout),
                "try-lock on a busy resource (§3.6)"
            );
        } else {
            match actual {
                Ok(AcquireOutcome::Queued(wid)) => {
                    let w = MWaiter {
                        conn,
                        lease: effective,
                        kind: MKind::Blocking(notify),
                    };
                    self.res.get_mut(&res).unwrap().queue.push_back(w);
                    self.conns[slot].pending = Some(Pending::Acquire { res, wid, notify });
                }
                other => prop_assert!(false, "expected Queued, got {:?}", other),
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, slot: usize, res: usize, limit: u32, lease: Option<u64>) -> Step {
        if self.conns[slot].pending.is_some() {
            return Ok(());
        }
        let conn = self.conns[slot].id;
        let lease = lease.map(|s| Lease::new(s).unwrap());
        let effective = lease.unwrap_or(self.config.default_lease);
        let limit_v = Limit::new(u64::from(limit)).unwrap();
        let actual = self
            .table
            .enqueue(conn, 0, &rid(res), limit_v, lease, self.now);
        if self.conns[slot].phase1.contains_key(&res) {
            prop_assert_eq!(actual, Err(LockError::AlreadyEnqueued), "§2.5 step 1");
            return Ok(());
        }
        if let Err(e) = self.prepare(res, limit) {
            prop_assert_eq!(actual, Err(e));
            return Ok(());
        }
        if self.grantable(res) {
            let gid = self.grant_now(res, conn, effective);
            match actual {
                Ok(EnqueueOutcome::Acquired(g)) => {
                    prop_assert_eq!(g.lease, effective);
                    self.learn(res, gid, g.token)?;
                }
                other => prop_assert!(false, "expected Acquired, got {:?}", other),
            }
            let p = MPhase1 {
                queued: false,
                gid: Some(gid),
                lease: effective,
                blocked: None,
            };
            self.conns[slot].phase1.insert(res, p);
        } else if self.queue_full(res) {
            prop_assert_eq!(actual, Err(LockError::MaxWaiters));
        } else {
            prop_assert_eq!(actual, Ok(EnqueueOutcome::Queued));
            let w = MWaiter {
                conn,
                lease: effective,
                kind: MKind::TwoPhase,
            };
            self.res.get_mut(&res).unwrap().queue.push_back(w);
            let p = MPhase1 {
                queued: true,
                gid: None,
                lease: effective,
                blocked: None,
            };
            self.conns[slot].phase1.insert(res, p);
        }
        Ok(())
    }

    fn wait(&mut self, slot: usize, res: usize, blocking: bool) -> Step {
        if self.conns[slot].pending.is_some() {
            return Ok(());
        }
        let conn = self.conns[slot].id;
        let notify = self.notify();
        let actual = self
            .table
            .wait(conn, 0, &rid(res), self.now, blocking.then_some(notify));
        let Some(p) = self.conns[slot].phase1.get_mut(&res) else {
            prop_assert_eq!(
                actual,
                Err(LockError::NotEnqueued),
                "§2.6: no phase-1 state"
            );
            return Ok(());
        };
        if let Some(gid) = p.gid {
            let lease = p.lease;
            self.conns[slot].phase1.remove(&res);
            match self.observe(res, gid, lease) {
                Ok(()) => match actual {
                    Ok(WaitOutcome::Granted(g)) => {
                        prop_assert_eq!(g.lease, lease, "§2.6: the lease given at `e`");
                        self.learn(res, gid, g.token)?;
                    }
                    other => prop_assert!(false, "expected the pre-granted token, got {:?}", other),
                },
                Err(()) => prop_assert_eq!(
                    actual,
                    Err(LockError::LeaseExpired),
                    "§2.6: lease ran out before `w`"
                ),
            }
        } else if blocking {
            p.blocked = Some(notify);
            prop_assert!(
                matches!(actual, Ok(WaitOutcome::Pending(_))),
                "{:?}",
                actual
            );
            self.conns[slot].pending = Some(Pending::Wait { res, notify });
        } else {
            prop_assert_eq!(
                actual,
                Ok(WaitOutcome::Timeout),
                "§2.6: a poll without grant times out"
            );
            self.conns[slot].phase1.remove(&res);
            self.remove_two_phase_waiter(res, conn);
            self.promote(res);
        }
        Ok(())
    }

    fn cancel(&mut self, slot: usize) -> Step {
        let Some(pending) = self.conns[slot].pending.take() else {
            return Ok(());
        };
        let conn = self.conns[slot].id;
        match pending {
            Pending::Acquire { res, wid, notify } => {
                let actual = self.table.cancel_acquire(conn, &rid(res), wid, self.now);
                let pos = self.res.get(&res).and_then(|r| {
                    r.queue
                        .iter()
                        .position(|w| matches!(w.kind, MKind::Blocking(n) if n == notify))
                });
                match pos {
                    Some(i) => {
                        prop_assert!(actual, "cancel_acquire of a queued waiter");
                        self.res.get_mut(&res).unwrap().queue.remove(i);
                        self.promote(res);
                    }
                    None => {
                        prop_assert!(
                            !actual,
                            "cancel_acquire of a promoted waiter must return false"
                        );
                        self.orphan(notify)?;
                    }
                }
            }
            Pending::Wait { res, notify } => {
                let actual = self.table.cancel_wait(conn, 0, &rid(res), self.now);
                if self.conns[slot].phase1.get(&res).is_some_and(|p| p.queued) {
                    prop_assert!(actual, "cancel_wait of a queued waiter");
                    self.conns[slot].phase1.remove(&res);
                    self.remove_two_phase_waiter(res, conn);
                    self.promote(res);
                } else {
                    prop_assert!(
                        !actual,
                        "cancel_wait of a promoted waiter must return false"
                    );
                    self.orphan(notify)?;
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, fail: u8) -> Step {
        let actual: Vec<Delivery<u64>> = self.table.take_deliveries().collect();
        let expected = std::mem::take(&mut self.deliveries);
        let notifies = |v: &mut dyn Iterator<Item = (u64, usize)>, res: usize| -> Vec<u64> {
            v.filter(|&(_, r)| r == res).map(|(n, _)| n).collect()
        };
        for res in 0..RESOURCES.len() {
            let got = notifies(
                &mut actual.iter().map(|d| (d.notify, res_of(&d.resource))),
                res,
            );
            let want = notifies(&mut expected.iter().map(|e| (e.notify, e.res)), res);
            prop_assert_eq!(
                got,
                want,
                "deliveries of resource {} out of FIFO order (§3.2)",
                res
            );
        }
        prop_assert_eq!(actual.len(), expected.len());
        let now = self.now;
        for (i, d) in actual.into_iter().enumerate() {
            let e = expected.iter().find(|e| e.notify == d.notify).unwrap();
            prop_assert_eq!(d.grant.lease, e.lease);
            self.learn(e.res, e.gid, d.grant.token)?;
            let failed = e.orphan || fail & (1 << (i % 8)) != 0;
            if !e.orphan {
                let slot = self.slot_of(e.conn).expect("live requester");
                let pending = self.conns[slot].pending.take();
                prop_assert_eq!(pending.map(Pending::notify), Some(e.notify));
            }
            if failed {
                self.table
                    .release_undelivered(&d.resource, d.grant.token, now);
                if self.evict(e.res, e.gid).is_some() {
                    self.promote(e.res);
                }
            } else {
                let actual = self
                    .table
                    .observe(&d.resource, d.grant.token, d.grant.lease, now);
                match self.observe(e.res, e.gid, e.lease) {
                    Ok(()) => prop_assert_eq!(actual, Ok(d.grant)),
                    Err(()) => prop_assert_eq!(actual, Err(LockError::LeaseExpired)),
                }
            }
        }
        Ok(())
    }

    // ----- invariants

    fn finish_op(&mut self) -> Step {
        let now = self.now;
        for r in self.res.values_mut() {
            if r.busy() {
                r.idle_since = None;
            } else if r.idle_since.is_none() {
                r.idle_since = Some(now);
            }
        }
        let range = (SEED + self.op_start_minted, SEED + self.minted);
        for &(gid, fence) in &self.learned_this_op {
            let minted_in = self.gid_op[&gid];
            let (lo, hi) = if minted_in == self.op {
                range
            } else {
                self.op_ranges[minted_in]
            };
            prop_assert!(
                lo < fence && fence <= hi,
                "fence {} of grant {} outside the range ({}, {}] minted by op {}",
                fence,
                gid,
                lo,
                hi,
                minted_in
            );
        }
        self.op_ranges.push(range);
        self.op += 1;
        self.check_invariants()
    }

    fn check_invariants(&mut self) -> Step {
        // Drops stale index entries, hence `&mut`; read before the rest.
        let next_deadline = self.table.next_deadline();
        let t = &self.table;
        let now = self.now;
        let holders: usize = self.res.values().map(|r| r.holders.len()).sum();
        let waiters: usize = self.res.values().map(|r| r.queue.len()).sum();
        prop_assert_eq!(t.resource_count(), self.res.len(), "resources");
        prop_assert_eq!(t.holder_count(), holders, "holders");
        prop_assert_eq!(t.waiter_count(), waiters, "waiters");
        let next = self
            .res
            .values()
            .flat_map(|r| r.holders.iter().map(|h| h.deadline))
            .min();
        prop_assert_eq!(next_deadline, next, "next deadline");

        let stats = t.stats(SLOTS as u64, now);
        // Read off the public API alone: exclusion and capacity.
        let sem_holders: u64 = stats.semaphores.iter().map(|s| s.holders).sum();
        let held_locks = stats.locks.iter().filter(|l| l.owner_conn_id != 0).count() as u64;
        prop_assert_eq!(
            t.holder_count() as u64 - sem_holders,
            held_locks,
            "some lock has two holders"
        );
        for s in &stats.semaphores {
            prop_assert!(
                s.holders <= s.limit,
                "semaphore {} over its limit: {:?}",
                s.key,
                s
            );
            if s.holders < s.limit {
                prop_assert_eq!(s.waiters, 0, "free capacity while {} waits", s.key);
            }
        }
        for l in &stats.locks {
            if l.owner_conn_id == 0 {
                prop_assert_eq!(l.waiters, 0, "lock {} free while others wait", &l.key);
            }
        }

        // The stats document matches the model exactly.
        let mut locks = Vec::new();
        let mut sems = Vec::new();
        let mut idle_locks = Vec::new();
        let mut idle_sems = Vec::new();
        for (&res, r) in &self.res {
            prop_assert!(r.holders.len() <= limit_of(res) as usize);
            let key = RESOURCES[res].1.to_string();
            let is_lock = limit_of(res) == 1;
            if !r.busy() {
                let idle = (now - r.idle_since.unwrap()).as_secs_f64();
                if is_lock {
                    idle_locks.push((key, idle));
                } else {
                    idle_sems.push((key, idle));
                }
            } else if is_lock {
                let h = r.holders.first();
                let left = h.map_or(0.0, |h| h.deadline.saturating_sub(now).as_secs_f64());
                locks.push((key, h.map_or(0, |h| h.conn.0), left, r.queue.len() as u64));
            } else {
                sems.push((
                    key,
                    u64::from(limit_of(res)),
                    r.holders.len() as u64,
                    r.queue.len() as u64,
                ));
            }
        }
        let mut got_locks: Vec<_> = stats
            .locks
            .iter()
            .map(|l| {
                (
                    l.key.clone(),
                    l.owner_conn_id,
                    l.lease_expires_in_s,
                    l.waiters,
                )
            })
            .collect();
        let mut got_sems: Vec<_> = stats
            .semaphores
            .iter()
            .map(|s| (s.key.clone(), s.limit, s.holders, s.waiters))
            .collect();
        let mut got_idle_locks: Vec<_> = stats
            .idle_locks
            .iter()
            .map(|e| (e.key.clone(), e.idle_s))
            .collect();
        let mut got_idle_sems: Vec<_> = stats
            .idle_semaphores
            .iter()
            .map(|e| (e.key.clone(), e.idle_s))
            .collect();
        for v in [&mut got_idle_locks, &mut got_idle_sems] {
            v.sort_by(|a, b| a.0.cmp(&b.0));
        }
        got_locks.sort_by(|a, b| a.0.cmp(&b.0));
        got_sems.sort();
        prop_assert_eq!(got_sems, sems, "stats semaphores");
        prop_assert_eq!(
            got_locks.len(),
            locks.len(),
            "stats locks: {:?} vs {:?}",
            &stats.locks,
            &locks
        );
        for (g, w) in got_locks.iter().zip(&locks) {
            prop_assert!(
                g.0 == w.0 && g.1 == w.1 && g.3 == w.3 && (g.2 - w.2).abs() < 1e-9,
                "lock entry {:?} vs {:?}",
                g,
                w
            );
        }
        for (got, want) in [(&got_idle_locks, &idle_locks), (&got_idle_sems, &idle_sems)] {
            prop_assert_eq!(
                got.len(),
                want.len(),
                "idle entries {:?} vs {:?}",
                got,
                want
            );
            for (g, w) in got.iter().zip(want) {
                prop_assert!(
                    g.0 == w.0 && (g.1 - w.1).abs() < 1e-9,
                    "idle entry {:?} vs {:?}",
                    g,
                    w
                );
            }
        }
        Ok(())
    }

    /// Everyone leaves with auto-release, leases run out, GC runs: nothing
    /// may be left, and the fence counter minted exactly the model's grants.
    fn drain(&mut self) -> Step {
        for slot in 0..SLOTS {
            self.apply(&Op::Disconnect {
                slot,
                auto_release: true,
            })?;
        }
        self.apply(&Op::Deliver { fail: 0 })?;
        prop_assert!(self.deliveries.is_empty());
        self.apply(&Op::Advance { ms: 1_000_000_000 })?;
        self.apply(&Op::Sweep)?;
        prop_assert_eq!(self.table.holder_count(), 0, "holders leaked");
        prop_assert_eq!(self.table.waiter_count(), 0, "waiters leaked");
        prop_assert_eq!(self.table.next_deadline(), None);
        self.apply(&Op::Deliver { fail: 0 })?;
        let idle_ms = self.config.gc_max_idle.as_millis() as u64;
        self.apply(&Op::Advance { ms: idle_ms + 1 })?;
        self.apply(&Op::Gc)?;
        prop_assert_eq!(self.table.resource_count(), 0, "resources leaked");

        let conn = ConnId(self.next_conn);
        let last = self
            .table
            .acquire(conn, &rid(0), Limit::ONE, None, self.now, None);
        match last {
            Ok(AcquireOutcome::Granted(g)) => {
                prop_assert_eq!(
                    g.token.fence(),
                    SEED + self.minted + 1,
                    "the table minted grants the model did not see"
                );
            }
            other => prop_assert!(false, "fresh table should grant, got {:?}", other),
        }
        Ok(())
    }
}

fn run(config: TableConfig, ops: &[Op]) -> Step {
    let mut h = Harness::new(config);
    for op in ops {
        h.apply(op)?;
    }
    h.drain()
}

proptest! {
    // 256 cases by default (about a second in debug); PROPTEST_CASES=N for more.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn table_matches_model(config in config(), ops in proptest::collection::vec(op(), 1..80)) {
        run(config, &ops)?;
    }
}

/// A hand-picked sequence through the races the random runs must also reach:
/// promotion before cancel, sweep of an undelivered grant, disconnect with a
/// pending delivery, and GC of a resource whose grant was never delivered.
#[test]
fn scripted_races() {
    let config = TableConfig {
        default_lease: Lease::new(DEFAULT_LEASE).unwrap(),
        max_locks: 1024,
        max_waiters: 0,
        gc_max_idle: Duration::ZERO,
        disconnect_lock_delay: Duration::ZERO,
        clock_granularity: Duration::ZERO,
        auto_release: true,
        orphan_ttl: Duration::ZERO,
    };
    let own = ResPick::Own;
    let ops = [
        Op::Acquire {
            slot: 0,
            res: 0,
            lease: Some(1),
            blocking: false,
        },
        Op::Acquire {
            slot: 1,
            res: 0,
            lease: None,
            blocking: true,
        },
        Op::Enqueue {
            slot: 2,
            res: 0,
            lease: Some(2),
        },
        Op::Wait {
            slot: 2,
            res: 0,
            blocking: true,
        },
        Op::Release {
            token: TokenPick::Live(0),
            res: own,
        },
        Op::Cancel { slot: 1 },
        Op::Deliver { fail: 0 },
        Op::Wait {
            slot: 2,
            res: 0,
            blocking: false,
        },
        Op::Acquire {
            slot: 3,
            res: 2,
            lease: Some(1),
            blocking: false,
        },
        Op::Acquire {
            slot: 3,
            res: 3,
            lease: None,
            blocking: false,
        },
        Op::Advance { ms: 5_000 },
        Op::Sweep,
        Op::Gc,
        Op::Deliver { fail: 0 },
        Op::Disconnect {
            slot: 2,
            auto_release: false,
        },
        Op::Renew {
            token: TokenPick::Live(0),
            res: own,
            lease: Some(3),
        },
    ];
    let mut h = Harness::new(config);
    for op in &ops {
        h.apply(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    h.drain().unwrap();
}
