//! Flags and environment variables of the `dflockd` binary, with the Go
//! server's names, defaults, precedence and validation (spec §6).
//!
//! Precedence: a flag given on the command line, then its environment
//! variable (empty counts as unset), then the default. Flags may be written
//! Go-style (`-port 7000`) or GNU-style (`--port 7000`, `--port=7000`);
//! booleans as `--debug` or `--debug=false`.
//!
//! ```
//! use dflockd_server::cli::load;
//! let env = |name: &str| (name == "DFLOCKD_PORT").then(|| "7001".to_string());
//! let settings = load(["dflockd", "-read-timeout", "5"].map(String::from), env).unwrap();
//! assert_eq!(settings.config.port, 7001);
//! assert_eq!(settings.config.read_timeout.as_secs(), 5);
//!
//! let err = load(["dflockd", "--read-timeout", "0"].map(String::from), |_| None).unwrap_err();
//! assert_eq!(err.to_string(), "configuration error: --read-timeout must be > 0");
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dflockd_proto::{Lease, MAX_SECONDS};
use thiserror::Error;

use dflockd_cluster::RaftSecret;

use crate::cluster_config::{ClusterConfig, parse_cluster_peers};
use crate::config::{IdlePolicy, Secret, ServerConfig};
use crate::tls::TlsConfig;

/// An invalid configuration; the binary prints it and exits with code 1.
///
/// ```
/// use dflockd_server::cli::{LoadError, load};
/// let err = load(["dflockd", "--max-locks", "0"].map(String::from), |_| None).unwrap_err();
/// let LoadError::Config(config_error) = err else { panic!("{err}") };
/// assert_eq!(config_error.0, "--max-locks must be > 0");
/// ```
#[derive(Debug, Error, PartialEq, Eq)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// Why [`load`] did not produce settings.
///
/// ```
/// use dflockd_server::cli::{LoadError, load};
/// let usage = load(["dflockd", "--no-such-flag"].map(String::from), |_| None);
/// assert!(matches!(usage, Err(LoadError::Usage(_)))); // the binary calls `.exit()` on it
/// let config = load(["dflockd", "--port", "70000"].map(String::from), |_| None);
/// assert!(matches!(config, Err(LoadError::Config(_))));
/// ```
#[derive(Debug, Error)]
pub enum LoadError {
    /// The arguments did not parse, or `--help`/`--version` was asked for:
    /// [`clap::Error::exit`] prints the right text and exits with the right code.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// A value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What the binary runs with.
///
/// ```
/// let settings = dflockd_server::cli::load(["dflockd", "--debug"].map(String::from), |_| None).unwrap();
/// assert!(settings.debug);
/// assert_eq!(settings.config.port, 6388);
/// ```
#[derive(Debug)]
pub struct Settings {
    /// The server configuration.
    pub config: ServerConfig,
    /// Debug-level logging (`--debug` / `DFLOCKD_DEBUG`).
    pub debug: bool,
    /// The log level (`--log-level` / `DFLOCKD_LOG_LEVEL`: error, warn,
    /// info, debug or trace); `--debug` means `debug`; `info` by default.
    pub log_level: LogLevel,
    /// How log lines look (`--log-format` / `DFLOCKD_LOG_FORMAT`).
    pub log_format: LogFormat,
}

/// The most detailed log lines written.
///
/// ```
/// use dflockd_server::cli::LogLevel;
/// assert_eq!("warn".parse::<LogLevel>().unwrap().as_str(), "warn");
/// assert!("loud".parse::<LogLevel>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default: start, stop, refusals and failures.
    Info,
    /// Per-connection detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The level as a `tracing` filter directive.
    ///
    /// ```
    /// assert_eq!(dflockd_server::cli::LogLevel::Info.as_str(), "info");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = ();
    fn from_str(text: &str) -> Result<LogLevel, ()> {
        match text.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(LogLevel::Error),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(()),
        }
    }
}

