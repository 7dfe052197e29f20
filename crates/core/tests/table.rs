//! Focused tests of the lock-table semantics. Each test names the spec
//! section (`/work/shared/spec/protocol.md`) and the §11 conformance item(s)
//! it mirrors. Time is virtual: every call gets a `Duration` since an origin.

use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, ConnId, EnqueueOutcome, Grant, LockError, MintError, ResourceId, TableConfig,
    WaitOutcome,
};
use dflockd_proto::{Key, Lease, Limit, Namespace, Stats, Token};

mod support;
use support::Driver;

/// The notification handle is a plain request number in these tests.
type Table = Driver<u32>;

const SEED: u64 = 1_000;

fn table() -> Table {
    table_with(TableConfig::default())
}

fn table_with(config: TableConfig) -> Table {
    Driver::new(config, SEED, 0x5eed)
}

fn lock(key: &str) -> ResourceId {
    ResourceId::new(Namespace::Lock, Key::new(key).unwrap())
}

fn sem(key: &str) -> ResourceId {
    ResourceId::new(Namespace::Semaphore, Key::new(key).unwrap())
}

fn limit(n: u64) -> Limit {
    Limit::new(n).unwrap()
}

fn lease(secs: u64) -> Option<Lease> {
    Some(Lease::new(secs).unwrap())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

const T0: Duration = Duration::ZERO;
const C1: ConnId = ConnId(1);
const C2: ConnId = ConnId(2);
const C3: ConnId = ConnId(3);
const C4: ConnId = ConnId(4);

/// The token as it arrives on the wire.
fn wire(grant: &Grant) -> Vec<u8> {
    grant.token.to_string().into_bytes()
}

#[track_caller]
fn granted(outcome: Result<AcquireOutcome, LockError>) -> Grant {
    match outcome {
        Ok(AcquireOutcome::Granted(grant)) => grant,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[track_caller]
fn queued(outcome: Result<AcquireOutcome, LockError>) -> dflockd_core::WaiterId {
    match outcome {
        Ok(AcquireOutcome::Queued(id)) => id,
        other => panic!("expected Queued, got {other:?}"),
    }
}

#[track_caller]
fn acquired(outcome: Result<EnqueueOutcome, LockError>) -> Grant {
    match outcome {
        Ok(EnqueueOutcome::Acquired(grant)) => grant,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[track_caller]
fn wait_granted(outcome: Result<WaitOutcome, LockError>) -> Grant {
    match outcome {
        Ok(WaitOutcome::Granted(grant)) => grant,
        other => panic!("expected a granted wait, got {other:?}"),
    }
}

/// Drains the deliveries as `(notify, resource, grant)`.
fn deliveries(t: &mut Table) -> Vec<(u32, ResourceId, Grant)> {
    t.take_deliveries()
        .map(|d| (d.notify, d.resource, d.grant))
        .collect()
}

fn try_lock(
    t: &mut Table,
    conn: ConnId,
    rid: &ResourceId,
    now: Duration,
) -> Result<AcquireOutcome, LockError> {
    t.acquire(conn, rid, Limit::ONE, None, now, None)
}

fn lock_entry<'a>(stats: &'a Stats, key: &str) -> &'a dflockd_proto::LockEntry {
    stats
        .locks
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("{key} not in locks: {stats:?}"))
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

// ---------------------------------------------------------------- §3.2 FIFO

/// §3.2, item 59: three waiters are granted one at a time in arrival order,
/// and TH < TA < TB < TC.
#[test]
fn fifo_promotion_with_strictly_increasing_fences() {
    let mut t = table();
    let q = lock("q");
    let th = granted(try_lock(&mut t, ConnId(10), &q, T0));
    queued(t.acquire(ConnId(11), &q, Limit::ONE, None, T0, Some(11)));
    queued(t.acquire(ConnId(12), &q, Limit::ONE, None, T0, Some(12)));
    queued(t.acquire(ConnId(13), &q, Limit::ONE, None, T0, Some(13)));
    assert_eq!(lock_entry(&t.stats(4, T0), "q").waiters, 3);
    assert!(deliveries(&mut t).is_empty());

    t.release(&q, &wire(&th), secs(1.0)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1, "only A is granted");
    assert_eq!((d[0].0, &d[0].1), (11, &q));
    let ta = d[0].2;
    assert_eq!(ta.lease.get(), 33);
    assert_eq!(t.observe(&q, ta.token, ta.lease, secs(1.0)), Ok(ta));

    t.release(&q, &wire(&ta), secs(2.0)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1, "only B is granted");
    assert_eq!(d[0].0, 12);
    let tb = d[0].2;

    t.release(&q, &wire(&tb), secs(3.0)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 13);
    let tc = d[0].2;

    let fences = [th, ta, tb, tc].map(|g| g.token.fence());
    assert_eq!(fences, [SEED + 1, SEED + 2, SEED + 3, SEED + 4]);
    assert!(fences.windows(2).all(|w| w[0] < w[1]));
}

/// §4.1, item 60: one counter across keys and namespaces.
#[test]
fn fences_strictly_increase_across_keys_and_namespaces() {
    let mut t = table();
    let mut last = 0;
    for i in 0..10 {
        let grant = if i % 2 == 0 {
            granted(try_lock(&mut t, C1, &lock(&format!("k{i}")), T0))
        } else {
            granted(t.acquire(C1, &sem(&format!("k{i}")), limit(2), None, T0, None))
        };
        assert!(grant.token.fence() > last);
        last = grant.token.fence();
    }
}

/// §3.2 fast path: a free resource with an empty queue grants at once.
/// §3.6: a semaphore with free capacity but a non-empty queue does not let
/// a newcomer jump the queue (item 63 as well).
#[test]
fn semaphore_limit_two_three_contenders() {
    let mut t = table();
    let s = sem("s");
    let ta = granted(t.acquire(C1, &s, limit(2), None, T0, None));
    let _tb = granted(t.acquire(C2, &s, limit(2), None, T0, None));
    assert_eq!(
        t.acquire(C3, &s, limit(2), None, T0, None),
        Ok(AcquireOutcome::Timeout)
    );
    queued(t.acquire(C3, &s, limit(2), None, T0, Some(3)));
    t.release(&s, &wire(&ta), secs(0.5)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 3);
    assert_eq!(t.stats(3, secs(0.5)).semaphores[0].holders, 2);
}

// --------------------------------------------------- §3.6 try-lock, §3.7 caps

/// §3.6, items 47 and 58: a try-lock on a held key answers Timeout at once,
/// even from the holder itself (not re-entrant), and leaves nothing queued.
#[test]
fn try_lock_on_held_key_times_out() {
    let mut t = table();
    let k = lock("k");
    granted(try_lock(&mut t, C1, &k, T0));
    assert_eq!(try_lock(&mut t, C2, &k, T0), Ok(AcquireOutcome::Timeout));
    assert_eq!(try_lock(&mut t, C1, &k, T0), Ok(AcquireOutcome::Timeout));
    assert_eq!(t.waiter_count(), 0);
}

/// §3.6/§3.7, item 82: with max_waiters 1 a full queue refuses blocking and
/// try-lock acquires and enqueues with MaxWaiters.
#[test]
fn max_waiters_one_refuses_every_kind_of_join() {
    let mut t = table_with(TableConfig {
        max_waiters: 1,
        ..TableConfig::default()
    });
    let w = lock("w");
    granted(try_lock(&mut t, ConnId(9), &w, T0));
    queued(t.acquire(C1, &w, Limit::ONE, None, T0, Some(1)));
    assert_eq!(
        t.acquire(C2, &w, Limit::ONE, None, T0, Some(2)),
        Err(LockError::MaxWaiters)
    );
    assert_eq!(try_lock(&mut t, C2, &w, T0), Err(LockError::MaxWaiters));
    assert_eq!(
        t.enqueue(C2, 0, &w, Limit::ONE, None, T0),
        Err(LockError::MaxWaiters)
    );
    assert_eq!(t.waiter_count(), 1);
    // A refused enqueue leaves no phase-1 state behind.
    assert_eq!(t.wait(C2, 0, &w, T0, None), Err(LockError::NotEnqueued));
}

/// §3.7, items 80 and 81: max_locks counts both namespaces and idle
/// resources until GC; existing keys are unaffected.
#[test]
fn max_locks_counts_idle_resources_until_gc() {
    let mut t = table_with(TableConfig {
        max_locks: 2,
        gc_max_idle: secs(60.0),
        ..TableConfig::default()
    });
    let a = granted(try_lock(&mut t, C1, &lock("a"), T0));
    let b = granted(try_lock(&mut t, C1, &lock("b"), T0));
    assert_eq!(
        try_lock(&mut t, C1, &lock("c"), T0),
        Err(LockError::MaxLocks)
    );
    assert_eq!(
        t.acquire(C1, &sem("d"), limit(1), None, T0, None),
        Err(LockError::MaxLocks)
    );
    assert_eq!(
        t.enqueue(C1, 0, &lock("c"), Limit::ONE, None, T0),
        Err(LockError::MaxLocks)
    );
    // The refused enqueue left no phase-1 state (a later `w` is not_enqueued).
    assert_eq!(
        t.wait(C1, 0, &lock("c"), T0, None),
        Err(LockError::NotEnqueued)
    );
    assert_eq!(
        try_lock(&mut t, C2, &lock("a"), T0),
        Ok(AcquireOutcome::Timeout)
    );
    assert_eq!(t.resource_count(), 2);

    t.release(&lock("a"), &wire(&a), secs(1.0)).unwrap();
    t.release(&lock("b"), &wire(&b), secs(1.0)).unwrap();
    assert_eq!(
        try_lock(&mut t, C1, &lock("c"), secs(2.0)),
        Err(LockError::MaxLocks)
    );
    assert_eq!(t.gc(secs(30.0)), 0, "not idle long enough");
    assert_eq!(
        try_lock(&mut t, C1, &lock("c"), secs(30.0)),
        Err(LockError::MaxLocks)
    );
    assert_eq!(t.gc(secs(61.0)), 2);
    granted(try_lock(&mut t, C1, &lock("c"), secs(61.0)));
}

// ------------------------------------------------------ §3.1 namespaces

/// §3.1, items 66 and 53: `l same` and `sl same` are independent; a token
/// only works in its own namespace.
#[test]
fn namespaces_are_independent() {
    let mut t = table();
    let l = granted(try_lock(&mut t, C1, &lock("same"), T0));
    let s = granted(t.acquire(C1, &sem("same"), limit(5), None, T0, None));
    assert_eq!(t.resource_count(), 2);
    assert_eq!(
        t.release(&sem("same"), &wire(&l), T0),
        Err(LockError::NotHeld)
    );
    assert_eq!(
        t.renew(&lock("same"), &wire(&s), None, T0),
        Err(LockError::NotHeld)
    );
    assert_eq!(
        t.renew(&lock("same"), &wire(&l), None, T0),
        Ok(Lease::new(33).unwrap())
    );
    t.release(&lock("same"), &wire(&l), T0).unwrap();
    t.release(&sem("same"), &wire(&s), T0).unwrap();
}

/// §3.1, items 64 and 65: a different limit is refused while the semaphore
/// exists, including while idle; after GC a new limit may be chosen.
#[test]
fn limit_mismatch_persists_while_idle_until_gc() {
    let mut t = table_with(TableConfig {
        gc_max_idle: secs(5.0),
        ..TableConfig::default()
    });
    let s = sem("s");
    let ta = granted(t.acquire(C1, &s, limit(2), None, T0, None));
    let tb = granted(t.acquire(C2, &s, limit(2), None, T0, None));
    assert_eq!(
        t.acquire(C4, &s, limit(3), None, T0, None),
        Err(LockError::LimitMismatch)
    );
    assert_eq!(
        t.enqueue(C4, 0, &s, limit(3), None, T0),
        Err(LockError::LimitMismatch)
    );
    // A mismatched enqueue records no phase-1 state.
    assert_eq!(t.wait(C4, 0, &s, T0, None), Err(LockError::NotEnqueued));

    t.release(&s, &wire(&ta), secs(1.0)).unwrap();
    t.release(&s, &wire(&tb), secs(1.0)).unwrap();
    assert_eq!(t.stats(1, secs(1.0)).idle_semaphores.len(), 1);
    assert_eq!(
        t.acquire(C4, &s, limit(3), None, secs(2.0), None),
        Err(LockError::LimitMismatch)
    );
    // A mismatch is not activity: the idle clock keeps running from 1 s.
    assert_eq!(t.gc(secs(5.5)), 0);
    assert_eq!(t.gc(secs(6.0)), 1);
    let grant = granted(t.acquire(C4, &s, limit(3), None, secs(6.0), None));
    assert!(grant.token.fence() > tb.token.fence());
    assert_eq!(t.stats(1, secs(6.0)).semaphores[0].limit, 3);
}

// ------------------------------------------------ §2.3/§2.4/§3.3 leases

/// §2.4, items 54 and 67: renew sets the deadline to now + lease and
/// answers the lease applied (default or explicit).
#[test]
fn renew_extends_the_lease() {
    let mut t = table();
    let k = lock("k7");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(10), T0, None));
    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(1.5)),
        Ok(Lease::new(33).unwrap())
    );
    assert!(approx(
        lock_entry(&t.stats(1, secs(1.5)), "k7").lease_expires_in_s,
        33.0
    ));
    assert_eq!(
        t.renew(&k, &wire(&g), lease(90), secs(2.0)),
        Ok(Lease::new(90).unwrap())
    );
    assert!(approx(
        lock_entry(&t.stats(1, secs(2.0)), "k7").lease_expires_in_s,
        90.0
    ));
    assert_eq!(t.next_deadline(), Some(secs(92.0)));
    // Past the original 33 s deadline the lease still holds.
    assert_eq!(t.sweep(secs(40.0)), 0);
    assert_eq!(t.holder_count(), 1);

    let s = sem("s");
    let sg = granted(t.acquire(C1, &s, limit(2), None, T0, None));
    assert_eq!(
        t.renew(&s, &wire(&sg), lease(40), secs(1.0)),
        Ok(Lease::new(40).unwrap())
    );
}

