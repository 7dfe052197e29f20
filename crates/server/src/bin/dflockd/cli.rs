//! Flags, environment variables and the optional `--config` file of the
//! `dflockd` binary, with the Go server's names, defaults, precedence and
//! validation (spec §6).
//!
//! Every flag is declared once, in [`FLAGS`]: long name, environment
//! variable, default and help. clap builds `--help` from that table and
//! parses the command line; [`load`] then takes each value from the first
//! place that has it: the command line, the environment (an empty value
//! counts as unset), the `--config` file, the default. Flags may be written
//! Go-style (`-port 7000`) or GNU-style (`--port 7000`, `--port=7000`);
//! switches as `--debug` or `--debug=false`.
//!
//! The config file is TOML whose keys are the long flag names:
//!
//! ```toml
//! port = 6388
//! read-timeout = 23
//! auth-token-file = "/etc/dflockd/token"
//! cluster-peers = ["1=10.0.0.1:7001@10.0.0.1:6388", "2=10.0.0.2:7001@10.0.0.2:6388"]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use dflockd_proto::{Lease, MAX_SECONDS};
use thiserror::Error;

use dflockd_server::{
    ClusterConfig, HttpConfig, IdlePolicy, RaftSecret, Secret, ServerConfig, TlsConfig,
    parse_cluster_peers,
};

/// An invalid configuration; the binary prints it and exits with code 1.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// Why [`load`] did not produce settings.
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
#[derive(Debug)]
pub struct Settings {
    /// The server configuration.
    pub config: ServerConfig,
    /// The log level (`--log-level`); `--debug` means `debug`; `info` by default.
    pub log_level: LogLevel,
    /// How log lines look (`--log-format`).
    pub log_format: LogFormat,
}

/// The most detailed log lines written.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What a flag takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A value: `--port 7000`.
    Value,
    /// A boolean: `--debug`, `--debug=false`.
    Switch,
    /// A secret value: its environment value is never shown in `--help`.
    Secret,
}

/// One flag, declared once.
struct Flag {
    long: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    kind: Kind,
    help: &'static str,
}

const fn flag(
    long: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    kind: Kind,
    help: &'static str,
) -> Flag {
    Flag {
        long,
        env,
        default,
        kind,
        help,
    }
}

use Kind::{Secret as SecretValue, Switch, Value};

