//! Commands: every change to a lock table, as data that can be written to a
//! log and applied again, anywhere, with the same result.

use std::time::Duration;

use dflockd_proto::{Label, Lease, Limit, StableRef, Token};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::TableConfig;
use crate::ids::{ConnId, ResourceId, WaiterId};

/// One change to a [`LockTable`](crate::LockTable), with everything that
/// makes applying it deterministic: the proposer's clock reading and the
/// randomness for the tokens it may mint. Applying the same commands in the
/// same order to two tables gives the same tables, byte for byte in their
/// [snapshots](crate::TableSnapshot).
///
/// ```
/// use std::time::Duration;
/// use dflockd_core::{Command, ConnId, LockTable, Op, Outcome, AcquireOutcome, ResourceId, Salt};
/// use dflockd_proto::{Key, Limit, Namespace};
/// let job = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// let acquire = Command::new(Duration::ZERO, Salt::new(7, 8), Op::Acquire {
///     conn: ConnId(1), resource: job, limit: Limit::ONE, lease: None, wait: None, origin: None,
/// });
/// let bytes = acquire.encode();
/// assert_eq!(Command::decode(&bytes).unwrap(), acquire);
/// let mut table = LockTable::new(Default::default());
/// let effects = table.apply(&acquire);
/// assert!(matches!(effects.outcome, Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The proposer's monotonic time (since an origin all appliers share).
    pub at: Duration,
    /// Salts for the tokens this command mints.
    pub salt: Salt,
    /// What changes.
    pub op: Op,
}

/// The version byte that starts every [`Command::encode`]d command and every
/// encoded [`TableSnapshot`](crate::TableSnapshot).
pub const FORMAT_VERSION: u8 = 3;

impl Command {
    /// A command at `at` with salts `salt`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::{Command, Op, Salt};
    /// let sweep = Command::new(Duration::from_secs(5), Salt::new(1, 2), Op::Sweep);
    /// assert_eq!(sweep.at, Duration::from_secs(5));
    /// ```
    pub fn new(at: Duration, salt: Salt, op: Op) -> Command {
        Command { at, salt, op }
    }

    /// The command as bytes for a log: [`FORMAT_VERSION`], then the fields
    /// in postcard's compact encoding.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::{Command, FORMAT_VERSION, Op, Salt};
    /// let bytes = Command::new(Duration::ZERO, Salt::new(1, 2), Op::Gc).encode();
    /// assert_eq!(bytes[0], FORMAT_VERSION);
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Reads a command written by [`encode`](Self::encode). Every value is
    /// checked again (keys, leases, limits), as it came from outside.
    ///
    /// ```
    /// use dflockd_core::{Command, DecodeError};
    /// assert_eq!(Command::decode(&[]), Err(DecodeError::Empty));
    /// assert_eq!(Command::decode(&[99, 0]), Err(DecodeError::UnknownVersion(99)));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        decode_versioned(bytes)
    }
}

pub(crate) fn encode_versioned<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT_VERSION];
    // Writing to a Vec cannot fail for these types (no maps with
    // non-string keys, no unsized sequences): postcard fails only when its
    // output is full, and a Vec grows.
    match postcard::to_extend(value, out) {
        Ok(bytes) => bytes,
        Err(error) => unreachable!("postcard refused an in-memory value: {error}"),
    }
}

pub(crate) fn decode_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let (value, left) =
        postcard::take_from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !left.is_empty() {
        return Err(DecodeError::TrailingBytes(left.len()));
    }
    Ok(value)
}

/// Why bytes are not a command or snapshot of this version.
///
/// ```
/// use dflockd_core::{Command, DecodeError, FORMAT_VERSION};
/// assert!(matches!(Command::decode(&[FORMAT_VERSION, 0xff, 0xff]), Err(DecodeError::Malformed(_))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty input: no format version byte")]
    Empty,
    /// Written by another format version.
    #[error("format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnknownVersion(u8),
    /// Not a valid encoding (or a value that fails validation).
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// A complete value followed by bytes that belong to nothing.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
}

/// The randomness for the tokens one command mints: the command's first
/// grant takes `first` as its salt; further grants of the same command (a
/// disconnect or sweep that frees several slots) take SipHash-1-3 of their
/// fence keyed by `rest`, so no grant's salt tells anything of another's.
/// The proposer draws both from a CSPRNG.
///
/// ```
/// use dflockd_core::Salt;
/// let salt = Salt::new(0xaaaa, 0xbbbb);
/// assert_eq!(salt.for_grant(0, 42), 0xaaaa);
/// assert_ne!(salt.for_grant(1, 43), salt.for_grant(2, 44));
/// assert_eq!(salt.for_grant(1, 43), Salt::new(0, 0xbbbb).for_grant(1, 43)); // a function of `rest` and the fence
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Salt {
    first: u64,
    rest: u64,
}