/// §2.3/§2.4, items 50, 51 and 55: wrong, malformed and empty tokens are
/// refused, and neither command creates a resource.
#[test]
fn renew_and_release_with_bogus_tokens_fail() {
    let mut t = table();
    let k = lock("k");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    let upper = g.token.to_string().to_uppercase();
    for bogus in [
        b"00000000000000000000000000000000".as_slice(),
        b"",
        b"zz",
        upper.as_bytes(),
    ] {
        assert_eq!(t.renew(&k, bogus, None, T0), Err(LockError::NotHeld));
        assert_eq!(t.release(&k, bogus, T0), Err(LockError::NotHeld));
    }
    assert_eq!(
        t.release(&lock("never"), &wire(&g), T0),
        Err(LockError::NotHeld)
    );
    assert_eq!(t.resource_count(), 1, "r/n never create a resource");
    assert_eq!(
        lock_entry(&t.stats(1, T0), "k").owner_conn_id,
        1,
        "still held"
    );
}

/// §2.4 and §3.3, items 56 and 110: a renew at the deadline (sweep not run)
/// is refused, evicts the holder on the spot, hands the slot to the waiter,
/// and the token never comes back.
#[test]
fn renew_at_deadline_evicts_promotes_and_never_resurrects() {
    let mut t = table();
    let k = lock("k");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(1), T0, None));
    queued(t.acquire(C2, &k, Limit::ONE, None, secs(0.1), Some(2)));
    // Just before the deadline nothing happens on its own.
    assert!(deliveries(&mut t).is_empty());
    assert_eq!(t.holder_count(), 1);

    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(1.0)),
        Err(LockError::NotHeld)
    );
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    assert!(d[0].2.token.fence() > g.token.fence());
    assert_eq!(lock_entry(&t.stats(2, secs(1.0)), "k").owner_conn_id, 2);

    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(1.1)),
        Err(LockError::NotHeld)
    );
    assert_eq!(t.release(&k, &wire(&g), secs(1.1)), Err(LockError::NotHeld));
    assert_eq!(lock_entry(&t.stats(2, secs(1.1)), "k").owner_conn_id, 2);
}

