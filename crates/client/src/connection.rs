//! The low-level connection: one socket, one request at a time, every
//! command of the protocol. Any failure after a request was written — an
//! error, a timeout, or the future being dropped — poisons the connection,
//! because a late reply would otherwise be read as the answer to the next
//! request.

use std::time::Duration;

use dflockd_proto::{
    Key, Kind, Lease, MAX_REPLY_LINE, Namespace, Reply, Request, Seconds, Stats, Token,
};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use tokio::net::TcpStream;

use crate::options::{ConnectOptions, ServerAddr};
use crate::{Error, ErrorKind, Result};

/// Extra time allowed for a reply beyond the request's own timeout.
pub(crate) const REPLY_SLACK: Duration = Duration::from_secs(10);

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub(crate) type BoxIo = Box<dyn Io>;

/// A grant: token and lease as the server reported them.
///
/// ```no_run
/// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_proto::{Key, Kind};
/// let key = Key::new("jobs/nightly").unwrap();
/// if let Some(granted) = conn.acquire(&key, Kind::Lock, Duration::ZERO, None).await? {
///     println!("fence {} for {} s", granted.token.fence(), granted.lease.get());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The token (its first 16 hex digits are the fence).
    pub token: Token,
    /// The lease the server applied.
    pub lease: Lease,
}

/// Result of a two-phase enqueue.
///
/// ```no_run
/// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_client::Enqueued;
/// use dflockd_proto::{Key, Kind};
/// let key = Key::new("jobs/nightly").unwrap();
/// let granted = match conn.enqueue(&key, Kind::Lock, None).await? {
///     Enqueued::Acquired(granted) => Some(granted),
///     Enqueued::Queued => conn.wait(&key, Kind::Lock.namespace(), Duration::from_secs(30)).await?,
/// };
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Granted at once.
    Acquired(Granted),
    /// In the queue; call `wait` on the same connection.
    Queued,
}

