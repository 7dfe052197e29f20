//! Two-phase acquisition: join the queue, announce your position, then wait.
//!
//! `cargo run --example two_phase`

use std::time::Duration;

use dflockd::client::{Client, Enqueue};
use dflockd::server::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::start(ServerConfig::ephemeral()).await?;
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()?;
    let lock = client.lock("migrations")?;

    let holder = lock.acquire().await?;
    println!("holder has the lock (fence {})", holder.fence());

    match lock.enqueue().await? {
        Enqueue::Acquired(lease) => println!("granted at once (fence {})", lease.fence()),
        Enqueue::Queued(ticket) => {
            println!("queued: our place is secured; tell the operator we are next, then wait");
            let release = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                holder.release().await
            });
            let lease = ticket.wait(Duration::from_secs(5)).await?;
            println!(
                "granted after the holder released (fence {})",
                lease.fence()
            );
            release.await??;
            lease.release().await?;
        }
    }
    Ok(())
}
