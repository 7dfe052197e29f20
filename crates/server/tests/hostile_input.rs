//! Hostile and malformed input over real TCP: the server must never panic,
//! desync (one reply per frame, in order), or keep state from connections
//! that are gone. Deterministic pseudo-random inputs keep runs reproducible
//! and bounded. Each test names the protection it checks. Related: the
//! 1,000,000-key GC churn is `tests/gc_churn.rs` (its own process, for RSS);
//! long fuzzing over TCP is `crates/server/fuzz` (target `conn_bytes`).

use std::time::Duration;

use dflockd_proto::Reply;
use dflockd_server::{Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(5);

/// xorshift64*: tiny, deterministic, good enough to vary inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
    /// A line without LF, up to `max` bytes, biased towards protocol-ish bytes.
    fn line(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max + 1) as usize;
        (0..len)
            .map(|_| match self.below(6) {
                0 => b' ',
                1 => b'\r',
                2 => b'0' + self.below(10) as u8,
                3 => b'\t',
                _ => {
                    let b = self.below(256) as u8;
                    if b == b'\n' { b'x' } else { b }
                }
            })
            .collect()
    }
}

async fn start() -> ServerHandle {
    Server::start(ServerConfig {
        max_locks: 64,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("server starts")
}

async fn ping(server: &ServerHandle) -> String {
    let stream = timeout(STEP, TcpStream::connect(server.local_addr()))
        .await
        .expect("connect in time")
        .expect("connect");
    let (read, mut write) = stream.into_split();
    write.write_all(b"stats\n_\n_\n").await.expect("write");
    let mut line = String::new();
    timeout(STEP, BufReader::new(read).read_line(&mut line))
        .await
        .expect("reply in time")
        .expect("read");
    line
}

/// Non-blocking frames only (timeouts forced to 0), so each must get exactly
/// one reply, in order.
fn frame(rng: &mut Rng) -> Vec<u8> {
    let command = rng.pick(&[
        "ping", "stats", "l", "r", "n", "e", "w", "sl", "sr", "sn", "se", "sw", "auth", "listen",
        "", "x",
    ]);
    let key = match rng.below(4) {
        0 => rng.line(20),
        _ => format!("k{}", rng.below(8)).into_bytes(),
    };
    let argument = match (command, rng.below(3)) {
        ("l" | "w" | "sw", 0) => b"0".to_vec(),
        ("l", 1) => format!("0 {}", rng.below(5)).into_bytes(),
        ("sl", 0) => format!("0 {}", rng.below(4)).into_bytes(),
        ("e" | "se", 0) => format!("{}", rng.below(4)).into_bytes(),
        ("l" | "w" | "sw" | "sl", _) => {
            // Anything that could parse as a positive timeout is forced to zero.
            let mut line = rng.line(12);
            if line.iter().any(u8::is_ascii_digit) {
                line = b"0 x".to_vec();
            }
            line
        }
        _ => rng.line(40),
    };
    [command.as_bytes(), b"\n", &key, b"\n", &argument, b"\n"].concat()
}

/// Protection: one reply per frame, in order, whatever the frame holds (the
/// decoder and the request parser never skip or duplicate a frame). No
/// switch turns this off; the proto fuzz target and property tests cover
/// the decoder itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_get_exactly_one_reply_each_in_order() {
    let server = start().await;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for round in 0..20 {
        let stream = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let frames: Vec<Vec<u8>> = (0..50).map(|_| frame(&mut rng)).collect();
        let mut bytes = frames.concat();
        bytes.extend_from_slice(b"ping\n_\nlast\n");
        write.write_all(&bytes).await.expect("write");
        for i in 0..=frames.len() {
            let mut line = Vec::new();
            let n = timeout(STEP, reader.read_until(b'\n', &mut line))
                .await
                .expect("reply in time")
                .expect("read");
            assert!(
                n > 0,
                "round {round}: connection closed after {i} replies; frame: {:?}",
                frames.get(i)
            );
            assert!(
                Reply::parse(&line).is_ok(),
                "round {round}: unparseable reply {line:?}"
            );
            if i == frames.len() {
                assert_eq!(
                    line, b"ok\n",
                    "round {round}: the final ping must be answered last"
                );
            }
        }
    }
    assert!(ping(&server).await.starts_with("ok {"));
}

/// Protection: disconnect cleanup (auto-release of holds, removal of
/// waiters). Confirmed to fail with `auto_release_on_disconnect: false`
/// ("state left behind": locks still held by closed connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_then_disconnect_leave_no_state() {
    let server = start().await;
    let mut rng = Rng(0xdead_beef_f00d_0002);
    for _ in 0..60 {
        let mut stream = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        let mut bytes = Vec::new();
        for _ in 0..rng.below(6) {
            bytes.extend_from_slice(&frame(&mut rng));
        }
        match rng.below(3) {
            0 => bytes.extend_from_slice(&rng.line(400)), // maybe an oversize line
            1 => bytes.extend_from_slice(
                &(0..rng.below(2000))
                    .map(|_| rng.below(256) as u8)
                    .collect::<Vec<_>>(),
            ),
            _ => {}
        }
        let _ = stream.write_all(&bytes).await;
        let _ = stream.shutdown().await;
        // Drain whatever the server answers until it closes or goes quiet.
        let mut sink = vec![0u8; 4096];
        while let Ok(Ok(n)) = timeout(Duration::from_millis(200), stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
    // Every connection is gone, so every hold must have been auto-released.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let line = ping(&server).await;
        let json: serde_json::Value =
            serde_json::from_str(line.trim_end().strip_prefix("ok ").expect("ok")).expect("json");
        let busy = json["locks"].as_array().map_or(0, Vec::len)
            + json["semaphores"].as_array().map_or(0, Vec::len);
        if busy == 0 && json["connections"] == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state left behind: {json}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Protection: the bounded line reader — an oversize line is consumed and
/// discarded up to its LF, then answered with `error` and a close. (Not
/// confirmed by disabling it: the line cap is not configurable; the
/// decoder's memory bound is a proto property test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_line_is_discarded_without_buffering_it() {
    let server = start().await;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    // 8 MiB without a newline: the server must keep reading (not buffer it) …
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..128 {
        timeout(STEP, stream.write_all(&chunk))
            .await
            .expect("server keeps reading")
            .expect("write");
    }
    // … and answer `error` and close once the line ends.
    stream.write_all(b"\n").await.expect("write");
    let mut reply = Vec::new();
    timeout(STEP, stream.read_to_end(&mut reply))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(reply, b"error\n");
    assert!(ping(&server).await.starts_with("ok {"));
}

/// Protection: the per-line read timeout. Confirmed to fail with a 60 s
/// read timeout ("slowloris never dropped" after 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_dropped_by_the_per_line_read_timeout() {
    // The deadline is re-armed per completed line, not per byte: a client
    // that trickles bytes without ever finishing a line is cut off.
    let read_timeout = Duration::from_millis(500);
    let server = Server::start(ServerConfig {
        read_timeout,
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("server starts");
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let started = tokio::time::Instant::now();
    let mut reply = Vec::new();
    loop {
        if stream.write_all(b"p").await.is_err() {
            break;
        }
        match timeout(Duration::from_millis(100), stream.read_to_end(&mut reply)).await {
            Ok(_) => break, // closed by the server
            Err(_) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "slowloris never dropped"
            ),
        }
    }
    assert_eq!(reply, b"error\n");
    assert!(started.elapsed() >= read_timeout);
    assert!(ping(&server).await.starts_with("ok {"));
}

/// Raises the soft descriptor limit to the hard one; returns the soft limit.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Connects from `source` (any 127.0.0.0/8 address is loopback on Linux).
async fn connect_from(source: [u8; 4], server: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((std::net::Ipv4Addr::from(source), 0).into())?;
    timeout(STEP, socket.connect(server))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Whether a flood connection was admitted: it answers a ping (a rejected
/// one was closed at accept and reads EOF or a reset at once).
async fn admitted(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping\n_\n_\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 3];
    match timeout(STEP, stream.read_exact(&mut reply)).await {
        Ok(Ok(_)) => {
            assert_eq!(&reply, b"ok\n");
            true
        }
        Ok(Err(_)) => false,
        Err(_) => panic!("a flood connection neither answered nor was closed"),
    }
}

/// The established client is still answered.
async fn assert_answers(established: &mut TcpStream) {
    established.write_all(b"ping\n_\n_\n").await.expect("write");
    let mut reply = [0u8; 3];
    timeout(STEP, established.read_exact(&mut reply))
        .await
        .expect("the established client is answered during the flood")
        .expect("read");
    assert_eq!(&reply, b"ok\n");
}

/// Checks `--max-connections` and `--max-connections-per-ip` under a
/// 10,000-connection flood from five loopback addresses. Confirmed to fail
/// without each protection: per-IP cap off → 50 admitted from 127.0.0.1
/// (expected 15); global cap off → 75 admitted in total (expected 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_respects_the_caps_while_established_clients_keep_working() {
    const WANTED: usize = 10_000;
    const MAX_CONNECTIONS: usize = 50;
    const PER_IP: usize = 15;
    let limit = raise_fd_limit();
    // Each flood connection costs the test one descriptor (rejected ones are
    // closed by the server, admitted ones cost it a second): keep headroom.
    let flood_size = WANTED.min(limit.saturating_sub(512) as usize);
    if flood_size < WANTED {
        eprintln!(
            "note: descriptor limit {limit} is too low for {WANTED} connections; flooding with {flood_size}"
        );
    }
    assert!(
        flood_size >= 1_000,
        "descriptor limit {limit} is too low for a flood test"
    );
    let config = ServerConfig {
        max_connections: MAX_CONNECTIONS,
        max_connections_per_ip: PER_IP,
        ..ServerConfig::ephemeral()
    };
    let server = Server::start(config).await.expect("server starts");
    let addr = server.local_addr();
    // An established client on 127.0.0.1, holding a lock.
    let mut established = connect_from([127, 0, 0, 1], addr).await.expect("connect");
    established
        .write_all(b"l\nflood-key\n0\n")
        .await
        .expect("write");
    let mut grant = [0u8; 39];
    timeout(STEP, established.read_exact(&mut grant))
        .await
        .expect("in time")
        .expect("read");
    assert!(grant.starts_with(b"ok "));
    let started = tokio::time::Instant::now();
    // Half the flood from 127.0.0.1: the per-IP cap binds (the established
    // connection already counts).
    let mut flood = Vec::new();
    let mut admitted_local = 0;
    for _ in 0..flood_size / 2 {
        let mut stream = connect_from([127, 0, 0, 1], addr)
            .await
            .expect("flood connect");
        if admitted(&mut stream).await {
            admitted_local += 1;
        }
        flood.push(stream);
    }
    assert_answers(&mut established).await;
    // The other half from 127.0.0.2 ..= 127.0.0.5: the global cap binds
    // first (35 free slots < 4 × 15).
    let mut admitted_other = [0usize; 4];
    for i in 0..flood_size - flood_size / 2 {
        let ip = i % 4;
        let mut stream = connect_from([127, 0, 0, 2 + ip as u8], addr)
            .await
            .expect("flood connect");
        if admitted(&mut stream).await {
            admitted_other[ip] += 1;
        }
        flood.push(stream);
    }
    assert_answers(&mut established).await;
    let total = 1 + admitted_local + admitted_other.iter().sum::<usize>();
    eprintln!(
        "flood of {flood_size} connections in {:.1} s: admitted {admitted_local} from 127.0.0.1 (+1 established), {admitted_other:?} from 127.0.0.2-5; {total} of max {MAX_CONNECTIONS}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(admitted_local + 1, PER_IP, "per-IP cap on 127.0.0.1");
    assert!(admitted_other.iter().all(|&n| n <= PER_IP), "per-IP cap");
    assert_eq!(total, MAX_CONNECTIONS, "global cap");
    // Closing the flood frees the slots again.
    drop(flood);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mut stream = connect_from([127, 0, 0, 9], addr).await.expect("connect");
        if admitted(&mut stream).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_answers(&mut established).await;
}

/// Protection: the write timeout. A client that pipelines requests but
/// never reads the replies fills both sockets' buffers; the server must give
/// up on the stalled write after `write_timeout` and close the connection,
/// not keep it (and its task) forever. Confirmed to fail with no write
/// timeout ("never closed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_by_the_write_timeout() {
    let server = Server::start(ServerConfig {
        write_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::ephemeral()
    })
    .await
    .expect("server starts");
    let stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    // The read half stays open and unread.
    let (_unread, mut write) = stream.into_split();
    let pump = tokio::spawn(async move {
        // Stats replies are the largest; 64 MiB of them is far beyond any
        // loopback socket buffer. A failed write means the server closed.
        let frames = b"stats\n_\n_\n".repeat(1024);
        for _ in 0..64 * 1024 * 1024 / (1024 * 100) {
            if write.write_all(&frames).await.is_err() {
                return true;
            }
        }
        false
    });
    // The server closes with our requests unread, which resets the
    // connection: the pump's next write fails.
    let closed = timeout(Duration::from_secs(20), pump)
        .await
        .expect("never closed")
        .expect("pump task");
    assert!(closed, "all 64 MiB written without the server closing");
    assert!(ping(&server).await.starts_with("ok {"));
}