/// Item 56 without a waiter: after the renew is refused, the key is free.
#[test]
fn renew_after_expiry_frees_the_key() {
    let mut t = table();
    let k = lock("k8");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(1), T0, None));
    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(2.2)),
        Err(LockError::NotHeld)
    );
    assert_eq!(t.release(&k, &wire(&g), secs(2.2)), Err(LockError::NotHeld));
    assert_eq!(t.holder_count(), 0);
    assert_eq!(t.next_deadline(), None);
    let g2 = granted(try_lock(&mut t, C2, &k, secs(2.2)));
    assert_eq!(g2.lease.get(), 33);
}

/// §2.3, item 109: release does not look at the deadline; an expired holder
/// that has not been evicted can still be released.
#[test]
fn release_after_deadline_before_sweep_succeeds() {
    let mut t = table();
    let k = lock("k");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(1), T0, None));
    assert_eq!(t.release(&k, &wire(&g), secs(1.3)), Ok(()));
    assert_eq!(t.holder_count(), 0);
    assert_eq!(t.next_deadline(), None);
    assert_eq!(t.sweep(secs(100.0)), 0);
}

/// §3.3, item 57: the sweep evicts leases at or before `now` and promotes;
/// until then stats shows the holder with 0 s left and the waiter waits.
#[test]
fn sweep_evicts_and_promotes() {
    let mut t = table();
    let k = lock("k9");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(1), T0, None));
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    assert_eq!(t.next_deadline(), Some(secs(1.0)));
    assert_eq!(t.sweep(secs(0.5)), 0);

    let s = t.stats(2, secs(1.5));
    let e = lock_entry(&s, "k9");
    assert_eq!(
        (e.owner_conn_id, e.lease_expires_in_s, e.waiters),
        (1, 0.0, 1)
    );
    assert!(deliveries(&mut t).is_empty());

    assert_eq!(t.sweep(secs(1.5)), 1);
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    let promoted = d[0].2;
    assert!(promoted.token.fence() > g.token.fence());
    // The promoted lease runs from promotion.
    assert_eq!(t.next_deadline(), Some(secs(34.5)));
    // Observing it restarts the lease.
    assert_eq!(
        t.observe(&k, promoted.token, promoted.lease, secs(2.0)),
        Ok(promoted)
    );
    assert_eq!(t.next_deadline(), Some(secs(35.0)));
}

/// §3.2 lazy eviction: a try-lock on a key whose holder expired promotes
/// the queued waiter first, and itself gets Timeout because the queue was
/// not empty when it arrived.
#[test]
fn acquire_evicts_expired_holders_first() {
    let mut t = table();
    let k = lock("k");
    granted(t.acquire(C1, &k, Limit::ONE, lease(1), T0, None));
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    assert_eq!(
        try_lock(&mut t, C3, &k, secs(1.5)),
        Ok(AcquireOutcome::Timeout)
    );
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    assert_eq!(lock_entry(&t.stats(3, secs(1.5)), "k").owner_conn_id, 2);
    // With no waiter, an acquire after expiry simply takes the key.
    let j = lock("j");
    granted(t.acquire(C1, &j, Limit::ONE, lease(1), T0, None));
    granted(try_lock(&mut t, C3, &j, secs(1.0)));
}

// ---------------------------------------------------- §2.5/§2.6 two-phase

/// §2.5/§2.6, items 68 and 75: fast path `acquired`, then `w` returns the
/// identical token with the enqueue-time lease, and restarts the lease.
#[test]
fn two_phase_fast_path_returns_same_token_and_restarts_lease() {
    let mut t = table();
    let k = lock("t8");
    let g = acquired(t.enqueue(C1, 0, &k, Limit::ONE, lease(10), T0));
    assert_eq!(g.lease.get(), 10);
    assert!(approx(
        lock_entry(&t.stats(1, secs(4.0)), "t8").lease_expires_in_s,
        6.0
    ));
    let w = wait_granted(t.wait(C1, 0, &k, secs(4.0), Some(1)));
    assert_eq!(w, g);
    assert!(approx(
        lock_entry(&t.stats(1, secs(4.0)), "t8").lease_expires_in_s,
        10.0
    ));
    // The phase-1 state is consumed.
    assert_eq!(
        t.wait(C1, 0, &k, secs(4.0), None),
        Err(LockError::NotEnqueued)
    );
    // Default lease when none is given (item 68).
    let g = acquired(t.enqueue(C1, 0, &lock("t1"), Limit::ONE, None, T0));
    assert_eq!(g.lease.get(), 33);
    assert_eq!(wait_granted(t.wait(C1, 0, &lock("t1"), T0, None)), g);
}

/// §2.5, item 69: a second `e` with phase-1 state is refused.
#[test]
fn two_phase_enqueue_twice_is_already_enqueued() {
    let mut t = table();
    let k = lock("t2");
    acquired(t.enqueue(C1, 0, &k, Limit::ONE, None, T0));
    assert_eq!(
        t.enqueue(C1, 0, &k, Limit::ONE, None, T0),
        Err(LockError::AlreadyEnqueued)
    );
    // Also while queued.
    queued_enqueue(&mut t, C2, &k);
    assert_eq!(
        t.enqueue(C2, 0, &k, Limit::ONE, None, T0),
        Err(LockError::AlreadyEnqueued)
    );
    assert_eq!(t.waiter_count(), 1);
}

