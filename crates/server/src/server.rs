//! The listener, admission caps, timers, drain and shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dflockd_core::ConnId;
use dflockd_core::{LockTable, Op, Outcome, ResourceBudget, TableConfig};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::TableClock;
use crate::config::ServerConfig;
use crate::conn::Connection;
use crate::fence::{FenceFileError, ServerMint};
use crate::ingress::InProcess;
use crate::replica::{self, ClusterLog, ClusterStartError, Releases, Replica};
use crate::session::Close;
use crate::shared::{ConnGuard, Shared, Telemetry};

/// Why a server could not start.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::{Server, ServerConfig, StartError};
/// let first = Server::start(ServerConfig::ephemeral()).await?;
/// let mut config = ServerConfig::ephemeral();
/// config.port = first.local_addr().port(); // already taken
/// assert!(matches!(Server::start(config).await, Err(StartError::Bind { .. })));
/// # Ok(()) }
/// ```
#[derive(Debug, Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The fence-state file could not be used.
    #[error(transparent)]
    FenceState(#[from] FenceFileError),
    /// Cluster mode could not start.
    #[error(transparent)]
    Cluster(#[from] ClusterStartError),
}

/// Listeners bound beforehand (by a test that must know every address of
/// a cluster before it starts, or a supervisor that passes sockets): the
/// server takes them instead of binding its own.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::{Listeners, Server, ServerConfig};
/// let client = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = client.local_addr()?;
/// let listeners = Listeners { client: Some(client), ..Listeners::default() };
/// let server = Server::start_with_listeners(ServerConfig::ephemeral(), listeners).await?;
/// assert_eq!(server.local_addr(), addr);
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Listeners {
    /// Where clients connect (instead of `host:port`).
    pub client: Option<std::net::TcpListener>,
    /// Where Raft peers connect, in cluster mode (instead of `raft_addr`).
    pub raft: Option<std::net::TcpListener>,
    /// Where the HTTP API listens, when [`ServerConfig::http`] is set
    /// (instead of its host and port).
    pub http: Option<std::net::TcpListener>,
}

/// A dflockd server. [`Server::start`] binds and runs it on the current
/// tokio runtime and returns a [`ServerHandle`].
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
/// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
/// let mut stream = tokio::net::TcpStream::connect(server.local_addr()).await?;
/// stream.write_all(b"ping\n_\n_\n").await?;
/// let mut line = String::new();
/// BufReader::new(stream).read_line(&mut line).await?;
/// assert_eq!(line, "ok\n");
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds the listener and starts serving in the background.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dflockd_server::{Server, ServerConfig, Secret};
    /// let mut config = ServerConfig::ephemeral();
    /// config.max_locks = 10_000;
    /// config.auth_token = Some(Secret::new("s3cret"));
    /// let server = Server::start(config).await?;
    /// assert_ne!(server.local_addr().port(), 0);
    /// server.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(config: ServerConfig) -> Result<ServerHandle, StartError> {
        Server::start_with_listeners(config, Listeners::default()).await
    }

    /// [`start`](Self::start) on listeners bound beforehand.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dflockd_server::{Listeners, Server, ServerConfig};
    /// let client = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let listeners = Listeners { client: Some(client), ..Listeners::default() };
    /// let server = Server::start_with_listeners(ServerConfig::ephemeral(), listeners).await?;
    /// server.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start_with_listeners(
        config: ServerConfig,
        listeners: Listeners,
    ) -> Result<ServerHandle, StartError> {
        let addr = format!("{}:{}", config.host, config.port);
        let bind_error = |source| StartError::Bind {
            addr: addr.clone(),
            source,
        };
        if let Some(cluster) = &config.cluster
            && config.fence_state_file.is_some()
        {
            return Err(StartError::Cluster(ClusterStartError::Config {
                node: cluster.node_id,
                reason: "--fence-state-file is not used in cluster mode (the fence counter is replicated)".to_string(),
            }));
        }
        let mint = ServerMint::open(config.fence_state_file.as_deref())?;
        let listener = match listeners.client {
            Some(listener) => {
                listener.set_nonblocking(true).map_err(bind_error)?;
                TcpListener::from_std(listener).map_err(bind_error)?
            }
            None => {
                let bind_host = config
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                TcpListener::bind((bind_host.as_str(), config.port))
                    .await
                    .map_err(bind_error)?
            }
        };
        let local_addr = listener.local_addr().map_err(bind_error)?;
        warn_unbounded(&config, &local_addr);
        let clock = TableClock::start(config.runtime_clock);
        let table_config = TableConfig {
            default_lease: config.default_lease,
            max_locks: config.max_locks,
            max_waiters: config.max_waiters,
            gc_max_idle: config.gc_max_idle,
            disconnect_lock_delay: config.disconnect_lock_delay,
            clock_granularity: clock.granularity(),
            auto_release: config.auto_release_on_disconnect,
            orphan_ttl: std::time::Duration::ZERO,
        };
        let telemetry = Arc::new(Telemetry::default());
        let replica = match &config.cluster {
            Some(cluster) => {
                // The leader's clock is the runtime's precise one.
                let table = TableConfig {
                    clock_granularity: std::time::Duration::ZERO,
                    orphan_ttl: cluster.orphan_ttl,
                    ..table_config
                };
                let client_addr = local_addr.to_string();
                Some(
                    Replica::start(
                        cluster,
                        table,
                        listeners.raft,
                        client_addr,
                        Arc::clone(&telemetry),
                    )
                    .await?,
                )
            }
            None => None,
        };
        // One fence counter and one resource cap for all shards.
        let budget = Arc::new(ResourceBudget::new(config.max_locks));
        let (replica, releases) = replica.unzip();
        let shared = Arc::new(Shared::new(config, clock, telemetry, || {
            LockTable::sharing(table_config, mint.share(), Arc::clone(&budget))
        }));
        let (local, local_rx) = mpsc::unbounded_channel();
        let http = match shared.config.http.clone() {
            Some(http) => {
                let host = http
                    .host
                    .clone()
                    .unwrap_or_else(|| shared.config.host.clone());
                let http_addr = format!("{host}:{}", http.port);
                let http_bind_error = |source| StartError::Bind {
                    addr: http_addr.clone(),
                    source,
                };
                let listener = match listeners.http {
                    Some(listener) => listener,
                    None => std::net::TcpListener::bind((
                        host.trim_start_matches('[').trim_end_matches(']'),
                        http.port,
                    ))
                    .map_err(http_bind_error)?,
                };
                Some(
                    crate::http::start(
                        listener,
                        Arc::clone(&shared),
                        replica.clone(),
                        local.clone(),
                        http,
                    )
                    .map_err(http_bind_error)?,
                )
            }
            None => None,
        };
        let metrics = match shared.config.metrics_addr.clone() {
            Some(addr) => {
                let bind_error = |source| StartError::Bind {
                    addr: addr.clone(),
                    source,
                };
                let listener = std::net::TcpListener::bind(addr.as_str()).map_err(bind_error)?;
                Some(
                    crate::http::start_metrics(listener, Arc::clone(&shared), replica.clone())
                        .map_err(bind_error)?,
                )
            }
            None => None,
        };
        let cluster = replica.clone().zip(releases);
        let task = tokio::spawn(run(listener, local_rx, Arc::clone(&shared), cluster));
        let (http_addr, http_task) = http.map(|h| (h.addr, h.task)).unzip();
        let (metrics_addr, metrics_task) = metrics.map(|h| (h.addr, h.task)).unzip();
        tracing::info!(addr = %local_addr, tls = shared.config.tls.is_some(), auth = shared.config.auth_token.is_some(), cluster = replica.is_some(), "dflockd listening");
        Ok(ServerHandle {
            local_addr,
            http_addr,
            shared,
            replica,
            local,
            task: Some(task),
            http_task,
            metrics_addr,
            metrics_task,
        })
    }
}

