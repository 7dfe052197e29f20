//! A hostile or broken server: a tiny fake TCP server in the test answers
//! with crafted replies. The client must report `ErrorKind::Protocol` (or the
//! matching error) promptly — no panic, no hang, no busy loop. Independent of
//! the test mode (the fake server is always local).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dflockd_client::{
    Client, ConnectOptions, Connection, Enqueue, Error, ErrorKind, Key, LossReason,
};
use dflockd_proto::Kind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A well-formed token.
const TOKEN: &str = "000000000000000100000000000000aa";

/// One request as the fake server read it.
#[derive(Debug, Clone)]
struct Frame {
    cmd: String,
    key: String,
    arg: String,
}

type Answer = Arc<dyn Fn(&Frame) -> Vec<u8> + Send + Sync>;

/// A fake server: reads three-line frames and writes whatever `answer`
/// returns (nothing at all when it returns an empty vector).
struct FakeServer {
    addr: SocketAddr,
    frames: Arc<Mutex<Vec<Frame>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    async fn start(answer: impl Fn(&Frame) -> Vec<u8> + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer: Answer = Arc::new(answer);
        let task = {
            let (frames, connections) = (Arc::clone(&frames), Arc::clone(&connections));
            tokio::spawn(async move {
                let mut served = Vec::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (frames, answer) = (Arc::clone(&frames), Arc::clone(&answer));
                    served.push(AbortOnDrop(tokio::spawn(serve(stream, frames, answer))));
                }
            })
        };
        FakeServer {
            addr,
            frames,
            connections,
            task,
        }
    }

    fn count(&self, cmd: &str) -> usize {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.cmd == cmd)
            .count()
    }

    fn total(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn client(&self) -> Client {
        Client::builder()
            .server(self.addr.into())
            .reply_timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    async fn connection(&self) -> Connection {
        Connection::connect(&self.addr.into(), &ConnectOptions::default())
            .await
            .unwrap()
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(stream: tokio::net::TcpStream, frames: Arc<Mutex<Vec<Frame>>>, answer: Answer) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = Vec::new();
            match read.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        let frame = Frame {
            cmd: lines[0].clone(),
            key: lines[1].clone(),
            arg: lines[2].clone(),
        };
        // Like any plain dflockd v2 server, the fake refuses the mux
        // extension with `error` (spec §1.11).
        let reply = if frame.cmd == "hello" {
            b"error\n".to_vec()
        } else {
            frames.lock().unwrap().push(frame.clone());
            answer(&frame)
        };
        if !reply.is_empty()
            && (write.write_all(&reply).await.is_err() || write.flush().await.is_err())
        {
            return;
        }
    }
}

/// The crafted replies every grant-returning request is tested with.
fn bad_replies() -> Vec<(&'static str, Vec<u8>)> {
    let mut huge = vec![b'o', b'k', b' '];
    huge.resize(2 * 1024 * 1024, b'x');
    huge.push(b'\n');
    vec![
        ("lease 0", format!("ok {TOKEN} 0\n").into_bytes()),
        ("okay", b"okay\n".to_vec()),
        ("2 MiB line", huge),
        ("invalid UTF-8", b"ok \xff\xfe\xfd 33\n".to_vec()),
        (
            "uppercase token",
            format!("ok {} 33\n", TOKEN.to_uppercase().replace('0', "A")).into_bytes(),
        ),
        (
            "lease too large",
            format!("ok {TOKEN} 9223372037\n").into_bytes(),
        ),
        ("missing lease", format!("ok {TOKEN}\n").into_bytes()),
        ("extra field", format!("ok {TOKEN} 33 1\n").into_bytes()),
    ]
}

fn assert_protocol(what: &str, via: &str, result: Result<impl std::fmt::Debug, Error>) {
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::Protocol(_))),
        "{what} via {via}: {result:?}"
    );
}

/// Runs `f` within a bound: a hang is a failure.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
}