/// One connection to a dflockd server, exposing every command.
///
/// ```no_run
/// # async fn demo() -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// use dflockd_client::{Connection, ConnectOptions};
/// use dflockd_proto::{Key, Kind};
/// let mut conn = Connection::connect(&"127.0.0.1:6388".parse()?, &ConnectOptions::default()).await?;
/// let key = Key::new("jobs/nightly").unwrap();
/// if let Some(grant) = conn.acquire(&key, Kind::Lock, Duration::from_secs(5), None).await? {
///     conn.release(&key, Kind::Lock.namespace(), grant.token).await?;
/// }
/// # Ok(()) }
/// ```
pub struct Connection {
    reader: BufReader<ReadHalf<BoxIo>>,
    writer: WriteHalf<BoxIo>,
    addr: ServerAddr,
    poisoned: bool,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Connection {
    /// Connects (TCP, then TLS and `auth` if configured), all within the
    /// connect timeout.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// use dflockd_client::{ConnectOptions, Connection};
    /// let addr = server.local_addr().into();
    /// let mut conn = Connection::connect(&addr, &ConnectOptions::default()).await?;
    /// conn.ping().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(addr: &ServerAddr, options: &ConnectOptions) -> Result<Connection> {
        let fail = |cause: String| ErrorKind::Connect {
            addr: addr.to_string(),
            cause,
        };
        let connect = async {
            let tcp = TcpStream::connect((addr.host(), addr.port()))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let io: BoxIo = match &options.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let name = match &tls.server_name {
                        Some(name) => name.clone(),
                        None => rustls::pki_types::ServerName::try_from(addr.host().to_owned())
                            .map_err(|e| fail(format!("TLS server name: {e}")))?,
                    };
                    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                    Box::new(connector.connect(name, tcp).await.map_err(|e| {
                        match crate::pinned::explain(&e) {
                            Some(advice) => fail(format!("TLS: {e}: {advice}")),
                            None => fail(format!("TLS: {e}")),
                        }
                    })?)
                }
            };
            let mut conn = Connection::from_io(io, addr.clone());
            if let Some(token) = &options.auth_token {
                conn.authenticate(token.expose()).await?;
            }
            Ok(conn)
        };
        tokio::time::timeout(options.connect_timeout, connect)
            .await
            .map_err(|_| fail("connect timed out".into()))?
    }

    pub(crate) fn from_io(io: BoxIo, addr: ServerAddr) -> Connection {
        let (read, write) = tokio::io::split(io);
        Connection {
            reader: BufReader::with_capacity(4096, read),
            writer: write,
            addr,
            poisoned: false,
            out: Vec::with_capacity(128),
            line: Vec::with_capacity(128),
        }
    }

    /// The server this connection talks to.
    ///
    /// ```no_run
    /// # fn demo(conn: &dflockd_client::Connection) {
    /// println!("talking to {}", conn.addr());
    /// # }
    /// ```
    pub fn addr(&self) -> &ServerAddr {
        &self.addr
    }

    /// Whether an interrupted or failed request made the connection unusable.
    ///
    /// ```no_run
    /// # async fn demo(mut conn: dflockd_client::Connection, options: dflockd_client::ConnectOptions) -> dflockd_client::Result<()> {
    /// use dflockd_client::Connection;
    /// if conn.ping().await.is_err() && conn.is_poisoned() {
    ///     conn = Connection::connect(&conn.addr().clone(), &options).await?; // start over
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Sends one request and reads its reply, waiting at most `reply_timeout`.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// use dflockd_proto::{Reply, Request};
    /// let reply = conn.request(&Request::Ping, Duration::from_secs(5)).await?;
    /// assert_eq!(reply, Reply::Ok);
    /// # Ok(()) }
    /// ```
    pub async fn request(&mut self, request: &Request, reply_timeout: Duration) -> Result<Reply> {
        if self.poisoned {
            return Err(ErrorKind::Poisoned.into());
        }
        // Poisoned until the reply is in: a dropped future leaves it so.
        self.poisoned = true;
        self.out.clear();
        request.encode(&mut self.out);
        let exchange = async {
            self.writer.write_all(&self.out).await?;
            self.writer.flush().await?;
            read_reply(&mut self.reader, &mut self.line).await
        };
        let reply = tokio::time::timeout(reply_timeout, exchange)
            .await
            .map_err(|_| ErrorKind::ReplyTimeout)??;
        self.poisoned = false;
        Ok(reply)
    }

    /// Writes `bytes` and reads one raw reply line (for the mux hello,
    /// whose accepting reply is not a v2 reply shape). Poisons like
    /// [`request`](Self::request).
    pub(crate) async fn raw_exchange(
        &mut self,
        bytes: &[u8],
        reply_timeout: Duration,
    ) -> Result<Vec<u8>> {
        if self.poisoned {
            return Err(ErrorKind::Poisoned.into());
        }
        self.poisoned = true;
        self.line.clear();
        let exchange = async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await?;
            read_line(&mut self.reader, &mut self.line).await
        };
        tokio::time::timeout(reply_timeout, exchange)
            .await
            .map_err(|_| ErrorKind::ReplyTimeout)??;
        self.poisoned = false;
        Ok(std::mem::take(&mut self.line))
    }

    async fn authenticate(&mut self, token: &str) -> Result<()> {
        let reply = self
            .request(
                &Request::Auth {
                    token: token.as_bytes().to_vec(),
                },
                REPLY_SLACK,
            )
            .await;
        match reply {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Failure(dflockd_proto::Status::ErrorDraining)) => {
                Err(ErrorKind::Draining.into())
            }
            Ok(_) => Err(ErrorKind::Auth.into()),
            Err(error) if matches!(error.kind(), ErrorKind::ConnectionClosed) => {
                Err(ErrorKind::Auth.into())
            }
            Err(other) => Err(other),
        }
    }

    /// `l`/`sl`: acquires, waiting up to `timeout` (rounded up to whole
    /// seconds; zero is a try-lock). `None` means not granted in time.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// use dflockd_proto::{Key, Kind, Limit};
    /// let key = Key::new("encoders").unwrap();
    /// let slot = Kind::Semaphore(Limit::new(4).unwrap());
    /// match conn.acquire(&key, slot, Duration::from_secs(10), Some(Duration::from_secs(60))).await? {
    ///     Some(granted) => println!("slot held, fence {}", granted.token.fence()),
    ///     None => println!("all 4 slots stayed busy for 10 s"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn acquire(
        &mut self,
        key: &Key,
        kind: Kind,
        timeout: Duration,
        lease: Option<Duration>,
    ) -> Result<Option<Granted>> {
        let request = Request::Acquire {
            key: key.clone(),
            kind,
            timeout: seconds(timeout)?,
            lease: lease_of(lease)?,
        };
        grant_or_timeout(self.request(&request, timeout + REPLY_SLACK).await?)
    }

    /// `r`/`sr`: releases a grant. an `ErrorKind::Server` error means the token no
    /// longer holds the key.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// use dflockd_proto::{Key, Kind};
    /// let key = Key::new("jobs/nightly").unwrap();
    /// if let Some(granted) = conn.acquire(&key, Kind::Lock, Duration::ZERO, None).await? {
    ///     conn.release(&key, Kind::Lock.namespace(), granted.token).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn release(&mut self, key: &Key, namespace: Namespace, token: Token) -> Result<()> {
        let request = Request::Release {
            key: key.clone(),
            namespace,
            token: token.into(),
        };
        expect_ok(self.request(&request, REPLY_SLACK).await?)
    }

    /// `n`/`sn`: renews a lease; returns the lease the server applied.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// use dflockd_proto::{Key, Kind};
    /// let key = Key::new("jobs/nightly").unwrap();
    /// let granted = conn.acquire(&key, Kind::Lock, Duration::from_secs(5), None).await?.expect("granted");
    /// let applied = conn.renew(&key, Kind::Lock.namespace(), granted.token, Some(Duration::from_secs(60))).await?;
    /// assert_eq!(applied.get(), 60);
    /// # Ok(()) }
    /// ```
    pub async fn renew(
        &mut self,
        key: &Key,
        namespace: Namespace,
        token: Token,
        lease: Option<Duration>,
    ) -> Result<Seconds> {
        let request = Request::Renew {
            key: key.clone(),
            namespace,
            token: token.into(),
            lease: lease_of(lease)?,
        };
        expect_renewed(self.request(&request, REPLY_SLACK).await?)
    }

    /// `e`/`se`: two-phase enqueue.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use dflockd_client::Enqueued;
    /// use dflockd_proto::{Key, Kind};
    /// let key = Key::new("jobs/nightly").unwrap();
    /// if conn.enqueue(&key, Kind::Lock, None).await? == Enqueued::Queued {
    ///     println!("queued; call wait on this same connection");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn enqueue(
        &mut self,
        key: &Key,
        kind: Kind,
        lease: Option<Duration>,
    ) -> Result<Enqueued> {
        let request = Request::Enqueue {
            key: key.clone(),
            kind,
            lease: lease_of(lease)?,
        };
        expect_enqueued(self.request(&request, REPLY_SLACK).await?)
    }

    /// `w`/`sw`: waits for the grant of an earlier enqueue on this
    /// connection. `None` means the wait timed out and the queue position is
    /// gone.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// use dflockd_client::Enqueued;
    /// use dflockd_proto::{Key, Kind};
    /// let key = Key::new("jobs/nightly").unwrap();
    /// if let Enqueued::Queued = conn.enqueue(&key, Kind::Lock, None).await? {
    ///     let granted = conn.wait(&key, Kind::Lock.namespace(), Duration::from_secs(30)).await?;
    ///     assert!(granted.is_some(), "or the place timed out and is gone");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait(
        &mut self,
        key: &Key,
        namespace: Namespace,
        timeout: Duration,
    ) -> Result<Option<Granted>> {
        let request = Request::Wait {
            key: key.clone(),
            namespace,
            timeout: seconds(timeout)?,
        };
        grant_or_timeout(self.request(&request, timeout + REPLY_SLACK).await?)
    }

    /// `stats`: the server's state, shape-validated.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// let stats = conn.stats().await?;
    /// for lock in &stats.locks {
    ///     println!("{}: {} waiting", lock.key, lock.waiters);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stats(&mut self) -> Result<Stats> {
        expect_stats(self.request(&Request::Stats, REPLY_SLACK).await?)
    }

    /// `ping`: keep-alive.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut dflockd_client::Connection) -> dflockd_client::Result<()> {
    /// // Keep an idle connection (and the holds tied to it) alive.
    /// conn.ping().await?;
    /// # Ok(()) }
    /// ```
    pub async fn ping(&mut self) -> Result<()> {
        expect_ok(self.request(&Request::Ping, REPLY_SLACK).await?)
    }

    /// Splits into halves for pipelining (the control lane).
    pub(crate) fn into_parts(self) -> (BufReader<ReadHalf<BoxIo>>, WriteHalf<BoxIo>) {
        (self.reader, self.writer)
    }
}

