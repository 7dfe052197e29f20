//! Effects: what applying a [`Command`](crate::Command) means for the world
//! outside the table, as plain data for the caller to carry out.

use dflockd_proto::{Lease, Token};
use thiserror::Error;

use crate::MintError;
use crate::ids::{ConnId, ResourceId, WaiterId};

/// Everything that must happen because a command was applied: the answer
/// to the command's proposer, the grants to deliver to requests that were
/// waiting, and the leases that ran out.
///
/// ```
/// use std::time::Duration;
/// use dflockd_core::*;
/// use dflockd_proto::{Key, Limit, Namespace};
/// let job = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// let mut table = LockTable::new(TableConfig::default());
/// let at = |op| Command::new(Duration::ZERO, Salt::new(1, 2), op);
/// let acquire = |conn, wait| Op::Acquire { conn: ConnId(conn), resource: job.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = table.apply(&at(acquire(1, None))).outcome else { panic!() };
/// // Connection 2's request 5 queues …
/// table.apply(&at(acquire(2, Some(5))));
/// // … and is granted when connection 1 releases.
/// let effects = table.apply(&at(Op::Release { resource: job.clone(), token: grant.token }));
/// assert_eq!(effects.outcome, Ok(Outcome::Released));
/// assert_eq!(effects.grants[0].to, Waiting { conn: ConnId(2), request: 5 });
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[must_use = "grants must be delivered (or released with Op::ReleaseUndelivered)"]
pub struct Effects {
    /// The answer to the command.
    pub outcome: Result<Outcome, LockError>,
    /// Grants for requests that were waiting, in the order they were made.
    /// Each must reach its request; one that cannot (the request is gone)
    /// must be given back with [`Op::ReleaseUndelivered`](crate::Op::ReleaseUndelivered),
    /// or its slot leaks until its lease runs out.
    pub grants: Vec<Delivery>,
    /// Leases that ran out and were evicted while applying the command.
    pub expired: Vec<Expired>,
}

/// The answer to a command, one variant per [`Op`](crate::Op).
///
/// ```
/// use dflockd_core::Outcome;
/// assert_ne!(Outcome::Withdrawn(true), Outcome::Withdrawn(false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// To [`Op::Acquire`](crate::Op::Acquire).
    Acquire(AcquireOutcome),
    /// To [`Op::Enqueue`](crate::Op::Enqueue).
    Enqueue(EnqueueOutcome),
    /// To [`Op::Wait`](crate::Op::Wait).
    Wait(WaitOutcome),
    /// To [`Op::Release`](crate::Op::Release) and
    /// [`Op::ReleaseUndelivered`](crate::Op::ReleaseUndelivered) (the
    /// latter answers this even if nothing was held any more).
    Released,
    /// To [`Op::Renew`](crate::Op::Renew): the lease now running.
    Renewed(Lease),
    /// To [`Op::Observe`](crate::Op::Observe): the grant, its lease
    /// restarted.
    Observed(Grant),
    /// To [`Op::Withdraw`](crate::Op::Withdraw) and
    /// [`Op::WithdrawPlace`](crate::Op::WithdrawPlace): `false` if the
    /// waiter was no longer queued (it was granted: the grant is, or was,
    /// in a [`Delivery`]).
    Withdrawn(bool),
    /// To [`Op::Disconnect`](crate::Op::Disconnect).
    Disconnected,
    /// To [`Op::Sweep`](crate::Op::Sweep): how many leases were evicted.
    Swept(usize),
    /// To [`Op::EndDelays`](crate::Op::EndDelays): how many lock-delays ended.
    DelaysEnded(usize),
    /// To [`Op::Gc`](crate::Op::Gc): how many idle resources were forgotten.
    Collected(usize),
    /// To [`Op::SetPolicy`](crate::Op::SetPolicy).
    PolicySet,
    /// To [`Op::TakeOffice`](crate::Op::TakeOffice): how many leases
    /// restarted (those that had run out are in [`Effects::expired`]).
    OfficeTaken(usize),
    /// To [`Op::Bind`](crate::Op::Bind): what the connection took over.
    Bound(Attached),
    /// To [`Op::Label`](crate::Op::Label).
    Labelled,
}

