//! A fault-injecting TCP proxy for tests.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1` (ephemeral port) and forwards
//! every accepted connection to one upstream address. Each forwarded
//! connection is a [`Link`]; a test controls it per direction
//! ([`Direction::ToServer`], [`Direction::ToClient`]) with [`Faults`]
//! (latency + jitter, throttling, blackholes) and per side ([`Side`]) with
//! half-closes and resets — both sides at once, or one side now and the other
//! later (an *asymmetric* reset, where one peer learns of the failure before
//! the other).
//!
//! Bytes are never reordered: jitter only stretches the gaps between chunks.
//! Resets are real TCP resets (`SO_LINGER` 0, then close), so the peer's next
//! read fails with `ConnectionReset`, not a clean end of stream.
//!
//! ```
//! use std::time::Duration;
//! use dflockd_testkit::faultproxy::{Direction, FaultProxy, Faults, Side};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An upstream that answers "pong" to anything.
//! let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream_addr = upstream.local_addr()?;
//! tokio::spawn(async move {
//!     let (mut conn, _) = upstream.accept().await?;
//!     let mut buf = [0u8; 4];
//!     conn.read_exact(&mut buf).await?;
//!     conn.write_all(b"pong").await?;
//!     std::io::Result::Ok(())
//! });
//!
//! let proxy = FaultProxy::start(upstream_addr).await?;
//! // Every new link gets 20 ms of latency towards the server.
//! proxy.set_default_faults(Direction::ToServer, Faults::none().with_latency(Duration::from_millis(20), Duration::ZERO));
//! let mut client = tokio::net::TcpStream::connect(proxy.addr()).await?;
//! client.write_all(b"ping").await?;
//! let mut reply = [0u8; 4];
//! client.read_exact(&mut reply).await?;
//! assert_eq!(&reply, b"pong");
//!
//! // Then kill it: the server side now, the client side 100 ms later.
//! let link = proxy.link(0).await;
//! link.reset_asymmetric(Side::Server, Duration::from_millis(100)).await;
//! assert!(link.is_closed());
//! # Ok(()) }
//! ```

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest chunk read from a socket in one go.
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction between the reading and the writing half;
/// beyond it the proxy stops reading (TCP back-pressure reaches the sender).
const QUEUE: usize = 64;
/// How long connecting to the upstream may take before the inbound
/// connection is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A throttled direction writes at most this share of a second's budget at once.
const THROTTLE_SLICES_PER_SECOND: u64 = 50;

/// Errors of [`FaultProxy::start`].
///
/// ```
/// let e = dflockd_testkit::faultproxy::Error::Bind(std::io::Error::other("in use"));
/// assert!(e.to_string().contains("bind"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be bound to `127.0.0.1:0` or its address read.
    #[error("cannot bind the proxy listener on 127.0.0.1: {0}")]
    Bind(#[source] io::Error),
}

/// One end of a proxied connection.
///
/// ```
/// use dflockd_testkit::faultproxy::Side;
/// assert_eq!(Side::Client.other(), Side::Server);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The connection the proxy accepted (the client under test).
    Client,
    /// The connection the proxy opened to the upstream.
    Server,
}

impl Side {
    /// The opposite side.
    ///
    /// ```
    /// assert_eq!(dflockd_testkit::faultproxy::Side::Server.other(), dflockd_testkit::faultproxy::Side::Client);
    /// ```
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }
}

/// A direction of travel through a link.
///
/// ```
/// use dflockd_testkit::faultproxy::{Direction, Side};
/// assert_eq!(Direction::toward(Side::Server), Direction::ToServer);
/// assert_eq!(Direction::ToClient.source(), Side::Server);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → server (requests).
    ToServer,
    /// Server → client (replies).
    ToClient,
}

impl Direction {
    /// Both directions, for loops.
    ///
    /// ```
    /// assert_eq!(dflockd_testkit::faultproxy::Direction::BOTH.len(), 2);
    /// ```
    pub const BOTH: [Direction; 2] = [Direction::ToServer, Direction::ToClient];