/// Controls a running server. Dropping the handle stops the server at once
/// (connections are closed); use [`shutdown`](Self::shutdown) for a graceful
/// drain.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
/// let addr = server.local_addr(); // hand this to clients
/// server.shutdown().await; // graceful; `drop(server)` would stop it at once
/// assert!(tokio::net::TcpStream::connect(addr).await.is_err());
/// # Ok(()) }
/// ```
pub struct ServerHandle {
    local_addr: SocketAddr,
    /// Where the HTTP API listens, if it is on.
    http_addr: Option<SocketAddr>,
    /// The HTTP API's task (ends after the drain).
    http_task: Option<JoinHandle<()>>,
    /// Where the metrics-only listener listens, if it is on.
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Cluster mode: this server's node.
    replica: Option<Arc<Replica>>,
    /// In-process connections for the accept loop.
    local: mpsc::UnboundedSender<InProcess>,
    task: Option<JoinHandle<()>>,
}

/// How many bytes an in-process connection buffers each way.
const IN_PROCESS_BUFFER: usize = 64 * 1024;

impl ServerHandle {
    /// The address the server listens on (with the real port when 0 was asked).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// let addr = server.local_addr();
    /// assert!(addr.ip().is_loopback());
    /// assert_ne!(addr.port(), 0); // the port the OS picked
    /// # Ok(()) }
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A connection that lives in this process: an in-memory pipe served
    /// like an accepted TCP connection from 127.0.0.1 (the same caps, auth,
    /// timeouts and drain; never TLS). A cap refuses it as it refuses a
    /// socket, by closing it at once. For tests and embedders that need no
    /// socket. `None` once the server has stopped accepting (draining or
    /// stopped).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// let mut pipe = BufReader::new(server.connect_in_process().expect("accepting"));
    /// pipe.write_all(b"ping\n_\n\n").await?;
    /// let mut reply = String::new();
    /// pipe.read_line(&mut reply).await?;
    /// assert_eq!(reply, "ok\n");
    /// # Ok(()) }
    /// ```
    pub fn connect_in_process(&self) -> Option<DuplexStream> {
        let (client, server) = tokio::io::duplex(IN_PROCESS_BUFFER);
        self.local
            .send(InProcess {
                stream: server,
                http: None,
            })
            .ok()?;
        Some(client)
    }

