//! A server restart on the same port with `--fence-state-file`: clients
//! notice the loss, and every fence after the restart exceeds every fence
//! before it — even with the wall clock set back (the journal's ceiling, not
//! the clock, seeds the counter).

use std::time::Duration;

use dflockd::client::{Client, LossReason};
use dflockd::server::{FenceFile, Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_fence_state_file_loses_leases_and_keeps_fences_growing() {
    let dir = tempfile::tempdir().unwrap();
    let fence_file = dir.path().join("fences");
    let config = |port| ServerConfig {
        port,
        fence_state_file: Some(fence_file.clone()),
        ..ServerConfig::ephemeral()
    };
    let first = Server::start(config(0)).await.unwrap();
    let addr = first.local_addr();
    let client = Client::builder().server(addr.into()).build().unwrap();

    let mut before = Vec::new();
    let mut held = Vec::new();
    for i in 0..20 {
        let lease = client
            .lock(&format!("restart-{i}"))
            .unwrap()
            .with_lease(Duration::from_secs(30))
            .acquire()
            .await
            .unwrap();
        before.push(lease.fence());
        held.push(lease);
    }
    // Stop the server (as a crash would: connections just close) …
    first.force_close();
    first.wait().await;
    for lease in &held {
        tokio::time::timeout(Duration::from_secs(5), lease.lost())
            .await
            .expect("loss noticed");
        assert_eq!(lease.loss_reason(), Some(LossReason::ConnectionLost));
    }
    // … and start it again on the same port with the same journal, whose
    // ceiling we push an hour ahead of the clock (as after a clock step back).
    let now_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let ahead = now_nanos + 3_600_000_000_000;
    let ceiling = {
        let (file, start) = FenceFile::open(&fence_file, ahead).unwrap();
        assert_eq!(start, ahead);
        file.ceiling()
    };
    assert!(ceiling > *before.iter().max().unwrap());
    let second = Server::start(config(addr.port())).await.unwrap();
    assert_eq!(second.local_addr(), addr);

    let mut after = Vec::new();
    for i in 0..20 {
        // The client reconnects by itself.
        let lease = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match client
                    .lock(&format!("restart-{i}"))
                    .unwrap()
                    .acquire()
                    .await
                {
                    Ok(lease) => break lease,
                    Err(error) if error.is_transient() => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(error) => panic!("{error}"),
                }
            }
        })
        .await
        .expect("reacquired after restart");
        after.push(lease.fence());
    }
    let max_before = *before.iter().max().unwrap();
    let min_after = *after.iter().min().unwrap();
    assert!(
        min_after > max_before,
        "fence {min_after} after restart is not above {max_before}"
    );
    assert!(
        min_after > ceiling,
        "fences start above the persisted ceiling"
    );
    assert!(after.windows(2).all(|w| w[0] < w[1]));
    let bytes = std::fs::read(&fence_file).unwrap();
    assert!(bytes.len() == 32 || bytes.len() == 64);
    assert_eq!(&bytes[..8], b"dflfnc1\n");
}
