//! Raw-bytes test client and helpers for the conformance suite
//! (`tests/conformance.rs`, spec §11).
//!
//! Everything here talks to an embedded server over real TCP on 127.0.0.1
//! with an ephemeral port, and every read is bounded in time: a reply that
//! does not arrive fails the test instead of hanging it.

use crate::pki;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dflockd_server::{Server, ServerConfig, ServerHandle, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// How long a reply may take unless a test says otherwise.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server may take to close a connection that must close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for polling a condition (stats, connect refused, …).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polls.
pub const POLL_STEP: Duration = Duration::from_millis(10);

/// `"ping\n_\n_\n"`.
pub const PING: &[u8] = b"ping\n_\n_\n";
/// `"stats\n_\n_\n"`.
pub const STATS: &[u8] = b"stats\n_\n_\n";

// ---------------------------------------------------------------------------
// Servers

/// Starts a server with the Go defaults on 127.0.0.1, ephemeral port.
pub async fn start() -> ServerHandle {
    start_with(|_| {}).await
}

/// Starts a server with the defaults changed by `tweak`.
pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut config = ServerConfig::ephemeral();
    tweak(&mut config);
    Server::start(config).await.expect("server starts")
}

/// Polls until a new TCP connection to `addr` is refused (bounded).
pub async fn assert_connect_refused_soon(addr: SocketAddr) {
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Err(_)) => return,
            Ok(Ok(stream)) => drop(stream),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "new connections to {addr} are still accepted"
        );
        tokio::time::sleep(POLL_STEP).await;
    }
}

// ---------------------------------------------------------------------------
// Raw client

/// How a bounded read ended without a complete line.
#[derive(Debug)]
pub enum ReadEnd {
    /// The peer closed (EOF, or a reset); `partial` holds bytes received
    /// before it that do not form a complete line.
    Closed {
        /// Bytes after the last complete line.
        partial: Vec<u8>,
    },
    /// Nothing complete within the bound.
    Timeout {
        /// Bytes after the last complete line.
        partial: Vec<u8>,
    },
}

/// How a test reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP to the server's 127.0.0.1 listener.
    Tcp,
    /// An in-memory pipe (`ServerHandle::connect_in_process`).
    InProcess,
}

