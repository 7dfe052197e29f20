//! A three-node dflockd cluster in one process: a lease survives the
//! leader's death.
//!
//! `cargo run --release --example cluster`
//!
//! Three nodes start on loopback, each with its own Raft directory, and form
//! one cluster. A client takes a lock with a 10 s lease on the leader. The
//! leader is killed (no hand-over); the other two elect a new leader, which
//! restarts every live lease in full on taking office. The client renews
//! its lease on the new leader with the same token — still its lock — and a
//! new grant's fence is larger than any before the failover.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dflockd::server::{
    ClusterConfig, ClusterPeer, Listeners, RaftSecret, Server, ServerConfig, ServerHandle,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Sends one request on `stream` and reads its one-line reply.
async fn request(stream: &mut BufReader<TcpStream>, request: &str) -> std::io::Result<String> {
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    Ok(line.trim_end().to_string())
}

/// Sends one request on a new connection and reads its reply. (Closing a
/// connection releases what it holds, as on a single server.)
async fn ask(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut stream = BufReader::new(TcpStream::connect(addr).await?);
    request(&mut stream, line).await
}

/// The node that answers a barrier: the leader, once it serves.
async fn leader(nodes: &[Option<ServerHandle>]) -> usize {
    loop {
        for (i, node) in nodes.iter().enumerate() {
            if let Some(node) = node
                && ask(node.local_addr(), "barrier\n_\n\n")
                    .await
                    .ok()
                    .as_deref()
                    == Some("ok")
            {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fence(token: &str) -> u64 {
    u64::from_str_radix(&token[..16], 16).unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let bind = || std::net::TcpListener::bind("127.0.0.1:0");
    let clients = [bind()?, bind()?, bind()?];
    let rafts = [bind()?, bind()?, bind()?];
    let peers: Vec<ClusterPeer> = (0..3)
        .map(|i| {
            Ok(ClusterPeer {
                id: i as u64 + 1,
                raft: rafts[i].local_addr()?.to_string(),
                client: clients[i].local_addr()?.to_string(),
            })
        })
        .collect::<std::io::Result<_>>()?;
    let secret = RaftSecret::new(b"example secret, at least 32 bytes long".to_vec())?;
    let mut starts = Vec::new();
    for (i, (client, raft)) in clients.into_iter().zip(rafts).enumerate() {
        let mut config = ServerConfig::ephemeral();
        let cluster = ClusterConfig::new(
            i as u64 + 1,
            dirs[i].path(),
            peers[i].raft.clone(),
            secret.clone(),
        );
        config.cluster = Some(cluster.with_peers(peers.clone()));
        let listeners = Listeners {
            client: Some(client),
            raft: Some(raft),
            http: None,
        };
        starts.push(tokio::spawn(Server::start_with_listeners(
            config, listeners,
        )));
    }
    let mut nodes = Vec::new();
    for start in starts {
        nodes.push(Some(start.await??));
    }
    let first = leader(&nodes).await;
    let addr = nodes[first]
        .as_ref()
        .map(ServerHandle::local_addr)
        .ok_or("no node")?;
    println!("cluster formed: node {} leads ({addr})", first + 1);

    // The holder keeps its connection: it dies with the leader.
    let mut holder = BufReader::new(TcpStream::connect(addr).await?);
    let granted = request(&mut holder, "l\nnightly-report\n0 10\n").await?;
    let token = granted
        .split_whitespace()
        .nth(1)
        .ok_or("no grant")?
        .to_string();
    println!("lock taken: {granted} (fence {})", fence(&token));

    let killed_at = Instant::now();
    if let Some(node) = nodes[first].take() {
        node.force_close();
        node.wait().await;
    }
    drop(holder);
    println!("node {} killed", first + 1);
    let next = leader(&nodes).await;
    let next_addr = nodes[next]
        .as_ref()
        .map(ServerHandle::local_addr)
        .ok_or("no node")?;
    println!(
        "node {} leads after {:.2} s",
        next + 1,
        killed_at.elapsed().as_secs_f64()
    );

    let mut holder = BufReader::new(TcpStream::connect(next_addr).await?);
    let renewed = request(&mut holder, &format!("n\nnightly-report\n{token} 10\n")).await?;
    println!("renewed on the new leader with the same token: {renewed}");
    let other = ask(next_addr, "l\nnightly-report\n0\n").await?;
    println!("another client asks for the lock: {other}");
    let fresh = ask(next_addr, "l\nanother-job\n0\n").await?;
    let fresh_fence = fresh.split_whitespace().nth(1).map(fence).unwrap_or(0);
    println!("a new grant: fence {fresh_fence} > {}", fence(&token));
    assert_eq!(renewed, "ok 10", "the lease survives the failover");
    assert_eq!(other, "timeout", "the lock is still held");
    assert!(
        fresh_fence > fence(&token),
        "fences grow across the failover"
    );
    for node in nodes.into_iter().flatten() {
        node.shutdown().await;
    }
    Ok(())
}