impl Salt {
    /// Salts from two random numbers.
    ///
    /// ```
    /// let _ = dflockd_core::Salt::new(1, 2);
    /// ```
    pub fn new(first: u64, rest: u64) -> Salt {
        Salt { first, rest }
    }

    /// The salt of the command's `index`-th grant (from 0), whose fence is
    /// `fence`.
    ///
    /// ```
    /// assert_eq!(dflockd_core::Salt::new(5, 6).for_grant(0, 1), 5);
    /// ```
    pub fn for_grant(&self, index: u32, fence: u64) -> u64 {
        if index == 0 {
            return self.first;
        }
        use std::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(self.rest, 0);
        hasher.write_u64(fence);
        hasher.finish()
    }
}

impl std::fmt::Debug for Salt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Salts make tokens unguessable: never printed.
        f.write_str("Salt(..)")
    }
}

/// What a [`Command`] changes. Each variant is one rule of the protocol
/// (spec §3–§5); the reply to it comes back as an
/// [`Outcome`](crate::Outcome).
///
/// ```
/// use dflockd_core::{ConnId, Op};
/// let close = Op::Disconnect { conn: ConnId(3), auto_release: Some(true) };
/// assert!(matches!(close, Op::Disconnect { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `l` / `sl`: take a slot now, or queue. With `wait: None` a busy
    /// resource answers `Timeout` (a try-lock); with `Some(request)` the
    /// request queues and its grant is delivered to (`conn`, `request`).
    Acquire {
        /// The connection (session) asking.
        conn: ConnId,
        /// The lock or semaphore.
        resource: ResourceId,
        /// 1 for a lock; the semaphore's limit.
        limit: Limit,
        /// The lease; `None` takes the table's default.
        lease: Option<Lease>,
        /// The request a later grant goes to, if it may wait.
        wait: Option<u64>,
        /// The request's id within its client session, when the session
        /// promises ids unique over all its connections (a named
        /// multiplexed connection). An acquire whose `origin` already got
        /// a hold this connection owns (typically before a failover, on an
        /// earlier connection of the session) is answered with that hold,
        /// its lease restarted, instead of acquiring again.
        origin: Option<u64>,
    },
    /// A queued acquire gave up (timeout, cancel): its waiter leaves the
    /// queue, unless it was granted already.
    Withdraw {
        /// The connection that queued it.
        conn: ConnId,
        /// The resource it queued on.
        resource: ResourceId,
        /// The place in the queue ([`AcquireOutcome::Queued`](crate::AcquireOutcome::Queued)).
        waiter: WaiterId,
    },
    /// `r` / `sr`.
    Release {
        /// The resource.
        resource: ResourceId,
        /// The holder's token.
        token: Token,
    },
    /// A grant whose request was gone when it was delivered: the slot
    /// passes on instead of leaking.
    ReleaseUndelivered {
        /// The resource.
        resource: ResourceId,
        /// The undelivered grant's token.
        token: Token,
    },
    /// `n` / `sn`.
    Renew {
        /// The resource.
        resource: ResourceId,
        /// The holder's token.
        token: Token,
        /// The new lease; `None` takes the table's default.
        lease: Option<Lease>,
    },
    /// `e` / `se`: two-phase, phase 1, on (`conn`, `ticket`, `resource`).
    Enqueue {
        /// The connection.
        conn: ConnId,
        /// The handle's ticket (0 on a plain connection).
        ticket: u64,
        /// The resource.
        resource: ResourceId,
        /// 1 for a lock; the semaphore's limit.
        limit: Limit,
        /// The lease; `None` takes the table's default.
        lease: Option<Lease>,
        /// As for [`Op::Acquire`]: a retried `e` (same `origin`) whose
        /// place exists on this connection is answered with that place's
        /// state (queued, or its grant).
        origin: Option<u64>,
    },
    /// `w` / `sw`: two-phase, phase 2. With `wait: None` this polls, and a
    /// place still queued is forfeited.
    Wait {
        /// The connection.
        conn: ConnId,
        /// The handle's ticket.
        ticket: u64,
        /// The resource.
        resource: ResourceId,
        /// The request a later grant goes to, if it may wait.
        wait: Option<u64>,
        /// As for [`Op::Acquire`]: a retried `w` (same `origin`) whose
        /// place was already collected is answered with the grant it
        /// collected.
        origin: Option<u64>,
    },
    /// A waiting `w` gave up: the queue place and the two-phase state go,
    /// unless the place was granted already. With `waiter: Some(place)`, only
    /// while that place is still the ticket's (a multiplexed ticket may have
    /// been enqueued again since).
    WithdrawPlace {
        /// The connection.
        conn: ConnId,
        /// The handle's ticket.
        ticket: u64,
        /// The resource.
        resource: ResourceId,
        /// The place it must still be, if any.
        waiter: Option<WaiterId>,
    },
    /// A delivered grant reached its request: its lease restarts at this
    /// command's time (or it ran out meanwhile: `LeaseExpired`).
    Observe {
        /// The resource.
        resource: ResourceId,
        /// The grant's token.
        token: Token,
        /// The grant's lease.
        lease: Lease,
    },
    /// A connection (session) closed: its waiters and two-phase state go;
    /// with auto-release its holds are released (`None`: the table's
    /// default, [`TableConfig::auto_release`](crate::TableConfig::auto_release)).
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// Release its holds now, rather than when their leases run out.
        auto_release: Option<bool>,
    },
    /// `stable-ref`: connection `conn` names its client session. If another
    /// connection had named it (typically one closed by a failover or a
    /// broken link), `conn` takes over that connection's holds (same
    /// tokens, leases running on), two-phase queue places (a later `w` on
    /// `conn` collects them) and, if it was an orphan, its blocking
    /// acquires' places (the session's retry of the same request claims
    /// them); a live connection's blocking acquires die with it.
    Bind {
        /// The connection.
        conn: ConnId,
        /// The session's name.
        reference: StableRef,
    },
    /// `label`: the holder with `token` proclaims `label` (shown in
    /// `stats`; replaced by a later one, gone with the hold).
    Label {
        /// The lock.
        resource: ResourceId,
        /// The holder's token.
        token: Token,
        /// What it proclaims.
        label: Label,
    },
    /// Evict every lease at or past its deadline, end due lock-delays, and
    /// disconnect orphaned sessions whose time ran out.
    Sweep,
    /// End every lock-delay that is due.
    EndDelays,
    /// Forget resources idle longer than `gc_max_idle`.
    Gc,
    /// Change the table's policy.
    SetPolicy(Policy),
    /// A new leader takes office, at this command's time on its own clock
    /// (which is not the previous leader's). Leases that had run out by
    /// the latest command before end now — a lease is never resurrected;
    /// every other lease restarts its full length from this time, and
    /// lock-delays and idle times restart too, so a change of leader never
    /// shortens a lease. A new leader proposes it before it takes requests.
    TakeOffice,
}

