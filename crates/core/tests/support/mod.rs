//! A test driver over [`LockTable::apply`]: one method per protocol step,
//! with the arguments the tests name (time, a notification value of their
//! choosing for a request that may wait), each building the [`Command`] it
//! stands for. It keeps every command it applied, so a test can replay the
//! log on another table.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, Command, ConnId, EnqueueOutcome, FenceCounter, Grant, LockError, LockTable, Op,
    Outcome, ResourceId, Salt, TableConfig, WaitOutcome, WaiterId, Waiting,
};
use dflockd_proto::{Lease, Limit, Token};

/// A grant for a waiting request, named by the notification value the
/// test gave when the request queued.
#[derive(Debug)]
pub struct Delivery<W> {
    pub notify: W,
    pub resource: ResourceId,
    pub grant: Grant,
}

/// The salts every command of a driver carries.
pub fn salts(salt: u64) -> Salt {
    Salt::new(salt, salt)
}

pub struct Driver<W> {
    table: LockTable,
    salt: Salt,
    next_request: u64,
    /// The notification value of each waiting request.
    notes: HashMap<Waiting, W>,
    /// The waiting request at each queue place that has one.
    by_waiter: HashMap<WaiterId, Waiting>,
    deliveries: Vec<Delivery<W>>,
    /// Every command applied, in order.
    pub log: Vec<Command>,
}

impl<W> std::ops::Deref for Driver<W> {
    type Target = LockTable;
    fn deref(&self) -> &LockTable {
        &self.table
    }
}

impl<W> Driver<W> {
    /// A table whose first fence is `seed + 1` and whose commands carry
    /// [`salts`]`(salt)`.
    pub fn new(config: TableConfig, seed: u64, salt: u64) -> Driver<W> {
        Driver {
            table: LockTable::with_fences(config, FenceCounter::starting_after(seed)),
            salt: salts(salt),
            next_request: 0,
            notes: HashMap::new(),
            by_waiter: HashMap::new(),
            deliveries: Vec::new(),
            log: Vec::new(),
        }
    }

    /// Applies `op` at `now`, keeping its grants for [`take_deliveries`](Self::take_deliveries).
    pub fn run(&mut self, op: Op, now: Duration) -> Result<Outcome, LockError> {
        let command = Command::new(now, self.salt, op);
        let effects = self.table.apply(&command);
        self.log.push(command);
        for d in effects.grants {
            self.by_waiter.retain(|_, w| *w != d.to);
            let notify = self
                .notes
                .remove(&d.to)
                .unwrap_or_else(|| panic!("a grant for {:?}, which is not waiting", d.to));
            self.deliveries.push(Delivery {
                notify,
                resource: d.resource,
                grant: d.grant,
            });
        }
        effects.outcome
    }

    /// [`run`](Self::run) for a request that may wait with notification `wait`.
    fn run_waiting(
        &mut self,
        conn: ConnId,
        wait: Option<W>,
        op: impl FnOnce(Option<u64>) -> Op,
        now: Duration,
    ) -> Result<Outcome, LockError> {
        let request = wait.as_ref().map(|_| {
            self.next_request += 1;
            self.next_request
        });
        let outcome = self.run(op(request), now);
        let (Some(request), Some(notify)) = (request, wait) else {
            return outcome;
        };
        let waiter = match outcome {
            Ok(Outcome::Acquire(AcquireOutcome::Queued(waiter))) => waiter,
            Ok(Outcome::Wait(WaitOutcome::Pending(waiter))) => waiter,
            _ => return outcome,
        };
        let waiting = Waiting { conn, request };
        self.notes.insert(waiting, notify);
        self.by_waiter.insert(waiter, waiting);
        outcome
    }

    pub fn acquire(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        limit: Limit,
        lease: Option<Lease>,
        now: Duration,
        wait: Option<W>,
    ) -> Result<AcquireOutcome, LockError> {
        let op = |wait| Op::Acquire {
            conn,
            resource: rid.clone(),
            limit,
            lease,
            wait,
            origin: None,
        };
        match self.run_waiting(conn, wait, op, now)? {
            Outcome::Acquire(outcome) => Ok(outcome),
            other => panic!("acquire answered {other:?}"),
        }
    }

    pub fn cancel_acquire(
        &mut self,
        conn: ConnId,
        rid: &ResourceId,
        waiter: WaiterId,
        now: Duration,
    ) -> bool {
        let op = Op::Withdraw {
            conn,
            resource: rid.clone(),
            waiter,
        };
        self.withdrawn(Some(waiter), op, now)
    }

    /// Applies a withdraw of `waiter`'s place; if it was still queued, the
    /// notification of the request waiting there goes with it.
    fn withdrawn(&mut self, waiter: Option<WaiterId>, op: Op, now: Duration) -> bool {
        let withdrawn = matches!(self.run(op, now), Ok(Outcome::Withdrawn(true)));
        if withdrawn && let Some(waiting) = waiter.and_then(|w| self.by_waiter.remove(&w)) {
            self.notes.remove(&waiting);
        }
        withdrawn
    }

