use std::collections::HashMap as StdHashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{
    IdleEntry, Label, Lease, Limit, LockEntry, SemaphoreEntry, StableRef, Stats, Token,
};

use crate::command::{Command, Op, Policy, Salt};
use crate::config::TableConfig;
use crate::effects::{
    AcquireOutcome, Delivery, Effects, EnqueueOutcome, Expired, Grant, LockError, Outcome,
    WaitOutcome, Waiting,
};
use crate::ids::{ConnId, ResourceId, WaiterId};
use crate::leases::{Leases, NO_RING, Slot};
use crate::{FenceCounter, FenceSource, MintError, ResourceBudget};

mod sessions;
mod snapshot;
pub use snapshot::{RestoreError, TableSnapshot};

/// The table's hash maps. Their keys are values the server assigns
/// (connection ids, minted tokens, waiter ids) or [`ResourceId`]s, which
/// hash as their precomputed keyed hash; so the fast foldhash (seeded per
/// process) is enough, and each lookup costs a few instructions where
/// SipHash over the key took about 250. A client can name a token in
/// `r`/`n`, but such a lookup only ever finds the server's own entries.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

struct Holder {
    conn: ConnId,
    deadline: Duration,
    /// The lease's length as last granted or renewed (a new leader
    /// restarts it in full).
    lease: Lease,
    /// The lease's slot in the table's [`Leases`].
    slot: Slot,
    /// The id of the request that was answered with this grant, in its
    /// session's numbering (see [`Op::Acquire`]'s `origin`): a retry of
    /// that request is answered with this hold.
    origin: Option<u64>,
    /// What the holder proclaimed (`label`).
    label: Option<Label>,
}

enum WaiterKind {
    /// A blocking acquire; its grant goes to this request.
    Blocking(u64),
    /// A two-phase waiter, by its ticket on its connection.
    TwoPhase(u64),
}

struct Waiter {
    conn: ConnId,
    lease: Lease,
    kind: WaiterKind,
    /// A blocking waiter whose connection closed while its session may
    /// come back (an orphan's): it keeps its place for the session's retry
    /// of the same request, and a grant made to it meanwhile is kept as a
    /// hold, with nobody to deliver it to.
    detached: bool,
}

struct Resource {
    /// The table's own copy of the resource's id; the lease slab names
    /// the resource by its hash (see [`Resources`]).
    id: ResourceId,
    limit: Limit,
    holders: Holders,
    queue: BTreeMap<WaiterId, Waiter>,
    last_activity: Duration,
    /// Lock-delay after a disconnect release: no grant before this instant.
    blocked_until: Option<Duration>,
}

/// The holders of one resource. Most resources are locks with at most one
/// holder; they keep it inline rather than in a hash map (a lock table of
/// 100,000 held keys saves a hash-map allocation per key).
enum Holders {
    Inline(Option<(Token, Holder)>),
    Map(HashMap<Token, Holder>),
}

impl Holders {
    fn new(limit: Limit) -> Holders {
        if limit.get() == 1 {
            Holders::Inline(None)
        } else {
            Holders::Map(Default::default())
        }
    }

    fn len(&self) -> usize {
        match self {
            Holders::Inline(slot) => usize::from(slot.is_some()),
            Holders::Map(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn deadline(&self, token: &Token) -> Option<Duration> {
        match self {
            Holders::Inline(Some((t, holder))) if t == token => Some(holder.deadline),
            Holders::Inline(_) => None,
            Holders::Map(map) => map.get(token).map(|h| h.deadline),
        }
    }

    fn get_mut(&mut self, token: &Token) -> Option<&mut Holder> {
        match self {
            Holders::Inline(Some((t, holder))) if t == token => Some(holder),
            Holders::Inline(_) => None,
            Holders::Map(map) => map.get_mut(token),
        }
    }

    fn insert(&mut self, token: Token, holder: Holder) {
        match self {
            Holders::Inline(slot @ None) => *slot = Some((token, holder)),
            Holders::Inline(Some(_)) => {
                // Not reachable for a limit-1 resource (grants check room
                // first); stay correct anyway.
                let Holders::Inline(Some((t, h))) =
                    std::mem::replace(self, Holders::Map(Default::default()))
                else {
                    unreachable!()
                };
                if let Holders::Map(map) = self {
                    map.insert(t, h);
                    map.insert(token, holder);
                }
            }
            Holders::Map(map) => {
                map.insert(token, holder);
            }
        }
    }

    fn remove(&mut self, token: &Token) -> Option<Holder> {
        match self {
            Holders::Inline(slot) if slot.as_ref().is_some_and(|(t, _)| t == token) => {
                slot.take().map(|(_, h)| h)
            }
            Holders::Inline(_) => None,
            Holders::Map(map) => map.remove(token),
        }
    }

    /// Tokens whose lease deadline is at or before `now` (no allocation
    /// when there are none).
    fn expired(&self, now: Duration) -> Vec<Token> {
        match self {
            Holders::Inline(Some((token, holder))) if holder.deadline <= now => vec![*token],
            Holders::Inline(_) => Vec::new(),
            Holders::Map(map) => {
                // Sorted: the map's order is its hasher's, which differs
                // from table to table, and replicas must agree.
                let mut expired: Vec<Token> = map
                    .iter()
                    .filter(|(_, h)| h.deadline <= now)
                    .map(|(t, _)| *t)
                    .collect();
                expired.sort_unstable();
                expired
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&Token, &Holder)> + '_> {
        match self {
            Holders::Inline(slot) => Box::new(slot.iter().map(|(t, h)| (t, h))),
            Holders::Map(map) => Box::new(map.iter()),
        }
    }

    fn holders_mut(&mut self) -> Box<dyn Iterator<Item = &mut Holder> + '_> {
        match self {
            Holders::Inline(slot) => Box::new(slot.iter_mut().map(|(_, h)| h)),
            Holders::Map(map) => Box::new(map.values_mut()),
        }
    }
}

impl Resource {
    fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty()
    }
    fn has_room(&self, now: Duration) -> bool {
        self.holders.len() < self.limit.get() as usize
            && self.blocked_until.is_none_or(|until| now >= until)
    }
}

/// A table's resources, found by their id's cached hash. A lease's slot in
/// the [`Leases`] names it by that hash and its token rather than by a
/// clone of the id, so recording or dropping a lease touches no shared
/// reference count.
struct Resources(hashbrown::HashTable<Resource>);

impl Resources {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Resource> {
        self.0.iter()
    }

    fn get(&self, rid: &ResourceId) -> Option<&Resource> {
        self.0.find(rid.hash(), |r| r.id == *rid)
    }

    fn get_mut(&mut self, rid: &ResourceId) -> Option<&mut Resource> {
        self.0.find_mut(rid.hash(), |r| r.id == *rid)
    }

    /// Adds a resource that is not in the table yet.
    fn insert(&mut self, resource: Resource) {
        self.0
            .insert_unique(resource.id.hash(), resource, |r| r.id.hash());
    }

    /// The resource whose id hashes to `hash` and that `token` holds.
    /// Tokens are unique, so this is at most one, even if ids collide.
    fn holding(&self, hash: u64, token: &Token) -> Option<&Resource> {
        self.0.find(hash, |r| {
            r.id.hash() == hash && r.holders.deadline(token).is_some()
        })
    }

    fn retain(&mut self, keep: impl FnMut(&mut Resource) -> bool) {
        self.0.retain(keep);
    }
}

/// What [`LockTable::remove_holder`] reports of a removed holder.
#[derive(Debug, Clone, Copy)]
struct Removed {
    /// Waiters are queued: the freed slot may go to one of them.
    waiters: bool,
    /// The connection the lease was granted to.
    conn: ConnId,
}

/// What a new request finds at a resource, once [`LockTable::prepare`] has
/// evicted expired holders: taken from the same lookup, so an uncontended
/// acquire does not look the resource up again to decide.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// A slot is free (and no lock delay runs).
    room: bool,
    /// Waiters already queued.
    queued: usize,
}

impl Arrival {
    /// What a request that finds nothing grantable sees.
    const FULL: Arrival = Arrival {
        room: false,
        queued: 0,
    };

    fn at(resource: &Resource, now: Duration) -> Arrival {
        Arrival {
            room: resource.has_room(now),
            queued: resource.queue.len(),
        }
    }

