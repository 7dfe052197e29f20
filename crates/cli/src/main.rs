//! `dflock`: the dflockd command line.
//!
//! * `dflock run KEY -- CMD…` runs a command while holding a lock (or, with
//!   `--limit`, a semaphore slot), like `flock` across machines;
//! * `dflock stats` shows what a server holds;
//! * `dflock fence TOKEN` decodes a token's fence;
//! * `dflock bench` measures a server against a zero-work baseline.

#[cfg(not(unix))]
compile_error!(
    "dflock is Unix-only: `dflock run` forwards Unix signals to the command's process group"
);

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dflockd_client::{Client, ServerAddr, TlsOptions};

mod bench;
mod cluster;
mod run;
mod stats;

/// Exit codes of `dflock` itself (a command run by `dflock run` that exits
/// normally passes its own status through).
pub mod exit {
    /// Bad usage or configuration.
    pub const USAGE: u8 = 64;
    /// The server could not be reached or answered an error.
    pub const UNAVAILABLE: u8 = 69;
    /// `dflock run`: the lock could not be acquired within `--timeout`.
    pub const TIMEOUT: u8 = 75;
    /// `dflock run`: the lease was lost while the command ran; the command
    /// was terminated.
    pub const LEASE_LOST: u8 = 76;
}

#[derive(Debug, Parser)]
#[command(
    name = "dflock",
    version,
    about = "Distributed locks from the shell, for dflockd servers"
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the servers (shared by every subcommand).
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Servers, comma-separated host:port, in sharding order.
    #[arg(
        long,
        env = "DFLOCKD_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:6388",
        global = true
    )]
    servers: Vec<String>,
    /// A dflockd cluster instead: every node's client address,
    /// comma-separated; requests go to its leader, leases survive a
    /// failover (nodes with --orphan-ttl).
    #[arg(
        long,
        env = "DFLOCKD_CLUSTER",
        value_delimiter = ',',
        conflicts_with = "servers",
        global = true
    )]
    cluster: Vec<String>,
    /// Trust this CA (PEM) and connect with TLS.
    #[arg(long, env = "DFLOCKD_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Verify the server certificate against this name instead of the host.
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    /// Shared secret (visible in `ps`; prefer --auth-token-file).
    #[arg(
        long,
        env = "DFLOCKD_AUTH_TOKEN",
        hide_env_values = true,
        global = true
    )]
    auth_token: Option<String>,
    /// File holding the shared secret.
    #[arg(long, env = "DFLOCKD_AUTH_TOKEN_FILE", global = true)]
    auth_token_file: Option<PathBuf>,
}

impl ConnectionArgs {
    /// The `--servers` addresses, parsed.
    pub fn addrs(&self) -> Result<Vec<ServerAddr>, String> {
        parse_addrs(&self.servers)
    }

    /// Whether `--cluster` was given (commands that address one server
    /// or each node refuse or expand it).
    pub fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// A client for the `--servers` (or the `--cluster`), with the TLS and
    /// auth flags.
    pub fn client(&self) -> Result<Client, String> {
        self.build(false)
    }

    /// A client that reaches every listed node as a server of its own —
    /// the `--cluster` nodes too — to ask each for its own view.
    pub fn client_per_node(&self) -> Result<Client, String> {
        self.build(true)
    }

    fn build(&self, per_node: bool) -> Result<Client, String> {
        let mut builder = if !self.is_cluster() {
            Client::builder().servers(self.addrs()?)
        } else if per_node {
            Client::builder().servers(parse_addrs(&self.cluster)?)
        } else {
            Client::builder().cluster(self.cluster.iter().map(|node| node.trim()))
        };
        if let Some(ca) = &self.tls_ca {
            let mut tls = TlsOptions::with_ca_file(ca).map_err(|e| e.to_string())?;
            if let Some(name) = &self.tls_server_name {
                tls = tls.server_name(name).map_err(|e| e.to_string())?;
            }
            builder = builder.tls(tls);
        }
        let token = match (&self.auth_token, &self.auth_token_file) {
            (Some(token), _) => Some(token.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if let Some(token) = token {
            builder = builder.auth_token(&token).map_err(|e| e.to_string())?;
        }
        builder.build().map_err(|e| e.to_string())
    }
}

/// `host:port` addresses from a comma-separated flag.
fn parse_addrs(list: &[String]) -> Result<Vec<ServerAddr>, String> {
    list.iter()
        .map(|s| s.trim().parse::<ServerAddr>().map_err(|e| e.to_string()))
        .collect()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command while holding a lock (or a semaphore slot with --limit).
    Run(run::RunArgs),
    /// Show what the servers hold.
    Stats(stats::StatsArgs),
    /// Print the fence of a grant token.
    Fence {
        /// A 32-hex-digit token.
        token: String,
    },
    /// Benchmark a server against a zero-work baseline.
    Bench(bench::BenchArgs),
    /// Inspect a replicated dflockd cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// (internal) Serve canned replies: the zero-work baseline for `bench`.
    #[command(hide = true)]
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; a usage error is 64
        // (EX_USAGE), as documented, not clap's 2.
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dflock: cannot start runtime: {error}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(&cli.connection, args).await,
            Command::Stats(args) => stats::stats(&cli.connection, args).await,
            Command::Fence { token } => match dflockd_proto::fence_from_token(token.trim()) {
                Ok(fence) => {
                    println!("{fence}");
                    0
                }
                Err(error) => {
                    eprintln!("dflock: {error}");
                    exit::USAGE
                }
            },
            Command::Bench(args) => bench::bench(&cli.connection, args).await,
            Command::Cluster(command) => cluster::cluster(&cli.connection, command).await,
            Command::BaselineServer { listen } => bench::baseline_server(&listen).await,
        }
    });
    // Let background releases finish before the runtime goes away.
    runtime.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}
