//! Every live lease of a table in one slab: for the sweep, and, linked per
//! connection, for the connection's disconnect.

use std::time::Duration;

use dflockd_proto::Token;

/// A slot index; `u32` keeps a slot small (a table of four billion leases
/// would hit memory limits long before).
pub(crate) type Slot = u32;

/// No ring yet (a connection that never held a lease).
pub(crate) const NO_RING: Slot = Slot::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    /// The head of one connection's ring of leases.
    Ring,
    Lease,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: Kind,
    token: Token,
    /// The resource's id hash: with the token, it finds the lease.
    hash: u64,
    deadline: Duration,
    prev: Slot,
    next: Slot,
}

impl Entry {
    const FREE: Entry = Entry {
        kind: Kind::Free,
        token: Token::new(0, 0),
        hash: 0,
        deadline: Duration::ZERO,
        prev: NO_RING,
        next: NO_RING,
    };
}

/// The live leases, each in a slot its holder remembers, so that granting,
/// renewing and releasing a lease touch the slab and nothing else: no hash
/// map of a connection's holds, and no ordered index of deadlines.
///
/// A lease was once recorded in a deadline heap (with lazy deletion) and in
/// a hash map of its connection's holds; together they were a large share
/// of the server's work per acquire + release. Here a grant takes a free
/// slot and links it into its connection's ring (a circular doubly linked
/// list through the slab, headed by a [`Kind::Ring`] slot), and a release
/// unlinks it and frees the slot, all by index.
///
/// The sweep pays instead: [`due`](Self::due) scans every slot. It runs on
/// an interval (a second by default), and a scan reads each slot once, so
/// a sweep costs time linear in the slots (`cargo bench --bench
/// acquire_release` measures a million). Freed slots are reused, not returned, so the slab
/// stays at its peak size (56 bytes a slot).
#[derive(Debug, Default)]
pub(crate) struct Leases {
    slots: Vec<Entry>,
    /// Free slots, reused last-freed first.
    free: Vec<Slot>,
}

