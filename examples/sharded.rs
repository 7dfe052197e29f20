//! Keys spread over three servers with CRC-32 sharding — the same mapping
//! the Go, Python and TypeScript clients use.
//!
//! `cargo run --example sharded`

use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Server::start(ServerConfig::ephemeral()).await?);
    }
    let client = Client::builder()
        .servers(servers.iter().map(|s| s.local_addr().into()))
        .build()?;
    let mut leases = Vec::new();
    for key in ["my-key", "row:42", "a", "lock-0", "日本"] {
        let index = client.server_for(key)?;
        let lease = client.lock(key)?.acquire().await?;
        println!(
            "{key:>8} → server {index} ({}), fence {}",
            servers[index].local_addr(),
            lease.fence()
        );
        leases.push(lease);
    }
    for (index, _) in servers.iter().enumerate() {
        let stats = client.stats(index).await?;
        let keys: Vec<_> = stats.locks.iter().map(|l| l.key.as_str()).collect();
        println!("server {index} holds {keys:?}");
    }
    for lease in leases {
        lease.release().await?;
    }
    Ok(())
}
