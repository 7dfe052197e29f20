//! Asymmetric resets: the server learns that a holder's connection died
//! *before* the holder does. Without a lock-delay the next holder overlaps
//! the old one by that skew (no client-side rule can prevent it); with
//! `disconnect_lock_delay` ≥ skew there is no overlap.

use dflockd_testkit::queue as client_support;

use std::time::Duration;

use client_support::queued_waiter;
use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};
use dflockd_testkit::faultproxy::{FaultProxy, Side};
use tokio::time::Instant;

const SKEW: Duration = Duration::from_millis(250);

/// Returns how long the old and the new holder overlapped (zero if not).
async fn overlap_after_asymmetric_reset(lock_delay: Duration) -> Duration {
    let server = Server::start(ServerConfig {
        disconnect_lock_delay: lock_delay,
        ..ServerConfig::ephemeral()
    })
    .await
    .unwrap();
    let proxy = FaultProxy::start(server.local_addr()).await.unwrap();
    let old = Client::builder()
        .server(proxy.addr().into())
        .build()
        .unwrap();
    let lease = old
        .lock("asymmetric")
        .unwrap()
        .with_lease(Duration::from_secs(5))
        .acquire()
        .await
        .unwrap();
    let monitor = lease.monitor();
    let old_ended = tokio::spawn(async move {
        monitor.lost().await;
        Instant::now()
    });
    let next = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    // The new holder queues behind the old one.
    let new_started = queued_waiter(&next, "asymmetric").await;
    // Every connection of the old holder: the server side is reset now, the
    // client side SKEW later.
    for link in proxy.links() {
        tokio::spawn(async move { link.reset_asymmetric(Side::Server, SKEW).await });
    }
    let old_end = tokio::time::timeout(Duration::from_secs(5), old_ended)
        .await
        .unwrap()
        .unwrap();
    let (new_start, _lease) = tokio::time::timeout(Duration::from_secs(5), new_started)
        .await
        .unwrap()
        .unwrap();
    drop(lease);
    old_end.saturating_duration_since(new_start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lock_delay_the_next_holder_overlaps_by_the_skew() {
    let overlap = overlap_after_asymmetric_reset(Duration::ZERO).await;
    eprintln!("skew {SKEW:?}, no lock-delay: old and new holder overlapped by {overlap:?}");
    assert!(
        overlap >= SKEW / 2,
        "expected an overlap of about {SKEW:?}, got {overlap:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_lock_delay_above_the_skew_there_is_no_overlap() {
    let overlap = overlap_after_asymmetric_reset(Duration::from_millis(750)).await;
    eprintln!("skew {SKEW:?}, lock-delay 750ms: overlap {overlap:?}");
    assert_eq!(overlap, Duration::ZERO, "holders overlapped by {overlap:?}");
}