    /// The direction whose bytes arrive at `side`.
    ///
    /// ```
    /// use dflockd_testkit::faultproxy::{Direction, Side};
    /// assert_eq!(Direction::toward(Side::Client), Direction::ToClient);
    /// ```
    pub fn toward(side: Side) -> Direction {
        match side {
            Side::Server => Direction::ToServer,
            Side::Client => Direction::ToClient,
        }
    }

    /// The side bytes of this direction are read from.
    ///
    /// ```
    /// use dflockd_testkit::faultproxy::{Direction, Side};
    /// assert_eq!(Direction::ToServer.source(), Side::Client);
    /// ```
    pub fn source(self) -> Side {
        self.target().other()
    }

    /// The side bytes of this direction are written to.
    ///
    /// ```
    /// use dflockd_testkit::faultproxy::{Direction, Side};
    /// assert_eq!(Direction::ToServer.target(), Side::Server);
    /// ```
    pub fn target(self) -> Side {
        match self {
            Direction::ToServer => Side::Server,
            Direction::ToClient => Side::Client,
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// What a blackholed direction does with the bytes it reads. Either way both
/// sockets stay open and nobody is told anything; a FIN from the source is
/// passed on only once the blackhole is lifted.
///
/// ```
/// use dflockd_testkit::faultproxy::{Blackhole, Faults};
/// let f = Faults::none().with_blackhole(Blackhole::Drop);
/// assert_eq!(f.blackhole, Some(Blackhole::Drop));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blackhole {
    /// Read and discard: the sender's writes succeed, nothing arrives, ever.
    Drop,
    /// Stop forwarding and keep the bytes; once the blackhole is lifted they
    /// are delivered in order. Queued bytes are bounded: when the queue is
    /// full the proxy stops reading and TCP back-pressure reaches the sender.
    Hold,
}

/// The faults applied to one direction of a link. `Faults::none()` (the
/// default) forwards bytes as fast as they come.
///
/// ```
/// use std::time::Duration;
/// use dflockd_testkit::faultproxy::Faults;
/// let f = Faults::none()
///     .with_latency(Duration::from_millis(50), Duration::from_millis(10))
///     .with_throttle(64 * 1024);
/// assert_eq!(f.latency, Duration::from_millis(50));
/// assert_eq!(f.throttle, Some(64 * 1024));
/// assert!(Faults::none().is_clear());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Added to every chunk's delivery time.
    pub latency: Duration,
    /// A uniformly random extra delay in `0..=jitter` per chunk. Order is
    /// preserved: a chunk is never delivered before the one read before it.
    pub jitter: Duration,
    /// Most bytes per second forwarded; `Some(0)` forwards nothing (like
    /// [`Blackhole::Hold`]); `None` is unlimited.
    pub throttle: Option<u64>,
    /// Stop forwarding, see [`Blackhole`].
    pub blackhole: Option<Blackhole>,
}

impl Faults {
    /// No faults.
    ///
    /// ```
    /// assert_eq!(dflockd_testkit::faultproxy::Faults::none(), Default::default());
    /// ```
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Whether no fault is set.
    ///
    /// ```
    /// assert!(!dflockd_testkit::faultproxy::Faults::none().with_throttle(10).is_clear());
    /// ```
    pub fn is_clear(&self) -> bool {
        *self == Faults::none()
    }

    /// With this latency and jitter.
    ///
    /// ```
    /// use std::time::Duration;
    /// let f = dflockd_testkit::faultproxy::Faults::none().with_latency(Duration::from_millis(5), Duration::from_millis(1));
    /// assert_eq!(f.jitter, Duration::from_millis(1));
    /// ```
    pub fn with_latency(mut self, latency: Duration, jitter: Duration) -> Faults {
        self.latency = latency;
        self.jitter = jitter;
        self
    }

    /// With a throttle of `bytes_per_second`.
    ///
    /// ```
    /// assert_eq!(dflockd_testkit::faultproxy::Faults::none().with_throttle(100).throttle, Some(100));
    /// ```
    pub fn with_throttle(mut self, bytes_per_second: u64) -> Faults {
        self.throttle = Some(bytes_per_second);
        self
    }

