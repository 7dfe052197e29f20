//! Queue observations for the end-to-end tests that drive the server
//! through the dflockd client, on server 0 (the raw-protocol helpers are in
//! [`wire`](crate::wire)).

use std::time::Duration;

use dflockd_client::{Client, Lease};

use crate::client::eventually;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many waiters lock `key` has on server 0.
pub async fn waiters(client: &Client, key: &str) -> u64 {
    let stats = client.stats(0).await.expect("stats");
    stats
        .locks
        .iter()
        .find(|l| l.key == key)
        .map_or(0, |l| l.waiters)
}

/// Polls until lock `key` has exactly `n` waiters (bounded: 20 s).
pub async fn wait_for_waiters(client: &Client, key: &str, n: u64) {
    eventually(
        &format!("{key}: {n} waiters"),
        Duration::from_secs(20),
        || async { waiters(client, key).await == n },
    )
    .await;
}

/// Starts `client` waiting (up to 10 s) for the held lock `key` and returns
/// once its request is queued on the server. The task yields when it was
/// granted, and the lease.
pub async fn queued_waiter(client: &Client, key: &str) -> JoinHandle<(Instant, Lease)> {
    let lock = client.lock(key).expect("lock");
    let waiter = tokio::spawn(async move {
        let lease = lock
            .acquire_within(Duration::from_secs(10))
            .await
            .expect("acquire")
            .expect("granted within 10 s");
        (Instant::now(), lease)
    });
    wait_for_waiters(client, key, 1).await;
    waiter
}