    pub fn release(
        &mut self,
        rid: &ResourceId,
        token: &[u8],
        now: Duration,
    ) -> Result<(), LockError> {
        let token = Token::parse_wire(token).ok_or(LockError::NotHeld)?;
        self.release_token(rid, token, now)
    }

    pub fn release_token(
        &mut self,
        rid: &ResourceId,
        token: Token,
        now: Duration,
    ) -> Result<(), LockError> {
        let op = Op::Release {
            resource: rid.clone(),
            token,
        };
        self.run(op, now).map(|_| ())
    }

    pub fn release_undelivered(&mut self, rid: &ResourceId, token: Token, now: Duration) {
        let op = Op::ReleaseUndelivered {
            resource: rid.clone(),
            token,
        };
        let _ = self.run(op, now);
    }

    pub fn renew(
        &mut self,
        rid: &ResourceId,
        token: &[u8],
        lease: Option<Lease>,
        now: Duration,
    ) -> Result<Lease, LockError> {
        let token = Token::parse_wire(token).ok_or(LockError::NotHeld)?;
        self.renew_token(rid, token, lease, now)
    }

    pub fn renew_token(
        &mut self,
        rid: &ResourceId,
        token: Token,
        lease: Option<Lease>,
        now: Duration,
    ) -> Result<Lease, LockError> {
        let op = Op::Renew {
            resource: rid.clone(),
            token,
            lease,
        };
        match self.run(op, now)? {
            Outcome::Renewed(lease) => Ok(lease),
            other => panic!("renew answered {other:?}"),
        }
    }

    pub fn enqueue(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        limit: Limit,
        lease: Option<Lease>,
        now: Duration,
    ) -> Result<EnqueueOutcome, LockError> {
        let op = Op::Enqueue {
            conn,
            ticket,
            resource: rid.clone(),
            limit,
            lease,
            origin: None,
        };
        match self.run(op, now)? {
            Outcome::Enqueue(outcome) => Ok(outcome),
            other => panic!("enqueue answered {other:?}"),
        }
    }

    pub fn wait(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        now: Duration,
        wait: Option<W>,
    ) -> Result<WaitOutcome, LockError> {
        let op = |wait| Op::Wait {
            conn,
            ticket,
            resource: rid.clone(),
            wait,
            origin: None,
        };
        match self.run_waiting(conn, wait, op, now)? {
            Outcome::Wait(outcome) => Ok(outcome),
            other => panic!("wait answered {other:?}"),
        }
    }

    pub fn cancel_wait(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        now: Duration,
    ) -> bool {
        let op = Op::WithdrawPlace {
            conn,
            ticket,
            resource: rid.clone(),
            waiter: None,
        };
        let place = self.table.queued_place(conn, ticket, rid);
        self.withdrawn(place, op, now)
    }

    pub fn cancel_wait_of(
        &mut self,
        conn: ConnId,
        ticket: u64,
        rid: &ResourceId,
        waiter: WaiterId,
        now: Duration,
    ) -> bool {
        let op = Op::WithdrawPlace {
            conn,
            ticket,
            resource: rid.clone(),
            waiter: Some(waiter),
        };
        self.withdrawn(Some(waiter), op, now)
    }

    pub fn observe(
        &mut self,
        rid: &ResourceId,
        token: Token,
        lease: Lease,
        now: Duration,
    ) -> Result<Grant, LockError> {
        let op = Op::Observe {
            resource: rid.clone(),
            token,
            lease,
        };
        match self.run(op, now)? {
            Outcome::Observed(grant) => Ok(grant),
            other => panic!("observe answered {other:?}"),
        }
    }

    pub fn disconnect(&mut self, conn: ConnId, auto_release: bool, now: Duration) {
        self.notes.retain(|w, _| w.conn != conn);
        self.by_waiter.retain(|_, w| w.conn != conn);
        let op = Op::Disconnect {
            conn,
            auto_release: Some(auto_release),
        };
        let _ = self.run(op, now);
    }

    pub fn sweep(&mut self, now: Duration) -> usize {
        match self.run(Op::Sweep, now) {
            Ok(Outcome::Swept(n)) => n,
            other => panic!("sweep answered {other:?}"),
        }
    }

    pub fn end_delays(&mut self, now: Duration) -> usize {
        match self.run(Op::EndDelays, now) {
            Ok(Outcome::DelaysEnded(n)) => n,
            other => panic!("end_delays answered {other:?}"),
        }
    }

    pub fn gc(&mut self, now: Duration) -> usize {
        match self.run(Op::Gc, now) {
            Ok(Outcome::Collected(n)) => n,
            other => panic!("gc answered {other:?}"),
        }
    }

    pub fn take_deliveries(&mut self) -> std::vec::Drain<'_, Delivery<W>> {
        self.deliveries.drain(..)
    }

    pub fn has_deliveries(&self) -> bool {
        !self.deliveries.is_empty()
    }
}
