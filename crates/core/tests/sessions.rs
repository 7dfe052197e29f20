//! Named sessions (`stable-ref`, spec §8 "Failover"): a connection that
//! named its session and closed is kept as an orphan for `orphan_ttl`; a
//! later connection with the same name takes over its holds (same tokens)
//! and two-phase queue places; an orphan whose time runs out is
//! disconnected; a new leader keeps the previous leader's named sessions as
//! orphans and disconnects the rest.

use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, Attached, Command, ConnId, EnqueueOutcome, Grant, LockTable, Op, Outcome,
    ResourceId, Salt, TableConfig, WaitOutcome,
};
use dflockd_proto::{Key, Lease, Limit, Namespace, StableRef};

const TTL: Duration = Duration::from_secs(5);

fn table(orphan_ttl: Duration) -> LockTable {
    LockTable::new(TableConfig {
        orphan_ttl,
        ..TableConfig::default()
    })
}

fn at(secs: u64, op: Op) -> Command {
    Command::new(Duration::from_secs(secs), Salt::new(secs, 7), op)
}

fn key(name: &str) -> ResourceId {
    ResourceId::new(Namespace::Lock, Key::new(name).unwrap())
}

fn acquire(conn: u64, name: &str, wait: Option<u64>) -> Op {
    Op::Acquire {
        conn: ConnId(conn),
        resource: key(name),
        limit: Limit::ONE,
        lease: Lease::new(30).ok(),
        wait,
        origin: None,
    }
}

fn bind(conn: u64, name: &str) -> Op {
    Op::Bind {
        conn: ConnId(conn),
        reference: StableRef::new(name).unwrap(),
    }
}

fn close(conn: u64) -> Op {
    Op::Disconnect {
        conn: ConnId(conn),
        auto_release: None,
    }
}

#[track_caller]
fn granted(table: &mut LockTable, command: Command) -> Grant {
    match table.apply(&command).outcome {
        Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) => grant,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[track_caller]
fn bound(table: &mut LockTable, command: Command) -> Attached {
    match table.apply(&command).outcome {
        Ok(Outcome::Bound(attached)) => attached,
        other => panic!("expected Bound, got {other:?}"),
    }
}

#[test]
fn a_new_connection_takes_over_an_orphaned_sessions_holds() {
    let mut t = table(TTL);
    let _ = bound(&mut t, at(0, bind(1, "worker-1")));
    let grant = granted(&mut t, at(0, acquire(1, "job", None)));
    // The link breaks: the hold stays for the session to come back.
    let _ = t.apply(&at(1, close(1)));
    assert_eq!(t.holder_count(), 1);
    assert_eq!(t.next_deadline(), Some(Duration::from_secs(1) + TTL));
    let attached = bound(&mut t, at(2, bind(2, "worker-1")));
    assert_eq!(
        attached,
        Attached {
            from: Some(ConnId(1)),
            holds: 1,
            places: 0
        }
    );
    // The orphan time no longer runs: a sweep after it releases nothing.
    let _ = t.apply(&at(10, Op::Sweep));
    assert_eq!(t.holder_count(), 1);
    // Connection 2 owns the hold now: its close orphans the session
    // again, and the orphan's end releases the hold.
    let _ = t.apply(&at(11, close(2)));
    let swept = t.apply(&at(11 + TTL.as_secs(), Op::Sweep));
    assert_eq!(swept.outcome, Ok(Outcome::Swept(0)));
    assert_eq!(t.holder_count(), 0);
    let again = granted(&mut t, at(20, acquire(3, "job", None)));
    assert!(again.token.fence() > grant.token.fence());
}

#[test]
fn a_two_phase_place_is_taken_over_and_collected_by_the_new_connection() {
    let mut t = table(TTL);
    let holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "s")));
    let enqueue = |conn| Op::Enqueue {
        conn: ConnId(conn),
        ticket: 0,
        resource: key("job"),
        limit: Limit::ONE,
        lease: Lease::new(30).ok(),
        origin: None,
    };
    assert!(matches!(
        t.apply(&at(0, enqueue(1))).outcome,
        Ok(Outcome::Enqueue(EnqueueOutcome::Queued))
    ));
    let _ = t.apply(&at(1, close(1)));
    assert_eq!(t.waiter_count(), 1, "the place is kept");
    let attached = bound(&mut t, at(2, bind(2, "s")));
    assert_eq!((attached.holds, attached.places), (0, 1));
    // The holder leaves: the place is granted and waits for a `w`.
    let released = t.apply(&at(
        3,
        Op::Release {
            resource: key("job"),
            token: holder.token,
        },
    ));
    assert_eq!(released.outcome, Ok(Outcome::Released));
    let wait = t.apply(&at(
        3,
        Op::Wait {
            conn: ConnId(2),
            ticket: 0,
            resource: key("job"),
            wait: Some(1),
            origin: None,
        },
    ));
    match wait.outcome {
        Ok(Outcome::Wait(WaitOutcome::Granted(grant))) => {
            assert!(grant.token.fence() > holder.token.fence());
        }
        other => panic!("expected the place's grant, got {other:?}"),
    }
}