    /// Where the HTTP API listens (with the real port when 0 was asked);
    /// `None` when [`ServerConfig::http`] is not set.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// assert_eq!(server.http_addr(), None); // off unless configured
    /// # Ok(()) }
    /// ```
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where the metrics-only listener (`--metrics-addr`) listens, if on.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = dflockd_server::ServerConfig {
    ///     metrics_addr: Some("127.0.0.1:0".into()),
    ///     ..dflockd_server::ServerConfig::ephemeral()
    /// };
    /// let server = dflockd_server::Server::start(config).await?;
    /// assert!(server.metrics_addr().is_some());
    /// server.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// In cluster mode, this server's node of the cluster (its Raft
    /// metrics, membership changes, `wait`); `None` for a single node.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// assert!(server.cluster_node().is_none());
    /// # Ok(()) }
    /// ```
    pub fn cluster_node(&self) -> Option<&dflockd_cluster::Node> {
        self.replica.as_ref().map(|replica| replica.node())
    }

    /// Starts a graceful drain, as SIGTERM does: the listener closes, blocked
    /// requests are answered `error`, every connection's next request gets
    /// `error_draining`, and connections still open after the shutdown
    /// timeout are closed. (A cluster node with `--orphan-ttl` leaves a
    /// named multiplexed session's blocked requests queued: its connections
    /// close as the node hands its leadership over, and the session claims
    /// them on its next connection.)
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::default()).await?;
    /// tokio::signal::ctrl_c().await?;
    /// server.begin_drain(); // clients get `error_draining` and move on
    /// server.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn begin_drain(&self) {
        self.shared.begin_drain();
    }

    /// Closes every connection at once (no further replies).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// let _client = tokio::net::TcpStream::connect(server.local_addr()).await?;
    /// // Simulate a crash: no drain, every connection dropped at once.
    /// server.force_close();
    /// server.wait().await;
    /// # Ok(()) }
    /// ```
    pub fn force_close(&self) {
        self.shared.begin_drain();
        self.shared.kill.cancel();
    }

    /// Waits until the server has stopped (after a drain or force close).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::default()).await?;
    /// let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    /// term.recv().await;
    /// server.begin_drain();
    /// server.wait().await; // returns once the last connection is gone (or the shutdown timeout)
    /// # Ok(()) }
    /// ```
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.http_task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.metrics_task.take() {
            let _ = task.await;
        }
    }

    /// Drains and waits until the server has stopped.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
    /// // … run tests against server.local_addr() …
    /// server.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(self) {
        self.begin_drain();
        self.wait().await;
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.force_close();
        }
    }
}