    /// With a blackhole.
    ///
    /// ```
    /// use dflockd_testkit::faultproxy::{Blackhole, Faults};
    /// assert!(Faults::none().with_blackhole(Blackhole::Hold).blackhole.is_some());
    /// ```
    pub fn with_blackhole(mut self, mode: Blackhole) -> Faults {
        self.blackhole = Some(mode);
        self
    }
}

/// A running proxy. Dropping it stops accepting and closes every link
/// (plainly, with FIN; use [`cut_all`](Self::cut_all) for resets).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
/// let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
/// let proxy = dflockd_testkit::faultproxy::FaultProxy::start(upstream).await?;
/// assert!(proxy.addr().ip().is_loopback());
/// assert_eq!(proxy.accepted(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<ProxyShared>,
}

#[derive(Debug)]
struct ProxyShared {
    defaults: Mutex<[Faults; 2]>,
    links: Mutex<Vec<Link>>,
    accepted: watch::Sender<usize>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1` (ephemeral port) forwarding to
    /// `upstream`. A connection the upstream refuses is reset.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// let proxy = dflockd_testkit::faultproxy::FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// assert_ne!(proxy.addr().port(), 0);
    /// # Ok(()) }
    /// ```
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy, Error> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let (accepted, _) = watch::channel(0);
        let shared = Arc::new(ProxyShared {
            defaults: Mutex::new([Faults::none(); 2]),
            links: Mutex::new(Vec::new()),
            accepted,
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            upstream,
            shared,
        })
    }

    /// The address clients connect to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// let proxy = dflockd_testkit::faultproxy::FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// let _ = tokio::net::TcpStream::connect(proxy.addr()).await;
    /// # Ok(()) }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address every link is forwarded to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// let up = "127.0.0.1:9".parse().unwrap();
    /// assert_eq!(dflockd_testkit::faultproxy::FaultProxy::start(up).await?.upstream(), up);
    /// # Ok(()) }
    /// ```
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Sets the faults every *new* link starts with in direction `dir`
    /// (links already open keep theirs).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// use dflockd_testkit::faultproxy::{Direction, FaultProxy, Faults};
    /// let proxy = FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// proxy.set_default_faults(Direction::ToClient, Faults::none().with_throttle(1024));
    /// assert_eq!(proxy.default_faults(Direction::ToClient).throttle, Some(1024));
    /// # Ok(()) }
    /// ```
    pub fn set_default_faults(&self, dir: Direction, faults: Faults) {
        lock(&self.shared.defaults)[dir.index()] = faults;
    }

    /// The faults new links start with in direction `dir`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// use dflockd_testkit::faultproxy::{Direction, FaultProxy};
    /// let proxy = FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// assert!(proxy.default_faults(Direction::ToServer).is_clear());
    /// # Ok(()) }
    /// ```
    pub fn default_faults(&self, dir: Direction) -> Faults {
        lock(&self.shared.defaults)[dir.index()]
    }

    /// How many connections have been accepted and forwarded so far.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// let proxy = dflockd_testkit::faultproxy::FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// assert_eq!(proxy.accepted(), 0);
    /// # Ok(()) }
    /// ```
    pub fn accepted(&self) -> usize {
        *self.shared.accepted.borrow()
    }

    /// Every link that is not fully closed yet, oldest first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dflockd_testkit::faultproxy::Error> {
    /// let proxy = dflockd_testkit::faultproxy::FaultProxy::start("127.0.0.1:9".parse().unwrap()).await?;
    /// assert!(proxy.links().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn links(&self) -> Vec<Link> {
        lock(&self.shared.links)
            .iter()
            .filter(|link| !link.is_closed())
            .cloned()
            .collect()
    }

    /// The `index`-th link forwarded (0-based, in accept order, closed or
    /// not), waiting until it exists.
    ///
    /// ```no_run
    /// # async fn demo(proxy: dflockd_testkit::faultproxy::FaultProxy) {
    /// let _client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    /// let link = proxy.link(0).await;
    /// assert_eq!(link.id(), 0);
    /// # }
    /// ```
    pub async fn link(&self, index: usize) -> Link {
        let mut accepted = self.shared.accepted.subscribe();
        // The sender lives in `self.shared`, so the channel cannot close
        // while `self` is borrowed.
        let _ = accepted.wait_for(|&n| n > index).await;
        lock(&self.shared.links)[index].clone()
    }

    /// Resets both sides of every open link at once (RST to client and
    /// server), returning when every socket is closed. New connections are
    /// still accepted.
    ///
    /// ```no_run
    /// # async fn demo(proxy: dflockd_testkit::faultproxy::FaultProxy) {
    /// proxy.cut_all().await;
    /// assert!(proxy.links().is_empty());
    /// # }
    /// ```
    pub async fn cut_all(&self) {
        for link in self.links() {
            link.reset().await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<ProxyShared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (inbound, peer) = match accepted {
            Ok(pair) => pair,
            Err(_) => {
                // Out of descriptors or an aborted handshake: try again later.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream));
        let outbound = tokio::select! {
            _ = shared.stop.cancelled() => return,
            outbound = connect => outbound,
        };
        let outbound = match outbound {
            Ok(Ok(stream)) => stream,
            _ => {
                let _ = SockRef::from(&inbound).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let defaults = *lock(&shared.defaults);
        let mut links = lock(&shared.links);
        let link = Link::spawn(
            links.len() as u64,
            peer,
            inbound,
            outbound,
            defaults,
            &shared.stop,
        );
        links.push(link);
        let count = links.len();
        drop(links);
        shared.accepted.send_replace(count);
    }
}

/// One proxied connection. Cheap to clone; every clone controls the same
/// link. Changes take effect for the next chunk forwarded.
///
/// ```no_run
/// # async fn demo(proxy: dflockd_testkit::faultproxy::FaultProxy) {
/// use std::time::Duration;
/// use dflockd_testkit::faultproxy::{Blackhole, Direction, Side};
/// let link = proxy.link(0).await;
/// link.set_latency(Direction::ToClient, Duration::from_millis(30), Duration::from_millis(10));
/// link.blackhole(Blackhole::Drop);      // both directions go silent
/// link.clear_faults();                  // and come back
/// link.half_close(Side::Server);        // the server reads EOF
/// link.reset().await;                   // both peers get RST
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Link {
    state: Arc<LinkState>,
}

#[derive(Debug)]
struct LinkState {
    id: u64,
    peer: SocketAddr,
    faults: [watch::Sender<Faults>; 2],
    half_close: [CancellationToken; 2],
    forwarded: [AtomicU64; 2],
    sides: [Arc<SideState>; 2],
}

/// One socket of a link and who still uses it. The socket closes when its
/// last user ends; a reset sets `SO_LINGER` 0 first, so that close is a RST.
#[derive(Debug)]
struct SideState {
    stream: Mutex<Option<Arc<TcpStream>>>,
    users: AtomicUsize,
    /// Stops every task using this socket.
    cancel: CancellationToken,
    /// Cancelled once the socket is closed.
    gone: CancellationToken,
}

impl SideState {
    fn new(stream: TcpStream, stop: &CancellationToken) -> Arc<SideState> {
        Arc::new(SideState {
            stream: Mutex::new(Some(Arc::new(stream))),
            users: AtomicUsize::new(0),
            cancel: stop.child_token(),
            gone: CancellationToken::new(),
        })
    }

    /// Registers a user; `None` if the socket is already closed.
    fn user(self: &Arc<SideState>) -> Option<SideUser> {
        let stream = lock(&self.stream).clone()?;
        self.users.fetch_add(1, Ordering::SeqCst);
        Some(SideUser {
            side: Arc::clone(self),
            stream: Some(stream),
        })
    }

    fn arm_reset(&self) {
        if let Some(stream) = lock(&self.stream).as_ref() {
            let _ = SockRef::from(&**stream).set_linger(Some(Duration::ZERO));
        }
    }

    /// Closes the socket if nobody uses it (after the last user ended, or
    /// when it never had one).
    fn close_if_unused(&self) {
        if self.users.load(Ordering::SeqCst) == 0 {
            drop(lock(&self.stream).take());
            self.gone.cancel();
        }
    }
}

struct SideUser {
    side: Arc<SideState>,
    stream: Option<Arc<TcpStream>>,
}

impl SideUser {
    fn stream(&self) -> &TcpStream {
        // Only `Drop` takes it.
        self.stream.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for SideUser {
    fn drop(&mut self) {
        drop(self.stream.take());
        if self.side.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.side.close_if_unused();
        }
    }
}

enum Chunk {
    Data { bytes: Vec<u8>, due: Instant },
    Eof,
}

impl Link {
    fn spawn(
        id: u64,
        peer: SocketAddr,
        inbound: TcpStream,
        outbound: TcpStream,
        defaults: [Faults; 2],
        stop: &CancellationToken,
    ) -> Link {
        let state = Arc::new(LinkState {
            id,
            peer,
            faults: defaults.map(|f| watch::channel(f).0),
            half_close: [CancellationToken::new(), CancellationToken::new()],
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            sides: [
                SideState::new(inbound, stop),
                SideState::new(outbound, stop),
            ],
        });
        for dir in Direction::BOTH {
            let source = state.side(dir.source()).user();
            let target = state.side(dir.target()).user();
            if let (Some(source), Some(target)) = (source, target) {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(read_half(Arc::clone(&state), dir, source, tx));
                tokio::spawn(write_half(Arc::clone(&state), dir, target, rx));
            }
        }
        Link { state }
    }

    /// The link's number: its position in accept order, from 0.
    ///
    /// ```no_run
    /// # async fn demo(proxy: dflockd_testkit::faultproxy::FaultProxy) {
    /// assert_eq!(proxy.link(3).await.id(), 3);
    /// # }
    /// ```
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The client's address as the proxy saw it.
    ///
    /// ```no_run
    /// # async fn demo(proxy: dflockd_testkit::faultproxy::FaultProxy) {
    /// assert!(proxy.link(0).await.peer().ip().is_loopback());
    /// # }
    /// ```
    pub fn peer(&self) -> SocketAddr {
        self.state.peer
    }

    /// The faults currently applied in direction `dir`.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// assert!(link.faults(dflockd_testkit::faultproxy::Direction::ToServer).is_clear());
    /// # }
    /// ```
    pub fn faults(&self, dir: Direction) -> Faults {
        *self.state.faults[dir.index()].borrow()
    }

    /// Replaces the faults of direction `dir`.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// use dflockd_testkit::faultproxy::{Direction, Faults};
    /// link.set_faults(Direction::ToClient, Faults::none().with_throttle(512));
    /// # }
    /// ```
    pub fn set_faults(&self, dir: Direction, faults: Faults) {
        self.state.faults[dir.index()].send_replace(faults);
    }

    /// Changes the faults of direction `dir` in place.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.update_faults(dflockd_testkit::faultproxy::Direction::ToServer, |f| f.throttle = None);
    /// # }
    /// ```
    pub fn update_faults(&self, dir: Direction, change: impl FnOnce(&mut Faults)) {
        self.state.faults[dir.index()].send_modify(change);
    }

    /// Sets latency and jitter of direction `dir`.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// use std::time::Duration;
    /// link.set_latency(dflockd_testkit::faultproxy::Direction::ToServer, Duration::from_millis(10), Duration::ZERO);
    /// # }
    /// ```
    pub fn set_latency(&self, dir: Direction, latency: Duration, jitter: Duration) {
        self.update_faults(dir, |f| {
            f.latency = latency;
            f.jitter = jitter;
        });
    }

    /// Throttles direction `dir` to `bytes_per_second` (`None`: unlimited).
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.set_throttle(dflockd_testkit::faultproxy::Direction::ToClient, Some(1_000));
    /// # }
    /// ```
    pub fn set_throttle(&self, dir: Direction, bytes_per_second: Option<u64>) {
        self.update_faults(dir, |f| f.throttle = bytes_per_second);
    }

    /// Blackholes direction `dir` (`None` lifts it).
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// use dflockd_testkit::faultproxy::{Blackhole, Direction};
    /// link.set_blackhole(Direction::ToClient, Some(Blackhole::Drop)); // replies vanish
    /// # }
    /// ```
    pub fn set_blackhole(&self, dir: Direction, mode: Option<Blackhole>) {
        self.update_faults(dir, |f| f.blackhole = mode);
    }

    /// Blackholes both directions.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.blackhole(dflockd_testkit::faultproxy::Blackhole::Hold);
    /// # }
    /// ```
    pub fn blackhole(&self, mode: Blackhole) {
        for dir in Direction::BOTH {
            self.set_blackhole(dir, Some(mode));
        }
    }

    /// Removes every fault in both directions.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.clear_faults();
    /// # }
    /// ```
    pub fn clear_faults(&self) {
        for dir in Direction::BOTH {
            self.set_faults(dir, Faults::none());
        }
    }

    /// Bytes delivered so far in direction `dir`.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// let _ = link.forwarded(dflockd_testkit::faultproxy::Direction::ToServer);
    /// # }
    /// ```
    pub fn forwarded(&self, dir: Direction) -> u64 {
        self.state.forwarded[dir.index()].load(Ordering::SeqCst)
    }

    /// Half-closes toward `side`: that peer reads end-of-stream (FIN) while
    /// the other direction keeps flowing. Bytes still queued toward it, and
    /// any the other peer sends later, are discarded.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.half_close(dflockd_testkit::faultproxy::Side::Server); // the server sees EOF; replies still reach the client
    /// # }
    /// ```
    pub fn half_close(&self, side: Side) {
        self.state.half_close[Direction::toward(side).index()].cancel();
    }

    /// Resets one side now: its peer's next read or write fails with
    /// `ConnectionReset`. The other side stays open and silent (bytes from it
    /// are discarded, nothing is sent to it) until it is reset too or its
    /// peer closes it. Returns once the reset socket is closed.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.reset_side(dflockd_testkit::faultproxy::Side::Server).await;
    /// # }
    /// ```
    pub async fn reset_side(&self, side: Side) {
        self.state.reset_side(side).await;
    }

    /// Resets both sides at once; returns once both sockets are closed.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.reset().await;
    /// assert!(link.is_closed());
    /// # }
    /// ```
    pub async fn reset(&self) {
        for side in [Side::Client, Side::Server] {
            self.state.side(side).arm_reset();
        }
        for side in [Side::Client, Side::Server] {
            self.state.side(side).cancel.cancel();
        }
        self.closed().await;
    }

    /// An asymmetric reset: resets `first` now and the other side `delay`
    /// later, so one peer learns of the failure `delay` before the other.
    /// Returns once both are closed; spawn it to keep going meanwhile.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// use std::time::Duration;
    /// // The server frees the client's locks 250 ms before the client notices.
    /// let link2 = link.clone();
    /// tokio::spawn(async move { link2.reset_asymmetric(dflockd_testkit::faultproxy::Side::Server, Duration::from_millis(250)).await });
    /// # }
    /// ```
    pub async fn reset_asymmetric(&self, first: Side, delay: Duration) {
        self.reset_side(first).await;
        tokio::time::sleep(delay).await;
        self.reset_side(first.other()).await;
    }

    /// Whether both sockets of the link are closed.
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// if !link.is_closed() { link.reset().await; }
    /// # }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.state.sides.iter().all(|side| side.gone.is_cancelled())
    }

    /// Resolves once both sockets of the link are closed (by a reset, the
    /// peers closing, or the proxy stopping).
    ///
    /// ```no_run
    /// # async fn demo(link: dflockd_testkit::faultproxy::Link) {
    /// link.closed().await;
    /// # }
    /// ```
    pub async fn closed(&self) {
        for side in &self.state.sides {
            side.gone.cancelled().await;
        }
    }
}

impl LinkState {
    fn side(&self, side: Side) -> &Arc<SideState> {
        &self.sides[side.index()]
    }

    async fn reset_side(&self, side: Side) {
        let side = self.side(side);
        side.arm_reset();
        side.cancel.cancel();
        side.gone.cancelled().await;
    }

    /// A peer reset or failed: pass the reset on to the other peer.
    fn propagate_reset(self: &Arc<Self>, failed: Side) {
        let state = Arc::clone(self);
        tokio::spawn(async move {
            state.side(failed).cancel.cancel();
            state.reset_side(failed.other()).await;
        });
    }
}

async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Reads `dir`'s source socket and queues chunks, stamped with their
/// delivery time, for [`write_half`].
async fn read_half(
    state: Arc<LinkState>,
    dir: Direction,
    source: SideUser,
    tx: mpsc::Sender<Chunk>,
) {
    let cancel = source.side.cancel.clone();
    let faults = state.faults[dir.index()].subscribe();
    let body = async {
        let mut buf = vec![0u8; CHUNK];
        let mut last_due = Instant::now();
        let mut target_open = true;
        loop {
            match read_some(source.stream(), &mut buf).await {
                Ok(0) => {
                    let _ = tx.send(Chunk::Eof).await;
                    return;
                }
                Ok(n) => {
                    if !target_open {
                        continue; // the target is gone or half-closed: discard
                    }
                    let f = *faults.borrow();
                    let due = (Instant::now() + f.latency + jitter(f.jitter)).max(last_due);
                    last_due = due;
                    let chunk = Chunk::Data {
                        bytes: buf[..n].to_vec(),
                        due,
                    };
                    target_open = tx.send(chunk).await.is_ok();
                }
                Err(_) => {
                    state.propagate_reset(dir.source());
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = body => {}
    }
}

/// Delivers queued chunks to `dir`'s target socket at their due time,
/// honouring throttle and blackhole.
async fn write_half(
    state: Arc<LinkState>,
    dir: Direction,
    target: SideUser,
    mut rx: mpsc::Receiver<Chunk>,
) {
    let cancel = target.side.cancel.clone();
    let half_close = state.half_close[dir.index()].clone();
    let mut faults = state.faults[dir.index()].subscribe();
    let forwarded = &state.forwarded[dir.index()];
    let body = async {
        let mut next_free = Instant::now();
        loop {
            let Some(chunk) = rx.recv().await else {
                // The source was reset by the proxy (or the proxy stopped):
                // tell the target nothing. Its socket stays open, silent,
                // as long as the other direction still reads from it.
                return false;
            };
            let (bytes, due) = match chunk {
                Chunk::Eof => {
                    // Like TCP retransmitting a FIN: it gets through only
                    // once the direction is no longer blackholed.
                    let _ = faults.wait_for(|f| f.blackhole.is_none()).await;
                    return true;
                }
                Chunk::Data { bytes, due } => (bytes, due),
            };
            tokio::time::sleep_until(due).await;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                // Wait out a hold (or a zero throttle).
                let _ = faults
                    .wait_for(|f| f.blackhole != Some(Blackhole::Hold) && f.throttle != Some(0))
                    .await;
                let f = *faults.borrow_and_update();
                if f.blackhole == Some(Blackhole::Drop) {
                    break;
                }
                let piece = match f.throttle {
                    None => rest.len(),
                    Some(rate) => {
                        let now = Instant::now();
                        if next_free > now {
                            tokio::time::sleep_until(next_free).await;
                        }
                        let slice = (rate / THROTTLE_SLICES_PER_SECOND).max(1);
                        let piece = rest.len().min(usize::try_from(slice).unwrap_or(usize::MAX));
                        let cost = Duration::from_secs_f64(piece as f64 / rate as f64);
                        next_free = next_free.max(Instant::now()) + cost;
                        piece
                    }
                };
                if write_all(target.stream(), &rest[..piece]).await.is_err() {
                    state.propagate_reset(dir.target());
                    return false;
                }
                forwarded.fetch_add(piece as u64, Ordering::SeqCst);
                rest = &rest[piece..];
            }
        }
    };
    let fin = tokio::select! {
        _ = cancel.cancelled() => false,
        _ = half_close.cancelled() => true,
        fin = body => fin,
    };
    if fin {
        // End of stream from the source, or a half-close: FIN toward the
        // target.
        let _ = SockRef::from(target.stream()).shutdown(Shutdown::Write);
    }
}