#[track_caller]
fn queued_enqueue(t: &mut Table, conn: ConnId, rid: &ResourceId) {
    assert_eq!(
        t.enqueue(conn, 0, rid, Limit::ONE, None, T0),
        Ok(EnqueueOutcome::Queued)
    );
}

/// §2.6, item 70: `w` without `e`.
#[test]
fn two_phase_wait_without_enqueue() {
    let mut t = table();
    assert_eq!(
        t.wait(C1, 0, &lock("t3"), T0, Some(1)),
        Err(LockError::NotEnqueued)
    );
    assert_eq!(
        t.wait(C1, 0, &lock("t3"), T0, None),
        Err(LockError::NotEnqueued)
    );
    assert_eq!(t.resource_count(), 0, "w never creates a resource");
}

/// §3.5, item 71: the binding is the connection.
#[test]
fn two_phase_wait_on_another_connection() {
    let mut t = table();
    let k = lock("t4");
    acquired(t.enqueue(C1, 0, &k, Limit::ONE, None, T0));
    assert_eq!(t.wait(C2, 0, &k, T0, None), Err(LockError::NotEnqueued));
    // C1's state is untouched.
    assert!(matches!(
        t.wait(C1, 0, &k, T0, None),
        Ok(WaitOutcome::Granted(_))
    ));
}

/// §2.6, item 72: promoted between `e` and `w`: `w` answers at once, the
/// lease ran from promotion and is restarted by `w` (§3.2 example: 5 s, then
/// 3 s two seconds later, then 5 s again).
#[test]
fn two_phase_queued_then_granted_before_wait() {
    let mut t = table();
    let k = lock("t5");
    let h = granted(try_lock(&mut t, C1, &k, T0));
    assert_eq!(
        t.enqueue(C2, 0, &k, Limit::ONE, lease(5), T0),
        Ok(EnqueueOutcome::Queued)
    );
    t.release(&k, &wire(&h), secs(1.0)).unwrap();
    assert!(
        deliveries(&mut t).is_empty(),
        "nobody is blocked in `w`, nothing to deliver"
    );
    assert!(approx(
        lock_entry(&t.stats(2, secs(1.0)), "t5").lease_expires_in_s,
        5.0
    ));
    assert!(approx(
        lock_entry(&t.stats(2, secs(3.0)), "t5").lease_expires_in_s,
        3.0
    ));
    let g = wait_granted(t.wait(C2, 0, &k, secs(3.0), Some(2)));
    assert_eq!(g.lease.get(), 5);
    assert!(g.token.fence() > h.token.fence());
    assert!(approx(
        lock_entry(&t.stats(2, secs(3.0)), "t5").lease_expires_in_s,
        5.0
    ));
    assert_eq!(lock_entry(&t.stats(2, secs(3.0)), "t5").owner_conn_id, 2);
    assert!(deliveries(&mut t).is_empty());
}