    /// Granted on arrival: room, and nobody ahead (FIFO).
    fn grantable(self) -> bool {
        self.room && self.queued == 0
    }
}

/// Two-phase state for one (connection, resource, ticket). Plain
/// connections always use ticket 0, so they have one per resource; a
/// multiplexed connection names a ticket per handle.
struct Phase1 {
    waiter: Option<WaiterId>,
    token: Option<Token>,
    lease: Lease,
    /// A `w` waits on this place: its request.
    blocked: Option<u64>,
}

struct Conn {
    /// The ring of this connection's leases in the table's [`Leases`], or
    /// [`NO_RING`] before its first grant.
    ring: Slot,
    waiters: HashMap<WaiterId, ResourceId>,
    phase1: HashMap<(ResourceId, u64), Phase1>,
    /// Tickets granted but not collected by a `w` yet, by token (so a
    /// release or expiry of that grant can drop the two-phase state).
    uncollected: HashMap<Token, u64>,
    /// The client session it named (`stable-ref`), if any.
    reference: Option<StableRef>,
    /// Closed, kept for its session to come back until then.
    orphaned_until: Option<Duration>,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            ring: NO_RING,
            waiters: Default::default(),
            phase1: Default::default(),
            uncollected: Default::default(),
            reference: None,
            orphaned_until: None,
        }
    }
}

/// The lock table: a state machine that changes only by
/// [`apply`](Self::apply)ing [`Command`]s. `F` is where its fences come
/// from: its own [`FenceCounter`] (part of its state and snapshot) unless a
/// server shares one source between several tables.
///
/// Time is a [`Duration`] since an arbitrary origin on a monotonic clock,
/// carried by each command.
///
/// ```
/// use std::time::Duration;
/// use dflockd_core::*;
/// use dflockd_proto::{Key, Limit, Namespace};
/// let mut table = LockTable::new(TableConfig::default());
/// let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// let acquire = Op::Acquire { conn: ConnId(1), resource: rid, limit: Limit::ONE, lease: None, wait: None, origin: None };
/// let effects = table.apply(&Command::new(Duration::ZERO, Salt::new(1, 2), acquire));
/// assert!(matches!(effects.outcome, Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))));
/// assert_eq!(table.holder_count(), 1);
/// ```
pub struct LockTable<F = FenceCounter> {
    config: TableConfig,
    mint: Mint<F>,
    /// The resource cap; shared with the other shards of a sharded server.
    budget: Arc<ResourceBudget>,
    resources: Resources,
    conns: HashMap<ConnId, Conn>,
    /// Which connection has each named session (a B-tree: clients choose
    /// the names).
    refs: BTreeMap<StableRef, ConnId>,
    /// Orphaned sessions by the time they are disconnected.
    orphans: BTreeSet<(Duration, ConnId)>,
    /// Every live lease, for the sweep and per connection.
    leases: Leases,
    /// At least the number of entries in all connections' `uncollected`
    /// maps: a release looks its connection up only while this is nonzero.
    uncollected: usize,
    /// Lock-delays in time order: when each blocked resource may grant again.
    delays: BTreeMap<(Duration, ResourceId), ()>,
    /// The latest command time applied, on the clock of the leader that
    /// proposed it (see [`Op::TakeOffice`]).
    latest: Duration,
    next_waiter: u64,
    deliveries: Vec<Delivery>,
    expired: Vec<Expired>,
}

impl LockTable<FenceCounter> {
    /// An empty table with its own fence counter, starting after 0 (see
    /// [`with_fences`](Self::with_fences) for another start).
    ///
    /// ```
    /// let t = dflockd_core::LockTable::new(dflockd_core::TableConfig::default());
    /// assert_eq!(t.resource_count(), 0);
    /// ```
    pub fn new(config: TableConfig) -> Self {
        LockTable::with_fences(config, FenceCounter::default())
    }
}

impl<F: FenceSource> LockTable<F> {
    /// An empty table whose fences come from `fences`.
    ///
    /// ```
    /// use dflockd_core::{FenceCounter, LockTable, TableConfig};
    /// let t = LockTable::with_fences(TableConfig::default(), FenceCounter::starting_after(1_000));
    /// assert_eq!(t.resource_count(), 0);
    /// ```
    pub fn with_fences(config: TableConfig, fences: F) -> Self {
        let budget = Arc::new(ResourceBudget::new(config.max_locks));
        LockTable::sharing(config, fences, budget)
    }

