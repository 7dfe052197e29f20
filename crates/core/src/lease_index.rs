//! Lease deadlines in time order, for the sweep.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use dflockd_proto::Token;

/// Entries a heap may hold beyond 1.25 times its live size before it is
/// compacted.
const SLACK: usize = 128;

/// One lease deadline. Ordered by deadline, then token (tokens are unique,
/// so the order is total among live entries).
#[derive(Debug)]
struct Entry {
    deadline: Duration,
    token: Token,
    /// The resource's id hash: with the token, it finds the lease.
    hash: u64,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        (self.deadline, self.token) == (other.deadline, other.token)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Entry) -> std::cmp::Ordering {
        (self.deadline, self.token).cmp(&(other.deadline, other.token))
    }
}

/// A min-heap of lease deadlines with lazy deletion.
///
/// Most leases end by release long before their deadline, so removing
/// their entries eagerly (an ordered map's insert and remove per grant)
/// was most of the table's cost per acquire + release. Here a grant or a
/// lease restart pushes an entry, and nothing else touches the heap: an
/// entry whose lease is gone, or has moved on to a later (or earlier)
/// deadline, is stale and is dropped when it reaches the top. A lease is
/// live exactly when its holder still has the entry's deadline — tokens
/// are never reused, so `(token, deadline)` names one lease.
///
/// Stale entries are bounded: when the heap grows past 1.25 times its size
/// at the last compaction (plus [`SLACK`]), it keeps only live entries.
/// Each compaction is paid for by the pushes since the last one (a quarter
/// of the live leases at least), and memory stays close to what an ordered
/// map of the live leases would take: 100,000 leases renewed every few
/// seconds are the case this bound was set for.
#[derive(Debug, Default)]
pub(crate) struct LeaseIndex {
    heap: BinaryHeap<Reverse<Entry>>,
    compact_above: usize,
}

impl LeaseIndex {
    /// Records a lease deadline. `current` tells a lease's deadline now
    /// (`None` if the token holds nothing), for compaction.
    pub(crate) fn push(
        &mut self,
        deadline: Duration,
        token: Token,
        hash: u64,
        current: impl Fn(u64, Token) -> Option<Duration>,
    ) {
        self.heap.push(Reverse(Entry {
            deadline,
            token,
            hash,
        }));
        if self.heap.len() > self.compact_above.max(SLACK) {
            self.heap
                .retain(|Reverse(e)| current(e.hash, e.token) == Some(e.deadline));
            self.compact_above = self.heap.len() + self.heap.len() / 4 + SLACK;
        }
    }

    /// The earliest live deadline; stale entries above it are dropped.
    pub(crate) fn next(
        &mut self,
        current: impl Fn(u64, Token) -> Option<Duration>,
    ) -> Option<Duration> {
        while let Some(Reverse(top)) = self.heap.peek() {
            if current(top.hash, top.token) == Some(top.deadline) {
                return Some(top.deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Removes and returns a live lease whose deadline is at or before
    /// `now`, if there is one (stale entries on the way are dropped).
    pub(crate) fn pop_due(
        &mut self,
        now: Duration,
        current: impl Fn(u64, Token) -> Option<Duration>,
    ) -> Option<(u64, Token)> {
        while let Some(Reverse(top)) = self.heap.peek() {
            if top.deadline > now {
                return None;
            }
            let live = current(top.hash, top.token) == Some(top.deadline);
            let Reverse(entry) = self.heap.pop()?;
            if live {
                return Some((entry.hash, entry.token));
            }
        }
        None
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn stale_entries_are_skipped_and_bounded() {
        let hash = 0x5eed;
        let mut live: HashMap<Token, Duration> = HashMap::new();
        let mut index = LeaseIndex::default();
        // 10,000 short leases, each released at once: all stale.
        for fence in 0..10_000u64 {
            let token = Token::new(fence, 0);
            live.insert(token, secs(100 + fence));
            index.push(secs(100 + fence), token, hash, |_, t| live.get(&t).copied());
            live.remove(&token);
        }
        assert!(index.len() <= SLACK + 1, "{} entries kept", index.len());
        // One live lease, renewed to a later and then an earlier deadline.
        let token = Token::new(20_000, 0);
        for deadline in [secs(50), secs(80), secs(60)] {
            live.insert(token, deadline);
            index.push(deadline, token, hash, |_, t| live.get(&t).copied());
        }
        let current = |_: u64, t: Token| live.get(&t).copied();
        assert_eq!(index.next(current), Some(secs(60)));
        assert_eq!(index.pop_due(secs(59), current), None);
        assert_eq!(index.pop_due(secs(60), current), Some((hash, token)));
        live.remove(&token);
        let current = |_: u64, t: Token| live.get(&t).copied();
        assert_eq!(index.pop_due(secs(1_000_000), current), None);
        assert_eq!(index.next(current), None);
        assert_eq!(index.len(), 0);
    }
}
