//! `dflock cluster status`: each node's view of its cluster, from `stats`.

use clap::Subcommand;

use crate::{ConnectionArgs, exit};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show each node's role, term, leader, log position and voters (give
    /// every node in --servers).
    Status,
}

pub async fn cluster(connection: &ConnectionArgs, command: ClusterCommand) -> u8 {
    let ClusterCommand::Status = command;
    let client = match connection.client() {
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
