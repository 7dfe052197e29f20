//! `dflock stats`.

use clap::Args;

use crate::{ConnectionArgs, exit};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print the raw JSON documents, one per server.
    #[arg(long)]
    json: bool,
}

pub async fn stats(connection: &ConnectionArgs, args: StatsArgs) -> u8 {
    let client = match connection.client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    let mut code = 0;
    for (index, addr) in client.servers().iter().enumerate() {
        let stats = match client.stats(index).await {
            Ok(stats) => stats,
            Err(error) => {
                eprintln!("dflock: {addr}: {error}");
                code = exit::UNAVAILABLE;
                continue;
            }
        };
        if args.json {
            match serde_json::to_string(&stats) {
                Ok(json) => println!("{json}"),
                Err(error) => eprintln!("dflock: {error}"),
            }
            continue;
        }
        println!("server {addr}: {} connection(s)", stats.connections);
        if !stats.locks.is_empty() {
            println!(
                "  {:<40} {:>10} {:>12} {:>8}",
                "LOCK", "OWNER", "EXPIRES IN", "WAITERS"
            );
            for l in &stats.locks {
                let owner = if l.owner_conn_id == 0 {
                    "-".to_string()
                } else {
                    format!("conn {}", l.owner_conn_id)
                };
                println!(
                    "  {:<40} {:>10} {:>11.1}s {:>8}",
                    l.key, owner, l.lease_expires_in_s, l.waiters
                );
            }
        }
        if !stats.semaphores.is_empty() {
            println!(
                "  {:<40} {:>10} {:>12} {:>8}",
                "SEMAPHORE", "LIMIT", "HOLDERS", "WAITERS"
            );
            for s in &stats.semaphores {
                println!(
                    "  {:<40} {:>10} {:>12} {:>8}",
                    s.key, s.limit, s.holders, s.waiters
                );
            }
        }
        let idle = stats.idle_locks.len() + stats.idle_semaphores.len();
        if idle > 0 {
            println!("  {idle} idle key(s) awaiting garbage collection");
        }
        if stats.locks.is_empty() && stats.semaphores.is_empty() {
            println!("  nothing held");
        }
    }
    code
}
