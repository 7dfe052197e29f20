//! Server configuration as the library sees it: typed values with the Go
//! server's defaults. The `dflockd` binary builds one from flags and
//! environment variables (the `cli` module); embedders build one in code.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use dflockd_proto::Lease;

use crate::cluster_config::ClusterConfig;
use crate::tls::TlsConfig;

/// How long a connection may stay silent between requests.
///
/// ```
/// use dflockd_server::{IdlePolicy, ServerConfig};
/// let mut config = ServerConfig::ephemeral();
/// assert_eq!(config.idle, IdlePolicy::ReadTimeout); // the Go default
/// config.idle = IdlePolicy::Unbounded; // clients that hold locks on silent connections
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// The Go v2 baseline: waiting for the next request is an ordinary line
    /// read, bounded by the read timeout; a silent connection gets `error`
    /// and is closed (releasing its locks when auto-release is on).
    #[default]
    ReadTimeout,
    /// Idle waits are unbounded; the read timeout applies only once a
    /// request has started (the newest upstream protocol source's variant).
    Unbounded,
}

/// A shared secret whose value never appears in `Debug` output or logs.
///
/// ```
/// let s = dflockd_server::Secret::new("s3cret");
/// assert_eq!(format!("{s:?}"), "Secret(***)");
/// assert_eq!(s.expose(), "s3cret");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    ///
    /// ```
    /// let mut config = dflockd_server::ServerConfig::ephemeral();
    /// config.auth_token = Some(dflockd_server::Secret::new(String::from("s3cret")));
    /// assert!(format!("{config:?}").contains("Secret(***)"));
    /// ```
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret's value. Do not log it.
    ///
    /// ```
    /// let secret = dflockd_server::Secret::new("s3cret");
    /// // Compare in constant time when checking what a client sent.
    /// assert_eq!(secret.expose().as_bytes(), b"s3cret");
    /// ```
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything a server needs to run. Defaults follow the Go dflockd v2
/// server (spec §6).
///
/// ```
/// use std::time::Duration;
/// let config = dflockd_server::ServerConfig::ephemeral();
/// assert_eq!(config.port, 0);
/// assert_eq!(config.read_timeout, Duration::from_secs(23));
/// assert_eq!(config.default_lease.get(), 33);
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bind address (`--host`, default `127.0.0.1`).
    pub host: String,
    /// Bind port (`--port`, default 6388; 0 = ephemeral).
    pub port: u16,
    /// Per-line read deadline (`--read-timeout`, 23 s).
    pub read_timeout: Duration,
    /// Whether idle time between requests is bounded by `read_timeout`.
    pub idle: IdlePolicy,
    /// Deadline for writing one reply (`--write-timeout`, 5 s); `None` = no deadline.
    pub write_timeout: Option<Duration>,
    /// How long a drain waits for connections before closing them
    /// (`--shutdown-timeout`, 30 s); `None` = wait forever.
    pub shutdown_timeout: Option<Duration>,
    /// Most concurrent connections; 0 = unlimited.
    pub max_connections: usize,
    /// Most concurrent connections from one IP; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Release a connection's holds when it closes (default true).
    pub auto_release_on_disconnect: bool,
    /// TLS for every connection, if set.
    pub tls: Option<TlsConfig>,
    /// Shared secret every connection must present first, if set.
    pub auth_token: Option<Secret>,
    /// Lease when a request names none (`--default-lease-ttl`, 33 s).
    pub default_lease: Lease,
    /// How often expired leases are evicted (`--lease-sweep-interval`, 1 s).
    pub lease_sweep_interval: Duration,
    /// How often idle resources are collected (`--gc-interval`, 5 s).
    pub gc_interval: Duration,
    /// Idle time after which a resource is collected (`--gc-max-idle`, 60 s).
    pub gc_max_idle: Duration,
    /// Disconnect lock-delay (`--disconnect-lock-delay-ms`, default 0 = off):
    /// after a closed connection's holds are released, their keys are not
    /// granted again for `min(remaining lease, delay)`.
    pub disconnect_lock_delay: Duration,
    /// Most resources, locks and semaphores together (`--max-locks`, 1024).
    pub max_locks: usize,
    /// Most waiters per resource; 0 = unlimited (`--max-waiters`).
    pub max_waiters: usize,
    /// File that makes fences monotonic across restarts (`--fence-state-file`).
    pub fence_state_file: Option<PathBuf>,
    /// Most bytes of pipelined requests buffered while a blocking request
    /// waits; beyond it the connection is closed (Go: its 4 KiB read buffer).
    pub pipeline_limit: usize,
    /// Whether a client may switch its connection to the multiplexed
    /// extension (`hello _ mux`, docs/protocol-mux.md). Default true; when
    /// false the server answers `error` like a plain dflockd v2 server.
    pub mux: bool,
    /// Most requests one multiplexed connection may have waiting at once
    /// (`--mux-max-waiting`, default 100,000); beyond it a blocking request
    /// is answered `error_max_waiters`. 0 = unlimited.
    pub mux_max_waiting: usize,
    /// Count lease and lock-delay time on the tokio runtime's clock instead
    /// of the kernel's coarse clock (default false; no flag). Dearer to
    /// read, but it follows `tokio::time::pause`, so tests of code that
    /// embeds the server can run on virtual time:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    /// let config = dflockd_server::ServerConfig { runtime_clock: true, ..dflockd_server::ServerConfig::ephemeral() };
    /// let server = dflockd_server::Server::start(config).await.unwrap();
    /// let mut c = BufReader::new(server.connect_in_process().unwrap());
    /// c.write_all(b"l\nk\n0 2\n").await.unwrap(); // a 2 s lease
    /// let mut granted = String::new();
    /// c.read_line(&mut granted).await.unwrap();
    /// tokio::time::sleep(std::time::Duration::from_secs(5)).await; // virtual: no wait
    /// let mut other = BufReader::new(server.connect_in_process().unwrap());
    /// other.write_all(b"l\nk\n0\n").await.unwrap();
    /// let mut reply = String::new();
    /// other.read_line(&mut reply).await.unwrap();
    /// assert!(reply.starts_with("ok "), "the lease ran out on the virtual clock: {reply}");
    /// # }
    /// ```
    pub runtime_clock: bool,
    /// Run as a node of a replicated cluster (`--raft-dir` and friends;
    /// see docs/CLUSTER.md). `None`: a single node.
    pub cluster: Option<ClusterConfig>,
    /// The HTTP API (`--http-port` and the `--http-*` flags; see
    /// docs/OPERATIONS.md). `None`: off.
    pub http: Option<HttpConfig>,
    /// A listener for `/metrics`, `/health` and `/ready` only
    /// (`--metrics-addr host:port`), for deployments that keep the API off.
    pub metrics_addr: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 6388,
            read_timeout: Duration::from_secs(23),
            idle: IdlePolicy::ReadTimeout,
            write_timeout: Some(Duration::from_secs(5)),
            shutdown_timeout: Some(Duration::from_secs(30)),
            max_connections: 0,
            max_connections_per_ip: 0,
            auto_release_on_disconnect: true,
            tls: None,
            auth_token: None,
            default_lease: Lease::new(33).expect("33 is a valid lease"),
            lease_sweep_interval: Duration::from_secs(1),
            gc_interval: Duration::from_secs(5),
            gc_max_idle: Duration::from_secs(60),
            disconnect_lock_delay: Duration::ZERO,
            max_locks: 1024,
            max_waiters: 0,
            fence_state_file: None,
            pipeline_limit: 16 * 1024,
            mux: true,
            mux_max_waiting: 100_000,
            runtime_clock: false,
            cluster: None,
            http: None,
            metrics_addr: None,
        }
    }
}