    /// An empty table that counts its resources against `budget`, which
    /// other tables may share: one shard of a server that splits its keys
    /// over several tables. The budget's cap replaces `config.max_locks`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use dflockd_core::*;
    /// use dflockd_proto::{Key, Limit, Namespace};
    /// let budget = Arc::new(ResourceBudget::new(1));
    /// let mut a = LockTable::sharing(TableConfig::default(), FenceCounter::default(), Arc::clone(&budget));
    /// let mut b = LockTable::sharing(TableConfig::default(), FenceCounter::default(), Arc::clone(&budget));
    /// let acquire = |key| Command::new(Duration::ZERO, Salt::new(0, 0), Op::Acquire {
    ///     conn: ConnId(1), resource: ResourceId::new(Namespace::Lock, Key::new(key).unwrap()),
    ///     limit: Limit::ONE, lease: None, wait: None, origin: None,
    /// });
    /// assert!(a.apply(&acquire("x")).outcome.is_ok());
    /// // The one resource the budget allows exists (in the other table).
    /// assert_eq!(b.apply(&acquire("y")).outcome, Err(LockError::MaxLocks));
    /// ```
    pub fn sharing(config: TableConfig, fences: F, budget: Arc<ResourceBudget>) -> Self {
        LockTable {
            config,
            mint: Mint {
                fences,
                salt: Salt::new(0, 0),
                minted: 0,
            },
            budget,
            resources: Resources(hashbrown::HashTable::new()),
            conns: Default::default(),
            refs: BTreeMap::new(),
            orphans: BTreeSet::new(),
            leases: Leases::default(),
            uncollected: 0,
            delays: BTreeMap::new(),
            latest: Duration::ZERO,
            next_waiter: 0,
            deliveries: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// Applies one command: the only way the table changes. Deterministic:
    /// it reads no clock (the time is `command.at`) and no randomness
    /// (token salts come from `command.salt`), so the same commands in the
    /// same order give the same table and the same effects on any node.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::*;
    /// use dflockd_proto::{Key, Limit, Namespace};
    /// let mut table = LockTable::new(TableConfig::default());
    /// let job = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// let acquire = Command::new(Duration::ZERO, Salt::new(0xfeed, 0), Op::Acquire {
    ///     conn: ConnId(1), resource: job, limit: Limit::ONE, lease: None, wait: None, origin: None,
    /// });
    /// let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = table.apply(&acquire).outcome else { panic!() };
    /// assert_eq!((grant.token.fence(), grant.token.salt()), (1, 0xfeed));
    /// ```
    pub fn apply(&mut self, command: &Command) -> Effects {
        self.mint.salt = command.salt;
        self.mint.minted = 0;
        let now = command.at;
        let outcome = match &command.op {
            Op::Acquire {
                conn,
                resource,
                limit,
                lease,
                wait,
                origin,
            } => self
                .acquire(*conn, resource, *limit, *lease, now, *wait, *origin)
                .map(Outcome::Acquire),
            Op::Withdraw {
                conn,
                resource,
                waiter,
            } => Ok(Outcome::Withdrawn(
                self.cancel_acquire(*conn, resource, *waiter, now),
            )),
            Op::Release { resource, token } => self
                .release(resource, *token, now)
                .map(|()| Outcome::Released),
            Op::ReleaseUndelivered { resource, token } => {
                self.release_undelivered(resource, *token, now);
                Ok(Outcome::Released)
            }
            Op::Renew {
                resource,
                token,
                lease,
            } => self
                .renew(resource, *token, *lease, now)
                .map(Outcome::Renewed),
            Op::Enqueue {
                conn,
                ticket,
                resource,
                limit,
                lease,
                origin,
            } => self
                .enqueue(*conn, *ticket, resource, *limit, *lease, now, *origin)
                .map(Outcome::Enqueue),
            Op::Wait {
                conn,
                ticket,
                resource,
                wait,
                origin,
            } => self
                .wait(*conn, *ticket, resource, now, *wait, *origin)
                .map(Outcome::Wait),
            Op::WithdrawPlace {
                conn,
                ticket,
                resource,
                waiter,
            } => Ok(Outcome::Withdrawn(match waiter {
                Some(place) => self.cancel_wait_of(*conn, *ticket, resource, *place, now),
                None => self.cancel_wait(*conn, *ticket, resource, now),
            })),
            Op::Observe {
                resource,
                token,
                lease,
            } => self
                .observe(resource, *token, *lease, now)
                .map(Outcome::Observed),
            Op::Disconnect { conn, auto_release } => {
                if self.orphans_on_close(*conn) {
                    self.orphan(*conn, now);
                } else {
                    let auto_release = auto_release.unwrap_or(self.config.auto_release);
                    self.disconnect(*conn, auto_release, now);
                }
                Ok(Outcome::Disconnected)
            }
            Op::Bind { conn, reference } => Ok(Outcome::Bound(self.bind(*conn, reference, now))),
            Op::Label {
                resource,
                token,
                label,
            } => self
                .label(resource, *token, label)
                .map(|()| Outcome::Labelled),
            Op::Sweep => Ok(Outcome::Swept(self.sweep(now))),
            Op::EndDelays => Ok(Outcome::DelaysEnded(self.end_delays(now))),
            Op::Gc => Ok(Outcome::Collected(self.gc(now))),
            Op::SetPolicy(policy) => {
                self.set_policy(policy);
                Ok(Outcome::PolicySet)
            }
            Op::TakeOffice => Ok(Outcome::OfficeTaken(self.take_office(now))),
        };
        if !matches!(command.op, Op::TakeOffice) {
            self.latest = self.latest.max(now);
        }
        Effects {
            outcome,
            grants: std::mem::take(&mut self.deliveries),
            expired: std::mem::take(&mut self.expired),
        }
    }

    /// A new leader takes office at `now`, on its own clock. Leases that
    /// had run out by the latest command's time end (a lease is never
    /// resurrected); every other lease restarts its full length from
    /// `now`, lock-delays restart in full and idle times from `now`, so a
    /// change of leader never shortens a lease. Returns how many leases
    /// restarted.
    fn take_office(&mut self, now: Duration) -> usize {
        let ended = self.leases.due(self.latest);
        let granularity = self.config.clock_granularity;
        let delay = self.config.disconnect_lock_delay;
        let mut restarted = 0;
        self.delays.clear();
        for resource in self.resources.0.iter_mut() {
            resource.last_activity = now;
            if resource.blocked_until.is_some() {
                let until = now.saturating_add(delay).saturating_add(granularity);
                resource.blocked_until = Some(until);
                self.delays.insert((until, resource.id.clone()), ());
            }
            for holder in resource.holders.holders_mut() {
                holder.deadline = deadline(now, holder.lease, granularity);
                self.leases.set_deadline(holder.slot, holder.deadline);
                restarted += 1;
            }
        }
        self.latest = now;
        self.close_previous_connections(now);
        for (hash, token) in ended {
            let Some(rid) = self.resources.holding(hash, &token).map(|r| r.id.clone()) else {
                continue;
            };
            self.evict(&rid, token, now);
            self.promote(&rid, now);
            restarted -= 1;
        }
        restarted
    }

    fn set_policy(&mut self, policy: &Policy) {
        self.config.default_lease = policy.default_lease;
        self.config.max_locks = policy.max_locks;
        self.config.max_waiters = policy.max_waiters;
        self.config.gc_max_idle = policy.gc_max_idle;
        self.config.disconnect_lock_delay = policy.disconnect_lock_delay;
        self.config.auto_release = policy.auto_release;
        self.config.orphan_ttl = policy.orphan_ttl;
        self.budget.set_max(policy.max_locks);
    }

    /// The table's configuration.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// assert_eq!(table.config().max_locks, 1024);
    /// assert_eq!(table.config().default_lease.get(), 33);
    /// ```
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The latest command time applied, on the clock of the leader that
    /// proposed it: the table's "now" for reading it (for example
    /// [`stats`](Self::stats) between commands).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::*;
    /// let mut table = LockTable::new(TableConfig::default());
    /// let _ = table.apply(&Command::new(Duration::from_secs(7), Salt::new(1, 2), Op::Gc));
    /// assert_eq!(table.latest(), Duration::from_secs(7));
    /// ```
    pub fn latest(&self) -> Duration {
        self.latest
    }

    /// How many resources exist (busy or idle).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = table.apply(&at(0, acquire(1, &rid, None))).outcome else { panic!() };
    /// let _ = table.apply(&at(0, Op::Release { resource: rid.clone(), token: grant.token }));
    /// assert_eq!(table.resource_count(), 1); // idle, but kept until GC
    /// assert_eq!(table.apply(&at(60, Op::Gc)).outcome, Ok(Outcome::Collected(1)));
    /// assert_eq!(table.resource_count(), 0);
    /// ```
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// How many holders exist across all resources.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let sem = ResourceId::new(Namespace::Semaphore, Key::new("pool").unwrap());
    /// for conn in 1..=3 {
    ///     let take = Op::Acquire { conn: ConnId(conn), resource: sem.clone(), limit: Limit::new(3).unwrap(), lease: None, wait: None, origin: None };
    ///     let _ = table.apply(&at(0, take));
    /// }
    /// assert_eq!(table.holder_count(), 3);
    /// ```
    pub fn holder_count(&self) -> usize {
        self.resources.iter().map(|r| r.holders.len()).sum()
    }

    /// How many waiters are queued across all resources.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let _ = table.apply(&at(0, acquire(1, &rid, None)));
    /// let _ = table.apply(&at(0, acquire(2, &rid, Some(0))));
    /// assert_eq!(table.waiter_count(), 1);
    /// // A closed connection stops waiting.
    /// let _ = table.apply(&at(0, Op::Disconnect { conn: ConnId(2), auto_release: None }));
    /// assert_eq!(table.waiter_count(), 0);
    /// ```
    pub fn waiter_count(&self) -> usize {
        self.resources.iter().map(|r| r.queue.len()).sum()
    }

    /// The earliest lease deadline or orphaned session's end, if any:
    /// when an [`Op::Sweep`] has something to do.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// assert_eq!(table.next_deadline(), None);
    /// let op = Op::Acquire { conn: ConnId(1), resource: rid.clone(), limit: Limit::ONE, lease: Some(Lease::new(10).unwrap()), wait: None, origin: None };
    /// let _ = table.apply(&at(0, op));
    /// // The caller sleeps until then and applies `Op::Sweep`.
    /// assert_eq!(table.next_deadline(), Some(Duration::from_secs(10)));
    /// ```
    pub fn next_deadline(&self) -> Option<Duration> {
        match (self.leases.earliest(), self.next_orphan_due()) {
            (Some(lease), Some(orphan)) => Some(lease.min(orphan)),
            (lease, orphan) => lease.or(orphan),
        }
    }

    /// When the earliest disconnect lock-delay ends, if one is running; apply
    /// [`Op::EndDelays`] then to grant the key to its waiters.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let config = TableConfig { disconnect_lock_delay: Duration::from_secs(5), ..TableConfig::default() };
    /// let mut table = LockTable::new(config);
    /// let _ = table.apply(&at(0, acquire(1, &rid, None)));
    /// let _ = table.apply(&at(0, Op::Disconnect { conn: ConnId(1), auto_release: Some(true) }));
    /// assert_eq!(table.next_delay_end(), Some(Duration::from_secs(5)));
    /// ```
    pub fn next_delay_end(&self) -> Option<Duration> {
        self.delays.keys().next().map(|(d, _)| *d)
    }

    /// Whether `rid` is in its disconnect lock-delay at `now` (no grant
    /// before it ends).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Limit, Namespace};
    /// let rid = ResourceId::new(Namespace::Lock, Key::new("k").unwrap());
    /// let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// let config = TableConfig { disconnect_lock_delay: Duration::from_secs(5), ..TableConfig::default() };
    /// let mut table = LockTable::new(config);
    /// let acquire = Op::Acquire { conn: ConnId(1), resource: rid.clone(), limit: Limit::ONE, lease: None, wait: None, origin: None };
    /// let _ = table.apply(&at(0, acquire));
    /// let _ = table.apply(&at(0, Op::Disconnect { conn: ConnId(1), auto_release: Some(true) }));
    /// assert!(table.in_lock_delay(&rid, Duration::from_secs(4)));
    /// assert!(!table.in_lock_delay(&rid, Duration::from_secs(5)));
    /// ```
    pub fn in_lock_delay(&self, rid: &ResourceId, now: Duration) -> bool {
        self.resources
            .get(rid)
            .and_then(|resource| resource.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Every key with waiters, and the connections waiting on it, first
    /// in line first (for dashboards; one entry per waiter).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Limit, Namespace};
    /// let rid = ResourceId::new(Namespace::Lock, Key::new("k").unwrap());
    /// let mut table = LockTable::new(TableConfig::default());
    /// for conn in [1, 2, 3] {
    ///     let op = Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait: Some(0), origin: None };
    ///     let _ = table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
    /// }
    /// assert_eq!(table.queues(), vec![(rid, vec![ConnId(2), ConnId(3)])]);
    /// ```
    pub fn queues(&self) -> Vec<(ResourceId, Vec<ConnId>)> {
        self.resources
            .iter()
            .filter(|r| !r.queue.is_empty())
            .map(|r| (r.id.clone(), r.queue.values().map(|w| w.conn).collect()))
            .collect()
    }

    /// `l` / `sl`. With `wait = None` this is a try-lock: it never queues;
    /// otherwise a queued waiter's grant goes to request `wait` of `conn`.
    /// A retry (`origin` of a hold `conn` has) gets that hold again.
    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        limit: Limit,
        lease: Option<Lease>,
        now: Duration,
        wait: Option<u64>,
        origin: Option<u64>,
    ) -> Result<AcquireOutcome, LockError> {
        let lease = lease.unwrap_or(self.config.default_lease);
        if let Some(origin) = origin {
            if let Some(grant) = self.answered(conn, rid, origin, Some(lease), now) {
                return Ok(AcquireOutcome::Granted(grant));
            }
            // Still queued from before the failover: the place is claimed
            // again, or given up by a retry that no longer waits.
            if let Some(place) = self.detached_waiter(conn, rid, origin) {
                if wait.is_none() {
                    self.cancel_acquire(conn, rid, place, now);
                    return Ok(AcquireOutcome::Timeout);
                }
                if let Some(waiter) = self
                    .resources
                    .get_mut(rid)
                    .and_then(|r| r.queue.get_mut(&place))
                {
                    waiter.detached = false;
                }
                return Ok(AcquireOutcome::Queued(place));
            }
        }
        let arrival = match self.grant_on_arrival(conn, rid, limit, lease, now, origin)? {
            Ok(grant) => return Ok(AcquireOutcome::Granted(grant)),
            Err(arrival) => arrival,
        };
        if self.config.max_waiters > 0 && arrival.queued >= self.config.max_waiters {
            return Err(LockError::MaxWaiters);
        }
        let Some(request) = wait else {
            return Ok(AcquireOutcome::Timeout);
        };
        let id = self.push_waiter(conn, rid, lease, WaiterKind::Blocking(request));
        Ok(AcquireOutcome::Queued(id))
    }

    /// Withdraws a waiter queued by an acquire (timeout or
    /// cancellation). Returns `false` if it is no longer queued: it has been
    /// granted, and that grant is (or was) in a [`Delivery`].
    fn cancel_acquire(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        waiter: WaiterId,
        now: Duration,
    ) -> bool {
        let Some(resource) = self.resources.get_mut(rid) else {
            return false;
        };
        if resource.queue.remove(&waiter).is_none() {
            return false;
        }
        resource.last_activity = now;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.waiters.remove(&waiter);
        }
        self.promote(rid, now);
        true
    }

    /// `r` / `sr`: releases the holder with this token and promotes waiters.
    /// Looks at no deadline: an expired holder that was not evicted yet can
    /// still be released.
    fn release(&mut self, rid: &ResourceId, token: Token, now: Duration) -> Result<(), LockError> {
        let removed = self
            .remove_holder(rid, token, now)
            .ok_or(LockError::NotHeld)?;
        if removed.waiters {
            self.promote(rid, now);
        }
        Ok(())
    }

    /// Releases a grant that could not be delivered because its request was
    /// cancelled, so the slot passes to the next waiter instead of leaking.
    fn release_undelivered(&mut self, rid: &ResourceId, token: Token, now: Duration) {
        if self
            .remove_holder(rid, token, now)
            .is_some_and(|removed| removed.waiters)
        {
            self.promote(rid, now);
        }
    }

    /// `n` / `sn`: extends a live lease to `now + lease`. A lease at or past
    /// its deadline is evicted on the spot and never resurrected.
    fn renew(
        &mut self,
        rid: &ResourceId,
        token: Token,
        lease: Option<Lease>,
        now: Duration,
    ) -> Result<Lease, LockError> {
        let lease = lease.unwrap_or(self.config.default_lease);
        self.restart_lease(rid, token, lease, now)
            .ok_or(LockError::NotHeld)?;
        if let Some(resource) = self.resources.get_mut(rid) {
            resource.last_activity = now;
        }
        Ok(lease)
    }

    /// `label`: the live holder with `token` proclaims `label`.
    fn label(&mut self, rid: &ResourceId, token: Token, label: &Label) -> Result<(), LockError> {
        let holder = self
            .resources
            .get_mut(rid)
            .and_then(|r| r.holders.get_mut(&token))
            .ok_or(LockError::NotHeld)?;
        holder.label = Some(label.clone());
        Ok(())
    }

    /// `e` / `se`: two-phase, phase 1. A retry (`origin` set) of an `e`
    /// whose place exists is answered with the place's state.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        limit: Limit,
        lease: Option<Lease>,
        now: Duration,
        origin: Option<u64>,
    ) -> Result<EnqueueOutcome, LockError> {
        let place = self
            .conns
            .get(&conn)
            .and_then(|c| c.phase1.get(&(rid.clone(), ticket)))
            .map(|place| (place.token, place.lease));
        match (place, origin) {
            (None, _) => {}
            (Some(_), None) => return Err(LockError::AlreadyEnqueued),
            (Some((None, _)), Some(_)) => return Ok(EnqueueOutcome::Queued),
            (Some((Some(token), lease)), Some(_)) => {
                // Granted, not collected: the grant again, lease restarted.
                if self.restart_lease(rid, token, lease, now).is_some() {
                    return Ok(EnqueueOutcome::Acquired(Grant { token, lease }));
                }
                // It ran out meanwhile (and went): enqueue afresh.
                self.drop_phase1(conn, rid, ticket);
            }
        }
        let lease = lease.unwrap_or(self.config.default_lease);
        let arrival = match self.grant_on_arrival(conn, rid, limit, lease, now, origin)? {
            Ok(grant) => {
                self.set_phase1(
                    conn,
                    rid,
                    ticket,
                    Phase1 {
                        waiter: None,
                        token: Some(grant.token),
                        lease,
                        blocked: None,
                    },
                );
                return Ok(EnqueueOutcome::Acquired(grant));
            }
            Err(arrival) => arrival,
        };
        if self.config.max_waiters > 0 && arrival.queued >= self.config.max_waiters {
            return Err(LockError::MaxWaiters);
        }
        let id = self.push_waiter(conn, rid, lease, WaiterKind::TwoPhase(ticket));
        self.set_phase1(
            conn,
            rid,
            ticket,
            Phase1 {
                waiter: Some(id),
                token: None,
                lease,
                blocked: None,
            },
        );
        Ok(EnqueueOutcome::Queued)
    }

    fn set_phase1(&mut self, conn: ConnId, rid: &ResourceId, ticket: u64, phase1: Phase1) {
        let c = self.conns.entry(conn).or_default();
        if let Some(token) = phase1.token
            && c.uncollected.insert(token, ticket).is_none()
        {
            self.uncollected += 1;
        }
        c.phase1.insert((rid.clone(), ticket), phase1);
    }

    /// `w` / `sw`: two-phase, phase 2. With `wait = None` this polls; a
    /// still-queued waiter is then removed (the position is forfeited).
    /// A retry (`origin` of a grant this `w` already collected) gets that
    /// grant again.
    fn wait(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        now: Duration,
        wait: Option<u64>,
        origin: Option<u64>,
    ) -> Result<WaitOutcome, LockError> {
        let Some(phase1) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.phase1.get_mut(&(rid.clone(), ticket)))
        else {
            return origin
                .and_then(|origin| self.answered(conn, rid, origin, None, now))
                .map(WaitOutcome::Granted)
                .ok_or(LockError::NotEnqueued);
        };
        // A `w` is already waiting on this ticket (only possible on a
        // multiplexed connection): a second one must not replace it, or the
        // first would never be answered.
        if phase1.blocked.is_some() {
            return Err(LockError::AlreadyEnqueued);
        }
        if let Some(token) = phase1.token {
            let lease = phase1.lease;
            self.drop_phase1(conn, rid, ticket);
            let granted = self.observe(rid, token, lease, now);
            if let Some(holder) = self
                .resources
                .get_mut(rid)
                .and_then(|r| r.holders.get_mut(&token))
            {
                holder.origin = origin;
            }
            return granted.map(WaitOutcome::Granted);
        }
        // Not granted, so queued: the place is there (a state with neither
        // is never made; answer as if nothing were enqueued).
        let place = phase1.waiter.ok_or(LockError::NotEnqueued)?;
        match wait {
            Some(request) => {
                phase1.blocked = Some(request);
                Ok(WaitOutcome::Pending(place))
            }
            None => {
                self.cancel_wait(conn, ticket, rid, now);
                Ok(WaitOutcome::Timeout)
            }
        }
    }

