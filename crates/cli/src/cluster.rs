//! `dflock cluster status`: each node's view of its cluster, from `stats`;
//! `dflock cluster add|remove`: membership changes, sent to a node's Raft
//! address with the cluster secret and applied by the leader.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Subcommand};
use dflockd_cluster::{
    Member, MembershipChange, Network, NodeId, RaftSecret, RaftTls, change_membership,
};

use crate::{ConnectionArgs, exit};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show each node's role, term, leader, log position and voters (give
    /// every node in --servers).
    Status,
    /// Add a voter: it joins as a learner, catches up with the log, then
    /// votes. Start the new node first (same --cluster-peers list as the
    /// others, or none, and an empty --raft-dir).
    Add {
        /// The new node as `id=raftHost:raftPort@clientHost:clientPort`
        /// (the --cluster-peers form).
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a voter (stop that node afterwards; a removed node must not
    /// come back with its old directory).
    Remove {
        /// The node id.
        id: NodeId,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How to reach a cluster's Raft side.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Raft address (host:port) of any member; the change goes on to the
    /// leader.
    #[arg(long, env = "DFLOCKD_RAFT_ADDR")]
    via: String,
    /// The cluster's Raft secret (visible in `ps`; prefer the file).
    #[arg(long, env = "DFLOCKD_RAFT_AUTH_TOKEN", hide_env_values = true)]
    raft_auth_token: Option<String>,
    /// File holding the cluster's Raft secret.
    #[arg(long, env = "DFLOCKD_RAFT_AUTH_TOKEN_FILE")]
    raft_auth_token_file: Option<String>,
    /// With Raft mutual TLS: a certificate of the cluster's CA to present.
    #[arg(long, env = "DFLOCKD_RAFT_TLS_CERT", requires_all = ["raft_tls_key", "raft_tls_ca"])]
    raft_tls_cert: Option<String>,
    /// Its private key.
    #[arg(long, env = "DFLOCKD_RAFT_TLS_KEY", requires_all = ["raft_tls_cert", "raft_tls_ca"])]
    raft_tls_key: Option<String>,
    /// The cluster's CA.
    #[arg(long, env = "DFLOCKD_RAFT_TLS_CA", requires_all = ["raft_tls_cert", "raft_tls_key"])]
    raft_tls_ca: Option<String>,
    /// How long the change may take (adding waits for the new node to
    /// catch up), in seconds.
    #[arg(long, default_value_t = 60.0)]
    wait: f64,
}

/// Why a membership command could not even be sent.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> UsageError {
    UsageError::Invalid(message.into())
}

/// The secret, from the flag, else the file (trimmed, one line).
fn secret(args: &AdminArgs) -> Result<RaftSecret, UsageError> {
    let (value, origin) = match (&args.raft_auth_token, &args.raft_auth_token_file) {
        (Some(token), _) if !token.is_empty() => (token.clone(), "--raft-auth-token"),
        (_, Some(path)) if !path.is_empty() => (
            std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("--raft-auth-token-file {path}: {e}")))?,
            "--raft-auth-token-file",
        ),
        _ => {
            return Err(invalid(
                "the cluster's Raft secret is needed: --raft-auth-token-file or --raft-auth-token",
            ));
        }
    };
    let token = value.trim();
    if token.is_empty() || token.contains(['\r', '\n']) {
        return Err(invalid(format!(
            "{origin}: the secret must be one non-empty line"
        )));
    }
    RaftSecret::new(token.as_bytes().to_vec()).map_err(|e| invalid(format!("{origin}: {e}")))
}