#[test]
fn an_orphan_whose_time_runs_out_is_disconnected() {
    let mut t = table(TTL);
    let _ = bound(&mut t, at(0, bind(1, "s")));
    let _ = granted(&mut t, at(0, acquire(1, "job", None)));
    // A blocking acquire keeps its place while its session may come back.
    let _ = granted(&mut t, at(0, acquire(3, "other", None)));
    assert!(matches!(
        t.apply(&at(0, acquire(1, "other", Some(4)))).outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))
    ));
    let _ = t.apply(&at(1, close(1)));
    assert_eq!(t.waiter_count(), 1);
    assert_eq!(t.holder_count(), 2);
    let _ = t.apply(&at(1 + TTL.as_secs() - 1, Op::Sweep));
    assert_eq!(t.holder_count(), 2, "not yet");
    let _ = t.apply(&at(1 + TTL.as_secs(), Op::Sweep));
    assert_eq!(t.holder_count(), 1, "released with auto-release");
    assert_eq!(t.waiter_count(), 0, "its place went with it");
    // The name is free: a new connection takes over nothing.
    let attached = bound(&mut t, at(20, bind(2, "s")));
    assert_eq!(attached, Attached::default());
}

#[test]
fn without_an_orphan_time_a_named_connection_closes_at_once() {
    let mut t = table(Duration::ZERO);
    let _ = bound(&mut t, at(0, bind(1, "s")));
    let _ = granted(&mut t, at(0, acquire(1, "job", None)));
    let _ = t.apply(&at(1, close(1)));
    assert_eq!(t.holder_count(), 0);
}

#[test]
fn a_live_connection_is_taken_over_by_its_sessions_new_connection() {
    // The client reconnected before the server saw the old link die.
    let mut t = table(TTL);
    let _ = bound(&mut t, at(0, bind(1, "s")));
    let _ = granted(&mut t, at(0, acquire(1, "job", None)));
    let attached = bound(&mut t, at(1, bind(2, "s")));
    assert_eq!(attached.holds, 1);
    // The old connection's close no longer touches the hold.
    let _ = t.apply(&at(2, close(1)));
    let _ = t.apply(&at(2 + TTL.as_secs(), Op::Sweep));
    assert_eq!(t.holder_count(), 1);
}

#[test]
fn a_new_leader_keeps_named_sessions_as_orphans_and_closes_the_rest() {
    let mut t = table(TTL);
    let _ = bound(&mut t, at(0, bind(1, "s")));
    let _ = granted(&mut t, at(0, acquire(1, "named", None)));
    let _ = granted(&mut t, at(0, acquire(2, "unnamed", None)));
    let _ = granted(&mut t, at(0, acquire(4, "busy", None)));
    assert!(matches!(
        t.apply(&at(0, acquire(2, "busy", Some(1)))).outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))
    ));
    // A new leader whose clock reads 100.
    let _ = t.apply(&at(100, Op::TakeOffice));
    assert_eq!(t.waiter_count(), 0, "the old connections' waiters left");
    assert_eq!(t.holder_count(), 3, "holds are left to their leases");
    // The named session comes back through the new leader in time.
    let attached = bound(&mut t, at(101, bind(7, "s")));
    assert_eq!(attached.holds, 1);
    // Leases restarted in full at 100; nobody renews, so all end at 130.
    let _ = t.apply(&at(129, Op::Sweep));
    assert_eq!(t.holder_count(), 3);
    let _ = t.apply(&at(131, Op::Sweep));
    assert_eq!(t.holder_count(), 0);
}