/// Reads one reply line (capped before decoding) and parses it.
pub(crate) async fn read_reply<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> Result<Reply> {
    line.clear();
    read_line(reader, line).await?;
    Reply::parse(line).map_err(|e| ErrorKind::Protocol(e.to_string()).into())
}

/// Appends bytes to `line` up to and including the next LF. Cancel-safe:
/// bytes already taken stay in `line`, so a later call resumes the line.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> Result<()> {
    loop {
        if line.len() > MAX_REPLY_LINE + 2 {
            return Err(ErrorKind::Protocol("reply line too long".into()).into());
        }
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(ErrorKind::ConnectionClosed.into());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&buf[..=end]);
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                reader.consume(n);
            }
        }
    }
}

pub(crate) fn seconds(d: Duration) -> Result<Seconds> {
    Seconds::from_duration_ceil(d)
        .map_err(|e| ErrorKind::InvalidArgument(format!("timeout: {e}")).into())
}

pub(crate) fn lease_of(d: Option<Duration>) -> Result<Option<Lease>> {
    d.map(|d| {
        Lease::from_duration_ceil(d)
            .map_err(|e| ErrorKind::InvalidArgument(format!("lease: {e}")).into())
    })
    .transpose()
}

pub(crate) fn failure(reply: Reply) -> Error {
    match reply {
        Reply::Failure(status) => Error::from_status(status),
        Reply::NotLeader(leader) => ErrorKind::NotLeader { leader }.into(),
        other => ErrorKind::Protocol(format!("unexpected reply {other:?}")).into(),
    }
}

