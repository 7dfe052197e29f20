//! The whole state of a table as plain data, in an order that depends on
//! the state alone (never on a hasher's seed or a slab's free list), so
//! that two tables that applied the same commands write the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dflockd_proto::{Label, Lease, Limit, StableRef, Token};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    Conn, HashMap, Holder, Holders, LockTable, Phase1, Resource, Resources, Waiter, WaiterKind,
};
use crate::command::{DecodeError, decode_versioned, encode_versioned};
use crate::config::TableConfig;
use crate::ids::{ConnId, ResourceId, WaiterId};
use crate::leases::NO_RING;
use crate::{FenceCounter, FenceSource, ResourceBudget};

/// A table's whole state: configuration, fence counter, every resource
/// with its holders and queue, every connection's leases, waiters and
/// two-phase state, and the running lock-delays. Made by
/// [`LockTable::snapshot`], read by [`LockTable::restore`].
///
/// Everything is listed in a canonical order (resources by id, holders by
/// token, connections by id, a connection's leases in the order its
/// disconnect would release them), so equal tables give equal snapshots
/// and equal [`encode`](Self::encode)d bytes.
///
/// ```
/// use dflockd_core::{LockTable, TableConfig, TableSnapshot};
/// let table = LockTable::new(TableConfig::default());
/// let bytes = table.snapshot().encode();
/// let back = TableSnapshot::decode(&bytes).unwrap();
/// assert_eq!(back, table.snapshot());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshot {
    config: TableConfig,
    last_fence: u64,
    next_waiter: u64,
    latest: Duration,
    resources: Vec<ResourceState>,
    conns: Vec<ConnState>,
    delays: Vec<(Duration, ResourceId)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResourceState {
    id: ResourceId,
    limit: Limit,
    /// By token.
    holders: Vec<HolderState>,
    /// In queue (arrival) order.
    queue: Vec<WaiterState>,
    last_activity: Duration,
    blocked_until: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HolderState {
    token: Token,
    conn: ConnId,
    deadline: Duration,
    lease: Lease,
    /// The request answered with it, for retries.
    origin: Option<u64>,
    /// What it proclaimed.
    label: Option<Label>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WaiterState {
    id: WaiterId,
    conn: ConnId,
    lease: Lease,
    kind: WaiterKindState,
    /// A blocking waiter whose request is gone, kept for its retry.
    detached: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum WaiterKindState {
    Blocking { request: u64 },
    TwoPhase { ticket: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ConnState {
    id: ConnId,
    /// Its leases' tokens, most recent grant first (the order in which its
    /// disconnect releases them).
    leases: Vec<Token>,
    /// By waiter id.
    waiters: Vec<(WaiterId, ResourceId)>,
    /// By (resource, ticket).
    phase1: Vec<Phase1State>,
    /// By token.
    uncollected: Vec<(Token, u64)>,
    /// The session it named.
    reference: Option<StableRef>,
    /// Orphaned until then.
    orphaned_until: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Phase1State {
    resource: ResourceId,
    ticket: u64,
    waiter: Option<WaiterId>,
    token: Option<Token>,
    lease: Lease,
    blocked: Option<u64>,
}

/// Why a snapshot cannot be restored: it contradicts itself (it was not
/// made by [`LockTable::snapshot`], or was damaged on the way).
///
/// ```
/// use dflockd_core::{LockTable, TableSnapshot, RestoreError, DecodeError};
/// assert!(matches!(TableSnapshot::decode(&[dflockd_core::FORMAT_VERSION]), Err(DecodeError::Malformed(_))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RestoreError {
    /// Two entries for one resource.
    #[error("resource {0:?} appears twice")]
    DuplicateResource(ResourceId),
    /// A resource with more holders than its limit.
    #[error("resource {0:?} has more holders than its limit")]
    OverLimit(ResourceId),
    /// A token held twice, or a connection's lease that no resource holds
    /// for that connection.
    #[error("lease {token} of connection {conn} is not held exactly once by it")]
    StrayLease {
        /// The connection.
        conn: u64,
        /// The token.
        token: Token,
    },
    /// Two entries for one connection.
    #[error("connection {0} appears twice")]
    DuplicateConnection(u64),
    /// A session named by two connections (the second is given).
    #[error("connection {0} names a session another connection has")]
    DuplicateSession(u64),
}

impl TableSnapshot {
    /// The snapshot as bytes: [`FORMAT_VERSION`](crate::FORMAT_VERSION),
    /// then postcard.
    ///
    /// ```
    /// let t = dflockd_core::LockTable::new(Default::default());
    /// assert_eq!(t.snapshot().encode()[0], dflockd_core::FORMAT_VERSION);
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Reads bytes written by [`encode`](Self::encode).
    ///
    /// ```
    /// use dflockd_core::{DecodeError, TableSnapshot};
    /// assert_eq!(TableSnapshot::decode(&[7]), Err(DecodeError::UnknownVersion(7)));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<TableSnapshot, DecodeError> {
        decode_versioned(bytes)
    }

    /// The last fence the table handed out.
    ///
    /// ```
    /// use dflockd_core::{FenceCounter, LockTable};
    /// let t = LockTable::with_fences(Default::default(), FenceCounter::starting_after(9));
    /// assert_eq!(t.snapshot().last_fence(), 9);
    /// ```
    pub fn last_fence(&self) -> u64 {
        self.last_fence
    }
}

impl<F: FenceSource> LockTable<F> {
    /// The table's whole state (see [`TableSnapshot`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::*;
    /// use dflockd_proto::{Key, Limit, Namespace};
    /// let mut a = LockTable::new(TableConfig::default());
    /// let mut b = LockTable::new(TableConfig::default());
    /// let acquire = Command::new(Duration::ZERO, Salt::new(1, 2), Op::Acquire {
    ///     conn: ConnId(1), resource: ResourceId::new(Namespace::Lock, Key::new("k").unwrap()),
    ///     limit: Limit::ONE, lease: None, wait: None, origin: None,
    /// });
    /// let _ = a.apply(&acquire);
    /// let _ = b.apply(&acquire);
    /// assert_eq!(a.snapshot().encode(), b.snapshot().encode());
    /// ```
    pub fn snapshot(&self) -> TableSnapshot {
        let mut resources: Vec<ResourceState> = self
            .resources
            .iter()
            .map(|r| {
                let mut holders: Vec<HolderState> = r
                    .holders
                    .iter()
                    .map(|(token, h)| HolderState {
                        token: *token,
                        conn: h.conn,
                        deadline: h.deadline,
                        lease: h.lease,
                        origin: h.origin,
                        label: h.label.clone(),
                    })
                    .collect();
                holders.sort_unstable_by_key(|h| h.token);
                ResourceState {
                    id: r.id.clone(),
                    limit: r.limit,
                    holders,
                    queue: r
                        .queue
                        .iter()
                        .map(|(id, w)| WaiterState {
                            id: *id,
                            conn: w.conn,
                            lease: w.lease,
                            detached: w.detached,
                            kind: match w.kind {
                                WaiterKind::Blocking(request) => {
                                    WaiterKindState::Blocking { request }
                                }
                                WaiterKind::TwoPhase(ticket) => {
                                    WaiterKindState::TwoPhase { ticket }
                                }
                            },
                        })
                        .collect(),
                    last_activity: r.last_activity,
                    blocked_until: r.blocked_until,
                }
            })
            .collect();
        resources.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut conns: Vec<ConnState> = self
            .conns
            .iter()
            .map(|(id, c)| {
                let leases = if c.ring == NO_RING {
                    Vec::new()
                } else {
                    self.leases
                        .in_ring(c.ring)
                        .into_iter()
                        .map(|(_, token)| token)
                        .collect()
                };
                let mut waiters: Vec<(WaiterId, ResourceId)> =
                    c.waiters.iter().map(|(w, rid)| (*w, rid.clone())).collect();
                waiters.sort_unstable_by_key(|(w, _)| *w);
                let mut phase1: Vec<Phase1State> = c
                    .phase1
                    .iter()
                    .map(|((rid, ticket), p)| Phase1State {
                        resource: rid.clone(),
                        ticket: *ticket,
                        waiter: p.waiter,
                        token: p.token,
                        lease: p.lease,
                        blocked: p.blocked,
                    })
                    .collect();
                phase1
                    .sort_unstable_by(|a, b| (&a.resource, a.ticket).cmp(&(&b.resource, b.ticket)));
                let mut uncollected: Vec<(Token, u64)> =
                    c.uncollected.iter().map(|(t, k)| (*t, *k)).collect();
                uncollected.sort_unstable();
                ConnState {
                    id: *id,
                    leases,
                    waiters,
                    phase1,
                    uncollected,
                    reference: c.reference.clone(),
                    orphaned_until: c.orphaned_until,
                }
            })
            .collect();
        conns.sort_unstable_by_key(|c| c.id);
        TableSnapshot {
            config: self.config,
            last_fence: self.mint.fences.last(),
            next_waiter: self.next_waiter,
            latest: self.latest,
            resources,
            conns,
            delays: self.delays.keys().cloned().collect(),
        }
    }
}

impl LockTable<FenceCounter> {
    /// A table in the state `snapshot` records, with its own fence counter
    /// and resource budget. Checks that the snapshot agrees with itself.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_core::*;
    /// use dflockd_proto::{Key, Limit, Namespace};
    /// let mut table = LockTable::new(TableConfig::default());
    /// let _ = table.apply(&Command::new(Duration::ZERO, Salt::new(1, 2), Op::Acquire {
    ///     conn: ConnId(1), resource: ResourceId::new(Namespace::Lock, Key::new("k").unwrap()),
    ///     limit: Limit::ONE, lease: None, wait: None, origin: None,
    /// }));
    /// let copy = LockTable::restore(&table.snapshot()).unwrap();
    /// assert_eq!(copy.holder_count(), 1);
    /// ```
    pub fn restore(snapshot: &TableSnapshot) -> Result<LockTable<FenceCounter>, RestoreError> {
        let budget = Arc::new(ResourceBudget::new(snapshot.config.max_locks));
        let mut table = LockTable::sharing(
            snapshot.config,
            FenceCounter::starting_after(snapshot.last_fence),
            budget,
        );
        table.load(snapshot)?;
        Ok(table)
    }
}

impl<F: FenceSource> LockTable<F> {
    /// Fills an empty table from `snapshot` (all but the fence source).
    fn load(&mut self, snapshot: &TableSnapshot) -> Result<(), RestoreError> {
        self.next_waiter = snapshot.next_waiter;
        self.latest = snapshot.latest;
        // Which resource holds each token, for the connections' rings.
        let mut holding: HashMap<Token, (ResourceId, HolderState)> = HashMap::default();
        for state in &snapshot.resources {
            if self.resources.get(&state.id).is_some() {
                return Err(RestoreError::DuplicateResource(state.id.clone()));
            }
            if state.holders.len() > state.limit.get() as usize {
                return Err(RestoreError::OverLimit(state.id.clone()));
            }
            let mut queue = BTreeMap::new();
            for w in &state.queue {
                queue.insert(
                    w.id,
                    Waiter {
                        conn: w.conn,
                        lease: w.lease,
                        detached: w.detached,
                        kind: match w.kind {
                            WaiterKindState::Blocking { request } => WaiterKind::Blocking(request),
                            WaiterKindState::TwoPhase { ticket } => WaiterKind::TwoPhase(ticket),
                        },
                    },
                );
            }
            for h in &state.holders {
                let previous = holding.insert(h.token, (state.id.clone(), h.clone()));
                if previous.is_some() {
                    return Err(RestoreError::StrayLease {
                        conn: h.conn.0,
                        token: h.token,
                    });
                }
            }
            self.resources.insert(Resource {
                id: state.id.clone(),
                limit: state.limit,
                holders: Holders::new(state.limit),
                queue,
                last_activity: state.last_activity,
                blocked_until: state.blocked_until,
            });
        }
        self.budget.take_existing(snapshot.resources.len());
        // Leases of live connections go into their rings, oldest first so
        // that the ring lists them as the snapshot does.
        for state in &snapshot.conns {
            if self.conns.contains_key(&state.id) {
                return Err(RestoreError::DuplicateConnection(state.id.0));
            }
            let mut conn = Conn::default();
            if !state.leases.is_empty() {
                conn.ring = self.leases.new_ring();
            }
            for token in state.leases.iter().rev() {
                let stray = RestoreError::StrayLease {
                    conn: state.id.0,
                    token: *token,
                };
                let Some((rid, held)) = holding.remove(token) else {
                    return Err(stray);
                };
                if held.conn != state.id {
                    return Err(stray);
                }
                let slot = self
                    .leases
                    .insert(conn.ring, *token, rid.hash(), held.deadline);
                hold_restored(&mut self.resources, &rid, &held, slot);
            }
            conn.waiters = state.waiters.iter().cloned().collect();
            for p in &state.phase1 {
                conn.phase1.insert(
                    (p.resource.clone(), p.ticket),
                    Phase1 {
                        waiter: p.waiter,
                        token: p.token,
                        lease: p.lease,
                        blocked: p.blocked,
                    },
                );
            }
            conn.uncollected = state.uncollected.iter().copied().collect();
            self.uncollected += conn.uncollected.len();
            if let Some(reference) = &state.reference
                && self.refs.insert(reference.clone(), state.id).is_some()
            {
                return Err(RestoreError::DuplicateSession(state.id.0));
            }
            conn.reference = state.reference.clone();
            if let Some(until) = state.orphaned_until {
                self.orphans.insert((until, state.id));
            }
            conn.orphaned_until = state.orphaned_until;
            self.conns.insert(state.id, conn);
        }
        // What is left was granted to a connection that has closed since
        // (without auto-release): each lease on its own, until it is
        // released or runs out, as a disconnect leaves them. The id may
        // name a live connection again (a later request on the same id),
        // whose ring then holds only its newer leases. Sorted by token, so
        // the slab is filled the same way every time.
        let mut orphans: Vec<(Token, (ResourceId, HolderState))> = holding.into_iter().collect();
        orphans.sort_unstable_by_key(|(token, _)| *token);
        for (token, (rid, held)) in orphans {
            let slot = self.leases.insert_alone(token, rid.hash(), held.deadline);
            hold_restored(&mut self.resources, &rid, &held, slot);
        }
        self.delays = snapshot
            .delays
            .iter()
            .map(|entry| (entry.clone(), ()))
            .collect();
        Ok(())
    }
}

/// Makes `held`'s connection a holder of `rid` again, its lease in `slot`.
fn hold_restored(
    resources: &mut Resources,
    rid: &ResourceId,
    held: &HolderState,
    slot: crate::leases::Slot,
) {
    if let Some(resource) = resources.get_mut(rid) {
        resource.holders.insert(
            held.token,
            Holder {
                conn: held.conn,
                deadline: held.deadline,
                lease: held.lease,
                slot,
                origin: held.origin,
                label: held.label.clone(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_round_trips() {
        let table = LockTable::new(TableConfig::default());
        let snapshot = table.snapshot();
        let restored = LockTable::restore(&snapshot).unwrap();
        assert_eq!(restored.snapshot(), snapshot);
    }
}