/// A named multiplexed session's request, by its session-wide id.
fn retried_acquire(conn: u64, name: &str, origin: u64, wait: bool) -> Op {
    Op::Acquire {
        conn: ConnId(conn),
        resource: key(name),
        limit: Limit::ONE,
        lease: Lease::new(30).ok(),
        wait: wait.then_some(origin),
        origin: Some(origin),
    }
}

/// The session's link breaks after the acquire was applied but before its
/// reply arrived; the next connection takes over, binds, and sends the same
/// request again.
fn fail_over(t: &mut LockTable, from: u64, to: u64, secs: u64) {
    let _ = t.apply(&at(secs, close(from)));
    let attached = bound(t, at(secs, bind(to, "session")));
    assert_eq!(attached.from, Some(ConnId(from)));
}

#[test]
fn a_retried_acquire_gets_the_hold_it_already_got() {
    let mut t = table(TTL);
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let first = granted(&mut t, at(0, retried_acquire(1, "job", 7, false)));
    fail_over(&mut t, 1, 2, 10);
    let again = granted(&mut t, at(11, retried_acquire(2, "job", 7, false)));
    assert_eq!(again.token, first.token, "the same hold, not a new grant");
    assert_eq!(t.holder_count(), 1);
    // Its lease restarted with the retry: 30 s from 11 s.
    assert_eq!(
        t.next_deadline(),
        Some(Duration::from_secs(41) + TableConfig::default().clock_granularity)
    );
    // Another request of the same session (a new id) still finds the lock
    // busy: the retry rule never shares a hold between two requests.
    let other = t.apply(&at(12, retried_acquire(2, "job", 8, false)));
    assert_eq!(other.outcome, Ok(Outcome::Acquire(AcquireOutcome::Timeout)));
    // Nor does a connection without ids (origin None) with the same number.
    let plain = t.apply(&at(12, acquire(2, "job", None)));
    assert_eq!(plain.outcome, Ok(Outcome::Acquire(AcquireOutcome::Timeout)));
}

#[test]
fn a_retried_blocking_acquire_gets_the_grant_delivered_to_it() {
    let mut t = table(TTL);
    let holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let queued = t.apply(&at(0, retried_acquire(1, "job", 5, true)));
    assert!(matches!(
        queued.outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Queued(_)))
    ));
    let released = t.apply(&at(
        1,
        Op::Release {
            resource: key("job"),
            token: holder.token,
        },
    ));
    let delivered = released.grants[0].grant;
    // The grant was written to connection 1, which broke before it arrived.
    fail_over(&mut t, 1, 2, 2);
    let again = granted(&mut t, at(3, retried_acquire(2, "job", 5, true)));
    assert_eq!(again.token, delivered.token);
}

#[test]
fn a_retry_of_a_hold_that_ran_out_acquires_afresh() {
    let mut t = table(Duration::from_secs(300));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let first = granted(&mut t, at(0, retried_acquire(1, "job", 7, false)));
    fail_over(&mut t, 1, 2, 1);
    // 30 s lease: gone by 40 s, and never resurrected.
    let again = granted(&mut t, at(40, retried_acquire(2, "job", 7, false)));
    assert!(again.token.fence() > first.token.fence());
}

