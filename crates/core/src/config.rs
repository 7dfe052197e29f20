//! The table's rules.

use std::time::Duration;

use dflockd_proto::Lease;

#[cfg(doc)]
use crate::Op;

/// Table-wide rules (spec §3.3, §3.7, §3.8).
///
/// ```
/// let c = dflockd_core::TableConfig::default();
/// assert_eq!(c.default_lease.get(), 33);
/// assert_eq!(c.max_locks, 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableConfig {
    /// Lease applied when a request names none.
    pub default_lease: Lease,
    /// Most resources (both namespaces together).
    pub max_locks: usize,
    /// Most queued waiters per resource; 0 = unlimited.
    pub max_waiters: usize,
    /// How long a resource with no holder and no waiter survives GC.
    pub gc_max_idle: Duration,
    /// Disconnect lock-delay: when a closed connection's hold is released
    /// automatically, the key is not granted again until
    /// `min(remaining lease, delay)` has passed (zero = off). Closes the
    /// window where a holder that has not yet noticed its connection died
    /// overlaps the next holder.
    pub disconnect_lock_delay: Duration,
    /// How far the `now` the caller passes may lag the true time (a coarse
    /// clock's tick; zero for a precise clock). Every lease and lock-delay
    /// is lengthened by it, so none ends before its full length has truly
    /// passed.
    pub clock_granularity: Duration,
    /// Whether a closed connection's holds are released at once (the
    /// default for [`Op::Disconnect`] with `auto_release: None`), rather
    /// than when their leases run out.
    pub auto_release: bool,
    /// How long a connection that named its session (`stable-ref`) and
    /// closed keeps its holds and two-phase queue places for a new
    /// connection with the same ref to take over ([`Op::Bind`]); zero =
    /// never (a close is a disconnect at once). Cluster mode only
    /// (`--orphan-ttl`).
    pub orphan_ttl: Duration,
}

impl Default for TableConfig {
    fn default() -> TableConfig {
        TableConfig {
            default_lease: Lease::new(33).expect("33 is a valid lease"),
            max_locks: 1024,
            max_waiters: 0,
            gc_max_idle: Duration::from_secs(60),
            disconnect_lock_delay: Duration::ZERO,
            clock_granularity: Duration::ZERO,
            auto_release: true,
            orphan_ttl: Duration::ZERO,
        }
    }
}