/// §2.6, item 73: a blocked `w` gets its grant as a delivery.
#[test]
fn two_phase_blocked_wait_is_delivered() {
    let mut t = table();
    let k = lock("t6");
    let h = granted(try_lock(&mut t, C1, &k, T0));
    queued_enqueue(&mut t, C2, &k);
    assert!(matches!(
        t.wait(C2, 0, &k, T0, Some(22)),
        Ok(WaitOutcome::Pending(_))
    ));
    assert!(deliveries(&mut t).is_empty());
    t.release(&k, &wire(&h), secs(2.0)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    let (notify, rid, grant) = d.into_iter().next().unwrap();
    assert_eq!((notify, &rid), (22, &k));
    assert_eq!(grant.lease.get(), 33);
    assert_eq!(
        t.observe(&rid, grant.token, grant.lease, secs(2.5)),
        Ok(grant)
    );
    // The delivery consumed the phase-1 state.
    assert_eq!(
        t.wait(C2, 0, &k, secs(2.5), None),
        Err(LockError::NotEnqueued)
    );
    assert!(!t.cancel_wait(C2, 0, &k, secs(2.5)));
}

/// §2.6, item 74: a poll that finds no grant forfeits the position.
#[test]
fn two_phase_poll_timeout_forfeits_position() {
    let mut t = table();
    let k = lock("t7");
    let h = granted(try_lock(&mut t, C1, &k, T0));
    queued_enqueue(&mut t, C2, &k);
    queued_enqueue(&mut t, C3, &k);
    assert_eq!(t.wait(C2, 0, &k, T0, None), Ok(WaitOutcome::Timeout));
    assert_eq!(t.wait(C2, 0, &k, T0, None), Err(LockError::NotEnqueued));
    assert_eq!(t.waiter_count(), 1);
    // C3 is now first.
    t.release(&k, &wire(&h), secs(1.0)).unwrap();
    wait_granted(t.wait(C3, 0, &k, secs(1.0), None));
    // A blocking `w` that times out is withdrawn with cancel_wait.
    let j = lock("j");
    let hj = granted(try_lock(&mut t, C1, &j, T0));
    queued_enqueue(&mut t, C2, &j);
    assert!(matches!(
        t.wait(C2, 0, &j, T0, Some(2)),
        Ok(WaitOutcome::Pending(_))
    ));
    assert!(t.cancel_wait(C2, 0, &j, secs(1.0)));
    assert_eq!(
        t.wait(C2, 0, &j, secs(1.0), None),
        Err(LockError::NotEnqueued)
    );
    t.release(&j, &wire(&hj), secs(2.0)).unwrap();
    assert!(deliveries(&mut t).is_empty());
    assert_eq!(t.holder_count(), 1, "only C3's hold of t7");
}

/// §2.5, item 76: releasing the `e` token drops the phase-1 state.
#[test]
fn two_phase_release_clears_phase1_state() {
    let mut t = table();
    let k = lock("t9");
    let g = acquired(t.enqueue(C1, 0, &k, Limit::ONE, None, T0));
    t.release(&k, &wire(&g), T0).unwrap();
    assert_eq!(t.wait(C1, 0, &k, T0, Some(1)), Err(LockError::NotEnqueued));
    let g2 = acquired(t.enqueue(C1, 0, &k, Limit::ONE, None, T0));
    assert!(g2.token.fence() > g.token.fence());
    // Releasing from another connection (token bearer) clears it too.
    t.release(&k, &wire(&g2), T0).unwrap();
    assert_eq!(t.wait(C1, 0, &k, T0, None), Err(LockError::NotEnqueued));
}

/// §2.7, items 77 and 79: phase-1 state is per namespace; semaphores have
/// the same two-phase rules.
#[test]
fn two_phase_cross_namespace_and_semaphore() {
    let mut t = table();
    acquired(t.enqueue(C1, 0, &lock("t10"), Limit::ONE, None, T0));
    assert_eq!(
        t.wait(C1, 0, &sem("t10"), T0, None),
        Err(LockError::NotEnqueued)
    );
    let st = sem("st");
    let g = acquired(t.enqueue(C1, 0, &st, limit(2), None, T0));
    assert_eq!(
        t.wait(C1, 0, &lock("st"), T0, None),
        Err(LockError::NotEnqueued)
    );
    assert_eq!(wait_granted(t.wait(C1, 0, &st, T0, None)), g);
}

/// §2.6, item 78: a lease that ran out before `w` gives LeaseExpired when
/// the sweep has not run (and is evicted), NotEnqueued when it has.
#[test]
fn two_phase_lease_expired_before_wait() {
    // Not swept: LeaseExpired, holder evicted, next waiter promoted.
    let mut t = table();
    let k = lock("t11");
    acquired(t.enqueue(C1, 0, &k, Limit::ONE, lease(1), T0));
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    assert_eq!(
        t.wait(C1, 0, &k, secs(2.5), Some(1)),
        Err(LockError::LeaseExpired)
    );
    assert_eq!(deliveries(&mut t).len(), 1);
    assert_eq!(lock_entry(&t.stats(2, secs(2.5)), "t11").owner_conn_id, 2);
    assert_eq!(
        t.wait(C1, 0, &k, secs(2.5), None),
        Err(LockError::NotEnqueued)
    );

    // Exactly at the deadline counts as expired.
    let mut t = table();
    acquired(t.enqueue(C1, 0, &k, Limit::ONE, lease(1), T0));
    assert_eq!(
        t.wait(C1, 0, &k, secs(1.0), None),
        Err(LockError::LeaseExpired)
    );
    assert_eq!(t.holder_count(), 0);

    // Swept first: the phase-1 state went with the holder.
    let mut t = table();
    acquired(t.enqueue(C1, 0, &k, Limit::ONE, lease(1), T0));
    assert_eq!(t.sweep(secs(2.0)), 1);
    assert_eq!(
        t.wait(C1, 0, &k, secs(2.5), None),
        Err(LockError::NotEnqueued)
    );

    // Promoted two-phase waiter whose lease ran out before `w`.
    let mut t = table();
    let h = granted(try_lock(&mut t, C1, &k, T0));
    assert_eq!(
        t.enqueue(C2, 0, &k, Limit::ONE, lease(1), T0),
        Ok(EnqueueOutcome::Queued)
    );
    t.release(&k, &wire(&h), secs(1.0)).unwrap();
    assert_eq!(
        t.wait(C2, 0, &k, secs(2.0), None),
        Err(LockError::LeaseExpired)
    );
    assert_eq!(t.holder_count(), 0);
}

/// §2.5, item 104: `e` on a key the connection holds through `l` queues
/// behind its own hold; a `w` poll then times out and the hold is intact.
#[test]
fn two_phase_enqueue_on_own_held_key_queues() {
    let mut t = table();
    let k = lock("k");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    queued_enqueue(&mut t, C1, &k);
    assert_eq!(t.wait(C1, 0, &k, secs(1.0), None), Ok(WaitOutcome::Timeout));
    assert_eq!(
        t.wait(C1, 0, &k, secs(1.0), None),
        Err(LockError::NotEnqueued)
    );
    assert_eq!(t.release(&k, &wire(&g), secs(1.0)), Ok(()));
    assert_eq!(t.holder_count(), 0);
    // For a semaphore with room the same connection gets another slot.
    let s = sem("s");
    granted(t.acquire(C1, &s, limit(2), None, T0, None));
    acquired(t.enqueue(C1, 0, &s, limit(2), None, T0));
}

// ------------------------------------------------------- §3.9 disconnect

/// §3.9, item 85: with auto-release the holds go at once.
#[test]
fn disconnect_with_auto_release_releases() {
    let mut t = table();
    let d1 = lock("d1");
    granted(try_lock(&mut t, C1, &d1, T0));
    queued(t.acquire(C2, &d1, Limit::ONE, None, T0, Some(2)));
    t.disconnect(C1, true, secs(0.1));
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
}

/// §3.9, item 86: without auto-release the hold stays until its lease
/// expires; the token still works for release/renew (token bearer).
#[test]
fn disconnect_without_auto_release_keeps_holds_until_expiry() {
    let mut t = table();
    let d2 = lock("d2");
    granted(t.acquire(C1, &d2, Limit::ONE, lease(3), T0, None));
    t.disconnect(C1, false, secs(0.1));
    assert_eq!(
        try_lock(&mut t, C2, &d2, secs(0.2)),
        Ok(AcquireOutcome::Timeout)
    );
    assert_eq!(lock_entry(&t.stats(1, secs(0.2)), "d2").owner_conn_id, 1);
    assert_eq!(t.sweep(secs(3.0)), 1);
    granted(try_lock(&mut t, C2, &d2, secs(3.5)));

    let d3 = lock("d2b");
    let g = granted(try_lock(&mut t, C3, &d3, T0));
    t.disconnect(C3, false, T0);
    assert_eq!(
        t.renew(&d3, &wire(&g), None, secs(1.0)),
        Ok(Lease::new(33).unwrap())
    );
    assert_eq!(t.release(&d3, &wire(&g), secs(1.0)), Ok(()));
}

/// §3.9, item 87: a blocked `l` of a closed connection is withdrawn.
#[test]
fn disconnect_cancels_blocked_acquire() {
    let mut t = table();
    let d3 = lock("d3");
    let h = granted(try_lock(&mut t, C1, &d3, T0));
    queued(t.acquire(C2, &d3, Limit::ONE, None, T0, Some(2)));
    t.disconnect(C2, true, secs(0.1));
    assert_eq!(lock_entry(&t.stats(2, secs(0.1)), "d3").waiters, 0);
    t.release(&d3, &wire(&h), secs(0.2)).unwrap();
    assert!(deliveries(&mut t).is_empty());
    granted(try_lock(&mut t, C3, &d3, secs(0.3)));
}

/// §3.9, items 88 and 89: an `e` waiter (blocked in `w` or not) is withdrawn,
/// and an `e`-acquired slot is released.
#[test]
fn disconnect_cancels_enqueued_waiters_and_releases_enqueue_grants() {
    let mut t = table();
    let d4 = lock("d4");
    let h = granted(try_lock(&mut t, C1, &d4, T0));
    queued_enqueue(&mut t, C2, &d4);
    queued_enqueue(&mut t, C3, &d4);
    assert!(matches!(
        t.wait(C3, 0, &d4, T0, Some(3)),
        Ok(WaitOutcome::Pending(_))
    ));
    t.disconnect(C2, true, secs(0.1));
    t.disconnect(C3, false, secs(0.1));
    assert_eq!(t.waiter_count(), 0);
    t.release(&d4, &wire(&h), secs(0.2)).unwrap();
    assert!(deliveries(&mut t).is_empty());
    assert_eq!(t.holder_count(), 0);
    granted(try_lock(&mut t, C4, &d4, secs(0.3)));

    let d5 = lock("d5");
    acquired(t.enqueue(C1, 0, &d5, Limit::ONE, None, T0));
    queued(t.acquire(C2, &d5, Limit::ONE, None, T0, Some(2)));
    t.disconnect(C1, true, secs(0.5));
    assert_eq!(deliveries(&mut t).len(), 1);
    assert_eq!(
        t.wait(C1, 0, &d5, secs(0.5), None),
        Err(LockError::NotEnqueued)
    );
}

// ------------------------------------- §3.2 cancellation at grant time

/// §3.2: cancelling a queued `l` withdraws it; if it was promoted first,
/// cancel returns false, the grant is in the deliveries, and
/// release_undelivered passes the slot on instead of leaking it.
#[test]
fn cancel_acquire_race_passes_the_slot_on() {
    let mut t = table();
    let k = lock("k");
    let h = granted(try_lock(&mut t, C1, &k, T0));
    let a = queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    let b = queued(t.acquire(C3, &k, Limit::ONE, None, T0, Some(3)));
    assert!(b > a, "waiter ids follow arrival");
    let c = queued(t.acquire(C4, &k, Limit::ONE, None, T0, Some(4)));
    // Plain cancellation of a still-queued waiter.
    assert!(t.cancel_acquire(C4, &k, c, secs(0.5)));
    assert!(!t.cancel_acquire(C4, &k, c, secs(0.5)));
    assert_eq!(t.waiter_count(), 2);

    t.release(&k, &wire(&h), secs(1.0)).unwrap();
    // A's timeout fires after the promotion but before delivery.
    assert!(!t.cancel_acquire(C2, &k, a, secs(1.0)));
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    t.release_undelivered(&d[0].1, d[0].2.token, secs(1.0));
    let d2 = deliveries(&mut t);
    assert_eq!(d2.len(), 1);
    assert_eq!(d2[0].0, 3);
    assert!(d2[0].2.token.fence() > d[0].2.token.fence());
    assert_eq!(lock_entry(&t.stats(3, secs(1.0)), "k").owner_conn_id, 3);
    // Releasing an undelivered grant twice is harmless.
    t.release_undelivered(&d[0].1, d[0].2.token, secs(1.0));
    assert_eq!(t.holder_count(), 1);
    assert!(deliveries(&mut t).is_empty());
}

/// §3.2: the same race for a blocked `w`.
#[test]
fn cancel_wait_race_passes_the_slot_on() {
    let mut t = table();
    let k = lock("k");
    let h = granted(try_lock(&mut t, C1, &k, T0));
    queued_enqueue(&mut t, C2, &k);
    queued(t.acquire(C3, &k, Limit::ONE, None, T0, Some(3)));
    assert!(matches!(
        t.wait(C2, 0, &k, T0, Some(2)),
        Ok(WaitOutcome::Pending(_))
    ));
    t.release(&k, &wire(&h), secs(1.0)).unwrap();
    assert!(!t.cancel_wait(C2, 0, &k, secs(1.0)));
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0, 2);
    t.release_undelivered(&d[0].1, d[0].2.token, secs(1.0));
    let d2 = deliveries(&mut t);
    assert_eq!(d2.len(), 1);
    assert_eq!(d2[0].0, 3);
}