#[test]
fn a_retried_enqueue_and_wait_find_their_place_and_grant() {
    let mut t = table(TTL);
    let holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let enqueue = |conn, origin| Op::Enqueue {
        conn: ConnId(conn),
        ticket: 3,
        resource: key("job"),
        limit: Limit::ONE,
        lease: Lease::new(30).ok(),
        origin,
    };
    let wait = |conn, origin: u64| Op::Wait {
        conn: ConnId(conn),
        ticket: 3,
        resource: key("job"),
        wait: Some(origin),
        origin: Some(origin),
    };
    let queued = Ok(Outcome::Enqueue(EnqueueOutcome::Queued));
    assert_eq!(t.apply(&at(0, enqueue(1, Some(4)))).outcome, queued);
    fail_over(&mut t, 1, 2, 1);
    // The retried `e` finds its place (kept, with its position) ...
    assert_eq!(t.apply(&at(2, enqueue(2, Some(4)))).outcome, queued);
    assert_eq!(t.waiter_count(), 1);
    // ... where a second `e` without an id would be refused.
    assert_eq!(
        t.apply(&at(2, enqueue(2, None))).outcome,
        Err(dflockd_core::LockError::AlreadyEnqueued)
    );
    // A `w` waits; the holder leaves; the grant goes to the `w`, whose
    // reply is lost in a second failover.
    assert!(matches!(
        t.apply(&at(3, wait(2, 6))).outcome,
        Ok(Outcome::Wait(WaitOutcome::Pending(_)))
    ));
    let released = t.apply(&at(
        4,
        Op::Release {
            resource: key("job"),
            token: holder.token,
        },
    ));
    let delivered = released.grants[0].grant;
    fail_over(&mut t, 2, 3, 5);
    match t.apply(&at(6, wait(3, 6))).outcome {
        Ok(Outcome::Wait(WaitOutcome::Granted(grant))) => assert_eq!(grant.token, delivered.token),
        other => panic!("expected the delivered grant, got {other:?}"),
    }
    // A `w` with another id has nothing to collect.
    assert_eq!(
        t.apply(&at(6, wait(3, 99))).outcome,
        Err(dflockd_core::LockError::NotEnqueued)
    );
}

/// A blocking acquire queued when its connection broke keeps its place
/// for the session: connections that queue later stay behind it, the
/// session's retry of the same request claims it, and a grant made to it
/// before the retry is kept as a hold and answered to the retry.
#[test]
fn a_blocking_acquire_keeps_its_place_through_a_failover() {
    let mut t = table(TTL);
    let holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let queued = |outcome| matches!(outcome, Ok(Outcome::Acquire(AcquireOutcome::Queued(_))));
    assert!(queued(
        t.apply(&at(0, retried_acquire(1, "job", 5, true))).outcome
    ));
    fail_over(&mut t, 1, 2, 1);
    // Someone else queues after the failover, before the retry arrives.
    assert!(queued(t.apply(&at(2, acquire(7, "job", Some(1)))).outcome));
    // The retry claims the old place (no second waiter).
    assert!(queued(
        t.apply(&at(3, retried_acquire(2, "job", 5, true))).outcome
    ));
    assert_eq!(t.waiter_count(), 2);
    let released = t.apply(&at(
        4,
        Op::Release {
            resource: key("job"),
            token: holder.token,
        },
    ));
    let first = &released.grants[0];
    assert_eq!(
        (first.to.conn, first.to.request),
        (ConnId(2), 5),
        "the session is first"
    );
}

#[test]
fn a_grant_made_to_a_detached_waiter_waits_for_its_retry() {
    let mut t = table(TTL);
    let holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let _ = t.apply(&at(0, retried_acquire(1, "job", 5, true)));
    let _ = t.apply(&at(1, close(1)));
    // Granted while nobody can receive it: no delivery, a hold.
    let released = t.apply(&at(
        2,
        Op::Release {
            resource: key("job"),
            token: holder.token,
        },
    ));
    assert!(released.grants.is_empty());
    assert_eq!(t.holder_count(), 1);
    let _ = bound(&mut t, at(3, bind(2, "session")));
    let again = granted(&mut t, at(3, retried_acquire(2, "job", 5, true)));
    assert!(again.token.fence() > holder.token.fence());
}

#[test]
fn a_retry_without_wait_gives_a_detached_place_up() {
    let mut t = table(TTL);
    let _holder = granted(&mut t, at(0, acquire(9, "job", None)));
    let _ = bound(&mut t, at(0, bind(1, "session")));
    let _ = t.apply(&at(0, retried_acquire(1, "job", 5, true)));
    fail_over(&mut t, 1, 2, 1);
    assert_eq!(t.waiter_count(), 1);
    assert_eq!(
        t.apply(&at(2, retried_acquire(2, "job", 5, false))).outcome,
        Ok(Outcome::Acquire(AcquireOutcome::Timeout))
    );
    assert_eq!(t.waiter_count(), 0);
}
