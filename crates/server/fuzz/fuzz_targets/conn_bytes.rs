//! Arbitrary bytes sent to a live embedded server over TCP (127.0.0.1).
//!
//! One server runs for the whole fuzzing session. For every input:
//! * the bytes are written on a fresh connection, which is then half-closed;
//! * the server must end the connection within a bound (a hang or a stuck
//!   blocking request fails the run), having written only well-formed reply
//!   lines, at most one per three LFs received (no desync, no extra output);
//! * a fresh connection must then still be answered (the server did not
//!   panic or wedge);
//! * every 256 inputs, once all fuzz connections are gone, the server must
//!   hold no locks or semaphores and count only the checking connection (no
//!   state leaked from closed connections).
//!
//! Memory: libFuzzer's `-rss_limit_mb` (default 2048) fails the run if the
//! server's buffers grow without bound.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dflockd_proto::Reply;
use dflockd_server::{Server, ServerConfig, ServerHandle};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::time::timeout;

/// Longer than any blocking request an input can make last: EOF cancels
/// waits at once, and the read timeout bounds a partial frame.
const BOUND: Duration = Duration::from_secs(10);

struct Harness {
    runtime: Runtime,
    addr: SocketAddr,
    _server: ServerHandle,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(Server::start(ServerConfig {
                read_timeout: Duration::from_secs(2),
                max_locks: 256,
                ..ServerConfig::ephemeral()
            }))
            .expect("server starts");
        Harness {
            runtime,
            addr: server.local_addr(),
            _server: server,
        }
    })
}

async fn one_input(addr: SocketAddr, data: &[u8]) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close early (oversize line, auth failure): a failed
    // write is fine, what it answered is checked below.
    let _ = stream.write_all(data).await;
    let _ = stream.shutdown().await;
    let mut replies = Vec::new();
    let read = timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => replies.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not end the connection in {BOUND:?}");
    let lfs = data.iter().filter(|&&b| b == b'\n').count();
    let lines: Vec<&[u8]> = replies.split_inclusive(|&b| b == b'\n').collect();
    // One reply per complete frame, plus at most one `error` for a frame cut
    // short by an oversize line.
    assert!(
        lines.len() <= lfs / 3 + 1,
        "{} replies to {lfs} LFs: {replies:?}",
        lines.len()
    );
    for line in lines {
        assert!(line.ends_with(b"\n"), "partial reply line {line:?}");
        assert!(Reply::parse(line).is_ok(), "malformed reply {line:?}");
    }
}

async fn ping(addr: SocketAddr) -> Vec<u8> {
    let mut stream = timeout(BOUND, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.write_all(b"stats\n_\n_\n").await.expect("write");
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.ends_with(b"\n") {
        let n = timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("the server answers after an input")
            .expect("read");
        assert!(n > 0, "the server closed a healthy connection");
        reply.extend_from_slice(&buf[..n]);
    }
    reply
}

/// Polls until no lock or semaphore is held and only the polling connection
/// is open.
async fn assert_no_state_left(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let reply = ping(addr).await;
        let text = String::from_utf8_lossy(&reply);
        let json: serde_json::Value = text
            .trim_end()
            .strip_prefix("ok ")
            .and_then(|body| serde_json::from_str(body).ok())
            .unwrap_or_else(|| panic!("stats answered {text}"));
        let empty = |field: &str| json[field].as_array().is_some_and(Vec::is_empty);
        if json["connections"] == 1 && empty("locks") && empty("semaphores") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state left behind: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fuzz_target!(|data: &[u8]| {
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    let h = harness();
    h.runtime.block_on(async {
        one_input(h.addr, data).await;
        let reply = ping(h.addr).await;
        assert!(reply.starts_with(b"ok {"), "stats answered {reply:?}");
        if INPUTS.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
            assert_no_state_left(h.addr).await;
        }
    });
});
