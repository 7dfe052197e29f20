//! Server options beyond the upstream checklist.

use std::time::Duration;

use dflockd_server::{IdlePolicy, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn read_all(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    timeout(within, stream.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .expect("read");
    out
}

#[tokio::test]
async fn unbounded_idle_keeps_silent_connections_but_still_times_out_inside_a_frame() {
    let read_timeout = Duration::from_millis(300);
    let config = ServerConfig {
        read_timeout,
        idle: IdlePolicy::Unbounded,
        ..ServerConfig::ephemeral()
    };
    let server = Server::start(config).await.expect("start");

    // Silent for well over the read timeout: still open.
    let mut idle = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    tokio::time::sleep(read_timeout * 3).await;
    idle.write_all(b"ping\n_\n_\n").await.expect("write");
    let mut reply = [0u8; 3];
    timeout(Duration::from_secs(2), idle.read_exact(&mut reply))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&reply, b"ok\n");

    // A request that stops after its first line is still cut off.
    let mut partial = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    partial.write_all(b"l\n").await.expect("write");
    let started = Instant::now();
    assert_eq!(
        read_all(&mut partial, Duration::from_secs(3)).await,
        b"error\n"
    );
    assert!(started.elapsed() >= read_timeout);
}

#[tokio::test]
async fn baseline_idle_policy_closes_silent_connections() {
    let read_timeout = Duration::from_millis(300);
    let server = Server::start(ServerConfig {
        read_timeout,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("start");
    let mut idle = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let started = Instant::now();
    assert_eq!(
        read_all(&mut idle, Duration::from_secs(3)).await,
        b"error\n"
    );
    assert!(started.elapsed() >= read_timeout);
}

#[tokio::test]
async fn shutdown_timeout_closes_idle_connections_silently_and_stops_the_server() {
    let config = ServerConfig {
        shutdown_timeout: Some(Duration::from_millis(400)),
        ..ServerConfig::ephemeral()
    };
    let server = Server::start(config).await.expect("start");
    let mut idle = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    // Make sure the connection is established server-side.
    idle.write_all(b"ping\n_\n_\n").await.expect("write");
    let mut reply = [0u8; 3];
    idle.read_exact(&mut reply).await.expect("read");
    let started = Instant::now();
    let stopped = tokio::spawn(server.shutdown());
    // The idle connection gets no bytes, just a close, after the timeout.
    assert_eq!(read_all(&mut idle, Duration::from_secs(5)).await, b"");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("server stopped")
        .expect("join");
}

/// Disconnect lock-delay (off by default): a key auto-released because its
/// holder's connection closed is not granted again for the delay.
#[tokio::test]
async fn disconnect_lock_delay_holds_an_auto_released_key() {
    use tokio::io::AsyncBufReadExt;
    let delay = Duration::from_millis(600);
    let server = Server::start(ServerConfig {
        disconnect_lock_delay: delay,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("start");
    let mut holder = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    holder
        .write_all(b"l\ndelayed\n0 10\n")
        .await
        .expect("write");
    let mut reply = [0u8; 39];
    holder.read_exact(&mut reply).await.expect("grant");
    assert!(reply.starts_with(b"ok "));
    let waiter = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let (read, mut write) = waiter.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    drop(holder); // the holder's connection closes: auto-release
    let released = Instant::now();
    write.write_all(b"l\ndelayed\n5\n").await.expect("write");
    let granted = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("in time")
        .expect("read")
        .expect("line");
    let waited = released.elapsed();
    assert!(granted.starts_with("ok "), "{granted}");
    assert!(
        waited >= delay - Duration::from_millis(50),
        "granted after only {waited:?}"
    );
    assert!(
        waited < delay + Duration::from_secs(1),
        "granted after {waited:?}"
    );
}