pub(crate) fn grant_or_timeout(reply: Reply) -> Result<Option<Granted>> {
    match reply {
        Reply::Granted { token, lease } => Ok(Some(Granted { token, lease })),
        Reply::Failure(dflockd_proto::Status::Timeout) => Ok(None),
        other => Err(failure(other)),
    }
}

pub(crate) fn expect_ok(reply: Reply) -> Result<()> {
    match reply {
        Reply::Ok => Ok(()),
        other => Err(failure(other)),
    }
}

pub(crate) fn expect_renewed(reply: Reply) -> Result<Seconds> {
    match reply {
        Reply::Renewed(secs) => Ok(secs),
        other => Err(failure(other)),
    }
}

pub(crate) fn expect_enqueued(reply: Reply) -> Result<Enqueued> {
    match reply {
        Reply::Acquired { token, lease } => Ok(Enqueued::Acquired(Granted { token, lease })),
        Reply::Queued => Ok(Enqueued::Queued),
        other => Err(failure(other)),
    }
}

pub(crate) fn expect_stats(reply: Reply) -> Result<Stats> {
    match reply {
        Reply::Stats(json) => serde_json::from_str(&json)
            .map_err(|e| ErrorKind::Protocol(format!("bad stats document: {e}")).into()),
        other => Err(failure(other)),
    }
}
