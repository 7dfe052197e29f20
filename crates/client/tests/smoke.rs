use std::time::Duration;

use dflockd_client::{Client, Enqueue, Error, Released};
use dflockd_server::{Server, ServerConfig, ServerHandle};

async fn setup() -> (ServerHandle, Client) {
    let server = Server::start(ServerConfig::ephemeral()).await.unwrap();
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    (server, client)
}

#[tokio::test]
async fn lock_round_trip_and_contention() {
    let (_server, client) = setup().await;
    let lock = client.lock("smoke").unwrap();
    let lease = lock.acquire().await.unwrap();
    assert!(lock.try_acquire().await.unwrap().is_none());
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire_within(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first_fence = lease.fence();
    assert_eq!(lease.release().await.unwrap(), Released::Released);
    let second = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("granted after release");
    assert!(second.fence() > first_fence);
    let stats = client.stats(0).await.unwrap();
    assert_eq!(stats.locks.len(), 1);
    drop(second);
}

#[tokio::test]
async fn two_phase_and_semaphore() {
    let (_server, client) = setup().await;
    let sem = client.semaphore("pool", 2).unwrap();
    let a = sem.acquire().await.unwrap();
    let b = sem.acquire().await.unwrap();
    let Enqueue::Queued(ticket) = sem.enqueue().await.unwrap() else {
        panic!("should queue")
    };
    a.release().await.unwrap();
    let c = ticket.wait(Duration::from_secs(5)).await.unwrap();
    assert!(c.fence() > b.fence());
    assert!(matches!(
        client.semaphore("pool", 3).unwrap().try_acquire().await,
        Err(Error::LimitMismatch)
    ));
}

#[tokio::test]
async fn renewals_keep_a_short_lease_alive() {
    let (_server, client) = setup().await;
    let lock = client
        .lock("renewed")
        .unwrap()
        .with_lease(Duration::from_secs(1));
    let lease = lock.acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!lease.is_lost());
    assert!(lock.try_acquire().await.unwrap().is_none());
    assert_eq!(lease.release().await.unwrap(), Released::Released);
}