/// How log lines are written to stderr.
///
/// ```
/// assert_eq!(dflockd_server::cli::LogFormat::default(), dflockd_server::cli::LogFormat::Text);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags. Every value is kept as text so that flags and
/// environment variables share one validation path.
#[derive(Debug, Parser)]
#[command(
    name = "dflockd",
    version,
    about = "Distributed FIFO lock and semaphore server (dflockd v2 protocol)"
)]
struct Flags {
    /// Bind address [env: DFLOCKD_HOST] [default: 127.0.0.1]
    #[arg(long)]
    host: Option<String>,
    /// Bind port, 0 = ephemeral [env: DFLOCKD_PORT] [default: 6388]
    #[arg(long)]
    port: Option<String>,
    /// Per-line read deadline in seconds [env: DFLOCKD_READ_TIMEOUT_S] [default: 23]
    #[arg(long)]
    read_timeout: Option<String>,
    /// Reply write deadline in seconds, 0 = none [env: DFLOCKD_WRITE_TIMEOUT_S] [default: 5]
    #[arg(long)]
    write_timeout: Option<String>,
    /// Drain limit in seconds, 0 = wait forever [env: DFLOCKD_SHUTDOWN_TIMEOUT_S] [default: 30]
    #[arg(long)]
    shutdown_timeout: Option<String>,
    /// Most concurrent connections, 0 = unlimited [env: DFLOCKD_MAX_CONNECTIONS] [default: 0]
    #[arg(long)]
    max_connections: Option<String>,
    /// Most connections per remote IP, 0 = unlimited [env: DFLOCKD_MAX_CONNECTIONS_PER_IP] [default: 0]
    #[arg(long)]
    max_connections_per_ip: Option<String>,
    /// Release a connection's locks when it closes [env: DFLOCKD_AUTO_RELEASE_ON_DISCONNECT] [default: true]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    auto_release_on_disconnect: Option<String>,
    /// TLS certificate chain (PEM) [env: DFLOCKD_TLS_CERT]
    #[arg(long)]
    tls_cert: Option<String>,
    /// TLS private key (PEM) [env: DFLOCKD_TLS_KEY]
    #[arg(long)]
    tls_key: Option<String>,
    /// Shared secret clients must send first (visible in ps) [env: DFLOCKD_AUTH_TOKEN]
    #[arg(long)]
    auth_token: Option<String>,
    /// File holding the shared secret [env: DFLOCKD_AUTH_TOKEN_FILE]
    #[arg(long)]
    auth_token_file: Option<String>,
    /// Lease in seconds when a request names none [env: DFLOCKD_DEFAULT_LEASE_TTL_S] [default: 33]
    #[arg(long)]
    default_lease_ttl: Option<String>,
    /// Expired-lease sweep period in seconds [env: DFLOCKD_LEASE_SWEEP_INTERVAL_S] [default: 1]
    #[arg(long)]
    lease_sweep_interval: Option<String>,
    /// Idle-resource GC period in seconds [env: DFLOCKD_GC_INTERVAL_S] [default: 5]
    #[arg(long)]
    gc_interval: Option<String>,
    /// Idle seconds before a resource is collected [env: DFLOCKD_GC_MAX_IDLE_S] [default: 60]
    #[arg(long)]
    gc_max_idle: Option<String>,
    /// After a closed connection's locks are auto-released, keep each key
    /// from being granted again for min(remaining lease, this many ms)
    /// [env: DFLOCKD_DISCONNECT_LOCK_DELAY_MS] [default: 0 = off]
    #[arg(long)]
    disconnect_lock_delay_ms: Option<String>,
    /// Most resources (locks + semaphores) [env: DFLOCKD_MAX_LOCKS] [default: 1024]
    #[arg(long)]
    max_locks: Option<String>,
    /// Most waiters per key, 0 = unlimited [env: DFLOCKD_MAX_WAITERS] [default: 0]
    #[arg(long)]
    max_waiters: Option<String>,
    /// File keeping fences monotonic across restarts [env: DFLOCKD_FENCE_STATE_FILE]
    #[arg(long)]
    fence_state_file: Option<String>,
    /// Cluster-only; must be 0 [env: DFLOCKD_ORPHAN_TTL_S] [default: 0]
    #[arg(long)]
    orphan_ttl: Option<String>,
    /// Let idle connections wait without a deadline (the read timeout then
    /// applies only inside a request) [env: DFLOCKD_UNBOUNDED_IDLE] [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    unbounded_idle: Option<String>,
    /// Refuse the multiplexed extension (`hello _ mux`), answering `error`
    /// like a plain dflockd v2 server [env: DFLOCKD_NO_MUX] [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    no_mux: Option<String>,
    /// Most requests one multiplexed connection may have waiting, 0 =
    /// unlimited [env: DFLOCKD_MUX_MAX_WAITING] [default: 100000]
    #[arg(long)]
    mux_max_waiting: Option<String>,
    /// Debug-level logs [env: DFLOCKD_DEBUG] [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    debug: Option<String>,
    /// Log level: error, warn, info, debug or trace [env: DFLOCKD_LOG_LEVEL]
    /// [default: info, or debug with --debug]
    #[arg(long)]
    log_level: Option<String>,
    /// Log format: text or json (one object per line) [env:
    /// DFLOCKD_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
    /// HTTP API port; not supported yet, must be 0 [env: DFLOCKD_HTTP_PORT]
    #[arg(long)]
    http_port: Option<String>,
    /// Cluster mode: where Raft keeps its log, vote and snapshots; its
    /// presence turns cluster mode on [env: DFLOCKD_RAFT_DIR]
    #[arg(long)]
    raft_dir: Option<String>,
    /// This node's id, 1–65535, stable and unique (cluster mode)
    /// [env: DFLOCKD_NODE_ID]
    #[arg(long)]
    node_id: Option<String>,
    /// Raft transport bind address host:port (cluster mode) [env: DFLOCKD_RAFT_ADDR]
    #[arg(long)]
    raft_addr: Option<String>,
    /// Every voter of a new cluster, this node included:
    /// id=raftHost:raftPort@clientHost:clientPort,... [env: DFLOCKD_CLUSTER_PEERS]
    #[arg(long)]
    cluster_peers: Option<String>,
    /// Client address redirects name for this node [env: DFLOCKD_ADVERTISE_ADDR]
    /// [default: its --cluster-peers entry]
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Form a cluster of this node alone, for others to join
    /// [env: DFLOCKD_CLUSTER_BOOTSTRAP] [default: false]
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    cluster_bootstrap: Option<String>,
    /// Secret the nodes prove to each other, ≥ 32 bytes (visible in ps)
    /// [env: DFLOCKD_RAFT_AUTH_TOKEN]
    #[arg(long)]
    raft_auth_token: Option<String>,
    /// File holding the Raft secret [env: DFLOCKD_RAFT_AUTH_TOKEN_FILE]
    #[arg(long)]
    raft_auth_token_file: Option<String>,
    /// Raft mutual TLS: this node's certificate (PEM; names its Raft IP) [env: DFLOCKD_RAFT_TLS_CERT]
    #[arg(long)]
    raft_tls_cert: Option<String>,
    /// Raft mutual TLS: this node's private key (PEM) [env: DFLOCKD_RAFT_TLS_KEY]
    #[arg(long)]
    raft_tls_key: Option<String>,
    /// Raft mutual TLS: the CA that issued every node's certificate (PEM) [env: DFLOCKD_RAFT_TLS_CA]
    #[arg(long)]
    raft_tls_ca: Option<String>,
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
enum Source<'a> {
    Flag(&'a str),
    Env(&'a str),
}

struct Raw<'a> {
    value: String,
    source: Source<'a>,
}

/// Resolves the settings from command-line arguments (including the program
/// name) and an environment lookup.
///
/// ```
/// use dflockd_server::cli::load;
/// // A flag beats its environment variable.
/// let env = |name: &str| (name == "DFLOCKD_PORT").then(|| "7001".to_string());
/// let settings = load(["dflockd", "--port=7002"].map(String::from), env).unwrap();
/// assert_eq!(settings.config.port, 7002);
/// // The real binary passes `std::env::args()` and `|name| std::env::var(name).ok()`.
/// ```
pub fn load(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Settings, LoadError> {
    let flags = Flags::try_parse_from(go_style(args))?;
    Ok(resolve(&flags, env)?)
}

fn resolve(flags: &Flags, env: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let pick = |flag, given: &Option<String>, var| pick(&env, flag, given, var);
    let defaults = ServerConfig::default();
    let mut config = ServerConfig::default();

    if let Some(raw) = pick("--host", &flags.host, "DFLOCKD_HOST") {
        config.host = raw.value;
    }
    if let Some(raw) = pick("--port", &flags.port, "DFLOCKD_PORT") {
        let port = integer(&raw)?;
        config.port = u16::try_from(port)
            .map_err(|_| ConfigError(format!("{} must be 0–65535", name(&raw))))?;
    }
    config.read_timeout = seconds(
        pick(
            "--read-timeout",
            &flags.read_timeout,
            "DFLOCKD_READ_TIMEOUT_S",
        ),
        defaults.read_timeout,
        true,
    )?;
    let write = seconds(
        pick(
            "--write-timeout",
            &flags.write_timeout,
            "DFLOCKD_WRITE_TIMEOUT_S",
        ),
        Duration::from_secs(5),
        false,
    )?;
    config.write_timeout = (!write.is_zero()).then_some(write);
    let shutdown = seconds(
        pick(
            "--shutdown-timeout",
            &flags.shutdown_timeout,
            "DFLOCKD_SHUTDOWN_TIMEOUT_S",
        ),
        Duration::from_secs(30),
        false,
    )?;
    config.shutdown_timeout = (!shutdown.is_zero()).then_some(shutdown);
    config.max_connections = count(
        pick(
            "--max-connections",
            &flags.max_connections,
            "DFLOCKD_MAX_CONNECTIONS",
        ),
        0,
        false,
    )?;
    config.max_connections_per_ip = count(
        pick(
            "--max-connections-per-ip",
            &flags.max_connections_per_ip,
            "DFLOCKD_MAX_CONNECTIONS_PER_IP",
        ),
        0,
        false,
    )?;
    config.auto_release_on_disconnect = boolean(
        pick(
            "--auto-release-on-disconnect",
            &flags.auto_release_on_disconnect,
            "DFLOCKD_AUTO_RELEASE_ON_DISCONNECT",
        ),
        true,
    )?;
    let lease = seconds(
        pick(
            "--default-lease-ttl",
            &flags.default_lease_ttl,
            "DFLOCKD_DEFAULT_LEASE_TTL_S",
        ),
        Duration::from_secs(33),
        true,
    )?;
    config.default_lease = Lease::new(lease.as_secs())
        .map_err(|e| ConfigError(format!("--default-lease-ttl: {e}")))?;
    config.lease_sweep_interval = seconds(
        pick(
            "--lease-sweep-interval",
            &flags.lease_sweep_interval,
            "DFLOCKD_LEASE_SWEEP_INTERVAL_S",
        ),
        defaults.lease_sweep_interval,
        true,
    )?;
    config.gc_interval = seconds(
        pick("--gc-interval", &flags.gc_interval, "DFLOCKD_GC_INTERVAL_S"),
        defaults.gc_interval,
        true,
    )?;
    config.gc_max_idle = seconds(
        pick("--gc-max-idle", &flags.gc_max_idle, "DFLOCKD_GC_MAX_IDLE_S"),
        defaults.gc_max_idle,
        false,
    )?;
    config.max_locks = count(
        pick("--max-locks", &flags.max_locks, "DFLOCKD_MAX_LOCKS"),
        defaults.max_locks,
        true,
    )?;
    if let Some(raw) = pick(
        "--disconnect-lock-delay-ms",
        &flags.disconnect_lock_delay_ms,
        "DFLOCKD_DISCONNECT_LOCK_DELAY_MS",
    ) {
        let ms = integer(&raw)?;
        if !(0..=(MAX_SECONDS as i64).saturating_mul(1000)).contains(&ms) {
            return Err(ConfigError(format!(
                "{} must be between 0 and {} ms",
                name(&raw),
                MAX_SECONDS * 1000
            )));
        }
        config.disconnect_lock_delay = Duration::from_millis(ms as u64);
    }
    config.max_waiters = count(
        pick("--max-waiters", &flags.max_waiters, "DFLOCKD_MAX_WAITERS"),
        0,
        false,
    )?;
    config.fence_state_file = pick(
        "--fence-state-file",
        &flags.fence_state_file,
        "DFLOCKD_FENCE_STATE_FILE",
    )
    .map(|r| PathBuf::from(r.value));
    let orphan_ttl = seconds(
        pick("--orphan-ttl", &flags.orphan_ttl, "DFLOCKD_ORPHAN_TTL_S"),
        Duration::ZERO,
        false,
    )?;
    if boolean(
        pick(
            "--unbounded-idle",
            &flags.unbounded_idle,
            "DFLOCKD_UNBOUNDED_IDLE",
        ),
        false,
    )? {
        config.idle = IdlePolicy::Unbounded;
    }
    config.mux = !boolean(pick("--no-mux", &flags.no_mux, "DFLOCKD_NO_MUX"), false)?;
    config.mux_max_waiting = count(
        pick(
            "--mux-max-waiting",
            &flags.mux_max_waiting,
            "DFLOCKD_MUX_MAX_WAITING",
        ),
        defaults.mux_max_waiting,
        false,
    )?;
    let debug = boolean(pick("--debug", &flags.debug, "DFLOCKD_DEBUG"), false)?;
    let log_level = match pick("--log-level", &flags.log_level, "DFLOCKD_LOG_LEVEL") {
        Some(raw) => raw.value.parse().map_err(|()| {
            ConfigError(format!(
                "{} must be one of error, warn, info, debug, trace (got {:?})",
                name(&raw),
                raw.value
            ))
        })?,
        None if debug => LogLevel::Debug,
        None => LogLevel::Info,
    };
    let log_format = match pick("--log-format", &flags.log_format, "DFLOCKD_LOG_FORMAT") {
        None => LogFormat::Text,
        Some(raw) => match raw.value.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                return Err(ConfigError(format!(
                    "{} must be text or json (got {:?})",
                    name(&raw),
                    raw.value
                )));
            }
        },
    };

