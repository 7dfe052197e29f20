//! The dflockd lock table as a deterministic state machine.
//!
//! [`LockTable`] owns every resource (lock or semaphore), its holders and its
//! FIFO queue, the two-phase state of each connection, the caps and the idle
//! garbage collector. It changes only by [`LockTable::apply`]ing a
//! [`Command`]: plain data that carries the proposer's clock reading and the
//! salts for any tokens it mints, so it can be written to a log and applied
//! again on another node with the same result. Applying returns
//! [`Effects`]: the answer to the proposer, grants for requests that were
//! waiting, leases that ran out. The table does no I/O, reads no clock and
//! draws no random numbers; [`LockTable::snapshot`] and
//! [`LockTable::restore`] carry its whole state.
//!
//! ```
//! use std::time::Duration;
//! use dflockd_core::*;
//! use dflockd_proto::{Key, Limit, Namespace};
//!
//! let mut table = LockTable::with_fences(TableConfig::default(), FenceCounter::starting_after(100));
//! let job = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
//! let at = |op| Command::new(Duration::ZERO, Salt::new(7, 8), op);
//! let acquire = |conn, wait| Op::Acquire { conn: ConnId(conn), resource: job.clone(), limit: Limit::ONE, lease: None, wait, origin: None };
//!
//! let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) = table.apply(&at(acquire(1, None))).outcome else { panic!() };
//! assert_eq!(grant.token.fence(), 101);
//!
//! // A second connection queues behind it and is granted on release.
//! let queued = table.apply(&at(acquire(2, Some(0)))).outcome;
//! assert!(matches!(queued, Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))));
//! let released = table.apply(&at(Op::Release { resource: job.clone(), token: grant.token }));
//! assert_eq!(released.grants[0].to.conn, ConnId(2));
//! assert_eq!(released.grants[0].grant.token.fence(), 102);
//!
//! // The log replayed elsewhere gives the same table.
//! let copy = LockTable::restore(&table.snapshot()).unwrap();
//! assert_eq!(copy.snapshot().encode(), table.snapshot().encode());
//! ```
#![warn(missing_docs)]

mod budget;
mod command;
mod config;
mod effects;
mod fence;
mod ids;
mod leases;
mod table;

pub use budget::ResourceBudget;
pub use command::{Command, DecodeError, FORMAT_VERSION, Op, Policy, Salt};
pub use config::TableConfig;
pub use effects::{
    AcquireOutcome, Attached, Delivery, Effects, EnqueueOutcome, Expired, Grant, LockError,
    Outcome, WaitOutcome, Waiting,
};
pub use fence::{FenceCounter, FenceSource, MintError};
pub use ids::{ConnId, ResourceId, WaiterId};
pub use table::{LockTable, RestoreError, TableSnapshot};
