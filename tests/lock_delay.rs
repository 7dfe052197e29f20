//! Asymmetric resets: the server learns that a holder's connection died
//! *before* the holder does. Without a lock-delay the next holder overlaps
//! the old one by that skew (no client-side rule can prevent it); with
//! `disconnect_lock_delay` ≥ skew there is no overlap.

use std::net::SocketAddr;
use std::time::Duration;

use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SKEW: Duration = Duration::from_millis(250);

/// A proxy whose server side can be closed while its client side stays open.
struct AsymmetricLink {
    addr: SocketAddr,
    cut_server_side: CancellationToken,
    cut_client_side: CancellationToken,
}

async fn link(server: SocketAddr) -> AsymmetricLink {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server_cut, client_cut) = (CancellationToken::new(), CancellationToken::new());
    let (s, c) = (server_cut.clone(), client_cut.clone());
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(outbound) = TcpStream::connect(server).await else {
                return;
            };
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                tokio::select! {
                    _ = pump(&mut ri, &mut wo) => {}
                    _ = pump(&mut ro, &mut wi) => {}
                    _ = s.cancelled() => {}
                }
                drop((ro, wo)); // the server sees EOF now …
                c.cancelled().await; // … the client only later
            });
        }
    });
    AsymmetricLink {
        addr,
        cut_server_side: server_cut,
        cut_client_side: client_cut,
    }
}

async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) {
    let mut buf = vec![0u8; 8192];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Returns how long the old and the new holder overlapped (zero if not).
async fn overlap_after_asymmetric_reset(lock_delay: Duration) -> Duration {
    let server = Server::start(ServerConfig {
        disconnect_lock_delay: lock_delay,
        ..ServerConfig::ephemeral()
    })
    .await
    .unwrap();
    let link = link(server.local_addr()).await;
    let old = Client::builder().server(link.addr.into()).build().unwrap();
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
    let new_started = tokio::spawn(async move {
        let lease = next
            .lock("asymmetric")
            .unwrap()
            .acquire_within(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        (Instant::now(), lease)
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // the new holder is queued
    link.cut_server_side.cancel();
    tokio::time::sleep(SKEW).await;
    link.cut_client_side.cancel();
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