/// Checks that nothing keeps talking to the server after a failure.
async fn assert_quiet(server: &FakeServer, what: &str) {
    let (frames, conns) = (server.total(), server.connections());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        server.total() <= frames + 1 && server.connections() <= conns + 1,
        "{what}: busy after the failure ({} → {} frames, {} → {} connections)",
        frames,
        server.total(),
        conns,
        server.connections()
    );
}

#[tokio::test]
async fn malformed_grant_is_protocol_error_on_a_connection() {
    let key = Key::new("k").unwrap();
    for (what, reply) in bad_replies() {
        let server = FakeServer::start(move |_| reply.clone()).await;
        let mut conn = server.connection().await;
        let result = bounded(what, conn.acquire(&key, Kind::Lock, Duration::ZERO, None)).await;
        assert_protocol(what, "Connection::acquire", result);
        assert!(conn.is_poisoned(), "{what}: connection still usable");
        assert!(matches!(conn.ping().await, Err(ref e) if matches!(e.kind(), ErrorKind::Poisoned)));
        let mut conn = server.connection().await;
        let result = bounded(
            what,
            conn.wait(&key, Kind::Lock.namespace(), Duration::from_secs(1)),
        )
        .await;
        assert_protocol(what, "Connection::wait", result);
    }
}

/// Through the client: the control lane (try-lock), a wait lane (contended
/// acquire) and a two-phase enqueue.
#[tokio::test]
async fn malformed_grant_is_protocol_error_through_the_client() {
    for (what, reply) in bad_replies() {
        // Try-locks (argument "0…") get the bad reply; blocking acquires too.
        let server = FakeServer::start(move |_| reply.clone()).await;
        let client = server.client();
        let lock = client.lock("k").unwrap();
        assert_protocol(what, "try_acquire", bounded(what, lock.try_acquire()).await);
        assert_quiet(&server, what).await;
        assert_protocol(what, "enqueue", bounded(what, lock.enqueue()).await);
        // The client still works for other requests afterwards (a fresh
        // control lane) and reports the same again.
        assert_protocol(
            what,
            "try_acquire again",
            bounded(what, lock.try_acquire()).await,
        );
        assert_quiet(&server, what).await;
    }
}

#[tokio::test]
async fn malformed_grant_on_a_wait_lane_is_protocol_error() {
    for (what, reply) in bad_replies() {
        // The try-lock on the control lane times out; the blocking acquire
        // on the wait lane gets the bad reply.
        let server = FakeServer::start(move |f: &Frame| {
            if f.cmd == "l" && f.arg.trim_start().starts_with('0') {
                b"timeout\n".to_vec()
            } else {
                reply.clone()
            }
        })
        .await;
        let client = server.client();
        let lock = client.lock("k").unwrap();
        let result = bounded(what, lock.acquire_within(Duration::from_secs(2))).await;
        assert_protocol(what, "acquire_within", result);
        assert_quiet(&server, what).await;
    }
}

/// Unknown or malformed answers to other requests are protocol errors too.
#[tokio::test]
async fn malformed_other_replies() {
    let server = FakeServer::start(|f: &Frame| match f.cmd.as_str() {
        "stats" => b"ok {\"connections\":\"many\"}\n".to_vec(),
        "ping" => b"pong\n".to_vec(),
        "e" => b"queued 1\n".to_vec(),
        _ => b"ok\n".to_vec(),
    })
    .await;
    let client = server.client();
    assert_protocol(
        "bad stats",
        "stats",
        bounded("stats", client.stats(0)).await,
    );
    assert_protocol("pong", "ping", bounded("ping", client.ping(0)).await);
    // `ok` to an acquire is not a grant.
    assert_protocol(
        "bare ok",
        "try_acquire",
        bounded("l", client.lock("k").unwrap().try_acquire()).await,
    );
    assert_protocol(
        "queued 1",
        "enqueue",
        bounded("e", client.lock("k").unwrap().enqueue())
            .await
            .map(|e| matches!(e, Enqueue::Queued(_))),
    );
    let mut conn = server.connection().await;
    assert_protocol(
        "bad stats",
        "Connection::stats",
        bounded("stats", conn.stats()).await,
    );
}