/// A plain connection: a TCP socket or an in-process pipe.
pub enum Stream {
    /// A TCP socket.
    Tcp(TcpStream),
    /// An in-process pipe.
    InProcess(tokio::io::DuplexStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::InProcess(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::InProcess(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::InProcess(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::InProcess(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A raw protocol client over any byte stream (plain TCP, an in-process
/// pipe, or TLS).
pub struct Client<S = Stream> {
    stream: S,
    buf: Vec<u8>,
}

impl Client<Stream> {
    /// Connects to `addr` over TCP (bounded).
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Client::new(Stream::Tcp(stream))
    }

    /// Connects to `server` over `transport`.
    pub async fn open(server: &ServerHandle, transport: Transport) -> Client {
        match transport {
            Transport::Tcp => Client::connect(server.local_addr()).await,
            Transport::InProcess => {
                let pipe = server
                    .connect_in_process()
                    .expect("the server accepts no connection");
                Client::new(Stream::InProcess(pipe))
            }
        }
    }

    /// Half-closes the connection (sends FIN, or ends the pipe's write
    /// side); reads still work.
    pub async fn shutdown_write(&mut self) {
        self.stream.shutdown().await.expect("shutdown(Write)");
    }
}

fn is_closed_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps an established stream.
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Writes `bytes` in one write and flushes; panics on failure.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes).await.expect("write to server");
    }

    /// Writes `bytes` and flushes, reporting failures (bounded).
    pub async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        let bytes = bytes.as_ref();
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(REPLY_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(ErrorKind::TimedOut, "write timed out")))
    }

    /// Reads one reply line within `limit`; returns it without its `\n`.
    pub async fn read_line_within(&mut self, limit: Duration) -> Result<String, ReadEnd> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                return Ok(String::from_utf8(line).expect("reply line is UTF-8"));
            }
            let mut chunk = [0u8; 8192];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read {
                Err(_) => {
                    return Err(ReadEnd::Timeout {
                        partial: self.buf.clone(),
                    });
                }
                Ok(Ok(0)) => {
                    return Err(ReadEnd::Closed {
                        partial: std::mem::take(&mut self.buf),
                    });
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if is_closed_error(e.kind()) => {
                    return Err(ReadEnd::Closed {
                        partial: std::mem::take(&mut self.buf),
                    });
                }
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
    }

    /// Reads one reply line within `limit`, failing the test otherwise.
    /// The line must be LF-terminated with no CR.
    pub async fn line_within(&mut self, limit: Duration) -> String {
        match self.read_line_within(limit).await {
            Ok(line) => {
                assert!(!line.contains('\r'), "reply line contains CR: {line:?}");
                line
            }
            Err(end) => panic!("expected a reply line within {limit:?}, got {end:?}"),
        }
    }

    /// Reads one reply line (bounded by [`REPLY_TIMEOUT`]).
    pub async fn line(&mut self) -> String {
        self.line_within(REPLY_TIMEOUT).await
    }

    /// Sends a request and reads its reply line.
    pub async fn req(&mut self, bytes: impl AsRef<[u8]>) -> String {
        self.send(bytes).await;
        self.line().await
    }

    /// Sends `bytes` and asserts the reply is exactly `expected` (no `\n`).
    pub async fn expect(&mut self, bytes: impl AsRef<[u8]>, expected: &str) {
        let bytes = bytes.as_ref();
        let got = self.req(bytes).await;
        assert_eq!(
            got,
            expected,
            "request {:?}",
            String::from_utf8_lossy(bytes)
        );
    }

    /// Asserts the server closes the connection: EOF (or a reset) with no
    /// further bytes, within [`CLOSE_TIMEOUT`].
    pub async fn assert_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before close: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(CLOSE_TIMEOUT, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("connection still open after {CLOSE_TIMEOUT:?}"),
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!(
                "expected close, got bytes {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Ok(Err(e)) if is_closed_error(e.kind()) => {}
            Ok(Err(e)) => panic!("expected close, got read error {e}"),
        }
    }

    /// Asserts the server closes the connection with a clean EOF (no
    /// reset) and no bytes, within [`CLOSE_TIMEOUT`].
    pub async fn assert_eof(&mut self) {
        assert!(self.buf.is_empty(), "unexpected buffered bytes");
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(CLOSE_TIMEOUT, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("connection still open after {CLOSE_TIMEOUT:?}"),
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!(
                "expected EOF, got bytes {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Ok(Err(e)) => panic!("expected EOF, got read error {e}"),
        }
    }

    /// Asserts the connection is open: `ping` is answered `ok`.
    pub async fn assert_open(&mut self) {
        self.expect(PING, "ok").await;
    }

    /// Asserts nothing at all arrives for `period`.
    pub async fn assert_silent(&mut self, period: Duration) {
        match self.read_line_within(period).await {
            Err(ReadEnd::Timeout { partial }) if partial.is_empty() => {}
            other => panic!("expected silence for {period:?}, got {other:?}"),
        }
    }

    /// Sends `stats` and parses the JSON document.
    pub async fn stats(&mut self) -> Value {
        let line = self.req(STATS).await;
        parse_stats(&line)
    }

    /// Polls `stats` until `pred` holds (bounded by [`POLL_TIMEOUT`]).
    pub async fn wait_stats(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + POLL_TIMEOUT;
        loop {
            let stats = self.stats().await;
            if pred(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last stats: {stats}"
            );
            tokio::time::sleep(POLL_STEP).await;
        }
    }

    /// Polls until lock `key` has exactly `n` waiters (0 also accepts the
    /// key no longer being busy).
    pub async fn wait_lock_waiters(&mut self, key: &str, n: u64) -> Value {
        self.wait_stats(&format!("lock {key:?} to have {n} waiters"), |s| {
            lock_waiters(s, key) == n
        })
        .await
    }

    /// Polls until semaphore `key` (limit > 1) has exactly `n` waiters.
    pub async fn wait_sem_waiters(&mut self, key: &str, n: u64) -> Value {
        self.wait_stats(&format!("semaphore {key:?} to have {n} waiters"), |s| {
            find(s, "semaphores", key).map_or(0, |e| e["waiters"].as_u64().unwrap()) == n
        })
        .await
    }

    /// Sends an acquire-like request and expects a grant `ok <T> <lease>`.
    pub async fn grant(&mut self, bytes: impl AsRef<[u8]>) -> Grant {
        let bytes = bytes.as_ref();
        let line = self.req(bytes).await;
        parse_grant(&line, "ok").unwrap_or_else(|| {
            panic!(
                "{:?}: expected ok <T> <lease>, got {line:?}",
                String::from_utf8_lossy(bytes)
            )
        })
    }

    /// Sends `e`/`se` and expects `acquired <T> <lease>`.
    pub async fn acquired(&mut self, bytes: impl AsRef<[u8]>) -> Grant {
        let bytes = bytes.as_ref();
        let line = self.req(bytes).await;
        parse_grant(&line, "acquired").unwrap_or_else(|| {
            panic!(
                "{:?}: expected acquired <T> <lease>, got {line:?}",
                String::from_utf8_lossy(bytes)
            )
        })
    }

    /// This connection's server-side id, learnt from `stats`: it takes a
    /// fresh probe lock, reads its `owner_conn_id`, and releases it.
    pub async fn conn_id(&mut self) -> u64 {
        static PROBE: AtomicU64 = AtomicU64::new(0);
        let key = format!("conn-id-probe-{}", PROBE.fetch_add(1, Ordering::Relaxed));
        let grant = self.grant(format!("l\n{key}\n0\n")).await;
        let stats = self.stats().await;
        let id = find(&stats, "locks", &key).expect("probe lock listed")["owner_conn_id"]
            .as_u64()
            .expect("owner_conn_id");
        self.expect(format!("r\n{key}\n{}\n", grant.token), "ok")
            .await;
        id
    }
}

// ---------------------------------------------------------------------------
// Replies

/// A grant: `ok <T> <lease>` or `acquired <T> <lease>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The 32-hex token.
    pub token: String,
    /// The lease in whole seconds.
    pub lease: u64,
}

impl Grant {
    /// The fence: the token's first 16 hex digits.
    pub fn fence(&self) -> u64 {
        fence(&self.token)
    }
}

/// `^[0-9a-f]{32}$`.
pub fn is_token(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `<status> <T> <lease>`; `None` if the line has another shape.
pub fn parse_grant(line: &str, status: &str) -> Option<Grant> {
    let mut fields = line.split(' ');
    if fields.next()? != status {
        return None;
    }
    let token = fields.next()?;
    let lease = fields.next()?;
    if fields.next().is_some() || !is_token(token) {
        return None;
    }
    if lease.is_empty() || !lease.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Grant {
        token: token.to_owned(),
        lease: lease.parse().ok()?,
    })
}

/// The fence of a token (first 16 hex digits as u64).
pub fn fence(token: &str) -> u64 {
    assert!(is_token(token), "not a token: {token:?}");
    u64::from_str_radix(&token[..16], 16).expect("hex")
}

/// Parses an `ok <json>` stats reply.
pub fn parse_stats(line: &str) -> Value {
    let json = line
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("stats reply is not `ok <json>`: {line:?}"));
    let value: Value = serde_json::from_str(json).expect("stats JSON parses");
    assert!(value["connections"].is_u64(), "connections: {value}");
    for section in ["locks", "semaphores", "idle_locks", "idle_semaphores"] {
        assert!(value[section].is_array(), "{section} is an array: {value}");
    }
    value
}

