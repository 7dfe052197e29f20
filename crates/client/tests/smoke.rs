//! A quick tour: lock, contention, two-phase, semaphore, renewal. Runs
//! against the embedded server or the external one (see `support`).

use dflockd_testkit::client as support;

use std::time::Duration;

use dflockd_client::{Enqueue, ErrorKind, Released};
use support::{BOUND, Keys, Mode, TestServer, both_modes, eventually, waiters};

both_modes! {
#[tokio::test]
async fn lock_round_trip_and_contention() {
    let server = TestServer::start().await;
    let client = server.client();
    let keys = Keys::new("smoke");
    let key = keys.key("lock");
    let lock = client.lock(&key).unwrap();
    let lease = lock.acquire().await.unwrap();
    assert!(lock.try_acquire().await.unwrap().is_none());
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire_within(Duration::from_secs(5)).await })
    };
    eventually("waiter queued", BOUND, || async {
        waiters(&client, 0, &key).await == 1
    })
    .await;
    let first_fence = lease.fence();
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    let second = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("granted after release");
    assert!(second.fence() > first_fence);
    let stats = client.stats(0).await.unwrap();
    assert_eq!(stats.locks.iter().filter(|l| l.key == key).count(), 1);
    drop(second);
}
}

both_modes! {
#[tokio::test]
async fn two_phase_and_semaphore() {
    let server = TestServer::start().await;
    let client = server.client();
    let keys = Keys::new("smoke");
    let key = keys.key("pool");
    let sem = client.semaphore(&key, 2).unwrap();
    let a = sem.acquire().await.unwrap();
    let b = sem.acquire().await.unwrap();
    let Enqueue::Queued(ticket) = sem.enqueue().await.unwrap() else {
        panic!("should queue")
    };
    a.release().await.unwrap();
    let c = ticket.wait(Duration::from_secs(5)).await.unwrap();
    assert!(c.fence() > b.fence());
    assert!(matches!(
        client.semaphore(&key, 3).unwrap().try_acquire().await,
        Err(ref e) if matches!(e.kind(), ErrorKind::LimitMismatch)
    ));
}
}

both_modes! {
#[tokio::test]
async fn renewals_keep_a_short_lease_alive() {
    let server = TestServer::start().await;
    let client = server.client();
    let keys = Keys::new("smoke");
    let lock = client
        .lock(&keys.key("renewed"))
        .unwrap()
        .with_lease(Duration::from_secs(1));
    let lease = lock.acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!lease.is_lost());
    assert!(lock.try_acquire().await.unwrap().is_none());
    assert_eq!(lease.release().await.unwrap(), Released::Released);
}
}

both_modes! {
/// The suite really runs in the mode it claims: against the embedded
/// server (which offers the extension), a mux-mode client multiplexes and a
/// plain-mode client does not. Against an external server either may be
/// right (a Go dflockd refuses the extension), so the mode is printed.
#[tokio::test]
async fn suite_runs_in_its_connection_mode() {
    let server = TestServer::start().await;
    let client = server.client();
    let multiplexed = client.multiplexed(0).await.unwrap();
    println!(
        "suite mode: {}; connection multiplexed: {multiplexed}",
        if Mode::current() == Mode::Mux {
            "mux"
        } else {
            "plain"
        }
    );
    if !support::is_external() {
        assert_eq!(multiplexed, Mode::current() == Mode::Mux);
    }
}
}
