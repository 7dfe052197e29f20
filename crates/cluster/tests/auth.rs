//! Raft links authenticated with the cluster secret: nodes that share it
//! form a cluster; a node with another secret is kept out; a peer that
//! cannot prove the secret is disconnected before any Raft message.

use std::time::Duration;

use dflockd_cluster::{Network, NodeOptions, RaftSecret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

use support::{WAIT, acquire, commit, fence_of, listeners, start_cluster};

fn secret(byte: u8) -> RaftSecret {
    RaftSecret::new(vec![byte; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_secret_replicate_and_a_stranger_is_kept_out() {
    // Nodes 1 and 2 share the secret; node 3 has another one.
    let (_dirs, nodes) = start_cluster(listeners(3).await, |i| NodeOptions {
        network: Network::with_secret(secret(if i < 2 { 1 } else { 2 })),
        ..NodeOptions::default()
    })
    .await;
    // 1 and 2 are a majority of three: they elect a leader and commit.
    let deadline = tokio::time::Instant::now() + WAIT;
    let leader = loop {
        let leader = nodes[0].raft().metrics().borrow().current_leader;
        if let Some(id) = leader
            && id <= 2
        {
            break &nodes[(id - 1) as usize];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader among 1 and 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let effects = commit(leader, acquire(1, "a")).await;
    fence_of(&effects);
    // Node 3 never received an entry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(nodes[2].raft().metrics().borrow().last_log_index, None);
    assert_eq!(
        nodes[2].view().read(dflockd_core::LockTable::holder_count),
        0
    );
}

#[tokio::test]
async fn a_peer_without_the_secret_is_disconnected() {
    let (_dirs, nodes) = start_cluster(listeners(1).await, |_| NodeOptions {
        network: Network::with_secret(secret(1)),
        ..NodeOptions::default()
    })
    .await;
    let mut stream = TcpStream::connect(nodes[0].raft_addr()).await.unwrap();
    stream.write_all(&[0u8; 32]).await.unwrap();
    let mut hello = [0u8; 64];
    stream.read_exact(&mut hello).await.unwrap();
    // A made-up proof: the node hangs up.
    stream.write_all(&[0u8; 32]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open: {read:?}");
}
