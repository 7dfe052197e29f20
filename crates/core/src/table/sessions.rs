//! Named client sessions (`stable-ref`): a connection that names its
//! session can be taken over by a later connection with the same name —
//! after a failover, or a broken link with `orphan_ttl` — which then owns
//! its holds and two-phase queue places.

use std::time::Duration;

use dflockd_proto::StableRef;

use super::{Conn, LockTable, WaiterKind};
use crate::effects::Attached;
use crate::fence::FenceSource;
use crate::ids::{ConnId, ResourceId, WaiterId};
use crate::leases::NO_RING;

impl<F: FenceSource> LockTable<F> {
    /// `conn` names its session `reference`, taking over whatever the
    /// session's previous connection still has.
    pub(super) fn bind(&mut self, conn: ConnId, reference: &StableRef, now: Duration) -> Attached {
        let mut attached = Attached::default();
        if let Some(&previous) = self.refs.get(reference)
            && previous != conn
        {
            attached = self.take_over(previous, conn, now);
            attached.from = Some(previous);
        }
        let own = self.conns.entry(conn).or_default();
        if let Some(old) = own.reference.replace(reference.clone())
            && old != *reference
        {
            self.refs.remove(&old);
        }
        self.refs.insert(reference.clone(), conn);
        attached
    }

    /// Whether `conn` is kept as an orphan instead of disconnected: it
    /// named its session and the table keeps orphans.
    pub(super) fn orphans_on_close(&self, conn: ConnId) -> bool {
        !self.config.orphan_ttl.is_zero()
            && self
                .conns
                .get(&conn)
                .is_some_and(|c| c.reference.is_some() && c.orphaned_until.is_none())
    }

    /// `conn` closed but its session may come back: its blocking acquires
    /// keep their places, detached (their requests died with it: a grant
    /// made to one is kept as a hold for the session's retry of the same
    /// request), `w`s waiting on its places stop waiting, and everything
    /// stays until `now + orphan_ttl`.
    pub(super) fn orphan(&mut self, conn: ConnId, now: Duration) {
        let until = now.saturating_add(self.config.orphan_ttl);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        for place in c.phase1.values_mut() {
            place.blocked = None;
        }
        c.orphaned_until = Some(until);
        for (waiter, rid) in &c.waiters {
            if let Some(w) = self
                .resources
                .get_mut(rid)
                .and_then(|r| r.queue.get_mut(waiter))
                && matches!(w.kind, WaiterKind::Blocking(_))
            {
                w.detached = true;
            }
        }
        self.orphans.insert((until, conn));
    }

    /// Disconnects every orphan whose time ran out by `now`, with the
    /// table's auto-release rule; returns how many.
    pub(super) fn expire_orphans(&mut self, now: Duration) -> usize {
        let due: Vec<ConnId> = self
            .orphans
            .iter()
            .take_while(|(until, _)| *until <= now)
            .map(|(_, conn)| *conn)
            .collect();
        for conn in &due {
            self.disconnect(*conn, self.config.auto_release, now);
        }
        due.len()
    }

    /// The earliest time an orphan is due.
    pub(super) fn next_orphan_due(&self) -> Option<Duration> {
        self.orphans.first().map(|(until, _)| *until)
    }

