//! Quickstart: leader election with failover, all in one process.
//!
//! `cargo run --example quickstart`
//!
//! An embedded dflockd server starts. Three workers campaign for leadership
//! of one key, each through its own client and its own TCP link (a tiny
//! in-process proxy we can cut). The leader writes to a *fenced register*
//! that rejects any write carrying a fence lower than the highest it has
//! seen. We cut the leader's link twice; each time another worker takes
//! over, and every new term has a larger fence.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dflockd::LeaderElection;
use dflockd::client::Client;
use dflockd::server::{Server, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const KEY: &str = "quickstart/leader";
const LEASE: Duration = Duration::from_secs(3);

/// Storage that only accepts writes from the newest leader.
#[derive(Default)]
struct FencedRegister {
    state: Mutex<RegisterState>,
}

#[derive(Default)]
struct RegisterState {
    highest: u64,
    accepted: Vec<(String, u64)>,
    rejected: usize,
}

impl FencedRegister {
    fn write(&self, who: &str, fence: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        if fence < state.highest {
            state.rejected += 1;
            return false;
        }
        state.highest = fence;
        state.accepted.push((who.to_owned(), fence));
        true
    }
}

/// A cuttable TCP link between one worker and the server.
struct Link {
    addr: SocketAddr,
    cut: CancellationToken,
}

async fn link(server: SocketAddr) -> std::io::Result<Link> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cut = CancellationToken::new();
    let token = cut.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => return, // refuse new connections from now on
                accepted = listener.accept() => accepted,
            };
            let Ok((mut inbound, _)) = accepted else {
                continue;
            };
            let token = token.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(server).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = token.cancelled() => {} // dropping both sockets cuts the link
                }
            });
        }
    });
    Ok(Link { addr, cut })
}

async fn worker(
    name: &'static str,
    client: Client,
    register: Arc<FencedRegister>,
    stop: CancellationToken,
    leadership: watch::Sender<Option<(&'static str, u64)>>,
) {
    let election = match LeaderElection::new(&client, KEY) {
        Ok(election) => election.with_lease(LEASE),
        Err(error) => return eprintln!("{name}: {error}"),
    };
    let result = election
        .run_as_leader(stop, |ctx| {
            let register = Arc::clone(&register);
            let leadership = leadership.clone();
            async move {
                println!("  {name:<8} becomes leader (fence {})", ctx.fence());
                leadership.send_replace(Some((name, ctx.fence())));
                let mut writes = 0;
                while !ctx.is_cancelled() {
                    if register.write(name, ctx.fence()) {
                        writes += 1;
                    } else {
                        println!("  register rejected a stale write from {name}");
                    }
                    tokio::select! {
                        _ = ctx.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                println!(
                    "  {name:<8} steps down     (fence {}, {writes} writes accepted)",
                    ctx.fence()
                );
            }
        })
        .await;
    if let Err(error) = result {
        eprintln!("{name}: election ended with {error}");
    }
}

async fn wait_for_leader(
    rx: &mut watch::Receiver<Option<(&'static str, u64)>>,
    not: Option<&str>,
) -> Result<(&'static str, u64), Box<dyn std::error::Error>> {
    let found = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|l| l.is_some_and(|(n, _)| Some(n) != not)),
    )
    .await??;
    Ok(found.expect("checked above"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let server = Server::start(ServerConfig::ephemeral()).await?;
    println!("dflockd server embedded on {}", server.local_addr());
    println!(
        "three workers campaign for {KEY:?} with {}s leases",
        LEASE.as_secs()
    );

    let register = Arc::new(FencedRegister::default());
    let stop = CancellationToken::new();
    let (leadership, mut leader_rx) = watch::channel(None);
    let mut links = Vec::new();
    let mut tasks = Vec::new();
    for name in ["alpha", "bravo", "charlie"] {
        let link = link(server.local_addr()).await?;
        let client = Client::builder().server(link.addr.into()).build()?;
        tasks.push(tokio::spawn(worker(
            name,
            client,
            Arc::clone(&register),
            stop.clone(),
            leadership.clone(),
        )));
        links.push((name, link));
        // Stagger the start so the story reads in order.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut terms = Vec::new();
    let (mut leader, mut fence) = wait_for_leader(&mut leader_rx, None).await?;
    terms.push((leader, fence));
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        println!("cutting {leader}'s network link (round {round})…");
        let cut_at = Instant::now();
        if let Some((_, link)) = links.iter().find(|(n, _)| *n == leader) {
            link.cut.cancel();
        }
        let (next, next_fence) = wait_for_leader(&mut leader_rx, Some(leader)).await?;
        println!("  failover to {next} took {:?}", cut_at.elapsed());
        (leader, fence) = (next, next_fence);
        terms.push((leader, fence));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    server.force_close();

    let state = register.state.lock().unwrap();
    let (writes, rejected) = (&state.accepted, state.rejected);
    let increasing = terms.windows(2).all(|w| w[0].1 < w[1].1);
    let monotonic_writes = writes.windows(2).all(|w| w[0].1 <= w[1].1);
    println!();
    println!(
        "terms: {}",
        terms
            .iter()
            .map(|(n, f)| format!("{n} (fence {f})"))
            .collect::<Vec<_>>()
            .join(" → ")
    );
    println!("fences strictly increase across terms: {increasing}");
    println!(
        "register: {} writes accepted, {rejected} stale writes rejected, accepted fences never decrease: {monotonic_writes}",
        writes.len()
    );
    println!("finished in {:?}", started.elapsed());
    if !(increasing && monotonic_writes && terms.len() == 3) {
        return Err("quickstart invariant violated".into());
    }
    Ok(())
}