// ------------------------------------------------ §3.4 token bearer

/// §3.4, item 103: renew from another connection works but does not move
/// ownership; the owner's disconnect releases the lock.
#[test]
fn renew_from_another_connection_keeps_ownership() {
    let mut t = table();
    let k = lock("k");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    assert_eq!(
        t.renew(&k, &wire(&g), lease(60), secs(1.0)),
        Ok(Lease::new(60).unwrap())
    );
    assert_eq!(lock_entry(&t.stats(3, secs(1.0)), "k").owner_conn_id, 1);
    t.disconnect(C1, true, secs(2.0));
    granted(try_lock(&mut t, C3, &k, secs(2.0)));
    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(2.0)),
        Err(LockError::NotHeld)
    );
}

/// §2.3, item 52: any connection may release with the token.
#[test]
fn token_bearer_release_from_any_connection() {
    let mut t = table();
    let k = lock("k6");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    t.release(&k, &wire(&g), T0).unwrap();
    // C1's disconnect afterwards has nothing left to release.
    let g2 = granted(try_lock(&mut t, C2, &k, T0));
    t.disconnect(C1, true, T0);
    assert_eq!(lock_entry(&t.stats(1, T0), "k6").owner_conn_id, 2);
    t.release(&k, &wire(&g2), T0).unwrap();
}

// ------------------------------------------------------------- §5 stats

/// §5, items 93–97.
#[test]
fn stats_shapes() {
    let mut t = table();
    // 93: fresh table.
    let s = t.stats(1, T0);
    assert_eq!(
        shape(&s),
        (1, 0, 0, 0, 0),
        "fresh server: no locks, semaphores or idle entries"
    );

    // 94: held lock with one waiter.
    let k = lock("k");
    let g = granted(t.acquire(C1, &k, Limit::ONE, None, T0, None));
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    let s = t.stats(2, secs(0.25));
    assert_eq!(s.connections, 2);
    let e = lock_entry(&s, "k");
    assert_eq!((e.owner_conn_id, e.waiters), (1, 1));
    assert!(e.lease_expires_in_s <= 33.0 && approx(e.lease_expires_in_s, 32.75));

    // (A lock with waiters but no holder, owner 0: see `exhausted_fence_counter`.)

    // 95: after release with no waiters the key is idle.
    t.disconnect(C2, true, secs(0.5));
    t.release(&k, &wire(&g), secs(1.0)).unwrap();
    assert!(deliveries(&mut t).is_empty());
    let s = t.stats(1, secs(3.5));
    assert!(s.locks.is_empty(), "{s:?}");
    let idle: Vec<_> = s
        .idle_locks
        .iter()
        .map(|e| (e.key.as_str(), e.idle_s))
        .collect();
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].0, "k");
    assert!(approx(idle[0].1, 2.5));

    // 96: semaphore entry.
    let sg = granted(t.acquire(C1, &sem("s"), limit(3), None, secs(4.0), None));
    let s = t.stats(1, secs(4.0));
    assert_eq!(s.semaphores.len(), 1);
    let e = &s.semaphores[0];
    assert_eq!(
        (e.key.as_str(), e.limit, e.holders, e.waiters),
        ("s", 3, 1, 0)
    );
    t.release(&sem("s"), &wire(&sg), secs(5.0)).unwrap();
    let s = t.stats(1, secs(5.0));
    assert!(s.semaphores.is_empty());
    assert_eq!(s.idle_semaphores.len(), 1);
    assert_eq!(s.idle_semaphores[0].key, "s");

    // 97: a limit-1 semaphore is listed under locks; lock `x` and limit-1
    // semaphore `x` both appear.
    granted(t.acquire(C1, &sem("x"), limit(1), None, secs(5.0), None));
    granted(t.acquire(C2, &lock("x"), Limit::ONE, None, secs(5.0), None));
    let s = t.stats(2, secs(5.0));
    let xs: Vec<_> = s
        .locks
        .iter()
        .filter(|e| e.key == "x")
        .map(|e| e.owner_conn_id)
        .collect();
    assert_eq!(xs.len(), 2);
    assert!(xs.contains(&1) && xs.contains(&2));
    assert!(s.semaphores.is_empty());
}