fn warn_unbounded(config: &ServerConfig, addr: &SocketAddr) {
    if addr.ip().is_loopback() {
        return;
    }
    for (flag, value) in [
        ("--max-connections", config.max_connections),
        ("--max-connections-per-ip", config.max_connections_per_ip),
        ("--max-waiters", config.max_waiters),
    ] {
        if value == 0 {
            tracing::warn!(flag, "unbounded limit on a non-loopback listener");
        }
    }
}

async fn run(
    listener: TcpListener,
    mut local: mpsc::UnboundedReceiver<InProcess>,
    shared: Arc<Shared>,
    cluster: Option<(Arc<Replica>, Releases)>,
) {
    let timers = tokio::spawn(timers(Arc::clone(&shared)));
    let (replica, releases) = cluster.unzip();
    // Cluster mode's tasks, stopped when this task ends.
    let mut cluster_tasks = Vec::new();
    if let (Some(replica), Some(releases)) = (&replica, releases) {
        let config = &shared.config;
        for task in [
            tokio::spawn(replica::watch_regime(Arc::clone(replica))),
            tokio::spawn(replica::release_undelivered(Arc::clone(replica), releases)),
            tokio::spawn(replica::propose_timers(
                Arc::clone(replica),
                config.lease_sweep_interval,
                config.gc_interval,
            )),
        ] {
            cluster_tasks.push(tokio_util::task::AbortOnDropHandle::new(task));
        }
    }
    // Stopped when this task ends, however it ends.
    let _reaper =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(Arc::clone(&shared.reaper).run()));
    // Connection tasks. A force close aborts them, so their hot loops need
    // not watch a cancellation signal on every read and write.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shared.drain.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(InProcess { stream, http }) = local.recv() => {
                let guard = match &http {
                    // HTTP sessions have their own caps.
                    Some(_) => shared.admit_http(),
                    // Over a cap: closed at once, as a socket is.
                    None => match shared.admit(IpAddr::from(Ipv4Addr::LOCALHOST)) {
                        Some(guard) => guard,
                        None => {
                            tracing::debug!("in-process connection refused by cap");
                            drop(stream);
                            continue;
                        }
                    },
                };
                let (opened, closed) = http.map(|l| (l.opened, l.closed)).unzip();
                let span = tracing::debug_span!("conn", id = guard.id.0, peer = "in-process");
                let connection = serve(stream, guard.id, Arc::clone(&shared), replica.clone(), opened);
                let connection = async move {
                    connection.await;
                    drop(guard);
                    if let Some(closed) = closed {
                        let _ = closed.send(());
                    }
                };
                if span.is_disabled() {
                    connections.spawn(connection);
                } else {
                    connections.spawn(connection.instrument(span));
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Over a cap: close at once, before any TLS handshake.
                let Some(guard) = shared.admit(peer.ip()) else {
                    tracing::info!(%peer, "connection refused by a connection cap");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let span = tracing::debug_span!("conn", id = guard.id.0, %peer);
                let connection = handle(stream, guard, Arc::clone(&shared), replica.clone());
                // A disabled span (the log level is above debug) records
                // nothing: the connection runs without the wrapper, which
                // would enter and leave it on every poll.
                if span.is_disabled() {
                    connections.spawn(connection);
                } else {
                    connections.spawn(connection.instrument(span));
                }
            }
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(local);
    tracing::info!("draining");
    if let Some(replica) = &replica {
        // A node that stops leaves the cluster first: while it kept Raft
        // running it would stay leader and refuse every request until its
        // clients were gone. It stops proposing, hands leadership to an
        // up-to-date follower if it leads (bounded), and stops Raft; its
        // connections close and their clients go to the next leader.
        drop(cluster_tasks);
        replica.retire();
        if !shared.kill.is_cancelled() {
            // A crash (force_close) hands nothing over.
            replica.node().hand_over().await;
        }
        replica.node().stop().await;
    }
    let finished = async { while connections.join_next().await.is_some() {} };
    let limit = async {
        match shared.config.shutdown_timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let forced = tokio::select! {
        _ = finished => false,
        _ = limit => true,
        _ = shared.kill.cancelled() => true,
    };
    if forced {
        tracing::info!("closing remaining connections");
        shared.kill.cancel();
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    let _ = timers.await;
    tracing::info!("stopped");
}

/// Serves one connection with the log of this server's mode. An HTTP
/// session's connection (`http`: where its connection id goes) is left out
/// of the request metrics: the HTTP layer counts its requests.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    id: ConnId,
    shared: Arc<Shared>,
    replica: Option<Arc<Replica>>,
    http: Option<oneshot::Sender<u64>>,
) -> Close {
    match replica {
        None => {
            for_http(Connection::new(stream, id, shared), id, http)
                .serve()
                .await
        }
        Some(replica) => {
            // The table knows the connection by the cluster's id.
            let (id, regime) = replica.open();
            let log = ClusterLog::new(replica, Arc::clone(&shared), id, regime);
            for_http(Connection::with_log(stream, id, shared, log), id, http)
                .serve()
                .await
        }
    }
}

/// An HTTP session's connection tells the HTTP layer its id and is left
/// out of the request metrics; others are served as they are.
fn for_http<S: AsyncRead + AsyncWrite + Unpin, L: crate::conn::DriverLog>(
    connection: Connection<S, L>,
    id: ConnId,
    http: Option<oneshot::Sender<u64>>,
) -> Connection<S, L> {
    match http {
        None => connection,
        Some(opened) => {
            let _ = opened.send(id.0);
            connection.for_http()
        }
    }
}

async fn handle(
    stream: TcpStream,
    guard: ConnGuard,
    shared: Arc<Shared>,
    replica: Option<Arc<Replica>>,
) {
    let id = guard.id;
    let peer = stream.peer_addr().ok();
    let close = match shared.config.tls.clone() {
        None => serve(stream, id, Arc::clone(&shared), replica, None).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
            let handshake =
                tokio::time::timeout(shared.config.read_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                },
                _ = shared.kill.cancelled() => return,
            };
            serve(stream, id, Arc::clone(&shared), replica, None).await
        }
    };
    if close == Close::AuthFailed {
        // The address only: what the peer sent is never logged.
        match peer {
            Some(peer) => tracing::warn!(%peer, "authentication failed"),
            None => tracing::warn!("authentication failed"),
        }
    }
    drop(guard);
}