/// Every flag of `dflockd`: the one place its name, variable and default
/// are spelled. Durations are whole seconds unless the name says `-ms`.
#[rustfmt::skip]
const FLAGS: &[Flag] = &[
    flag("host", "DFLOCKD_HOST", Some("127.0.0.1"), Value, "Bind address"),
    flag("port", "DFLOCKD_PORT", Some("6388"), Value, "Bind port, 0 = ephemeral"),
    flag("read-timeout", "DFLOCKD_READ_TIMEOUT_S", Some("23"), Value, "Per-line read deadline in seconds"),
    flag("write-timeout", "DFLOCKD_WRITE_TIMEOUT_S", Some("5"), Value, "Reply write deadline in seconds, 0 = none"),
    flag("shutdown-timeout", "DFLOCKD_SHUTDOWN_TIMEOUT_S", Some("30"), Value, "Drain limit in seconds, 0 = wait forever"),
    flag("max-connections", "DFLOCKD_MAX_CONNECTIONS", Some("0"), Value, "Most concurrent connections, 0 = unlimited"),
    flag("max-connections-per-ip", "DFLOCKD_MAX_CONNECTIONS_PER_IP", Some("0"), Value, "Most connections per remote IP, 0 = unlimited"),
    flag("auto-release-on-disconnect", "DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", Some("true"), Switch, "Release a connection's locks when it closes"),
    flag("tls-cert", "DFLOCKD_TLS_CERT", None, Value, "TLS certificate chain (PEM)"),
    flag("tls-key", "DFLOCKD_TLS_KEY", None, Value, "TLS private key (PEM)"),
    flag("auth-token", "DFLOCKD_AUTH_TOKEN", None, SecretValue, "Shared secret clients must send first (visible in ps; prefer the file)"),
    flag("auth-token-file", "DFLOCKD_AUTH_TOKEN_FILE", None, Value, "File holding the shared secret"),
    flag("default-lease-ttl", "DFLOCKD_DEFAULT_LEASE_TTL_S", Some("33"), Value, "Lease in seconds when a request names none"),
    flag("lease-sweep-interval", "DFLOCKD_LEASE_SWEEP_INTERVAL_S", Some("1"), Value, "Expired-lease sweep period in seconds"),
    flag("gc-interval", "DFLOCKD_GC_INTERVAL_S", Some("5"), Value, "Idle-resource GC period in seconds"),
    flag("gc-max-idle", "DFLOCKD_GC_MAX_IDLE_S", Some("60"), Value, "Idle seconds before a resource is collected"),
    flag("disconnect-lock-delay-ms", "DFLOCKD_DISCONNECT_LOCK_DELAY_MS", Some("0"), Value, "After a closed connection's locks are auto-released, keep each key from being granted again for min(remaining lease, this many ms); 0 = off"),
    flag("max-locks", "DFLOCKD_MAX_LOCKS", Some("1024"), Value, "Most resources (locks + semaphores)"),
    flag("max-waiters", "DFLOCKD_MAX_WAITERS", Some("0"), Value, "Most waiters per key, 0 = unlimited"),
    flag("fence-state-file", "DFLOCKD_FENCE_STATE_FILE", None, Value, "File keeping fences monotonic across restarts (single node)"),
    flag("orphan-ttl", "DFLOCKD_ORPHAN_TTL_S", Some("0"), Value, "Seconds a named session's locks wait for it to re-attach (cluster mode), 0 = none"),
    flag("unbounded-idle", "DFLOCKD_UNBOUNDED_IDLE", Some("false"), Switch, "Let idle connections wait without a deadline (the read timeout then applies only inside a request)"),
    flag("no-mux", "DFLOCKD_NO_MUX", Some("false"), Switch, "Refuse the multiplexed extension (`hello _ mux`), answering `error` like a plain dflockd v2 server"),
    flag("mux-max-waiting", "DFLOCKD_MUX_MAX_WAITING", Some("100000"), Value, "Most requests one multiplexed connection may have waiting, 0 = unlimited"),
    flag("debug", "DFLOCKD_DEBUG", Some("false"), Switch, "Debug-level logs"),
    flag("log-level", "DFLOCKD_LOG_LEVEL", None, Value, "Log level: error, warn, info, debug or trace [default: info, or debug with --debug]"),
    flag("log-format", "DFLOCKD_LOG_FORMAT", Some("text"), Value, "Log format: text, or json (one object per line)"),
    flag("http-port", "DFLOCKD_HTTP_PORT", Some("0"), Value, "HTTP API port (JSON API, /metrics, /health, /ready, events, dashboard), 0 = off"),
    flag("http-host", "DFLOCKD_HTTP_HOST", None, Value, "HTTP API bind address [default: --host]"),
    flag("http-session-idle-timeout", "DFLOCKD_HTTP_SESSION_IDLE_S", Some("20"), Value, "Seconds; an HTTP session is closed after twice this without requests, 0 = never"),
    flag("http-max-sessions", "DFLOCKD_HTTP_MAX_SESSIONS", Some("0"), Value, "Most open HTTP sessions, 0 = unlimited"),
    flag("http-max-sessions-per-ip", "DFLOCKD_HTTP_MAX_SESSIONS_PER_IP", Some("0"), Value, "Most HTTP sessions per client address, 0 = unlimited"),
    flag("http-max-connections-per-ip", "DFLOCKD_HTTP_MAX_CONNECTIONS_PER_IP", Some("0"), Value, "Most HTTP connections per client address, 0 = unlimited"),
    flag("http-rate-limit-per-ip", "DFLOCKD_HTTP_RATE_LIMIT_PER_IP", Some("0"), Value, "HTTP requests per second per client address (429 over it), 0 = unlimited"),
    flag("http-rate-limit-burst", "DFLOCKD_HTTP_RATE_LIMIT_BURST", Some("0"), Value, "Burst of the HTTP rate limit [default: the rate]"),
    flag("http-cors-allowed-origins", "DFLOCKD_HTTP_CORS_ALLOWED_ORIGINS", None, Value, "Comma-separated origins allowed by CORS, * = any [default: no CORS]"),
    flag("admin-token", "DFLOCKD_ADMIN_TOKEN", None, SecretValue, "Secret of the HTTP cluster admin routes, sent as X-Dflockd-Admin [default: those routes answer 503 admin_disabled]"),
    flag("admin-token-file", "DFLOCKD_ADMIN_TOKEN_FILE", None, Value, "File holding the admin secret"),
    flag("metrics-addr", "DFLOCKD_METRICS_ADDR", None, Value, "host:port of a listener for /metrics, /health and /ready only"),
    flag("raft-dir", "DFLOCKD_RAFT_DIR", None, Value, "Cluster mode: where Raft keeps its log, vote and snapshots; its presence turns cluster mode on"),
    flag("node-id", "DFLOCKD_NODE_ID", None, Value, "This node's id, 1–65535, stable and unique (cluster mode)"),
    flag("raft-addr", "DFLOCKD_RAFT_ADDR", None, Value, "Raft transport bind address host:port (cluster mode)"),
    flag("cluster-peers", "DFLOCKD_CLUSTER_PEERS", None, Value, "Every voter of a new cluster, this node included: id=raftHost:raftPort@clientHost:clientPort,..."),
    flag("advertise-addr", "DFLOCKD_ADVERTISE_ADDR", None, Value, "Client address redirects name for this node [default: its --cluster-peers entry]"),
    flag("cluster-bootstrap", "DFLOCKD_CLUSTER_BOOTSTRAP", Some("false"), Switch, "Form a cluster of this node alone, for others to join"),
    flag("raft-auth-token", "DFLOCKD_RAFT_AUTH_TOKEN", None, SecretValue, "Secret the nodes prove to each other, ≥ 32 bytes (visible in ps; prefer the file)"),
    flag("raft-auth-token-file", "DFLOCKD_RAFT_AUTH_TOKEN_FILE", None, Value, "File holding the Raft secret"),
    flag("raft-tls-cert", "DFLOCKD_RAFT_TLS_CERT", None, Value, "Raft mutual TLS: this node's certificate (PEM; names its Raft IP)"),
    flag("raft-tls-key", "DFLOCKD_RAFT_TLS_KEY", None, Value, "Raft mutual TLS: this node's private key (PEM)"),
    flag("raft-tls-ca", "DFLOCKD_RAFT_TLS_CA", None, Value, "Raft mutual TLS: the CA that issued every node's certificate (PEM)"),
];