/// A fake server that grants `l` with a 1 s lease and answers every renew
/// with `renew_reply`, and a 1 s lease acquired from it.
async fn one_second_lease(renew_reply: &'static [u8]) -> (FakeServer, dflockd_client::Lease) {
    let server = FakeServer::start(move |f: &Frame| match f.cmd.as_str() {
        "l" => format!("ok {TOKEN} 1\n").into_bytes(),
        "n" => renew_reply.to_vec(),
        _ => b"ok\n".to_vec(),
    })
    .await;
    let lease = server
        .client()
        .lock("k")
        .unwrap()
        .with_lease(Duration::from_secs(1))
        .acquire()
        .await
        .unwrap();
    (server, lease)
}

/// A server that renews to zero seconds (`ok 0`) does not drive a renew
/// busy loop: the lease is reported lost and renewing stops.
#[tokio::test]
async fn zero_second_renewal_is_not_a_busy_loop() {
    let (server, lease) = one_second_lease(b"ok 0\n").await;
    let started = Instant::now();
    bounded("loss", lease.lost()).await;
    assert_eq!(lease.loss_reason(), Some(LossReason::Refused));
    // Count renewals over a further second.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewals = server.count("n");
    assert!(renewals <= 2, "{renewals} renew requests: busy loop");
    drop(lease);
}

/// A server that keeps renewing a 1 s lease is renewed at a sane pace, not
/// in a tight loop.
#[tokio::test]
async fn one_second_renewals_are_paced() {
    let (server, lease) = one_second_lease(b"ok 1\n").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lease.is_lost());
    let renewals = server.count("n");
    // ttl/3 ≈ 0.3 s → about 5 in 1.5 s.
    assert!((2..=10).contains(&renewals), "{renewals} renewals in 1.5 s");
    // Each renews the granted token with the requested lease.
    for frame in server
        .frames
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.cmd == "n")
    {
        assert_eq!(frame.key, "k");
        assert_eq!(frame.arg, format!("{TOKEN} 1"));
    }
    drop(lease);
}

/// A server that stops answering: the request fails with `ReplyTimeout`
/// after the configured reply timeout, and leases on that connection are
/// lost; no hang.
#[tokio::test]
async fn silent_server_is_reply_timeout() {
    let server = FakeServer::start(|_| Vec::new()).await;
    let client = Client::builder()
        .server(server.addr.into())
        .reply_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let result = bounded("silent", client.lock("k").unwrap().try_acquire()).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::ReplyTimeout)),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut conn = server.connection().await;
    let result = conn
        .request(&dflockd_proto::Request::Ping, Duration::from_millis(200))
        .await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::ReplyTimeout)),
        "{result:?}"
    );
    assert!(conn.is_poisoned());
}

/// A server that closes the connection instead of answering.
#[tokio::test]
async fn closing_server_is_connection_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            drop(stream);
        }
    });
    let client = Client::builder().server(addr.into()).build().unwrap();
    let result = bounded("closed", client.lock("k").unwrap().try_acquire()).await;
    assert!(
        matches!(result, Err(ref e) if matches!(e.kind(), ErrorKind::ConnectionClosed | ErrorKind::Io(_))),
        "{result:?}"
    );
    accept.abort();
}

/// A server that answers renewals with a transient failure
/// (`error_draining`): retried at a bounded pace until the local expiry,
/// then the lease is lost as `Expired` — before the server's own deadline
/// (at the latest `ttl` after the grant reached the client), and the guard's
/// `deadline()` never moves backwards. For a lease granted at once on the
/// control lane and for one granted after queueing on a wait lane.
#[tokio::test]
async fn transient_renew_failures_end_in_local_expiry() {
    tokio::join!(expiry_case(false), expiry_case(true));
}