/// The entry for `key` in a stats section, if any.
pub fn find<'a>(stats: &'a Value, section: &str, key: &str) -> Option<&'a Value> {
    stats[section]
        .as_array()
        .expect("section is an array")
        .iter()
        .find(|e| e["key"] == key)
}

/// Waiters of busy lock `key`; 0 if it is not listed as busy.
pub fn lock_waiters(stats: &Value, key: &str) -> u64 {
    find(stats, "locks", key).map_or(0, |e| e["waiters"].as_u64().expect("waiters"))
}

/// The member names of a JSON object, sorted.
pub fn members(entry: &Value) -> Vec<String> {
    let mut names: Vec<String> = entry
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

/// Current wall-clock time in Unix nanoseconds.
pub fn unix_nanos() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(d.as_nanos()).expect("fits u64")
}

/// CRC-64 with the ISO polynomial as Go's `crc64.Checksum(data,
/// crc64.MakeTable(crc64.ISO))` computes it (CRC-64/GO-ISO).
pub fn crc64_go_iso(data: &[u8]) -> u64 {
    const POLY: u64 = 0xD800_0000_0000_0000; // 0x1B, reflected
    let mut crc = !0u64;
    for &byte in data {
        crc ^= u64::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------
// TLS

/// A test PKI: the server's configuration (leaf for `localhost` and
/// 127.0.0.1, signed by a fresh CA) and a client trusting that CA.
pub struct TestPki {
    /// For `ServerConfig::tls`.
    pub server: TlsConfig,
    /// rustls client configuration (ring provider) trusting the CA.
    pub client: Arc<rustls::ClientConfig>,
}

/// Generates a CA and a leaf certificate with rcgen.
pub fn test_pki() -> TestPki {
    let pem = pki::generate("dflockd conformance test CA");
    let server = TlsConfig::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes())
        .expect("server TLS config");

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add root");
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TestPki {
        server,
        client: Arc::new(client),
    }
}

/// Connects and completes a TLS handshake for `localhost` (bounded).
pub async fn connect_tls(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Client<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio::time::timeout(REPLY_TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake");
    Client::new(tls)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads every byte until the server closes (EOF or reset), bounded by
    /// [`CLOSE_TIMEOUT`]; returns what arrived.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut all = std::mem::take(&mut self.buf);
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!(
                    "connection still open after {CLOSE_TIMEOUT:?}; got {:?}",
                    String::from_utf8_lossy(&all)
                ),
                Ok(Ok(0)) => return all,
                Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if is_closed_error(e.kind()) => return all,
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
    }
}

/// One record of the fence-state journal (spec §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord {
    /// Sequence number.
    pub seq: u64,
    /// Persisted ceiling.
    pub ceiling: u64,
}