/// Lease sweep and idle GC, until the drain starts.
async fn timers(shared: Arc<Shared>) {
    let mut sweep = tokio::time::interval(shared.config.lease_sweep_interval);
    let mut gc = tokio::time::interval(shared.config.gc_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delay_end = shared.next_delay_end().map(|d| shared.instant_after(d));
        let delay_over = async {
            match delay_end {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.drain.cancelled() => return,
            _ = sweep.tick() => {
                let mut evicted = 0;
                shared.each_shard(|shard| {
                    if let Ok(Outcome::Swept(n)) = shard.run(Op::Sweep) {
                        evicted += n;
                    }
                });
                if evicted > 0 {
                    tracing::debug!(evicted, "expired leases evicted");
                }
            }
            _ = gc.tick() => {
                let mut removed = 0;
                shared.each_shard(|shard| {
                    if let Ok(Outcome::Collected(n)) = shard.run(Op::Gc) {
                        removed += n;
                    }
                });
                if removed > 0 {
                    tracing::debug!(removed, "idle resources collected");
                }
            }
            _ = delay_over => {
                shared.each_shard(|shard| {
                    let _ = shard.run(Op::EndDelays);
                });
            }
            // A new lock-delay may end before the one we are sleeping for.
            _ = shared.delay_started.notified() => {}
        }
    }
}