    if let Some(raw) = pick("--http-port", &flags.http_port, "DFLOCKD_HTTP_PORT")
        && integer(&raw)? != 0
    {
        return Err(ConfigError(format!(
            "{}: the HTTP API is not supported by this server",
            name(&raw)
        )));
    }
    config.cluster = cluster(flags, &env, orphan_ttl)?;
    if config.cluster.is_some() && config.fence_state_file.is_some() {
        return Err(ConfigError(
            "--fence-state-file is not used in cluster mode (the fence counter is replicated)"
                .into(),
        ));
    }

    let cert = pick("--tls-cert", &flags.tls_cert, "DFLOCKD_TLS_CERT");
    let key = pick("--tls-key", &flags.tls_key, "DFLOCKD_TLS_KEY");
    config.tls = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(
            TlsConfig::from_pem_files(&cert.value, &key.value)
                .map_err(|e| ConfigError(format!("TLS: {e}")))?,
        ),
        _ => {
            return Err(ConfigError(
                "--tls-cert and --tls-key must be set together".into(),
            ));
        }
    };
    config.auth_token = auth_token(flags, &env)?;
    Ok(Settings {
        config,
        debug,
        log_level,
        log_format,
    })
}

/// A flag's value if given, else its environment variable's (`env` treats
/// an empty value as unset), with where it came from.
fn pick(
    env: &impl Fn(&str) -> Option<String>,
    flag: &'static str,
    given: &Option<String>,
    var: &'static str,
) -> Option<Raw<'static>> {
    match given {
        Some(value) => Some(Raw {
            value: value.clone(),
            source: Source::Flag(flag),
        }),
        None => env(var).map(|value| Raw {
            value,
            source: Source::Env(var),
        }),
    }
}