impl Leases {
    fn alloc(&mut self, entry: Entry) -> Slot {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = entry;
                slot
            }
            None => {
                let slot = Slot::try_from(self.slots.len())
                    .ok()
                    .filter(|&slot| slot != NO_RING)
                    .unwrap_or_else(|| panic!("more than {NO_RING} leases in one table"));
                self.slots.push(entry);
                slot
            }
        }
    }

    fn release(&mut self, slot: Slot) {
        self.slots[slot as usize] = Entry::FREE;
        self.free.push(slot);
    }

    fn entry(&self, slot: Slot) -> &Entry {
        &self.slots[slot as usize]
    }

    fn entry_mut(&mut self, slot: Slot) -> &mut Entry {
        &mut self.slots[slot as usize]
    }

    /// A new, empty ring for one connection's leases.
    pub(crate) fn new_ring(&mut self) -> Slot {
        let slot = self.alloc(Entry {
            kind: Kind::Ring,
            ..Entry::FREE
        });
        let head = self.entry_mut(slot);
        head.prev = slot;
        head.next = slot;
        slot
    }

    /// Records a lease in `ring` and returns its slot.
    pub(crate) fn insert(
        &mut self,
        ring: Slot,
        token: Token,
        hash: u64,
        deadline: Duration,
    ) -> Slot {
        debug_assert_eq!(self.entry(ring).kind, Kind::Ring);
        let first = self.entry(ring).next;
        let slot = self.alloc(Entry {
            kind: Kind::Lease,
            token,
            hash,
            deadline,
            prev: ring,
            next: first,
        });
        self.entry_mut(ring).next = slot;
        self.entry_mut(first).prev = slot;
        slot
    }

    /// Records a lease that belongs to no ring (its connection is gone), as
    /// [`drop_ring`](Self::drop_ring) leaves them.
    pub(crate) fn insert_alone(&mut self, token: Token, hash: u64, deadline: Duration) -> Slot {
        let slot = self.alloc(Entry {
            kind: Kind::Lease,
            token,
            hash,
            deadline,
            ..Entry::FREE
        });
        let entry = self.entry_mut(slot);
        entry.prev = slot;
        entry.next = slot;
        slot
    }

    /// Moves a lease's deadline (a renewal).
    pub(crate) fn set_deadline(&mut self, slot: Slot, deadline: Duration) {
        debug_assert_eq!(self.entry(slot).kind, Kind::Lease);
        self.entry_mut(slot).deadline = deadline;
    }

    /// Forgets a lease: out of its ring, its slot free.
    pub(crate) fn remove(&mut self, slot: Slot) {
        debug_assert_eq!(self.entry(slot).kind, Kind::Lease);
        let Entry { prev, next, .. } = *self.entry(slot);
        self.entry_mut(prev).next = next;
        self.entry_mut(next).prev = prev;
        self.release(slot);
    }

    /// The leases in `ring`, as (resource hash, token).
    pub(crate) fn in_ring(&self, ring: Slot) -> Vec<(u64, Token)> {
        let mut found = Vec::new();
        let mut at = self.entry(ring).next;
        while at != ring {
            let entry = self.entry(at);
            found.push((entry.hash, entry.token));
            at = entry.next;
        }
        found
    }

    /// Whether `ring` holds no lease.
    pub(crate) fn ring_is_empty(&self, ring: Slot) -> bool {
        self.entry(ring).next == ring
    }

    /// Ends a ring: its leases stay, each in a ring of its own (its
    /// connection is gone, the lease lives on until released or expired).
    pub(crate) fn drop_ring(&mut self, ring: Slot) {
        debug_assert_eq!(self.entry(ring).kind, Kind::Ring);
        let mut at = self.entry(ring).next;
        while at != ring {
            let entry = self.entry_mut(at);
            let next = entry.next;
            entry.prev = at;
            entry.next = at;
            at = next;
        }
        self.release(ring);
    }

    /// Every lease whose deadline is at or before `now`, as (resource hash,
    /// token), earliest deadline first (then by token).
    pub(crate) fn due(&self, now: Duration) -> Vec<(u64, Token)> {
        let mut due: Vec<(Duration, Token, u64)> = self
            .slots
            .iter()
            .filter(|e| e.kind == Kind::Lease && e.deadline <= now)
            .map(|e| (e.deadline, e.token, e.hash))
            .collect();
        due.sort_unstable();
        due.into_iter()
            .map(|(_, token, hash)| (hash, token))
            .collect()
    }

    /// The earliest deadline of any lease.
    pub(crate) fn earliest(&self) -> Option<Duration> {
        self.slots
            .iter()
            .filter(|e| e.kind == Kind::Lease)
            .map(|e| e.deadline)
            .min()
    }

    /// The lease in `slot`, as (resource hash, token, deadline).
    #[cfg(test)]
    pub(crate) fn lease_at(&self, slot: Slot) -> Option<(u64, Token, Duration)> {
        let entry = self.slots.get(slot as usize)?;
        (entry.kind == Kind::Lease).then_some((entry.hash, entry.token, entry.deadline))
    }

    /// Leases recorded (counted: only tests ask).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.iter().filter(|e| e.kind == Kind::Lease).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn tokens(found: Vec<(u64, Token)>) -> Vec<u64> {
        let mut fences: Vec<u64> = found.into_iter().map(|(_, t)| t.fence()).collect();
        fences.sort_unstable();
        fences
    }

    #[test]
    fn a_slot_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn rings_keep_each_connections_leases_apart() {
        let mut leases = Leases::default();
        let a = leases.new_ring();
        let b = leases.new_ring();
        let a1 = leases.insert(a, Token::new(1, 0), 7, secs(10));
        let b2 = leases.insert(b, Token::new(2, 0), 7, secs(20));
        let a3 = leases.insert(a, Token::new(3, 0), 8, secs(30));
        assert_eq!(tokens(leases.in_ring(a)), [1, 3]);
        assert_eq!(tokens(leases.in_ring(b)), [2]);
        assert_eq!(leases.len(), 3);
        // Removing from the middle, the end, and the only one.
        leases.remove(a1);
        assert_eq!(tokens(leases.in_ring(a)), [3]);
        leases.remove(a3);
        assert!(leases.ring_is_empty(a));
        leases.remove(b2);
        assert!(leases.ring_is_empty(b));
        assert_eq!(leases.len(), 0);
        assert_eq!(leases.earliest(), None);
    }

    #[test]
    fn slots_are_reused_and_the_slab_stays_at_its_peak() {
        let mut leases = Leases::default();
        let ring = leases.new_ring();
        for fence in 0..10_000 {
            let slot = leases.insert(ring, Token::new(fence, 0), 1, secs(fence));
            leases.remove(slot);
        }
        // The ring's head and one lease slot, reused 10,000 times.
        assert_eq!(leases.slots.len(), 2);
        assert!(leases.ring_is_empty(ring));
    }

    #[test]
    fn due_and_earliest_follow_renewals() {
        let mut leases = Leases::default();
        let ring = leases.new_ring();
        let early = leases.insert(ring, Token::new(1, 0), 1, secs(10));
        leases.insert(ring, Token::new(2, 0), 2, secs(20));
        assert_eq!(leases.earliest(), Some(secs(10)));
        assert_eq!(tokens(leases.due(secs(9))), Vec::<u64>::new());
        assert_eq!(tokens(leases.due(secs(10))), [1]);
        leases.set_deadline(early, secs(25));
        assert_eq!(leases.earliest(), Some(secs(20)));
        assert_eq!(tokens(leases.due(secs(20))), [2]);
        assert_eq!(tokens(leases.due(secs(25))), [1, 2]);
    }

    #[test]
    fn a_dropped_ring_leaves_its_leases_alone() {
        let mut leases = Leases::default();
        let ring = leases.new_ring();
        let one = leases.insert(ring, Token::new(1, 0), 1, secs(10));
        let two = leases.insert(ring, Token::new(2, 0), 1, secs(10));
        leases.drop_ring(ring);
        assert_eq!(leases.len(), 2);
        assert_eq!(tokens(leases.due(secs(10))), [1, 2]);
        // The freed head is reused by the next ring, which starts empty.
        let next = leases.new_ring();
        assert_eq!(next, ring);
        assert!(leases.ring_is_empty(next));
        leases.remove(one);
        leases.remove(two);
        assert!(leases.ring_is_empty(next));
        assert_eq!(leases.len(), 0);
    }
}
