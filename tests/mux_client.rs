//! The client on the multiplexed extension, end to end against the embedded
//! server: thousands of waiters through one connection in exact FIFO
//! order, and mux clients sharing one FIFO queue with plain clients — our
//! own client in plain mode and the real Python client 2.1.1.
//!
//! The 10,000-waiter and throughput figures are benchmarks
//! (`cargo bench -p dflockd-client --bench mux`); this is the CI-sized
//! version of the FIFO one.

use dflockd_testkit::python as venv;
use dflockd_testkit::queue as client_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_support::{wait_for_waiters, waiters};
use dflockd::client::{Client, Enqueue, Lease, Ticket};
use dflockd::server::{Server, ServerConfig, ServerHandle};

const WAIT: Duration = Duration::from_secs(60);

async fn server() -> ServerHandle {
    let mut config = ServerConfig::ephemeral();
    config.max_locks = 100_000;
    Server::start(config).await.expect("server starts")
}

fn client(server: &ServerHandle, multiplex: bool) -> Client {
    Client::builder()
        .server(server.local_addr().into())
        .multiplex(multiplex)
        .build()
        .expect("client")
}

async fn queued(client: &Client, key: &str) -> Ticket {
    match client.lock(key).unwrap().enqueue().await.unwrap() {
        Enqueue::Queued(ticket) => ticket,
        Enqueue::Acquired(_) => panic!("{key} was free"),
    }
}

/// Waits on every ticket at once, in reverse order (the queue, not the
/// spawn order, decides who is granted first); each grantee records its
/// index and fence, then releases. `release_holder` lets go of the key once
/// all `n` waits are queued. Returns the grant order.
async fn drain_in_queue_order(
    client: &Client,
    key: &str,
    tickets: Vec<(usize, Ticket)>,
    holder: Lease,
) -> Vec<(usize, u64)> {
    let n = tickets.len() as u64;
    let order = Arc::new(Mutex::new(Vec::with_capacity(tickets.len())));
    let tasks: Vec<_> = tickets
        .into_iter()
        .rev()
        .map(|(i, ticket)| {
            let order = Arc::clone(&order);
            tokio::spawn(async move {
                let lease = ticket.wait(WAIT).await.unwrap();
                order.lock().unwrap().push((i, lease.fence()));
                lease.release().await.unwrap();
            })
        })
        .collect();
    wait_for_waiters(client, key, n).await;
    holder.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    std::mem::take(&mut *order.lock().unwrap())
}

/// 2,000 handles of one process queue on one key through one connection;
/// each releases as soon as it is granted, so the grants must follow the
/// enqueue order exactly, with strictly increasing fences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_waiters_through_one_connection_in_fifo_order() {
    const N: usize = 2_000;
    let server = server().await;
    let client = client(&server, true);
    assert!(client.multiplexed(0).await.unwrap());
    let key = "mux-fifo";
    let holder = client.lock(key).unwrap().acquire().await.unwrap();
    let mut tickets = Vec::with_capacity(N);
    for _ in 0..N {
        tickets.push(queued(&client, key).await);
    }
    let stats = client.stats(0).await.unwrap();
    assert_eq!(stats.connections, 1, "everything on one connection");
    assert_eq!(waiters(&client, key).await, N as u64);
    let tickets = tickets.into_iter().enumerate().collect();
    let order = drain_in_queue_order(&client, key, tickets, holder).await;
    let indices: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, (0..N).collect::<Vec<_>>(), "grants in FIFO order");
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1), "fences grow");
    assert_eq!(client.stats(0).await.unwrap().connections, 1);
}

/// Blocking acquires (not tickets) from many tasks over one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_acquires_share_the_connection() {
    const N: usize = 500;
    let server = server().await;
    let client = client(&server, true);
    let key = "mux-blocking";
    let holder = client.lock(key).unwrap().acquire().await.unwrap();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let lock = client.lock(key).unwrap();
            tokio::spawn(async move {
                let lease = lock.acquire_within(WAIT).await.unwrap().unwrap();
                let fence = lease.fence();
                lease.release().await.unwrap();
                fence
            })
        })
        .collect();
    wait_for_waiters(&client, key, N as u64).await;
    assert_eq!(client.stats(0).await.unwrap().connections, 1);
    holder.release().await.unwrap();
    let mut fences = Vec::new();
    for task in tasks {
        fences.push(task.await.unwrap());
    }
    fences.sort_unstable();
    fences.dedup();
    assert_eq!(fences.len(), N, "every waiter got a grant of its own");
}

/// A mux client and a plain-mode client queue on the same key, alternating;
/// grants follow arrival order across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_and_plain_clients_share_one_fifo() {
    let server = server().await;
    let mux = client(&server, true);
    let plain = client(&server, false);
    assert!(mux.multiplexed(0).await.unwrap());
    assert!(!plain.multiplexed(0).await.unwrap());
    let key = "mixed-fifo";
    let holder = plain.lock(key).unwrap().acquire().await.unwrap();
    let mut tickets = Vec::new();
    for i in 0..6 {
        let who = if i % 2 == 0 { &mux } else { &plain };
        tickets.push((i, queued(who, key).await));
    }
    let order = drain_in_queue_order(&mux, key, tickets, holder).await;
    assert_eq!(
        order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1));
}

/// The real Python client (plain protocol) queues between two tickets of
/// our mux client on the same key: it is granted after the first and
/// before the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_and_mux_client_share_one_fifo() {
    let python = venv::interop_python(env!("CARGO_TARGET_TMPDIR"));
    let server = server().await;
    let mux = client(&server, true);
    assert!(mux.multiplexed(0).await.unwrap());
    let key = "py-mux-fifo";
    let holder = mux.lock(key).unwrap().acquire().await.unwrap();
    let first = queued(&mux, key).await;

    let script = r#"
import sys
from dflockd_client import SyncDistributedLock, fence_from_token
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = SyncDistributedLock(key, servers=[(host, port)], acquire_timeout_s=60)
print("waiting", flush=True)
if not lock.acquire():
    print("not granted", flush=True)
    sys.exit(1)
print(f"granted {fence_from_token(lock.token)}", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"#;
    let addr = server.local_addr();
    let mut child = Command::new(&python)
        .args(["-c", script, "127.0.0.1", &addr.port().to_string(), key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("python did not print {what}"))
    };
    assert_eq!(next_line("waiting"), "waiting");
    wait_for_waiters(&mux, key, 2).await;
    let second = queued(&mux, key).await;

    let first = tokio::spawn(first.wait(WAIT));
    let second = tokio::spawn(second.wait(WAIT));
    holder.release().await.unwrap();
    let first: Lease = first.await.unwrap().unwrap();
    // Python is next in line, then our second ticket.
    wait_for_waiters(&mux, key, 2).await;
    assert!(!second.is_finished(), "second ticket jumped the queue");
    let first_fence = first.fence();
    first.release().await.unwrap();
    let granted = next_line("its grant");
    let python_fence: u64 = granted
        .strip_prefix("granted ")
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("unexpected python output {granted:?}"));
    assert!(python_fence > first_fence);
    assert!(
        !second.is_finished(),
        "second ticket granted while python held the key"
    );
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin).expect("tell python to release");
    let second: Lease = second.await.unwrap().unwrap();
    assert!(second.fence() > python_fence);
    assert_eq!(next_line("released"), "released");
    assert!(child.wait().expect("python exits").success());
    second.release().await.unwrap();
}
