//! Bound concurrency across machines: at most 3 of 8 workers hold a slot of
//! the `gpu-pool` semaphore at any time; the rest queue in FIFO order.
//!
//! `cargo run --example semaphore_pool`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::start(ServerConfig::ephemeral()).await?;
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()?;
    let busy = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let pool = client
            .semaphore("gpu-pool", 3)?
            .with_timeout(Duration::from_secs(20));
        let (busy, peak) = (Arc::clone(&busy), Arc::clone(&peak));
        tasks.push(tokio::spawn(async move {
            let slot = pool.acquire().await?;
            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            println!(
                "worker {worker} got a slot (fence {}, {now} busy)",
                slot.fence()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            busy.fetch_sub(1, Ordering::SeqCst);
            slot.release().await?;
            Ok::<_, dflockd::client::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "peak concurrency: {} (limit 3)",
        peak.load(Ordering::SeqCst)
    );
    Ok(())
}