    /// A new leader at `now`: every connection in the table belongs to an
    /// earlier leader's process and is gone. One that named its session is
    /// kept as an orphan for `orphan_ttl` from now (an orphan already is
    /// given that time again); any other is disconnected, its holds left
    /// to their leases (they are never released early).
    pub(super) fn close_previous_connections(&mut self, now: Duration) {
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        conns.sort_unstable();
        self.orphans.clear();
        for conn in conns {
            let named = self.conns.get(&conn).is_some_and(|c| c.reference.is_some());
            if named && !self.config.orphan_ttl.is_zero() {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.orphaned_until = None;
                }
                self.orphan(conn, now);
            } else {
                self.disconnect(conn, false, now);
            }
        }
    }

    /// Removes `conn`'s blocking waiters from their queues, but for the
    /// detached ones (an orphan's, kept for its session); returns the
    /// resources to promote on.
    fn drop_blocking(&mut self, conn: ConnId, now: Duration) -> Vec<ResourceId> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Vec::new();
        };
        // In arrival order: promotions mint fences in this order.
        let mut waiters: Vec<(WaiterId, ResourceId)> =
            c.waiters.iter().map(|(w, rid)| (*w, rid.clone())).collect();
        waiters.sort_unstable_by_key(|(waiter, _)| *waiter);
        let mut touched = Vec::new();
        for (waiter, rid) in waiters {
            let Some(resource) = self.resources.get_mut(&rid) else {
                continue;
            };
            let blocking = resource
                .queue
                .get(&waiter)
                .is_some_and(|w| matches!(w.kind, WaiterKind::Blocking(_)) && !w.detached);
            if blocking {
                resource.queue.remove(&waiter);
                resource.last_activity = now;
                c.waiters.remove(&waiter);
                touched.push(rid);
            }
        }
        touched
    }

    /// Moves `from`'s holds and two-phase places to `to`.
    fn take_over(&mut self, from: ConnId, to: ConnId, now: Duration) -> Attached {
        let touched = self.drop_blocking(from, now);
        let Some(old) = self.conns.remove(&from) else {
            return Attached::default();
        };
        if let Some(until) = old.orphaned_until {
            self.orphans.remove(&(until, from));
        }
        if let Some(reference) = &old.reference {
            self.refs.remove(reference);
        }
        let Conn {
            ring: old_ring,
            waiters,
            mut phase1,
            uncollected,
            ..
        } = old;
        let mut attached = Attached::default();
        // Holds: into `to`'s ring, oldest first so the ring keeps its order.
        if old_ring != NO_RING {
            let leases = self.leases.in_ring(old_ring);
            let ring = self.ring_of(to);
            for (hash, token) in leases.into_iter().rev() {
                let Some(rid) = self.resources.holding(hash, &token).map(|r| r.id.clone()) else {
                    continue;
                };
                let Some(holder) = self
                    .resources
                    .get_mut(&rid)
                    .and_then(|r| r.holders.get_mut(&token))
                else {
                    continue;
                };
                self.leases.remove(holder.slot);
                holder.slot = self.leases.insert(ring, token, hash, holder.deadline);
                holder.conn = to;
                attached.holds += 1;
            }
            self.leases.drop_ring(old_ring);
        }
        // Two-phase places: their queue entries and state go to `to`
        // (a place `to` already has for the same key and ticket wins).
        for place in phase1.values_mut() {
            place.blocked = None;
        }
        let mut waiters: Vec<(WaiterId, ResourceId)> = waiters.into_iter().collect();
        waiters.sort_unstable_by_key(|(waiter, _)| *waiter);
        let mut stale = Vec::new();
        {
            let own = self.conns.entry(to).or_default();
            for ((rid, ticket), place) in phase1 {
                if own.phase1.contains_key(&(rid.clone(), ticket)) {
                    stale.extend(place.waiter.map(|w| (w, rid.clone())));
                    continue;
                }
                if place.waiter.is_some() || place.token.is_some() {
                    attached.places += 1;
                }
                own.phase1.insert((rid, ticket), place);
            }
            for (token, ticket) in uncollected {
                own.uncollected.insert(token, ticket);
            }
        }
        for (waiter, rid) in waiters {
            if stale.iter().any(|(w, _)| *w == waiter) {
                if let Some(resource) = self.resources.get_mut(&rid) {
                    resource.queue.remove(&waiter);
                }
                continue;
            }
            if let Some(entry) = self
                .resources
                .get_mut(&rid)
                .and_then(|r| r.queue.get_mut(&waiter))
            {
                entry.conn = to;
            }
            if let Some(own) = self.conns.get_mut(&to) {
                own.waiters.insert(waiter, rid);
            }
        }
        for rid in touched
            .into_iter()
            .chain(stale.into_iter().map(|(_, rid)| rid))
        {
            self.promote(&rid, now);
        }
        attached
    }

    /// `conn`'s lease ring, made if it has none yet.
    fn ring_of(&mut self, conn: ConnId) -> crate::leases::Slot {
        let ring = self.conns.entry(conn).or_default().ring;
        if ring != NO_RING {
            return ring;
        }
        let ring = self.leases.new_ring();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ring = ring;
        }
        ring
    }
}