/// (connections, locks, semaphores, idle_locks, idle_semaphores) sizes.
fn shape(s: &Stats) -> (u64, usize, usize, usize, usize) {
    (
        s.connections,
        s.locks.len(),
        s.semaphores.len(),
        s.idle_locks.len(),
        s.idle_semaphores.len(),
    )
}

// ---------------------------------------------------------------- §3.8 GC

/// §3.8, item 95: with max idle 0 every idle resource goes at the next
/// pass; busy ones stay.
#[test]
fn gc_with_zero_max_idle_removes_idle_not_busy() {
    let mut t = table_with(TableConfig {
        gc_max_idle: Duration::ZERO,
        ..TableConfig::default()
    });
    let held = lock("held");
    let idle = lock("idle");
    let sem_idle = sem("idle");
    let g = granted(try_lock(&mut t, C1, &held, T0));
    queued(t.acquire(C2, &held, Limit::ONE, None, T0, Some(2)));
    let i = granted(try_lock(&mut t, C1, &idle, T0));
    t.release(&idle, &wire(&i), T0).unwrap();
    let s = granted(t.acquire(C1, &sem_idle, limit(2), None, T0, None));
    t.release(&sem_idle, &wire(&s), T0).unwrap();
    assert_eq!(t.resource_count(), 3);
    assert_eq!(t.gc(T0), 2);
    assert_eq!(t.resource_count(), 1);
    let st = t.stats(2, T0);
    assert_eq!(st.locks.len(), 1);
    assert!(st.idle_locks.is_empty() && st.idle_semaphores.is_empty());

    // The promoted waiter keeps it busy until its grant is given back.
    t.release(&held, &wire(&g), secs(1.0)).unwrap();
    let d = deliveries(&mut t);
    assert_eq!(d.len(), 1);
    assert_eq!(t.gc(secs(1.0)), 0, "held by the promoted waiter");
    t.release_undelivered(&d[0].1, d[0].2.token, secs(1.0));
    assert_eq!(t.gc(secs(1.0)), 1);
    assert_eq!(t.resource_count(), 0);
}

/// §3.8: bogus releases/renews do not refresh the idle clock; a default
/// max idle is respected.
#[test]
fn gc_ignores_bogus_activity() {
    let mut t = table_with(TableConfig {
        gc_max_idle: secs(2.0),
        ..TableConfig::default()
    });
    let k = lock("k");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    t.release(&k, &wire(&g), secs(1.0)).unwrap();
    assert_eq!(t.release(&k, &wire(&g), secs(2.5)), Err(LockError::NotHeld));
    assert_eq!(
        t.renew(&k, &wire(&g), None, secs(2.5)),
        Err(LockError::NotHeld)
    );
    assert!(approx(t.stats(1, secs(2.5)).idle_locks[0].idle_s, 1.5));
    assert_eq!(t.gc(secs(2.9)), 0);
    assert_eq!(t.gc(secs(3.0)), 1);
}

// ------------------------------------------------------ §4 fence limits

/// §4.1: fences never wrap; an exhausted counter fails the acquire with a
/// mint error, and a promotion that cannot mint leaves the waiter queued.
#[test]
fn exhausted_fence_counter() {
    let mut t: Table = Driver::new(TableConfig::default(), u64::MAX - 1, 1);
    let k = lock("k");
    let g = granted(try_lock(&mut t, C1, &k, T0));
    assert_eq!(g.token, Token::new(u64::MAX, 1));
    assert_eq!(
        try_lock(&mut t, C2, &lock("j"), T0),
        Err(LockError::Mint(MintError::Exhausted))
    );
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    t.release(&k, &wire(&g), T0).unwrap();
    assert!(deliveries(&mut t).is_empty());
    assert_eq!(t.waiter_count(), 1);
    assert_eq!(t.holder_count(), 0);
    // §5: a lock with waiters but no holder shows owner 0 and 0 s.
    let s = t.stats(1, T0);
    let e = lock_entry(&s, "k");
    assert_eq!(
        (e.owner_conn_id, e.lease_expires_in_s, e.waiters),
        (0, 0.0, 1)
    );
}

// ------------------------------------------------- disconnect lock-delay

#[test]
fn disconnect_lock_delay_blocks_the_key_then_grants_the_waiter() {
    let mut t = table_with(TableConfig {
        disconnect_lock_delay: secs(2.0),
        ..TableConfig::default()
    });
    let k = lock("delayed");
    granted(t.acquire(C1, &k, Limit::ONE, lease(10), T0, None));
    queued(t.acquire(C2, &k, Limit::ONE, None, T0, Some(2)));
    t.disconnect(C1, true, secs(1.0));
    // Released, but nobody is granted during the delay …
    assert!(deliveries(&mut t).is_empty());
    assert_eq!(t.next_delay_end(), Some(secs(3.0)));
    assert!(matches!(
        try_lock(&mut t, C3, &k, secs(2.0)),
        Ok(AcquireOutcome::Timeout)
    ));
    t.sweep(secs(2.9));
    assert!(deliveries(&mut t).is_empty());
    // … and the queued waiter gets it as soon as the delay ends.
    t.sweep(secs(3.0));
    let delivered = deliveries(&mut t);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, 2);
    assert_eq!(t.next_delay_end(), None);
}

#[test]
fn lock_delay_never_outlasts_the_remaining_lease() {
    let mut t = table_with(TableConfig {
        disconnect_lock_delay: secs(30.0),
        ..TableConfig::default()
    });
    let k = lock("short");
    granted(t.acquire(C1, &k, Limit::ONE, lease(5), T0, None));
    t.disconnect(C1, true, secs(4.0));
    // Only one second of lease was left: that is the delay.
    assert_eq!(t.next_delay_end(), Some(secs(5.0)));
    assert!(matches!(
        try_lock(&mut t, C2, &k, secs(4.5)),
        Ok(AcquireOutcome::Timeout)
    ));
    assert!(matches!(
        try_lock(&mut t, C2, &k, secs(5.0)),
        Ok(AcquireOutcome::Granted(_))
    ));
}

// ------------------------------------------------------ clock granularity

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A table on a clock that lags by up to `g` (a coarse clock's tick).
fn coarse_table(g: u64, delay: u64) -> Table {
    table_with(TableConfig {
        clock_granularity: ms(g),
        disconnect_lock_delay: ms(delay),
        ..TableConfig::default()
    })
}

#[test]
fn a_lagging_clock_lengthens_leases_by_its_granularity() {
    let mut t = coarse_table(4, 0);
    let k = lock("coarse");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(5), T0, None));
    // The grant's `now` may have been up to 4 ms late: the lease may end
    // only once 5 s have passed after the latest true time it stands for.
    assert!(matches!(
        try_lock(&mut t, C2, &k, ms(5003)),
        Ok(AcquireOutcome::Timeout)
    ));
    // Stats show the lease as granted, without the allowance.
    let stats = t.stats(0, T0);
    assert_eq!(stats.locks[0].lease_expires_in_s, 5.0);
    // A renewal gets the allowance too.
    t.renew(&k, &wire(&g), lease(5), ms(1000)).unwrap();
    assert_eq!(t.sweep(ms(6003)), 0);
    assert_eq!(t.sweep(ms(6004)), 1);
    assert!(matches!(
        try_lock(&mut t, C2, &k, ms(6004)),
        Ok(AcquireOutcome::Granted(_))
    ));
}