/// Reads a fence-state file, checks its journal format (32 or 64 bytes,
/// every slot with magic `dflfnc1\n` and a valid CRC-64/GO-ISO, each record
/// in the slot its sequence number selects) and returns the winning record.
pub fn read_journal(path: &std::path::Path) -> JournalRecord {
    let bytes = std::fs::read(path).expect("read fence state file");
    assert!(
        bytes.len() == 32 || bytes.len() == 64,
        "fence state file must be 32 or 64 bytes, is {}",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"dflfnc1\n", "magic");
    let mut best: Option<JournalRecord> = None;
    for (slot, record) in bytes.chunks(32).enumerate() {
        assert_eq!(&record[..8], b"dflfnc1\n", "magic of slot {slot}");
        let crc = u64::from_be_bytes(record[24..32].try_into().unwrap());
        assert_eq!(crc64_go_iso(&record[..24]), crc, "CRC of slot {slot}");
        let seq = u64::from_be_bytes(record[8..16].try_into().unwrap());
        let ceiling = u64::from_be_bytes(record[16..24].try_into().unwrap());
        assert!(seq >= 1, "sequence numbers start at 1");
        assert_eq!((seq - 1) % 2, slot as u64, "record {seq} is in slot {slot}");
        if best.is_none_or(|b| seq > b.seq) {
            best = Some(JournalRecord { seq, ceiling });
        }
    }
    best.expect("at least one record")
}