impl ServerConfig {
    /// The defaults, bound to `127.0.0.1` on an ephemeral port: what tests,
    /// examples and embedders usually want.
    ///
    /// ```
    /// assert_eq!(dflockd_server::ServerConfig::ephemeral().host, "127.0.0.1");
    /// ```
    pub fn ephemeral() -> ServerConfig {
        ServerConfig {
            port: 0,
            ..ServerConfig::default()
        }
    }
}

/// The HTTP API's settings (spec §6.4). `port` 0 with
/// [`ServerConfig::http`](crate::ServerConfig::http) set binds an
/// ephemeral port.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::{HttpConfig, Server, ServerConfig};
/// let config = ServerConfig { http: Some(HttpConfig::default()), ..ServerConfig::ephemeral() };
/// let server = Server::start(config).await?;
/// let http = server.http_addr().expect("the API is on");
/// assert_ne!(http.port(), 0);
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Bind address (`--http-host`); `None` = the server's `--host`.
    pub host: Option<String>,
    /// Bind port (`--http-port`; 0 = ephemeral when set in code).
    pub port: u16,
    /// Sessions are closed after twice this without a request
    /// (`--http-session-idle-timeout`, default 20 s; zero = never).
    pub session_idle_timeout: Duration,
    /// At most this many sessions open (0 = no cap).
    pub max_sessions: usize,
    /// At most this many sessions per client address (0 = no cap).
    pub max_sessions_per_ip: usize,
    /// At most this many HTTP connections per client address (0 = no
    /// cap); one over it is closed at once.
    pub max_connections_per_ip: usize,
    /// Requests per second per client address (0 = no limit); over it,
    /// `429 rate_limited`.
    pub rate_limit_per_ip: u32,
    /// The burst the rate limit allows (0 = the rate).
    pub rate_limit_burst: u32,
    /// Origins allowed by CORS (`*` = any; empty = no CORS headers).
    pub cors_allowed_origins: Vec<String>,
    /// Largest request body, in bytes (default 64 KiB); larger is
    /// `413 body_too_large`.
    pub max_body_bytes: usize,
    /// The secret of the cluster admin routes (`--admin-token`), sent as
    /// `X-Dflockd-Admin`; `None` = those routes answer `503
    /// admin_disabled`. Separate from the bearer token, so a client's
    /// credentials carry no authority over the membership.
    pub admin_token: Option<Secret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            host: None,
            port: 0,
            session_idle_timeout: Duration::from_secs(20),
            max_sessions: 0,
            max_sessions_per_ip: 0,
            max_connections_per_ip: 0,
            rate_limit_per_ip: 0,
            rate_limit_burst: 0,
            cors_allowed_origins: Vec::new(),
            max_body_bytes: 64 * 1024,
            admin_token: None,
        }
    }
}