/// The table rules an operator may change at run time: caps, the default
/// lease, idle GC, the lock-delay and the auto-release default.
///
/// ```
/// use dflockd_core::{Policy, TableConfig};
/// let policy = Policy::of(&TableConfig::default());
/// assert_eq!(policy.max_locks, 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// [`TableConfig::default_lease`](crate::TableConfig::default_lease).
    pub default_lease: Lease,
    /// [`TableConfig::max_locks`](crate::TableConfig::max_locks).
    pub max_locks: usize,
    /// [`TableConfig::max_waiters`](crate::TableConfig::max_waiters).
    pub max_waiters: usize,
    /// [`TableConfig::gc_max_idle`](crate::TableConfig::gc_max_idle).
    pub gc_max_idle: Duration,
    /// [`TableConfig::disconnect_lock_delay`](crate::TableConfig::disconnect_lock_delay).
    pub disconnect_lock_delay: Duration,
    /// [`TableConfig::auto_release`](crate::TableConfig::auto_release).
    pub auto_release: bool,
    /// [`TableConfig::orphan_ttl`](crate::TableConfig::orphan_ttl).
    pub orphan_ttl: Duration,
}

impl Policy {
    /// The policy part of a configuration.
    ///
    /// ```
    /// use dflockd_core::{Policy, TableConfig};
    /// assert!(Policy::of(&TableConfig::default()).auto_release);
    /// ```
    pub fn of(config: &TableConfig) -> Policy {
        Policy {
            default_lease: config.default_lease,
            max_locks: config.max_locks,
            max_waiters: config.max_waiters,
            gc_max_idle: config.gc_max_idle,
            disconnect_lock_delay: config.disconnect_lock_delay,
            auto_release: config.auto_release,
            orphan_ttl: config.orphan_ttl,
        }
    }
}