/// Cluster mode's settings (spec §6.5), if `--raft-dir` is given; the
/// other cluster flags without it are an error.
fn cluster(
    flags: &Flags,
    env: &impl Fn(&str) -> Option<String>,
    orphan_ttl: Duration,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let pick = |flag, given: &Option<String>, var| pick(env, flag, given, var);
    let dir = pick("--raft-dir", &flags.raft_dir, "DFLOCKD_RAFT_DIR");
    let node_id = pick("--node-id", &flags.node_id, "DFLOCKD_NODE_ID");
    let raft_addr = pick("--raft-addr", &flags.raft_addr, "DFLOCKD_RAFT_ADDR");
    let peers = pick(
        "--cluster-peers",
        &flags.cluster_peers,
        "DFLOCKD_CLUSTER_PEERS",
    );
    let advertise = pick(
        "--advertise-addr",
        &flags.advertise_addr,
        "DFLOCKD_ADVERTISE_ADDR",
    );
    let bootstrap = pick(
        "--cluster-bootstrap",
        &flags.cluster_bootstrap,
        "DFLOCKD_CLUSTER_BOOTSTRAP",
    );
    let token = secret_value(
        "the secret",
        [
            (&flags.raft_auth_token, "--raft-auth-token", false),
            (&flags.raft_auth_token_file, "--raft-auth-token-file", true),
        ],
        [
            ("DFLOCKD_RAFT_AUTH_TOKEN", false),
            ("DFLOCKD_RAFT_AUTH_TOKEN_FILE", true),
        ],
        env,
    )?;
    let tls = [
        pick(
            "--raft-tls-cert",
            &flags.raft_tls_cert,
            "DFLOCKD_RAFT_TLS_CERT",
        ),
        pick(
            "--raft-tls-key",
            &flags.raft_tls_key,
            "DFLOCKD_RAFT_TLS_KEY",
        ),
        pick("--raft-tls-ca", &flags.raft_tls_ca, "DFLOCKD_RAFT_TLS_CA"),
    ];
    let Some(dir) = dir else {
        let given = [&node_id, &raft_addr, &peers, &advertise, &bootstrap]
            .into_iter()
            .chain(&tls)
            .flatten()
            .next();
        if let Some(raw) = given {
            return Err(ConfigError(format!(
                "{} is a cluster flag: it needs --raft-dir",
                name(raw)
            )));
        }
        if let Some((_, origin)) = token {
            return Err(ConfigError(format!(
                "{origin} is rejected outside cluster mode (no --raft-dir)"
            )));
        }
        if !orphan_ttl.is_zero() {
            return Err(ConfigError(
                "--orphan-ttl > 0 is only allowed in cluster mode".into(),
            ));
        }
        return Ok(None);
    };
    let tls = match tls {
        [None, None, None] => None,
        [Some(cert), Some(key), Some(ca)] => Some(
            dflockd_cluster::RaftTls::from_pem_files(&cert.value, &key.value, &ca.value)
                .map_err(|e| ConfigError(e.to_string()))?,
        ),
        given => {
            let missing: Vec<&str> = ["--raft-tls-cert", "--raft-tls-key", "--raft-tls-ca"]
                .into_iter()
                .zip(&given)
                .filter(|(_, raw)| raw.is_none())
                .map(|(flag, _)| flag)
                .collect();
            return Err(ConfigError(format!(
                "Raft mutual TLS needs --raft-tls-cert, --raft-tls-key and --raft-tls-ca together (missing {})",
                missing.join(", ")
            )));
        }
    };
    let node_id = node_id.ok_or_else(|| ConfigError("cluster mode needs --node-id".into()))?;
    let id = integer(&node_id)?;
    let id = u64::try_from(id)
        .ok()
        .filter(|id| (1..=0xFFFF).contains(id))
        .ok_or_else(|| {
            ConfigError(format!(
                "{} must be an integer from 1 to 65535",
                name(&node_id)
            ))
        })?;
    let raft_addr = raft_addr
        .ok_or_else(|| ConfigError("cluster mode needs --raft-addr host:port".into()))?
        .value;
    let (token, origin) = token.ok_or_else(|| {
        ConfigError(
            "cluster mode needs --raft-auth-token or --raft-auth-token-file (≥ 32 bytes)".into(),
        )
    })?;
    let secret =
        RaftSecret::new(token.into_bytes()).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
    let bootstrap = boolean(bootstrap, false)?;
    let peers = match peers {
        Some(raw) => parse_cluster_peers(&raw.value)
            .map_err(|e| ConfigError(format!("{}: {e}", name(&raw))))?,
        None if bootstrap => Vec::new(),
        None => {
            return Err(ConfigError(
                "cluster mode needs --cluster-peers (or --cluster-bootstrap)".into(),
            ));
        }
    };
    if !peers.is_empty() && !peers.iter().any(|p| p.id == id) {
        return Err(ConfigError(format!(
            "--cluster-peers must include this node (id {id})"
        )));
    }
    let mut cluster = ClusterConfig::new(id, dir.value, raft_addr, secret).with_peers(peers);
    cluster.bootstrap = bootstrap;
    cluster.advertise_addr = advertise.map(|raw| raw.value);
    cluster.tls = tls;
    cluster.orphan_ttl = orphan_ttl;
    Ok(Some(cluster))
}

