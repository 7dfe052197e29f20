//! Lane identities: which connection a lease is bound to, and which one a
//! renew reply came back on. Below the lanes and the renewal batches.

use std::sync::atomic::{AtomicU64, Ordering};

/// Identity of one connection, for binding leases to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LaneId(pub(crate) u64);

static NEXT_LANE: AtomicU64 = AtomicU64::new(1);

/// A fresh lane id.
pub(crate) fn next_lane_id() -> LaneId {
    LaneId(NEXT_LANE.fetch_add(1, Ordering::Relaxed))
}
