//! One instance of a job across "processes" (here: two clients), restarted
//! on the other when the holder goes away.
//!
//! `cargo run --example singleton`

use std::time::Duration;

use dflockd::Singleton;
use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::start(ServerConfig::ephemeral()).await?;
    let mut stops = Vec::new();
    let mut clients = Vec::new();
    for name in ["host-a", "host-b"] {
        let client = Client::builder()
            .server(server.local_addr().into())
            .build()?;
        let stop = CancellationToken::new();
        let job = Singleton::new(&client, "jobs/reindex")?.with_lease(Duration::from_secs(2));
        let token = stop.clone();
        tokio::spawn(async move {
            let result = job
                .run(token, |ctx| async move {
                    println!("{name}: reindex job running (fence {})", ctx.fence());
                    let mut batch = 0;
                    while !ctx.is_cancelled() {
                        batch += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    println!("{name}: job stopped after {batch} batches");
                })
                .await;
            if let Err(error) = result {
                eprintln!("{name}: {error}");
            }
        });
        stops.push(stop);
        clients.push(client);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("host-a shuts down (resigns)");
    stops[0].cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stops[1].cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}