/// The first address `addr` resolves to.
async fn resolve(what: &str, addr: &str) -> Result<SocketAddr, UsageError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| invalid(format!("{what} {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("{what} {addr:?} resolves to no address")))
}

/// `id=raftHost:raftPort@clientHost:clientPort`, the Raft address resolved.
async fn parse_node(spec: &str) -> Result<(NodeId, Member), UsageError> {
    let shape = || {
        invalid(format!(
            "{spec:?}: a node is id=raftHost:raftPort@clientHost:clientPort"
        ))
    };
    let (id, addrs) = spec.split_once('=').ok_or_else(shape)?;
    let (raft, client) = addrs.split_once('@').ok_or_else(shape)?;
    let id: NodeId = id
        .trim()
        .parse()
        .ok()
        .filter(|id| (1..=0xFFFF).contains(id))
        .ok_or_else(|| invalid(format!("{spec:?}: node ids are 1–65535")))?;
    if client.is_empty() {
        return Err(shape());
    }
    let raft = resolve("the new node's Raft address", raft).await?;
    Ok((id, Member::new(raft.to_string(), client)))
}

/// Sends a membership change; prints what happened.
async fn change(change: Result<MembershipChange, UsageError>, admin: &AdminArgs) -> u8 {
    let prepared = async {
        let change = change?;
        let mut network = Network::with_secret(secret(admin)?);
        if let (Some(cert), Some(key), Some(ca)) = (
            &admin.raft_tls_cert,
            &admin.raft_tls_key,
            &admin.raft_tls_ca,
        ) {
            let tls = RaftTls::from_pem_files(cert, key, ca).map_err(|e| invalid(e.to_string()))?;
            network = network.with_tls(tls);
        }
        let via = resolve("--via", &admin.via).await?;
        let wait = Duration::try_from_secs_f64(admin.wait)
            .ok()
            .filter(|wait| !wait.is_zero())
            .ok_or_else(|| invalid(format!("--wait {}: seconds above 0", admin.wait)))?;
        Ok::<_, UsageError>((change, network, via, wait))
    };
    let (change, network, via, wait) = match prepared.await {
        Ok(prepared) => prepared,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    match change_membership(via, &network, change.clone(), wait).await {
        Ok(()) => {
            println!("{change}: done");
            0
        }
        Err(error) => {
            eprintln!("dflock: {change}: {error}");
            exit::UNAVAILABLE
        }
    }
}

pub async fn cluster(connection: &ConnectionArgs, command: ClusterCommand) -> u8 {
    match command {
        ClusterCommand::Status => status(connection).await,
        ClusterCommand::Add { node, admin } => {
            let parsed = parse_node(&node)
                .await
                .map(|(id, member)| MembershipChange::AddVoter { id, member });
            change(parsed, &admin).await
        }
        ClusterCommand::Remove { id, admin } => {
            change(Ok(MembershipChange::RemoveVoter { id }), &admin).await
        }
    }
}

async fn status(connection: &ConnectionArgs) -> u8 {
    let client = match connection.client_per_node() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    println!(
        "{:<22} {:>5} {:<10} {:>6} {:>7} {:<22} {:>8} {:>9} VOTERS",
        "SERVER", "NODE", "ROLE", "TERM", "LEADER", "LEADER ADDRESS", "APPLIED", "SNAPSHOT"
    );
    let mut code = 0;
    let mut leaders = std::collections::BTreeSet::new();
    for (index, addr) in client.servers().iter().enumerate() {
        let stats = match client.stats(index).await {
            Ok(stats) => stats,
            Err(error) => {
                println!("{addr:<22} unreachable: {error}");
                code = exit::UNAVAILABLE;
                continue;
            }
        };
        let Some(c) = stats.cluster else {
            println!("{addr:<22} not in cluster mode");
            continue;
        };
        if c.role == "leader" {
            leaders.insert(c.node_id.clone());
        }
        println!(
            "{:<22} {:>5} {:<10} {:>6} {:>7} {:<22} {:>8} {:>9} {}",
            addr.to_string(),
            c.node_id,
            c.role,
            c.term,
            if c.leader_id.is_empty() {
                "-"
            } else {
                &c.leader_id
            },
            c.leader_addr.as_deref().unwrap_or("-"),
            c.commit_index,
            c.snapshot_index,
            c.voters.join(",")
        );
    }
    if leaders.is_empty() && code == 0 {
        eprintln!("dflock: no node answered as leader");
        code = exit::UNAVAILABLE;
    }
    code
}