/// `--config FILE`: the one flag the file itself cannot set.
const CONFIG: Flag = flag(
    "config",
    "DFLOCKD_CONFIG",
    None,
    Value,
    "TOML file of settings keyed by long flag name; flags and environment take precedence",
);

fn arg(flag: &Flag) -> Arg {
    let mut arg = Arg::new(flag.long)
        .long(flag.long)
        .env(flag.env)
        .help(flag.help);
    if let Some(default) = flag.default {
        arg = arg.default_value(default);
    }
    match flag.kind {
        Kind::Value => arg,
        Kind::Secret => arg.hide_env_values(true),
        Kind::Switch => arg
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true"),
    }
}

/// The command line `dflockd` accepts, built from [`FLAGS`].
fn command() -> Command {
    Command::new("dflockd")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Distributed FIFO lock and semaphore server (dflockd v2 protocol)")
        .arg(arg(&CONFIG))
        .args(FLAGS.iter().map(arg))
}

fn declared(long: &str) -> &'static Flag {
    FLAGS
        .iter()
        .find(|flag| flag.long == long)
        .unwrap_or_else(|| panic!("--{long} is not declared in FLAGS"))
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
enum Source<'a> {
    Flag(&'static str),
    Env(&'static str),
    File { path: &'a str, key: &'static str },
    Default(&'static str),
}

struct Raw<'a> {
    value: String,
    source: Source<'a>,
}

/// The settings of a `--config` file, as text keyed by long flag name.
struct ConfigFile {
    path: String,
    values: BTreeMap<String, String>,
}

impl ConfigFile {
    fn read(path: String) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read config file {path}: {e}")))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(format!("config file {path}: {e}")))?;
        let mut values = BTreeMap::new();
        for (key, value) in table {
            if !FLAGS.iter().any(|flag| flag.long == key) {
                return Err(ConfigError(format!(
                    "config file {path}: unknown key {key:?} (keys are long flag names, like read-timeout)"
                )));
            }
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) if key == "cluster-peers" => items
                    .into_iter()
                    .map(|item| match item {
                        toml::Value::String(peer) => Ok(peer),
                        _ => Err(ConfigError(format!(
                            "config file {path}: cluster-peers must be a string or an array of strings"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                other => {
                    return Err(ConfigError(format!(
                        "config file {path}: {key} must be a string, an integer or a boolean (got {})",
                        other.type_str()
                    )));
                }
            };
            values.insert(key, text);
        }
        Ok(ConfigFile { path, values })
    }
}

/// Looks values up in precedence order.
struct Sources<'a> {
    matches: ArgMatches,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: Option<ConfigFile>,
}

impl Sources<'_> {
    /// The value the user gave for `--long`, from the command line, the
    /// environment or the config file, in that order.
    fn given(&self, long: &'static str) -> Option<Raw<'_>> {
        self.layers(long).into_iter().flatten().next()
    }

    /// [`Sources::given`], else the declared default.
    fn get(&self, long: &'static str) -> Option<Raw<'_>> {
        self.given(long).or_else(|| {
            declared(long).default.map(|value| Raw {
                value: value.to_string(),
                source: Source::Default(long),
            })
        })
    }

    /// What the command line, the environment (an empty value counting as
    /// unset) and the config file say of `--long`.
    fn layers(&self, long: &'static str) -> [Option<Raw<'_>>; 3] {
        let flag = declared(long);
        let command_line = (self.matches.value_source(long) == Some(ValueSource::CommandLine))
            .then(|| self.matches.get_one::<String>(long))
            .flatten()
            .map(|value| Raw {
                value: value.clone(),
                source: Source::Flag(long),
            });
        let env = (self.env)(flag.env)
            .filter(|value| !value.is_empty())
            .map(|value| Raw {
                value,
                source: Source::Env(flag.env),
            });
        let file = self.file.as_ref().and_then(|file| {
            let value = file.values.get(long)?;
            Some(Raw {
                value: value.clone(),
                source: Source::File {
                    path: &file.path,
                    key: long,
                },
            })
        });
        [command_line, env, file]
    }
}

/// Resolves the settings from command-line arguments (including the program
/// name) and an environment lookup; the binary passes `std::env::args()`
/// and `|name| std::env::var(name).ok()`.
pub fn load(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Settings, LoadError> {
    let matches = command().try_get_matches_from(go_style(args))?;
    let config_path = match matches.value_source(CONFIG.long) {
        Some(ValueSource::CommandLine) => matches.get_one::<String>(CONFIG.long).cloned(),
        _ => env(CONFIG.env),
    }
    .filter(|path| !path.is_empty());
    let file = config_path.map(ConfigFile::read).transpose()?;
    let sources = Sources {
        matches,
        env: &env,
        file,
    };
    Ok(resolve(&sources)?)
}

fn resolve(s: &Sources<'_>) -> Result<Settings, ConfigError> {
    let mut config = ServerConfig::default();
    if let Some(raw) = s.get("host") {
        config.host = raw.value;
    }
    if let Some(raw) = s.get("port") {
        let port = integer(&raw)?;
        config.port = u16::try_from(port)
            .map_err(|_| ConfigError(format!("{} must be 0–65535", name(&raw))))?;
    }
    config.read_timeout = seconds(s.get("read-timeout"), true)?.unwrap_or(config.read_timeout);
    config.write_timeout = seconds(s.get("write-timeout"), false)?.filter(|d| !d.is_zero());
    config.shutdown_timeout = seconds(s.get("shutdown-timeout"), false)?.filter(|d| !d.is_zero());
    config.max_connections = count(s.get("max-connections"), false)?.unwrap_or(0);
    config.max_connections_per_ip = count(s.get("max-connections-per-ip"), false)?.unwrap_or(0);
    config.auto_release_on_disconnect =
        boolean(s.get("auto-release-on-disconnect"))?.unwrap_or(true);
    if let Some(lease) = seconds(s.get("default-lease-ttl"), true)? {
        config.default_lease = Lease::new(lease.as_secs())
            .map_err(|e| ConfigError(format!("--default-lease-ttl: {e}")))?;
    }
    if let Some(period) = seconds(s.get("lease-sweep-interval"), true)? {
        config.lease_sweep_interval = period;
    }
    if let Some(period) = seconds(s.get("gc-interval"), true)? {
        config.gc_interval = period;
    }
    if let Some(idle) = seconds(s.get("gc-max-idle"), false)? {
        config.gc_max_idle = idle;
    }
    if let Some(max) = count(s.get("max-locks"), true)? {
        config.max_locks = max;
    }
    if let Some(raw) = s.get("disconnect-lock-delay-ms") {
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
    config.max_waiters = count(s.get("max-waiters"), false)?.unwrap_or(0);
    config.fence_state_file = s.get("fence-state-file").map(|r| PathBuf::from(r.value));
    let orphan_ttl = seconds(s.get("orphan-ttl"), false)?.unwrap_or(Duration::ZERO);
    if boolean(s.get("unbounded-idle"))?.unwrap_or(false) {
        config.idle = IdlePolicy::Unbounded;
    }
    config.mux = !boolean(s.get("no-mux"))?.unwrap_or(false);
    if let Some(max) = count(s.get("mux-max-waiting"), false)? {
        config.mux_max_waiting = max;
    }
    let debug = boolean(s.get("debug"))?.unwrap_or(false);
    let log_level = match s.get("log-level") {
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
    let log_format = match s.get("log-format") {
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

    config.http = http(s, config.port)?;
    config.metrics_addr = s.get("metrics-addr").map(|raw| raw.value);
    config.cluster = cluster(s, orphan_ttl)?;
    if config.cluster.is_some() && config.fence_state_file.is_some() {
        return Err(ConfigError(
            "--fence-state-file is not used in cluster mode (the fence counter is replicated)"
                .into(),
        ));
    }

    config.tls = match (s.get("tls-cert"), s.get("tls-key")) {
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
    config.auth_token = secret_value(s, "auth token", "auth-token", "auth-token-file")?
        .map(|(token, _)| Secret::new(token));
    Ok(Settings {
        config,
        log_level,
        log_format,
    })
}

/// The HTTP API's settings (spec §6.4), if `--http-port` is not 0; the
/// other HTTP flags without it are an error.
fn http(s: &Sources<'_>, tcp_port: u16) -> Result<Option<HttpConfig>, ConfigError> {
    let port = match s.get("http-port") {
        Some(raw) => u16::try_from(integer(&raw)?)
            .map_err(|_| ConfigError(format!("{} must be 0–65535", name(&raw))))?,
        None => 0,
    };
    if port == 0 {
        let http_only = [
            "http-host",
            "http-session-idle-timeout",
            "http-max-sessions",
            "http-max-sessions-per-ip",
            "http-max-connections-per-ip",
            "http-rate-limit-per-ip",
            "http-rate-limit-burst",
            "http-cors-allowed-origins",
            "admin-token",
            "admin-token-file",
        ];
        if let Some(raw) = http_only.into_iter().find_map(|long| s.given(long)) {
            return Err(ConfigError(format!(
                "{} is an HTTP flag: it needs --http-port",
                name(&raw)
            )));
        }
        return Ok(None);
    }
    if port == tcp_port {
        return Err(ConfigError(format!(
            "--http-port {port} must differ from --port"
        )));
    }
    let defaults = HttpConfig::default();
    let rate = count(s.get("http-rate-limit-per-ip"), false)?.unwrap_or(0);
    let burst = count(s.get("http-rate-limit-burst"), false)?.unwrap_or(0);
    let u32_of = |value: usize, flag: &str| {
        u32::try_from(value)
            .map_err(|_| ConfigError(format!("--{flag} must be at most {}", u32::MAX)))
    };
    Ok(Some(HttpConfig {
        host: s.get("http-host").map(|raw| raw.value),
        port,
        session_idle_timeout: seconds(s.get("http-session-idle-timeout"), false)?
            .unwrap_or(defaults.session_idle_timeout),
        max_sessions: count(s.get("http-max-sessions"), false)?.unwrap_or(0),
        max_sessions_per_ip: count(s.get("http-max-sessions-per-ip"), false)?.unwrap_or(0),
        max_connections_per_ip: count(s.get("http-max-connections-per-ip"), false)?.unwrap_or(0),
        rate_limit_per_ip: u32_of(rate, "http-rate-limit-per-ip")?,
        rate_limit_burst: u32_of(burst, "http-rate-limit-burst")?,
        cors_allowed_origins: s
            .get("http-cors-allowed-origins")
            .map(|raw| {
                raw.value
                    .split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        admin_token: secret_value(s, "the admin token", "admin-token", "admin-token-file")?
            .map(|(token, _)| Secret::new(token)),
        ..defaults
    }))
}

/// Cluster mode's settings (spec §6.5), if `--raft-dir` is given; the
/// other cluster flags without it are an error.
fn cluster(s: &Sources<'_>, orphan_ttl: Duration) -> Result<Option<ClusterConfig>, ConfigError> {
    let token = secret_value(s, "the secret", "raft-auth-token", "raft-auth-token-file")?;
    let tls = [
        s.get("raft-tls-cert"),
        s.get("raft-tls-key"),
        s.get("raft-tls-ca"),
    ];
    let Some(dir) = s.get("raft-dir") else {
        let cluster_only = [
            "node-id",
            "raft-addr",
            "cluster-peers",
            "advertise-addr",
            "cluster-bootstrap",
            "raft-tls-cert",
            "raft-tls-key",
            "raft-tls-ca",
        ];
        if let Some(raw) = cluster_only.into_iter().find_map(|long| s.given(long)) {
            return Err(ConfigError(format!(
                "{} is a cluster flag: it needs --raft-dir",
                name(&raw)
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
    let node_id = s
        .get("node-id")
        .ok_or_else(|| ConfigError("cluster mode needs --node-id".into()))?;
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
    let raft_addr = s
        .get("raft-addr")
        .ok_or_else(|| ConfigError("cluster mode needs --raft-addr host:port".into()))?
        .value;
    let (token, origin) = token.ok_or_else(|| {
        ConfigError(
            "cluster mode needs --raft-auth-token or --raft-auth-token-file (≥ 32 bytes)".into(),
        )
    })?;
    let secret =
        RaftSecret::new(token.into_bytes()).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
    let bootstrap = boolean(s.get("cluster-bootstrap"))?.unwrap_or(false);
    let peers = match s.get("cluster-peers") {
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
    cluster.advertise_addr = s.get("advertise-addr").map(|raw| raw.value);
    cluster.tls = tls;
    cluster.orphan_ttl = orphan_ttl;
    Ok(Some(cluster))
}

/// The first secret given — the token, then the token file, on the command
/// line, then in the environment, then in the config file — trimmed and on
/// one line, with where it came from. `what` names it in errors.
fn secret_value(
    s: &Sources<'_>,
    what: &str,
    token: &'static str,
    file: &'static str,
) -> Result<Option<(String, String)>, ConfigError> {
    let [token_layers, file_layers] = [s.layers(token), s.layers(file)];
    let found = token_layers
        .into_iter()
        .zip(file_layers)
        .find_map(|(token, file)| {
            let nonempty = |raw: &Raw<'_>| !raw.value.is_empty();
            let token = token.filter(nonempty).map(|raw| (raw, false));
            token.or(file.filter(nonempty).map(|raw| (raw, true)))
        });
    let Some((raw, is_file)) = found else {
        return Ok(None);
    };
    let origin = name(&raw);
    let value = if is_file {
        std::fs::read_to_string(&raw.value)
            .map_err(|e| ConfigError(format!("{origin}: cannot read {}: {e}", raw.value)))?
    } else {
        raw.value
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

/// How errors name where a value came from: the flag, the variable, or the
/// file and key.
fn name(raw: &Raw<'_>) -> String {
    match raw.source {
        Source::Flag(long) | Source::Default(long) => format!("--{long}"),
        Source::Env(var) => var.to_string(),
        Source::File { path, key } => format!("{key} in {path}"),
    }
}

fn integer(raw: &Raw<'_>) -> Result<i64, ConfigError> {
    raw.value
        .trim()
        .parse::<i64>()
        .map_err(|_| match raw.source {
            Source::Flag(long) => ConfigError(format!(
                "invalid value {:?} for flag --{long}: must be an integer",
                raw.value
            )),
            _ => ConfigError(format!(
                "{} must be an integer (got {:?})",
                name(raw),
                raw.value
            )),
        })
}

/// A whole-second duration; `positive` demands > 0, otherwise ≥ 0.
fn seconds(raw: Option<Raw<'_>>, positive: bool) -> Result<Option<Duration>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let n = integer(&raw)?;
    let display = name(&raw);
    if positive && n <= 0 {
        return Err(ConfigError(format!("{display} must be > 0")));
    }
    if n < 0 {
        return Err(ConfigError(format!("{display} must be >= 0")));
    }
    if n as u64 > MAX_SECONDS {
        return Err(ConfigError(format!("{display} is too large")));
    }
    Ok(Some(Duration::from_secs(n as u64)))
}

fn count(raw: Option<Raw<'_>>, positive: bool) -> Result<Option<usize>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let n = integer(&raw)?;
    let display = name(&raw);
    if positive && n <= 0 {
        return Err(ConfigError(format!("{display} must be > 0")));
    }
    usize::try_from(n)
        .map(Some)
        .map_err(|_| ConfigError(format!("{display} must be >= 0")))
}

fn boolean(raw: Option<Raw<'_>>) -> Result<Option<bool>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    match raw.value.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "t" => Ok(Some(true)),
        "0" | "no" | "false" | "f" => Ok(Some(false)),
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
        assert_eq!(s.log_level, LogLevel::Info);
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
        assert!(e(&["--http-port", "6388"], &[]).contains("must differ"));
        assert!(e(&["--http-max-sessions", "3"], &[]).contains("needs --http-port"));
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
        assert_eq!(run(&["--debug"], &[]).unwrap().log_level, LogLevel::Debug);
        assert!(
            !run(&[], &[("DFLOCKD_AUTO_RELEASE_ON_DISCONNECT", "No")])
                .unwrap()
                .config
                .auto_release_on_disconnect
        );
        assert_eq!(
            run(&[], &[("DFLOCKD_DEBUG", "YES")]).unwrap().log_level,
            LogLevel::Debug
        );
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

    /// The doc examples of the old library module, kept as tests.
    #[test]
    fn load_reports_usage_and_config_errors_apart() {
        assert!(matches!(
            run(&["--no-such-flag"], &[]),
            Err(LoadError::Usage(_))
        ));
        let Err(LoadError::Config(error)) = run(&["--port", "70000"], &[]) else {
            panic!("a port above 65535 is a configuration error")
        };
        assert_eq!(error.0, "--port must be 0–65535");
        assert_eq!("warn".parse::<LogLevel>(), Ok(LogLevel::Warn));
        assert!("loud".parse::<LogLevel>().is_err());
        assert_eq!(run(&[], &[]).unwrap().log_format, LogFormat::Text);
    }

    #[test]
    fn http_flags_make_an_http_config() {
        let settings = run(
            &[
                "--http-port",
                "8080",
                "--http-max-sessions",
                "3",
                "--http-cors-allowed-origins",
                "https://a.example, https://b.example",
                "--admin-token",
                "adm",
            ],
            &[("DFLOCKD_HTTP_RATE_LIMIT_PER_IP", "5")],
        )
        .unwrap();
        let http = settings.config.http.expect("HTTP on");
        assert_eq!(
            (http.port, http.max_sessions, http.rate_limit_per_ip),
            (8080, 3, 5)
        );
        assert_eq!(
            http.cors_allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(http.session_idle_timeout, Duration::from_secs(20));
        assert_eq!(
            http.admin_token.map(|t| t.expose().to_owned()).as_deref(),
            Some("adm")
        );
        assert!(run(&[], &[]).unwrap().config.http.is_none());
        let metrics = run(&["--metrics-addr", "127.0.0.1:9100"], &[]).unwrap();
        assert_eq!(
            metrics.config.metrics_addr.as_deref(),
            Some("127.0.0.1:9100")
        );
    }

    #[test]
    fn every_flag_is_declared_once_with_its_variable_and_shown_in_help() {
        let mut longs: Vec<&str> = FLAGS.iter().map(|f| f.long).collect();
        let mut vars: Vec<&str> = FLAGS.iter().map(|f| f.env).collect();
        longs.sort_unstable();
        vars.sort_unstable();
        let declared = FLAGS.len();
        longs.dedup();
        vars.dedup();
        assert_eq!((longs.len(), vars.len()), (declared, declared));
        command().debug_assert();
        let help = command().render_long_help().to_string();
        for flag in FLAGS.iter().chain([&CONFIG]) {
            assert!(flag.env.starts_with("DFLOCKD_"), "{}", flag.env);
            assert!(
                help.contains(&format!("--{}", flag.long)),
                "--{}",
                flag.long
            );
            assert!(help.contains(flag.env), "{} missing from --help", flag.env);
        }
        assert!(help.contains("[default: 6388]"), "{help}");
    }

    fn config_file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dflockd.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path.display().to_string())
    }

    #[test]
    fn a_config_file_sets_what_flags_and_environment_do_not() {
        let (_dir, path) = config_file(
            "port = 7100\nread-timeout = 9\nhost = \"0.0.0.0\"\nno-mux = true\nmax-locks = 50\n",
        );
        let s = run(&["--config", &path], &[]).unwrap();
        assert_eq!((s.config.host.as_str(), s.config.port), ("0.0.0.0", 7100));
        assert_eq!(s.config.read_timeout, Duration::from_secs(9));
        assert!(!s.config.mux);
        assert_eq!(s.config.max_locks, 50);
        // The environment beats the file, and the command line beats both.
        let s = run(
            &["--config", &path, "--max-locks", "70"],
            &[("DFLOCKD_PORT", "7200"), ("DFLOCKD_MAX_LOCKS", "60")],
        )
        .unwrap();
        assert_eq!((s.config.port, s.config.max_locks), (7200, 70));
        assert_eq!(s.config.read_timeout, Duration::from_secs(9));
        // DFLOCKD_CONFIG names the file too.
        let s = run(&[], &[("DFLOCKD_CONFIG", &path)]).unwrap();
        assert_eq!(s.config.port, 7100);
    }

    #[test]
    fn a_config_file_names_itself_and_the_key_in_errors() {
        let (_dir, path) = config_file("read-timeout = 0\n");
        assert_eq!(
            e(&["--config", &path], &[]),
            format!("configuration error: read-timeout in {path} must be > 0")
        );
        let (_dir, path) = config_file("prot = 7000\n");
        let error = e(&["--config", &path], &[]);
        assert!(
            error.contains(&path) && error.contains("unknown key \"prot\""),
            "{error}"
        );
        let (_dir, path) = config_file("port = 1.5\n");
        let error = e(&["--config", &path], &[]);
        assert!(
            error.contains("port must be a string, an integer or a boolean"),
            "{error}"
        );
        let (_dir, path) = config_file("port = \n");
        let error = e(&["--config", &path], &[]);
        assert!(error.contains(&path), "{error}");
        let error = e(&["--config", "/nonexistent/dflockd.toml"], &[]);
        assert!(
            error.contains("cannot read config file /nonexistent/dflockd.toml"),
            "{error}"
        );
        let (_dir, path) = config_file("config = \"other.toml\"\n");
        assert!(e(&["--config", &path], &[]).contains("unknown key"));
    }

    #[test]
    fn a_config_file_carries_cluster_settings_and_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("raft-token");
        std::fs::write(&token, format!("{SECRET}\n")).unwrap();
        let (_config_dir, path) = config_file(&format!(
            "raft-dir = \"/tmp/n1\"\nnode-id = 1\nraft-addr = \"127.0.0.1:7001\"\n\
             raft-auth-token-file = \"{}\"\norphan-ttl = 15\n\
             cluster-peers = [\"1=127.0.0.1:7001@127.0.0.1:6388\", \"2=127.0.0.1:7002@127.0.0.1:6389\"]\n",
            token.display()
        ));
        let cluster = run(&["--config", &path], &[])
            .unwrap()
            .config
            .cluster
            .expect("cluster mode from the file");
        assert_eq!((cluster.node_id, cluster.peers.len()), (1, 2));
        assert_eq!(cluster.orphan_ttl, Duration::from_secs(15));
        // A cluster key in the file without raft-dir is named with the file.
        let (_dir, path) = config_file("node-id = 3\n");
        assert_eq!(
            e(&["--config", &path], &[]),
            format!(
                "configuration error: node-id in {path} is a cluster flag: it needs --raft-dir"
            )
        );
        let (_dir, path) = config_file("cluster-peers = [1, 2]\n");
        assert!(e(&["--config", &path], &[]).contains("array of strings"));
    }
}