async fn expiry_case(queued: bool) {
    let server = FakeServer::start(move |f: &Frame| match f.cmd.as_str() {
        // Queued: the try-lock says timeout, the blocking acquire is granted.
        "l" if queued && f.arg.starts_with('0') => b"timeout\n".to_vec(),
        "l" => format!("ok {TOKEN} 2\n").into_bytes(),
        "n" => b"error_draining\n".to_vec(),
        _ => b"ok\n".to_vec(),
    })
    .await;
    let client = server.client();
    let ttl = Duration::from_secs(2);
    let lock = client.lock("k").unwrap().with_lease(ttl);
    let lease = lock.acquire().await.unwrap();
    let granted_at = Instant::now();
    let mut deadline = lease.deadline();
    assert!(
        deadline <= granted_at + ttl,
        "queued={queued}: deadline beyond the lease"
    );
    let lost = lease.lost();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            _ = &mut lost => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                let now = lease.deadline();
                assert!(now >= deadline, "queued={queued}: deadline moved backwards");
                deadline = now;
                assert!(granted_at.elapsed() < Duration::from_secs(5), "never lost");
            }
        }
    }
    let lost_at = Instant::now();
    assert_eq!(lease.loss_reason(), Some(LossReason::Expired));
    assert!(
        lost_at < granted_at + ttl,
        "queued={queued}: still trusted past the server's deadline"
    );
    assert!(
        lost_at + Duration::from_millis(600) >= granted_at + ttl,
        "queued={queued}: gave up long before the lease ran out"
    );
    let renewals = server.count("n");
    assert!(
        (1..=8).contains(&renewals),
        "queued={queued}: {renewals} renew attempts in 2 s"
    );
}

/// A server that never answers renewals (the connection stays open and the
/// lane's reply timeout is longer than the lease): the lease is lost as
/// `Expired` at its local expiry — before the server's own deadline — not
/// when the lane finally gives up on the reply.
#[tokio::test]
async fn unanswered_renewal_ends_in_local_expiry() {
    let server = FakeServer::start(|f: &Frame| match f.cmd.as_str() {
        "l" => format!("ok {TOKEN} 2\n").into_bytes(),
        "n" => Vec::new(),
        _ => b"ok\n".to_vec(),
    })
    .await;
    let client = server.client();
    let ttl = Duration::from_secs(2);
    let sent_at = Instant::now();
    let lease = client
        .lock("k")
        .unwrap()
        .with_lease(ttl)
        .acquire()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(4), lease.lost())
        .await
        .expect("never lost");
    let lost_at = Instant::now();
    assert_eq!(lease.loss_reason(), Some(LossReason::Expired));
    assert!(
        lost_at < sent_at + ttl,
        "still trusted past the server's deadline"
    );
    assert!(
        lost_at + Duration::from_millis(500) >= sent_at + ttl,
        "gave up long before the lease ran out"
    );
    assert_eq!(server.count("n"), 1, "one renewal, never answered");
}

/// A server that answers the mux hello with something that is neither
/// `ok mux 1` nor `error`: the client reports a protocol error at once
/// instead of guessing which protocol the connection now speaks.
#[tokio::test]
async fn garbled_mux_hello_answer_is_protocol_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = BufReader::new(read);
                let mut line = Vec::new();
                for _ in 0..3 {
                    if read.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let _ = write.write_all(b"ok mux 999\n").await;
                let mut rest = Vec::new();
                let _ = read.read_until(b'\n', &mut rest).await;
            });
        }
    });
    let client = Client::builder().server(addr.into()).build().unwrap();
    let started = Instant::now();
    let error = client.ping(0).await.unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Protocol(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    task.abort();
}