#[test]
fn a_lagging_clock_lengthens_the_lock_delay_but_not_past_the_lease() {
    let mut t = coarse_table(4, 2_000);
    let k = lock("delayed");
    granted(t.acquire(C1, &k, Limit::ONE, lease(10), T0, None));
    t.disconnect(C1, true, ms(1000));
    assert_eq!(t.next_delay_end(), Some(ms(3004)));
    // With one second of lease left, the rest of the lease (allowance
    // included) bounds the delay.
    let k2 = lock("short");
    granted(t.acquire(C2, &k2, Limit::ONE, lease(5), T0, None));
    t.disconnect(C2, true, ms(4000));
    assert!(matches!(
        try_lock(&mut t, C3, &k2, ms(5003)),
        Ok(AcquireOutcome::Timeout)
    ));
    assert!(matches!(
        try_lock(&mut t, C3, &k2, ms(5004)),
        Ok(AcquireOutcome::Granted(_))
    ));
}

#[test]
fn explicit_release_and_expiry_are_not_delayed_and_delay_survives_gc() {
    let config = TableConfig {
        disconnect_lock_delay: secs(2.0),
        gc_max_idle: Duration::ZERO,
        ..TableConfig::default()
    };
    let mut t = table_with(config);
    let k = lock("explicit");
    let g = granted(t.acquire(C1, &k, Limit::ONE, lease(10), T0, None));
    t.release(&k, &wire(&g), secs(1.0)).unwrap();
    assert!(matches!(
        try_lock(&mut t, C2, &k, secs(1.0)),
        Ok(AcquireOutcome::Granted(_))
    ));
    // Disconnect with auto-release off: nothing is released, nothing delayed.
    let other = lock("kept");
    granted(t.acquire(C3, &other, Limit::ONE, lease(10), T0, None));
    t.disconnect(C3, false, secs(1.0));
    assert_eq!(t.next_delay_end(), None);
    // A delayed, idle resource is not garbage-collected (that would end the delay).
    let gone = lock("gone");
    granted(t.acquire(C4, &gone, Limit::ONE, lease(10), T0, None));
    t.disconnect(C4, true, secs(1.0));
    t.gc(secs(2.0));
    assert!(matches!(
        try_lock(&mut t, C2, &gone, secs(2.0)),
        Ok(AcquireOutcome::Timeout)
    ));
    t.sweep(secs(3.0));
    assert!(matches!(
        try_lock(&mut t, C2, &gone, secs(3.0)),
        Ok(AcquireOutcome::Granted(_))
    ));
}

// ------------------------------------------- mux extension: two-phase tickets

/// docs/protocol-mux.md: on one connection, each ticket has its own
/// two-phase state, so several handles enqueue on one key and are granted
/// in arrival order.
#[test]
fn tickets_on_one_connection_queue_in_fifo_order() {
    let mut t = table();
    let k = lock("mux-fifo");
    let first = granted(t.acquire(C2, &k, Limit::ONE, None, T0, None));
    for ticket in 1..=3 {
        assert_eq!(
            t.enqueue(C1, ticket, &k, Limit::ONE, None, T0),
            Ok(EnqueueOutcome::Queued)
        );
    }
    // The same ticket twice is refused; another ticket is not.
    assert_eq!(
        t.enqueue(C1, 2, &k, Limit::ONE, None, T0),
        Err(LockError::AlreadyEnqueued)
    );
    // Ticket 3 waits first, but ticket 1 is ahead of it.
    assert!(matches!(
        t.wait(C1, 3, &k, T0, Some(33)),
        Ok(WaitOutcome::Pending(_))
    ));
    t.release(&k, &wire(&first), T0).unwrap();
    assert_eq!(t.take_deliveries().count(), 0, "ticket 1 has no w yet");
    let one = wait_granted(t.wait(C1, 1, &k, T0, None));
    t.release(&k, &wire(&one), T0).unwrap();
    // Ticket 2 is granted next and keeps the grant for its `w`.
    assert_eq!(t.take_deliveries().count(), 0);
    let two = wait_granted(t.wait(C1, 2, &k, T0, Some(22)));
    assert!(two.token.fence() > one.token.fence());
    t.release(&k, &wire(&two), T0).unwrap();
    let delivered: Vec<_> = t.take_deliveries().collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].notify, 33);
    assert!(delivered[0].grant.token.fence() > two.token.fence());
}

/// A ticket granted but not collected: releasing (or expiring) that grant
/// drops the ticket's state, and other tickets are untouched.
#[test]
fn releasing_an_uncollected_ticket_grant_drops_only_that_ticket() {
    let mut t = table();
    let k = lock("mux-uncollected");
    let g = acquired(t.enqueue(C1, 7, &k, Limit::ONE, None, T0));
    assert_eq!(
        t.enqueue(C1, 8, &k, Limit::ONE, None, T0),
        Ok(EnqueueOutcome::Queued)
    );
    t.release(&k, &wire(&g), T0).unwrap();
    assert_eq!(t.wait(C1, 7, &k, T0, None), Err(LockError::NotEnqueued));
    let eight = wait_granted(t.wait(C1, 8, &k, T0, None));
    assert!(eight.token.fence() > g.token.fence());
}

/// Cancelling one ticket's wait leaves the others queued; a disconnect
/// removes every ticket of the connection.
#[test]
fn cancel_and_disconnect_with_tickets() {
    let mut t = table();
    let k = lock("mux-cancel");
    let held = granted(t.acquire(C2, &k, Limit::ONE, None, T0, None));
    for ticket in [1, 2] {
        t.enqueue(C1, ticket, &k, Limit::ONE, None, T0).unwrap();
    }
    assert!(matches!(
        t.wait(C1, 1, &k, T0, Some(1)),
        Ok(WaitOutcome::Pending(_))
    ));
    assert!(t.cancel_wait(C1, 1, &k, T0));
    assert_eq!(t.waiter_count(), 1);
    t.disconnect(C1, true, T0);
    assert_eq!(t.waiter_count(), 0);
    t.release(&k, &wire(&held), T0).unwrap();
    assert_eq!(t.holder_count(), 0);
}

/// Only one `w` may wait on a ticket at a time: a second one (blocking or a
/// poll) is refused and the first stays in place.
#[test]
fn a_second_wait_on_a_waiting_ticket_is_refused() {
    let mut t = table();
    let k = lock("mux-double-wait");
    let held = granted(t.acquire(C2, &k, Limit::ONE, None, T0, None));
    t.enqueue(C1, 4, &k, Limit::ONE, None, T0).unwrap();
    assert!(matches!(
        t.wait(C1, 4, &k, T0, Some(1)),
        Ok(WaitOutcome::Pending(_))
    ));
    assert_eq!(
        t.wait(C1, 4, &k, T0, Some(2)),
        Err(LockError::AlreadyEnqueued)
    );
    assert_eq!(t.wait(C1, 4, &k, T0, None), Err(LockError::AlreadyEnqueued));
    t.release(&k, &wire(&held), T0).unwrap();
    let delivered: Vec<_> = t.take_deliveries().collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].notify, 1, "the first wait is answered");
}