/// The first secret given, from flags (`(value, name, is a file)`) then
/// environment variables: its value (trimmed, one line) and where it
/// came from. `what` names it in errors.
fn secret_value(
    what: &str,
    flags: [(&Option<String>, &'static str, bool); 2],
    vars: [(&'static str, bool); 2],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, &'static str)>, ConfigError> {
    let from_flags = flags.into_iter().find_map(|(value, origin, file)| {
        value
            .clone()
            .filter(|v| !v.is_empty())
            .map(|v| (v, origin, file))
    });
    let found = from_flags.or_else(|| {
        vars.into_iter()
            .find_map(|(var, file)| env(var).map(|v| (v, var, file)))
    });
    let Some((value, origin, file)) = found else {
        return Ok(None);
    };
    let value = if file {
        read_token_file(&value, origin)?
    } else {
        value
    };
    let token = value.trim();
    if token.is_empty() {
        return Err(ConfigError(format!("{origin}: {what} is empty")));
    }
    if token.contains(['\r', '\n']) {
        return Err(ConfigError(format!(
            "{origin}: {what} must be a single line"
        )));
    }
    Ok(Some((token.to_string(), origin)))
}

/// Auth token resolution (spec §6.2): `--auth-token`, `--auth-token-file`,
/// `DFLOCKD_AUTH_TOKEN`, `DFLOCKD_AUTH_TOKEN_FILE`; trimmed; blank or
/// multi-line is an error.
fn auth_token(
    flags: &Flags,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    let token = secret_value(
        "auth token",
        [
            (&flags.auth_token, "--auth-token", false),
            (&flags.auth_token_file, "--auth-token-file", true),
        ],
        [
            ("DFLOCKD_AUTH_TOKEN", false),
            ("DFLOCKD_AUTH_TOKEN_FILE", true),
        ],
        env,
    )?;
    Ok(token.map(|(token, _)| Secret::new(token)))
}

fn read_token_file(path: &str, origin: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{origin}: cannot read {path}: {e}")))
}

fn name(raw: &Raw<'_>) -> String {
    match raw.source {
        Source::Flag(flag) => flag.to_string(),
        Source::Env(var) => var.to_string(),
    }
}

fn integer(raw: &Raw<'_>) -> Result<i64, ConfigError> {
    raw.value
        .trim()
        .parse::<i64>()
        .map_err(|_| match raw.source {
            Source::Env(var) => {
                ConfigError(format!("{var} must be an integer (got {:?})", raw.value))
            }
            Source::Flag(flag) => ConfigError(format!(
                "invalid value {:?} for flag {flag}: must be an integer",
                raw.value
            )),
        })
}

/// A whole-second duration; `positive` demands > 0, otherwise ≥ 0.
fn seconds(
    raw: Option<Raw<'_>>,
    default: Duration,
    positive: bool,
) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let n = integer(&raw)?;
    let display = match raw.source {
        Source::Flag(flag) => flag.to_string(),
        Source::Env(var) => var.to_string(),
    };
    if positive && n <= 0 {
        return Err(ConfigError(format!("{display} must be > 0")));
    }
    if n < 0 {
        return Err(ConfigError(format!("{display} must be >= 0")));
    }
    if n as u64 > MAX_SECONDS {
        return Err(ConfigError(format!("{display} is too large")));
    }
    Ok(Duration::from_secs(n as u64))
}

fn count(raw: Option<Raw<'_>>, default: usize, positive: bool) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    let n = integer(&raw)?;
    let display = name(&raw);
    if positive && n <= 0 {
        return Err(ConfigError(format!("{display} must be > 0")));
    }
    usize::try_from(n).map_err(|_| ConfigError(format!("{display} must be >= 0")))
}

fn boolean(raw: Option<Raw<'_>>, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.value.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "t" => Ok(true),
        "0" | "no" | "false" | "f" => Ok(false),
        _ => Err(ConfigError(format!(
            "{} must be a boolean (got {:?})",
            name(&raw),
            raw.value
        ))),
    }
}

/// Go's `flag` package accepts `-name`; clap wants `--name`. Single-dash
/// words of two or more letters become double-dash (negative numbers are
/// left alone).
fn go_style(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let bytes = arg.as_bytes();
            if bytes.len() > 2
                && bytes[0] == b'-'
                && bytes[1].is_ascii_alphabetic()
                && bytes[2] != b'='
            {
                format!("-{arg}")
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, LoadError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = std::iter::once("dflockd")
            .chain(args.iter().copied())
            .map(String::from);
        load(args, move |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_match_the_go_server() {
        let s = run(&[], &[]).unwrap();
        let c = s.config;
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 6388));
        assert_eq!(c.read_timeout, Duration::from_secs(23));
        assert_eq!(c.write_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.shutdown_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_ip,
                c.max_waiters,
                c.max_locks
            ),
            (0, 0, 0, 1024)
        );
        assert!(c.auto_release_on_disconnect);
        assert_eq!(c.default_lease.get(), 33);
        assert_eq!(c.lease_sweep_interval, Duration::from_secs(1));
        assert_eq!(
            (c.gc_interval, c.gc_max_idle),
            (Duration::from_secs(5), Duration::from_secs(60))
        );
        assert!(c.tls.is_none() && c.auth_token.is_none() && c.fence_state_file.is_none());
        assert_eq!(c.idle, IdlePolicy::ReadTimeout);
        assert!(!s.debug);
    }

    #[test]
    fn flag_beats_env_beats_default_and_empty_env_is_unset() {
        assert_eq!(
            run(&["--port", "7000"], &[("DFLOCKD_PORT", "7001")])
                .unwrap()
                .config
                .port,
            7000
        );
        assert_eq!(
            run(&[], &[("DFLOCKD_PORT", "7001")]).unwrap().config.port,
            7001
        );
        assert_eq!(run(&[], &[("DFLOCKD_PORT", "")]).unwrap().config.port, 6388);
        assert_eq!(run(&["-port", "7002"], &[]).unwrap().config.port, 7002);
        assert_eq!(run(&["--port=7003"], &[]).unwrap().config.port, 7003);
    }

    #[test]
    fn go_style_messages() {
        let e = |args: &[&str], env: &[(&str, &str)]| run(args, env).unwrap_err().to_string();
        assert_eq!(
            e(&["--read-timeout", "0"], &[]),
            "configuration error: --read-timeout must be > 0"
        );
        assert_eq!(
            e(&[], &[("DFLOCKD_READ_TIMEOUT_S", "abc")]),
            "configuration error: DFLOCKD_READ_TIMEOUT_S must be an integer (got \"abc\")"
        );
        assert_eq!(
            e(&[], &[("DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", "maybe")]),
            "configuration error: DFLOCKD_AUTO_RELEASE_ON_DISCONNECT must be a boolean (got \"maybe\")"
        );
        assert!(e(&["--read-timeout", "9223372037"], &[]).contains("too large"));
        assert!(e(&["--max-locks", "0"], &[]).contains("must be > 0"));
        assert!(e(&["--tls-cert", "x.pem"], &[]).contains("together"));
        // A TLS file that cannot be read is named, with the problem.
        let missing = e(
            &[
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/nonexistent/k.pem",
            ],
            &[],
        );
        assert!(
            missing.contains("certificate /nonexistent/c.pem"),
            "{missing}"
        );
        assert!(e(&["--orphan-ttl", "5"], &[]).contains("cluster"));
        assert!(e(&["--http-port", "8080"], &[]).contains("HTTP"));
        assert!(e(&["--raft-dir", "/tmp/r"], &[]).contains("cluster"));
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn e(args: &[&str], env: &[(&str, &str)]) -> String {
        run(args, env).unwrap_err().to_string()
    }

    #[test]
    fn cluster_flags_make_a_cluster_config() {
        let settings = run(
            &[
                "--raft-dir",
                "/tmp/n2",
                "--node-id",
                "2",
                "--raft-addr",
                "127.0.0.1:7002",
                "--cluster-peers",
                "1=127.0.0.1:7001@127.0.0.1:6388,2=127.0.0.1:7002@127.0.0.1:6389",
            ],
            &[("DFLOCKD_RAFT_AUTH_TOKEN", SECRET)],
        )
        .unwrap();
        let cluster = settings.config.cluster.expect("cluster mode");
        assert_eq!(cluster.node_id, 2);
        assert_eq!(cluster.raft_addr, "127.0.0.1:7002");
        assert_eq!(cluster.peers.len(), 2);
        assert_eq!(cluster.peers[1].client, "127.0.0.1:6389");
        assert!(!cluster.bootstrap);
        let alone = run(
            &[
                "--raft-dir=/tmp/n1",
                "--node-id=1",
                "--raft-addr=127.0.0.1:7001",
                "--cluster-bootstrap",
                "--raft-auth-token",
                SECRET,
            ],
            &[],
        )
        .unwrap();
        assert!(alone.config.cluster.unwrap().bootstrap);
        let orphans = run(
            &[
                "--raft-dir=/tmp/n1",
                "--node-id=1",
                "--raft-addr=127.0.0.1:7001",
                "--cluster-bootstrap",
            ],
            &[
                ("DFLOCKD_RAFT_AUTH_TOKEN", SECRET),
                ("DFLOCKD_ORPHAN_TTL_S", "15"),
            ],
        )
        .unwrap();
        assert_eq!(
            orphans.config.cluster.unwrap().orphan_ttl,
            Duration::from_secs(15)
        );
    }

    #[test]
    fn cluster_flags_are_validated() {
        let base = [
            "--raft-dir",
            "/tmp/n",
            "--node-id",
            "1",
            "--raft-addr",
            "127.0.0.1:7001",
        ];
        let with = |extra: &[&str]| -> String {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            e(&args, &[])
        };
        assert!(with(&["--cluster-bootstrap"]).contains("--raft-auth-token"));
        assert!(with(&["--cluster-bootstrap", "--raft-auth-token", "short"]).contains("32"));
        assert!(with(&["--raft-auth-token", SECRET]).contains("--cluster-peers"));
        let peers = "2=127.0.0.1:7002@127.0.0.1:6389";
        assert!(
            with(&["--raft-auth-token", SECRET, "--cluster-peers", peers])
                .contains("include this node")
        );
        assert!(
            with(&["--raft-auth-token", SECRET, "--cluster-peers", "1=nope"])
                .contains("id=raftHost")
        );
        let dup = "1=a:1@b:2,1=c:3@d:4";
        assert!(with(&["--raft-auth-token", SECRET, "--cluster-peers", dup]).contains("twice"));
        assert!(
            with(&[
                "--raft-auth-token",
                SECRET,
                "--cluster-bootstrap",
                "--fence-state-file",
                "/tmp/f"
            ])
            .contains("fence")
        );
        assert!(e(&["--node-id", "1"], &[]).contains("needs --raft-dir"));
        assert!(e(&["--raft-auth-token", SECRET], &[]).contains("outside cluster mode"));
        assert!(e(&["--raft-dir", "/tmp/n", "--node-id", "0"], &[]).contains("1 to 65535"));
        assert!(e(&["--raft-dir", "/tmp/n", "--node-id", "65536"], &[]).contains("1 to 65535"));
    }

    #[test]
    fn raft_tls_flags_load_all_three_files_or_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
            .unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("node.pem"), cert.pem()).unwrap();
        std::fs::write(path("node.key"), key.serialize_pem()).unwrap();
        std::fs::write(path("ca.pem"), ca_pem).unwrap();
        let (cert, key, ca) = (path("node.pem"), path("node.key"), path("ca.pem"));
        let base = vec![
            "--raft-dir=/tmp/n",
            "--node-id=1",
            "--raft-addr=127.0.0.1:7001",
            "--cluster-bootstrap",
            "--raft-auth-token",
            SECRET,
        ];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            run(&args, &[])
        };
        let loaded = with(&["--raft-tls-cert", &cert, "--raft-tls-key", &key])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(loaded.contains("missing --raft-tls-ca"), "{loaded}");
        let settings = run(
            &base,
            &[
                ("DFLOCKD_RAFT_TLS_CERT", &cert),
                ("DFLOCKD_RAFT_TLS_KEY", &key),
                ("DFLOCKD_RAFT_TLS_CA", &ca),
            ],
        )
        .unwrap();
        assert!(settings.config.cluster.unwrap().tls.is_some());
        let missing = path("nope.pem");
        let error = with(&[
            "--raft-tls-cert",
            &missing,
            "--raft-tls-key",
            &key,
            "--raft-tls-ca",
            &ca,
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(error.contains(&missing), "{error}");
        // A CA file with no certificate in it.
        let error = with(&[
            "--raft-tls-cert",
            &cert,
            "--raft-tls-key",
            &key,
            "--raft-tls-ca",
            &key,
        ])
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(error.contains("CA"), "{error}");
        assert!(e(&["--raft-tls-ca", &ca], &[]).contains("needs --raft-dir"));
    }

    #[test]
    fn disconnect_lock_delay() {
        assert_eq!(
            run(&[], &[]).unwrap().config.disconnect_lock_delay,
            Duration::ZERO
        );
        assert_eq!(
            run(&["--disconnect-lock-delay-ms", "250"], &[])
                .unwrap()
                .config
                .disconnect_lock_delay,
            Duration::from_millis(250)
        );
        assert_eq!(
            run(&[], &[("DFLOCKD_DISCONNECT_LOCK_DELAY_MS", "1500")])
                .unwrap()
                .config
                .disconnect_lock_delay,
            Duration::from_millis(1500)
        );
        assert!(run(&["--disconnect-lock-delay-ms", "-1"], &[]).is_err());
    }

    #[test]
    fn booleans() {
        assert!(
            !run(&["--auto-release-on-disconnect=false"], &[])
                .unwrap()
                .config
                .auto_release_on_disconnect
        );
        assert!(run(&["--debug"], &[]).unwrap().debug);
        assert!(
            !run(&[], &[("DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", "No")])
                .unwrap()
                .config
                .auto_release_on_disconnect
        );
        assert!(run(&[], &[("DFLOCKD_DEBUG", "YES")]).unwrap().debug);
        assert_eq!(
            run(&["--unbounded-idle"], &[]).unwrap().config.idle,
            IdlePolicy::Unbounded
        );
        assert!(run(&[], &[]).unwrap().config.mux);
        assert!(!run(&["--no-mux"], &[]).unwrap().config.mux);
        assert_eq!(run(&[], &[]).unwrap().config.mux_max_waiting, 100_000);
        assert_eq!(
            run(&[], &[("DFLOCKD_MUX_MAX_WAITING", "7")])
                .unwrap()
                .config
                .mux_max_waiting,
            7
        );
        assert!(run(&["--mux-max-waiting", "-1"], &[]).is_err());
    }

    #[test]
    fn auth_token_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file \n").unwrap();
        let file = file.to_str().unwrap();
        let token = |args: &[&str], env: &[(&str, &str)]| {
            run(args, env).map(|s| s.config.auth_token.map(|t| t.expose().to_string()))
        };
        assert_eq!(
            token(&["--auth-token", " s3cret "], &[])
                .unwrap()
                .as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            token(
                &["--auth-token-file", file],
                &[("DFLOCKD_AUTH_TOKEN", "env")]
            )
            .unwrap()
            .as_deref(),
            Some("from-file")
        );
        assert_eq!(
            token(&["--auth-token", ""], &[("DFLOCKD_AUTH_TOKEN", "env")])
                .unwrap()
                .as_deref(),
            Some("env")
        );
        assert_eq!(
            token(&[], &[("DFLOCKD_AUTH_TOKEN_FILE", file)])
                .unwrap()
                .as_deref(),
            Some("from-file")
        );
        assert!(token(&["--auth-token", "   "], &[]).is_err());
        let multi = dir.path().join("multi");
        std::fs::write(&multi, "a\nb\n").unwrap();
        assert!(token(&["--auth-token-file", multi.to_str().unwrap()], &[]).is_err());
        assert!(token(&["--auth-token-file", "/nonexistent/token"], &[]).is_err());
    }
}