/// What a connection took over when it named its session
/// ([`Op::Bind`](crate::Op::Bind)).
///
/// ```
/// let nothing = dflockd_core::Attached::default();
/// assert_eq!((nothing.from, nothing.holds, nothing.places), (None, 0, 0));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    /// The connection that had the session before, if any.
    pub from: Option<ConnId>,
    /// Holds taken over.
    pub holds: usize,
    /// Two-phase queue places (queued or granted, not yet collected)
    /// taken over.
    pub places: usize,
}

/// Which waiting request a grant is for: the `wait` request id given in
/// [`Op::Acquire`](crate::Op::Acquire) or [`Op::Wait`](crate::Op::Wait) on
/// connection `conn`.
///
/// ```
/// use dflockd_core::{ConnId, Waiting};
/// let w = Waiting { conn: ConnId(1), request: 9 };
/// assert_eq!(w.request, 9);
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Waiting {
    /// The connection (session) that waits.
    pub conn: ConnId,
    /// The request on it.
    pub request: u64,
}

/// A grant for a request that was waiting. The caller must hand it to the
/// request; if that is no longer possible it must apply
/// [`Op::ReleaseUndelivered`](crate::Op::ReleaseUndelivered) so the slot is
/// not leaked.
///
/// ```
/// use dflockd_core::{ConnId, Delivery, Grant, ResourceId, Waiting};
/// use dflockd_proto::{Key, Lease, Namespace, Token};
/// let d = Delivery {
///     to: Waiting { conn: ConnId(1), request: 0 },
///     resource: ResourceId::new(Namespace::Lock, Key::new("k").unwrap()),
///     grant: Grant { token: Token::new(1, 2), lease: Lease::new(5).unwrap() },
/// };
/// assert_eq!(d.grant.token.fence(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    /// The waiting request.
    pub to: Waiting,
    /// The resource granted.
    pub resource: ResourceId,
    /// The grant.
    pub grant: Grant,
}

/// A lease that ran out and was evicted.
///
/// ```
/// use dflockd_core::{ConnId, Expired, ResourceId};
/// use dflockd_proto::{Key, Namespace, Token};
/// let e = Expired { resource: ResourceId::new(Namespace::Lock, Key::new("k").unwrap()), token: Token::new(3, 0), conn: ConnId(1) };
/// assert_eq!(e.token.fence(), 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Expired {
    /// The resource it held.
    pub resource: ResourceId,
    /// Its token.
    pub token: Token,
    /// The connection it was granted to.
    pub conn: ConnId,
}

/// A grant: the token and the lease it was given.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let op = Op::Acquire { conn: ConnId(1), resource: rid.clone(), limit: Limit::ONE, lease: Some(Lease::new(10).unwrap()), wait: None, origin: None };
/// let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = run(op).outcome else { panic!() };
/// assert_eq!(grant.token.fence(), 1);
/// assert_eq!(grant.lease.get(), 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The new token (fence + salt).
    pub token: Token,
    /// The lease length.
    pub lease: Lease,
}

/// Result of `l`/`sl`.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let granted = run(acquire(1, &rid, None)).outcome;
/// assert!(matches!(granted, Ok(Outcome::Acquire(AcquireOutcome::Granted(_)))));
/// // Busy: a try-lock times out at once, a blocking acquire queues.
/// assert_eq!(run(acquire(2, &rid, None)).outcome, Ok(Outcome::Acquire(AcquireOutcome::Timeout)));
/// let queued = run(acquire(2, &rid, Some(7))).outcome;
/// assert!(matches!(queued, Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AcquireOutcome {
    /// Granted at once.
    Granted(Grant),
    /// Queued; the grant will arrive as a [`Delivery`].
    Queued(WaiterId),
    /// Not free and the caller did not want to wait.
    Timeout,
}

