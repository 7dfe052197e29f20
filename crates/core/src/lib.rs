//! The dflockd lock table as a pure state machine.
//!
//! [`LockTable`] owns every resource (lock or semaphore), its holders and its
//! FIFO queue, the two-phase state of each connection, the caps and the idle
//! garbage collector. It does no I/O, reads no clock and spawns nothing: the
//! caller passes the current monotonic time into every call and receives the
//! grants that must be delivered to blocked requests via
//! [`LockTable::take_deliveries`]. That keeps every rule testable with
//! property tests and a virtual clock, and is what a replicated state machine
//! would apply.
//!
//! ```
//! use std::time::Duration;
//! use dflockd_core::{AcquireOutcome, ConnId, FenceCounter, LockTable, ResourceId, TableConfig};
//! use dflockd_proto::{Key, Limit, Namespace};
//!
//! let mut table: LockTable<&str, _> = LockTable::new(TableConfig::default(), FenceCounter::with_fixed_salt(100, 7));
//! let rid = ResourceId::new(Namespace::Lock, Key::new("job").unwrap());
//! let t0 = Duration::ZERO;
//!
//! let first = table.acquire(ConnId(1), &rid, Limit::ONE, None, t0, None).unwrap();
//! let AcquireOutcome::Granted(grant) = first else { panic!() };
//! assert_eq!(grant.token.fence(), 101);
//!
//! // A second connection queues behind it and is granted on release.
//! let queued = table.acquire(ConnId(2), &rid, Limit::ONE, None, t0, Some("conn-2")).unwrap();
//! assert!(matches!(queued, AcquireOutcome::Queued(_)));
//! table.release(&rid, grant.token.to_string().as_bytes(), t0).unwrap();
//! let delivered: Vec<_> = table.take_deliveries().collect();
//! assert_eq!(delivered[0].notify, "conn-2");
//! assert_eq!(delivered[0].grant.token.fence(), 102);
//! ```
#![warn(missing_docs)]

mod budget;
mod fence;
mod leases;
mod table;

pub use budget::ResourceBudget;
pub use fence::{FenceCounter, Mint, MintError};
pub use table::{
    AcquireOutcome, ConnId, Delivery, EnqueueOutcome, Grant, LockError, LockTable, ResourceId,
    TableConfig, WaitOutcome, WaiterId,
};