    /// Gives up a blocked or polled `w`: removes the waiter and the two-phase
    /// state. Returns `false` if the waiter was already granted (the grant is
    /// in a [`Delivery`]).
    fn cancel_wait(&mut self, conn: ConnId, ticket: u64, rid: &ResourceId, now: Duration) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let key = (rid.clone(), ticket);
        let Some(phase1) = c.phase1.get(&key) else {
            return false;
        };
        let Some(waiter) = phase1.waiter else {
            return false;
        };
        c.phase1.remove(&key);
        c.waiters.remove(&waiter);
        if let Some(resource) = self.resources.get_mut(rid)
            && resource.queue.remove(&waiter).is_some()
        {
            resource.last_activity = now;
        }
        self.promote(rid, now);
        true
    }

    /// The waiter holding the queue place of (`conn`, `ticket`, `rid`), while
    /// it is queued (not granted yet).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let _ = table.apply(&at(0, acquire(1, &rid, None)));
    /// let enqueue = Op::Enqueue { conn: ConnId(2), ticket: 7, resource: rid.clone(), limit: Limit::ONE, lease: None, origin: None };
    /// let _ = table.apply(&at(0, enqueue));
    /// assert!(table.queued_place(ConnId(2), 7, &rid).is_some());
    /// assert!(table.queued_place(ConnId(2), 8, &rid).is_none());
    /// ```
    pub fn queued_place(&self, conn: ConnId, ticket: u64, rid: &ResourceId) -> Option<WaiterId> {
        self.conns
            .get(&conn)?
            .phase1
            .get(&(rid.clone(), ticket))?
            .waiter
    }

    /// [`cancel_wait`](Self::cancel_wait), but only while the place is still
    /// held by `waiter`: on a multiplexed connection the same ticket may have
    /// been granted and enqueued again since, and that newer place must not
    /// be withdrawn in the old request's name.
    fn cancel_wait_of(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        waiter: WaiterId,
        now: Duration,
    ) -> bool {
        self.queued_place(conn, ticket, rid) == Some(waiter)
            && self.cancel_wait(conn, ticket, rid, now)
    }

    /// How many waiters connection `conn` has queued (blocking requests and
    /// two-phase places together).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let _ = table.apply(&at(0, acquire(1, &rid, None)));
    /// for ticket in [1, 2] {
    ///     let enqueue = Op::Enqueue { conn: ConnId(2), ticket, resource: rid.clone(), limit: Limit::ONE, lease: None, origin: None };
    ///     let _ = table.apply(&at(0, enqueue));
    /// }
    /// assert_eq!(table.waiters_of(ConnId(2)), 2);
    /// ```
    pub fn waiters_of(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.waiters.len())
    }

    /// Restarts the lease of a grant that its waiting request has just
    /// observed (`now + lease`). Fails with `LeaseExpired` if it already ran
    /// out (and evicts it).
    fn observe(
        &mut self,
        rid: &ResourceId,
        token: Token,
        lease: Lease,
        now: Duration,
    ) -> Result<Grant, LockError> {
        self.restart_lease(rid, token, lease, now)
            .ok_or(LockError::LeaseExpired)?;
        Ok(Grant { token, lease })
    }

    /// Restarts a live holder's lease at `now + lease`. A holder at or past
    /// its deadline is evicted instead (and waiters promoted): leases are
    /// never resurrected. `None` if the token holds nothing (any more).
    fn restart_lease(
        &mut self,
        rid: &ResourceId,
        token: Token,
        lease: Lease,
        now: Duration,
    ) -> Option<()> {
        let resource = self.resources.get_mut(rid)?;
        let holder = resource.holders.get_mut(&token)?;
        if holder.deadline <= now {
            self.evict(rid, token, now);
            self.promote(rid, now);
            return None;
        }
        holder.deadline = deadline(now, lease, self.config.clock_granularity);
        holder.lease = lease;
        self.leases.set_deadline(holder.slot, holder.deadline);
        Some(())
    }

    /// A connection ended: its waiters are removed and its two-phase state
    /// dropped; with `auto_release` its holds are released too (otherwise they
    /// stay until their leases expire).
    fn disconnect(&mut self, conn: ConnId, auto_release: bool, now: Duration) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(reference) = &c.reference
            && self.refs.get(reference) == Some(&conn)
        {
            self.refs.remove(reference);
        }
        if let Some(until) = c.orphaned_until {
            self.orphans.remove(&(until, conn));
        }
        self.uncollected = self.uncollected.saturating_sub(c.uncollected.len());
        let mut touched = Vec::new();
        // In arrival order, not the map's (its hasher differs from table to
        // table): promotions mint fences in this order, and replicas must
        // agree on them.
        let mut waiters: Vec<(WaiterId, ResourceId)> = c.waiters.into_iter().collect();
        waiters.sort_unstable_by_key(|(waiter, _)| *waiter);
        for (waiter, rid) in waiters {
            if let Some(resource) = self.resources.get_mut(&rid)
                && resource.queue.remove(&waiter).is_some()
            {
                resource.last_activity = now;
            }
            touched.push(rid);
        }
        if c.ring != NO_RING {
            if auto_release {
                for (hash, token) in self.leases.in_ring(c.ring) {
                    let Some(resource) = self.resources.holding(hash, &token) else {
                        continue;
                    };
                    let rid = resource.id.clone();
                    let deadline = resource.holders.deadline(&token);
                    self.remove_holder(&rid, token, now);
                    if let Some(deadline) = deadline {
                        self.delay_after_disconnect(&rid, deadline, now);
                    }
                    touched.push(rid);
                }
            }
            // With auto-release the ring is empty now; without, its leases
            // live on, each in a ring of its own.
            self.leases.drop_ring(c.ring);
        }
        // Without auto-release the holds stay (owned by this dead connection)
        // until their leases expire or someone releases them by token.
        for rid in touched {
            self.promote(&rid, now);
        }
    }

    /// Evicts every holder whose lease deadline is at or before `now` and
    /// promotes waiters into the freed capacity. Returns how many leases
    /// were evicted.
    fn sweep(&mut self, now: Duration) -> usize {
        self.end_delays(now);
        self.expire_orphans(now);
        let mut evicted = 0;
        for (hash, token) in self.leases.due(now) {
            let Some(rid) = self.resources.holding(hash, &token).map(|r| r.id.clone()) else {
                continue;
            };
            self.evict(&rid, token, now);
            self.promote(&rid, now);
            evicted += 1;
        }
        evicted
    }

    /// Ends every disconnect lock-delay due by `now` and grants the keys to
    /// their waiters. Returns how many delays ended.
    fn end_delays(&mut self, now: Duration) -> usize {
        let mut ended = 0;
        while let Some(entry) = self.delays.first_entry() {
            let (until, _) = entry.key();
            if *until > now {
                break;
            }
            let ((until, rid), ()) = entry.remove_entry();
            if let Some(resource) = self.resources.get_mut(&rid)
                && resource.blocked_until == Some(until)
            {
                resource.blocked_until = None;
            }
            self.promote(&rid, now);
            ended += 1;
        }
        ended
    }

    /// Deletes resources that have had no holder and no waiter for longer
    /// than `gc_max_idle`. Returns how many were deleted.
    fn gc(&mut self, now: Duration) -> usize {
        let max_idle = self.config.gc_max_idle;
        let before = self.resources.len();
        // A resource in lock-delay is kept: forgetting it would end the delay.
        self.resources.retain(|r| {
            !(r.is_idle()
                && r.blocked_until.is_none_or(|until| now >= until)
                && now.saturating_sub(r.last_activity) >= max_idle)
        });
        // Connections that kept holds only for ownership records (auto-release off) and
        // hold nothing any more can go too.
        let leases = &mut self.leases;
        let uncollected = &mut self.uncollected;
        self.conns.retain(|_, c| {
            let holds = c.ring != NO_RING && !leases.ring_is_empty(c.ring);
            // A named session stays until its connection closes (or its
            // orphan time ends): its name must keep finding it.
            let keep =
                holds || !c.waiters.is_empty() || !c.phase1.is_empty() || c.reference.is_some();
            if !keep {
                if c.ring != NO_RING {
                    leases.drop_ring(c.ring);
                }
                *uncollected = uncollected.saturating_sub(c.uncollected.len());
            }
            keep
        });
        let removed = before - self.resources.len();
        self.budget.give_back(removed);
        removed
    }

    /// The `stats` document, with `connections` supplied by the caller.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use dflockd_core::*;
    /// # use dflockd_proto::{Key, Lease, Limit, Namespace};
    /// # let mut table = LockTable::new(TableConfig::default());
    /// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
    /// # let t0 = Duration::ZERO;
    /// # let at = |secs, op| Command::new(Duration::from_secs(secs), Salt::new(0, 0), op);
    /// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
    /// let _ = table.apply(&at(0, acquire(1, &rid, None)));
    /// let stats = table.stats(1, Duration::from_secs(3));
    /// assert_eq!(stats.locks[0].key, "job");
    /// assert_eq!(stats.locks[0].owner_conn_id, 1);
    /// assert_eq!(stats.locks[0].lease_expires_in_s, 30.0);
    /// ```
    pub fn stats(&self, connections: u64, now: Duration) -> Stats {
        let mut stats = Stats {
            connections,
            ..Stats::default()
        };
        for r in self.resources.iter() {
            let key = r.id.key().to_string_lossy();
            let limit = r.limit.get();
            if r.is_idle() {
                let entry = IdleEntry {
                    key,
                    idle_s: now.saturating_sub(r.last_activity).as_secs_f64(),
                };
                if limit == 1 {
                    stats.idle_locks.push(entry);
                } else {
                    stats.idle_semaphores.push(entry);
                }
            } else if limit == 1 {
                let holder = r.holders.iter().next().map(|(_, h)| h);
                let held = r.holders.iter().next();
                stats.locks.push(LockEntry {
                    key,
                    fence: held.map(|(token, _)| token.fence()),
                    label: held.and_then(|(_, h)| h.label.as_ref().map(|l| l.to_string())),
                    owner_conn_id: holder.map_or(0, |h| h.conn.0),
                    // The lease as granted: the clock's allowance left out.
                    lease_expires_in_s: holder.map_or(0.0, |h| {
                        h.deadline
                            .saturating_sub(now)
                            .saturating_sub(self.config.clock_granularity)
                            .as_secs_f64()
                    }),
                    waiters: r.queue.len() as u64,
                });
            } else {
                stats.semaphores.push(SemaphoreEntry {
                    key,
                    limit: u64::from(limit),
                    holders: r.holders.len() as u64,
                    waiters: r.queue.len() as u64,
                });
            }
        }
        stats
    }

    /// Starts a lock-delay on `rid` after its holder's connection closed:
    /// `min(remaining lease, configured delay)`.
    fn delay_after_disconnect(&mut self, rid: &ResourceId, deadline: Duration, now: Duration) {
        let configured = self.config.disconnect_lock_delay;
        if configured.is_zero() {
            return;
        }
        // At most the rest of the lease (whose deadline has the clock's
        // allowance already); a configured delay gets the allowance too.
        let until = deadline.min(
            now.saturating_add(configured)
                .saturating_add(self.config.clock_granularity),
        );
        if until <= now {
            return;
        }
        let Some(resource) = self.resources.get_mut(rid) else {
            return;
        };
        if resource
            .blocked_until
            .is_some_and(|current| current >= until)
        {
            return;
        }
        if let Some(previous) = resource.blocked_until.replace(until) {
            self.delays.remove(&(previous, rid.clone()));
        }
        self.delays.insert((until, rid.clone()), ());
    }

    /// Resolves or creates the resource, checks its limit, evicts its
    /// expired holders and promotes waiters (so nobody queues behind a dead
    /// lease).
    fn prepare(
        &mut self,
        rid: &ResourceId,
        limit: Limit,
        now: Duration,
    ) -> Result<Arrival, LockError> {
        let Some(resource) = self.resources.get_mut(rid) else {
            if !self.budget.try_take() {
                return Err(LockError::MaxLocks);
            }
            let resource = Resource {
                id: rid.clone(),
                limit,
                holders: Holders::new(limit),
                queue: BTreeMap::new(),
                last_activity: now,
                blocked_until: None,
            };
            let arrival = Arrival::at(&resource, now);
            self.resources.insert(resource);
            return Ok(arrival);
        };
        if resource.limit != limit {
            return Err(LockError::LimitMismatch);
        }
        resource.last_activity = now;
        let expired = resource.holders.expired(now);
        if expired.is_empty() {
            return Ok(Arrival::at(resource, now));
        }
        for token in expired {
            self.evict(rid, token, now);
        }
        self.promote(rid, now);
        Ok(self
            .resources
            .get(rid)
            .map_or(Arrival::FULL, |resource| Arrival::at(resource, now)))
    }

    /// What a request that may take `rid` finds on arrival: granted at once
    /// (room, and nobody ahead), or else the [`Arrival`] it must wait
    /// behind. Either way the resource is resolved first (`prepare`).
    ///
    /// Always inlined: left a call (the compiler ignored a plain `#[inline]`
    /// with two callers) it cost the acquire path about half of what its
    /// one-lookup fast path saves (callgrind).
    #[inline(always)]
    fn grant_on_arrival(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        limit: Limit,
        lease: Lease,
        now: Duration,
        origin: Option<u64>,
    ) -> Result<Result<Grant, Arrival>, LockError> {
        // The common case in one lookup: the resource is known, free, not in
        // a lock-delay, and nobody waits (what `prepare` then `grant_now`
        // would find and do).
        if let Some(resource) = self.resources.get_mut(rid)
            && resource.limit == limit
            && resource.holders.is_empty()
            && resource.queue.is_empty()
            && resource.blocked_until.is_none()
        {
            resource.last_activity = now;
            let token = self.mint.token()?;
            let deadline = deadline(now, lease, self.config.clock_granularity);
            hold(
                &mut self.conns,
                &mut self.leases,
                resource,
                conn,
                (token, lease, origin),
                deadline,
            );
            return Ok(Ok(Grant { token, lease }));
        }
        let arrival = self.prepare(rid, limit, now)?;
        if arrival.grantable() {
            return self.grant_now(conn, rid, lease, now, origin).map(Ok);
        }
        Ok(Err(arrival))
    }

    fn grant_now(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        lease: Lease,
        now: Duration,
        origin: Option<u64>,
    ) -> Result<Grant, LockError> {
        let token = self.mint.token()?;
        self.insert_holder(conn, rid, (token, lease, origin), now);
        Ok(Grant { token, lease })
    }

    /// The grant `conn` already got for its request `origin` on `rid`, its
    /// lease restarted at `now + lease` (`None`: the hold's own length) —
    /// a retry of that request is answered with it. `None` if there is
    /// none, or it ran out.
    fn answered(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        origin: u64,
        lease: Option<Lease>,
        now: Duration,
    ) -> Option<Grant> {
        let (token, held) = self.answered_hold(conn, rid, origin)?;
        let lease = lease.unwrap_or(held);
        self.restart_lease(rid, token, lease, now)?;
        Some(Grant { token, lease })
    }

    /// The detached blocking waiter of `conn` on `rid` for request `origin`.
    fn detached_waiter(&self, conn: ConnId, rid: &ResourceId, origin: u64) -> Option<WaiterId> {
        let resource = self.resources.get(rid)?;
        let c = self.conns.get(&conn)?;
        c.waiters
            .iter()
            .filter(|(_, waiting_on)| *waiting_on == rid)
            .map(|(id, _)| *id)
            .find(|id| {
                resource.queue.get(id).is_some_and(|w| {
                    w.detached
                        && matches!(w.kind, WaiterKind::Blocking(request) if request == origin)
                })
            })
    }

    /// The token and lease length of `conn`'s hold on `rid` from request
    /// `origin`.
    fn answered_hold(&self, conn: ConnId, rid: &ResourceId, origin: u64) -> Option<(Token, Lease)> {
        let resource = self.resources.get(rid)?;
        resource
            .holders
            .iter()
            .find(|(_, h)| h.conn == conn && h.origin == Some(origin))
            .map(|(token, h)| (*token, h.lease))
    }

    fn insert_holder(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        (token, lease, origin): (Token, Lease, Option<u64>),
        now: Duration,
    ) {
        let deadline = deadline(now, lease, self.config.clock_granularity);
        let Some(resource) = self.resources.get_mut(rid) else {
            return;
        };
        resource.last_activity = now;
        hold(
            &mut self.conns,
            &mut self.leases,
            resource,
            conn,
            (token, lease, origin),
            deadline,
        );
    }

    /// Removes a holder whose lease ran out, and reports it in the effects.
    fn evict(&mut self, rid: &ResourceId, token: Token, now: Duration) {
        if let Some(removed) = self.remove_holder(rid, token, now) {
            self.expired.push(Expired {
                resource: rid.clone(),
                token,
                conn: removed.conn,
            });
        }
    }

    /// Removes a holder and everything that points at it.
    fn remove_holder(&mut self, rid: &ResourceId, token: Token, now: Duration) -> Option<Removed> {
        let resource = self.resources.get_mut(rid)?;
        let holder = resource.holders.remove(&token)?;
        resource.last_activity = now;
        let removed = Removed {
            waiters: !resource.queue.is_empty(),
            conn: holder.conn,
        };
        self.leases.remove(holder.slot);
        if self.uncollected > 0
            && let Some(c) = self.conns.get_mut(&holder.conn)
            && let Some(ticket) = c.uncollected.remove(&token)
        {
            self.uncollected -= 1;
            c.phase1.remove(&(rid.clone(), ticket));
        }
        Some(removed)
    }

    fn push_waiter(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        lease: Lease,
        kind: WaiterKind,
    ) -> WaiterId {
        self.next_waiter += 1;
        let id = WaiterId(self.next_waiter);
        if let Some(resource) = self.resources.get_mut(rid) {
            resource.queue.insert(
                id,
                Waiter {
                    conn,
                    lease,
                    kind,
                    detached: false,
                },
            );
        }
        self.conns
            .entry(conn)
            .or_default()
            .waiters
            .insert(id, rid.clone());
        id
    }

    fn drop_phase1(&mut self, conn: ConnId, rid: &ResourceId, ticket: u64) {
        if let Some(c) = self.conns.get_mut(&conn)
            && let Some(phase1) = c.phase1.remove(&(rid.clone(), ticket))
            && let Some(token) = phase1.token
            && c.uncollected.remove(&token).is_some()
        {
            self.uncollected -= 1;
        }
    }

    /// Moves waiters from the head of the queue into free capacity, minting
    /// a fresh token for each at this moment.
    fn promote(&mut self, rid: &ResourceId, now: Duration) {
        loop {
            let Some(resource) = self.resources.get_mut(rid) else {
                return;
            };
            if !resource.has_room(now) {
                return;
            }
            let Some(entry) = resource.queue.first_entry() else {
                return;
            };
            let token = match self.mint.token() {
                Ok(token) => token,
                // Leave the waiter queued; the next release or sweep retries.
                Err(_) => return,
            };
            let (id, waiter) = entry.remove_entry();
            // The request the grant is answered to, if it is delivered now.
            let origin = match waiter.kind {
                WaiterKind::Blocking(request) => Some(request),
                WaiterKind::TwoPhase(ticket) => self
                    .conns
                    .get(&waiter.conn)
                    .and_then(|c| c.phase1.get(&(rid.clone(), ticket)))
                    .and_then(|place| place.blocked),
            };
            self.insert_holder(waiter.conn, rid, (token, waiter.lease, origin), now);
            let grant = Grant {
                token,
                lease: waiter.lease,
            };
            let c = self.conns.entry(waiter.conn).or_default();
            c.waiters.remove(&id);
            match waiter.kind {
                // Nobody to deliver it to: kept as a hold for the retry.
                WaiterKind::Blocking(_) if waiter.detached => {}
                WaiterKind::Blocking(request) => {
                    self.deliveries.push(Delivery {
                        to: Waiting {
                            conn: waiter.conn,
                            request,
                        },
                        resource: rid.clone(),
                        grant,
                    });
                }
                WaiterKind::TwoPhase(ticket) => {
                    let key = (rid.clone(), ticket);
                    let Some(phase1) = c.phase1.get_mut(&key) else {
                        continue;
                    };
                    match phase1.blocked.take() {
                        // A `w` is waiting: it consumes the state and observes the grant.
                        Some(request) => {
                            c.phase1.remove(&key);
                            self.deliveries.push(Delivery {
                                to: Waiting {
                                    conn: waiter.conn,
                                    request,
                                },
                                resource: rid.clone(),
                                grant,
                            });
                        }
                        None => {
                            phase1.waiter = None;
                            phase1.token = Some(token);
                            if c.uncollected.insert(token, ticket).is_none() {
                                self.uncollected += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Tokens for the command being applied: fences from the table's source,
/// salts from the command.
struct Mint<F> {
    fences: F,
    salt: Salt,
    /// Grants the command has minted so far.
    minted: u32,
}

impl<F: FenceSource> Mint<F> {
    /// A token for the command's next grant.
    fn token(&mut self) -> Result<Token, MintError> {
        let fence = self.fences.next_fence()?;
        let salt = self.salt.for_grant(self.minted, fence);
        self.minted = self.minted.wrapping_add(1);
        Ok(Token::new(fence, salt))
    }
}

/// Makes `conn` a holder of `resource` with `token` until `deadline`: the
/// holder, and its lease in the slab, in its connection's ring.
fn hold(
    conns: &mut HashMap<ConnId, Conn>,
    leases: &mut Leases,
    resource: &mut Resource,
    conn: ConnId,
    (token, lease, origin): (Token, Lease, Option<u64>),
    deadline: Duration,
) {
    let c = conns.entry(conn).or_default();
    if c.ring == NO_RING {
        c.ring = leases.new_ring();
    }
    let slot = leases.insert(c.ring, token, resource.id.hash(), deadline);
    resource.holders.insert(
        token,
        Holder {
            conn,
            deadline,
            lease,
            slot,
            origin,
            label: None,
        },
    );
}

/// When a lease granted or renewed at `now` ends, on a clock that may lag
/// by `granularity` (see [`TableConfig::clock_granularity`]).
fn deadline(now: Duration, lease: Lease, granularity: Duration) -> Duration {
    now.saturating_add(lease.as_duration())
        .saturating_add(granularity)
}

impl<F> Drop for LockTable<F> {
    fn drop(&mut self) {
        // A shared budget outlives this table.
        self.budget.give_back(self.resources.len());
    }
}

impl<F> std::fmt::Debug for LockTable<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockTable")
            .field("resources", &self.resources.len())
            .field("connections", &self.conns.len())
            .field(
                "leases",
                &self
                    .resources
                    .iter()
                    .map(|r| r.holders.len())
                    .sum::<usize>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FenceCounter;
    use dflockd_proto::Key;

    /// Two resources whose ids hash alike (the keyed hash makes this
    /// astronomically rare, so it is forced here).
    fn colliding() -> (ResourceId, ResourceId) {
        let named = |key: &str| {
            ResourceId::with_hash(dflockd_proto::Namespace::Lock, Key::new(key).unwrap(), 42)
        };
        (named("a"), named("b"))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    impl<F> LockTable<F> {
        /// Every holder's lease is in the slab, in the slot it remembers,
        /// with its token, resource and deadline, and nothing else is.
        fn assert_leases_match_holders(&self) {
            let mut holders = 0;
            for resource in self.resources.iter() {
                for (token, holder) in resource.holders.iter() {
                    holders += 1;
                    assert_eq!(
                        self.leases.lease_at(holder.slot),
                        Some((resource.id.hash(), *token, holder.deadline))
                    );
                }
            }
            assert_eq!(self.leases.len(), holders);
        }
    }

    /// Random grants, renewals, releases, waits, sweeps and disconnects
    /// (with and without auto-release) on locks and a semaphore keep the
    /// lease slab exactly in step with the holders.
    #[test]
    fn the_lease_slab_follows_every_holder() {
        let config = TableConfig {
            disconnect_lock_delay: Duration::ZERO,
            ..TableConfig::default()
        };
        let mut t = LockTable::with_fences(config, FenceCounter::starting_after(1));
        let rids: Vec<(ResourceId, Limit)> = [("a", 1), ("b", 1), ("s", 3)]
            .into_iter()
            .map(|(key, limit)| {
                let namespace = if limit == 1 {
                    dflockd_proto::Namespace::Lock
                } else {
                    dflockd_proto::Namespace::Semaphore
                };
                (
                    ResourceId::new(namespace, Key::new(key).unwrap()),
                    Limit::new(limit).unwrap(),
                )
            })
            .collect();
        let mut held: Vec<(usize, Token)> = Vec::new();
        // A fixed xorshift sequence: reproducible, no extra dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut now = secs(0);
        for _ in 0..20_000 {
            let conn = ConnId(next(5));
            let r = next(3) as usize;
            let (rid, limit) = &rids[r];
            match next(7) {
                0 | 1 => {
                    let lease = Lease::new(1 + next(20)).ok();
                    let wait = (next(2) == 0).then_some(0);
                    if let Ok(AcquireOutcome::Granted(grant)) =
                        t.acquire(conn, rid, *limit, lease, now, wait, None)
                    {
                        held.push((r, grant.token));
                    }
                }
                2 if !held.is_empty() => {
                    let (r, token) = held.swap_remove(next(held.len() as u64) as usize);
                    let _ = t.release(&rids[r].0, token, now);
                }
                3 if !held.is_empty() => {
                    let (r, token) = held[next(held.len() as u64) as usize];
                    let _ = t.renew(&rids[r].0, token, Lease::new(1 + next(20)).ok(), now);
                }
                4 => now += Duration::from_millis(next(3_000)),
                5 => {
                    t.sweep(now);
                }
                _ => t.disconnect(conn, next(2) == 0, now),
            }
            for delivery in std::mem::take(&mut t.deliveries) {
                let r = rids
                    .iter()
                    .position(|(rid, _)| *rid == delivery.resource)
                    .unwrap();
                held.push((r, delivery.grant.token));
            }
            t.assert_leases_match_holders();
        }
        t.sweep(now + secs(1_000));
        assert_eq!(t.holder_count(), 0);
        t.assert_leases_match_holders();
    }

    /// A new leader on a clock of its own: a live lease restarts in full
    /// from the new time (never shorter), one that had run out by the
    /// latest command ends, a lock-delay restarts in full, and the earlier
    /// leader's connections are gone: their waiters leave the queues.
    #[test]
    fn taking_office_restarts_live_leases_and_ends_run_out_ones() {
        let config = TableConfig {
            disconnect_lock_delay: secs(4),
            ..TableConfig::default()
        };
        let mut t = LockTable::new(config);
        let at = |secs_: u64, op| Command::new(secs(secs_), Salt::new(1, 2), op);
        let acquire = |conn, key: &str, lease, wait| Op::Acquire {
            conn: ConnId(conn),
            resource: ResourceId::new(dflockd_proto::Namespace::Lock, Key::new(key).unwrap()),
            limit: Limit::ONE,
            lease: Lease::new(lease).ok(),
            wait,
            origin: None,
        };
        // `a` (lease 10) and `b` (lease 3) at 100; a waiter behind `b`;
        // `c` released with a lock-delay by a closing connection.
        let _ = t.apply(&at(100, acquire(1, "a", 10, None)));
        let _ = t.apply(&at(100, acquire(2, "b", 3, None)));
        let _ = t.apply(&at(100, acquire(3, "b", 3, Some(9))));
        let _ = t.apply(&at(100, acquire(4, "c", 10, None)));
        let _ = t.apply(&at(
            100,
            Op::Disconnect {
                conn: ConnId(4),
                auto_release: Some(true),
            },
        ));
        // The latest command is at 104: `b` ran out at 103, `a` has 6 s left.
        let _ = t.apply(&at(104, Op::Gc));
        // The new leader's clock reads 2.
        let effects = t.apply(&at(2, Op::TakeOffice));
        assert_eq!(effects.outcome, Ok(Outcome::OfficeTaken(1)));
        assert_eq!(effects.expired.len(), 1, "`b` ran out before the change");
        assert!(
            effects.grants.is_empty(),
            "its waiter left with its connection"
        );
        assert_eq!(t.waiter_count(), 0);
        let deadline_of = |t: &LockTable, key: &str| {
            let rid = ResourceId::new(dflockd_proto::Namespace::Lock, Key::new(key).unwrap());
            t.resources
                .get(&rid)
                .unwrap()
                .holders
                .iter()
                .next()
                .map(|(_, h)| h.deadline)
        };
        assert_eq!(
            deadline_of(&t, "a"),
            Some(secs(12)),
            "restarted in full: 2 + 10"
        );
        assert_eq!(deadline_of(&t, "b"), None, "free");
        assert_eq!(
            t.next_delay_end(),
            Some(secs(6)),
            "the lock-delay restarted: 2 + 4"
        );
        t.assert_leases_match_holders();
        // The sweep follows the new clock.
        assert_eq!(t.apply(&at(11, Op::Sweep)).outcome, Ok(Outcome::Swept(0)));
        assert_eq!(t.apply(&at(12, Op::Sweep)).outcome, Ok(Outcome::Swept(1)));
    }

    #[test]
    fn leases_on_resources_with_one_hash_stay_apart() {
        let mut t = LockTable::with_fences(TableConfig::default(), FenceCounter::starting_after(1));
        let (a, b) = colliding();
        let grant = |t: &mut LockTable<FenceCounter>, conn, rid, lease| match t.acquire(
            ConnId(conn),
            rid,
            Limit::ONE,
            Lease::new(lease).ok(),
            secs(0),
            None,
            None,
        ) {
            Ok(AcquireOutcome::Granted(grant)) => grant,
            other => panic!("{other:?}"),
        };
        let on_a = grant(&mut t, 1, &a, 10);
        let on_b = grant(&mut t, 1, &b, 20);
        assert_eq!(t.resource_count(), 2);
        // Each lease expires on its own resource, at its own deadline.
        assert_eq!(t.sweep(secs(10)), 1);
        assert!(matches!(
            t.acquire(ConnId(2), &a, Limit::ONE, None, secs(10), None, None),
            Ok(AcquireOutcome::Granted(_))
        ));
        assert_eq!(t.release(&b, on_a.token, secs(10)), Err(LockError::NotHeld));
        // A disconnect releases exactly the holds of that connection.
        t.disconnect(ConnId(1), true, secs(11));
        assert_eq!(t.holder_count(), 1);
        assert!(matches!(
            t.acquire(ConnId(3), &b, Limit::ONE, None, secs(11), None, None),
            Ok(AcquireOutcome::Granted(_))
        ));
        assert_eq!(t.release(&b, on_b.token, secs(11)), Err(LockError::NotHeld));
    }
}