/// Result of `e`/`se`.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let enqueue = |conn| Op::Enqueue { conn: ConnId(conn), ticket: 0, resource: rid.clone(), limit: Limit::ONE, lease: None, origin: None };
/// assert!(matches!(run(enqueue(1)).outcome, Ok(Outcome::Enqueue(EnqueueOutcome::Acquired(_)))));
/// assert_eq!(run(enqueue(2)).outcome, Ok(Outcome::Enqueue(EnqueueOutcome::Queued)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EnqueueOutcome {
    /// Granted at once (`acquired`).
    Acquired(Grant),
    /// Queued (`queued`).
    Queued,
}

/// Result of `w`/`sw`.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = run(acquire(1, &rid, None)).outcome else { panic!() };
/// let _ = run(Op::Enqueue { conn: ConnId(2), ticket: 0, resource: rid.clone(), limit: Limit::ONE, lease: None, origin: None }); // queued
/// let wait = run(Op::Wait { conn: ConnId(2), ticket: 0, resource: rid.clone(), wait: Some(4), origin: None });
/// assert!(matches!(wait.outcome, Ok(Outcome::Wait(WaitOutcome::Pending(_)))));
/// let released = run(Op::Release { resource: rid.clone(), token: grant.token });
/// assert_eq!(released.grants[0].to, Waiting { conn: ConnId(2), request: 4 }); // the pending wait is granted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WaitOutcome {
    /// The grant (made before or at this call).
    Granted(Grant),
    /// Still queued, at this place; the grant will arrive as a
    /// [`Delivery`].
    Pending(WaiterId),
    /// Still queued and the caller did not want to wait: the waiter was
    /// removed and the two-phase state discarded.
    Timeout,
}

/// Lock-level failures, each mapping to one status word.
///
/// ```
/// # use std::time::Duration;
/// # use dflockd_core::*;
/// # use dflockd_proto::{Key, Lease, Limit, Namespace};
/// # let mut table = LockTable::new(TableConfig::default());
/// # let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
/// # let mut run = |op| table.apply(&Command::new(Duration::ZERO, Salt::new(0, 0), op));
/// # let acquire = |conn, rid: &ResourceId, wait| Op::Acquire { conn: ConnId(conn), resource: rid.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
/// let wait = run(Op::Wait { conn: ConnId(1), ticket: 0, resource: rid.clone(), wait: None, origin: None });
/// assert_eq!(wait.outcome, Err(LockError::NotEnqueued));
/// let release = run(Op::Release { resource: rid.clone(), token: dflockd_proto::Token::new(1, 2) });
/// assert_eq!(release.outcome, Err(LockError::NotHeld));
/// let sem = ResourceId::new(Namespace::Semaphore, Key::new("pool").unwrap());
/// let take = |conn, limit| Op::Acquire { conn: ConnId(conn), resource: sem.clone(), limit: Limit::new(limit).unwrap(), lease: None, wait: None, origin: None };
/// let _ = run(take(1, 3));
/// assert_eq!(run(take(2, 5)).outcome, Err(LockError::LimitMismatch));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum LockError {
    /// `error_max_locks`
    #[error("too many resources")]
    MaxLocks,
    /// `error_max_waiters`
    #[error("wait queue full")]
    MaxWaiters,
    /// `error_limit_mismatch`
    #[error("semaphore exists with another limit")]
    LimitMismatch,
    /// `error_not_enqueued`
    #[error("not enqueued")]
    NotEnqueued,
    /// `error_already_enqueued`
    #[error("already enqueued")]
    AlreadyEnqueued,
    /// `error_lease_expired`
    #[error("lease expired before the grant was observed")]
    LeaseExpired,
    /// `error`: the token does not hold the resource (or its lease ran out).
    #[error("token does not hold the resource")]
    NotHeld,
    /// `error`: no token could be minted.
    #[error(transparent)]
    Mint(#[from] MintError),
}
