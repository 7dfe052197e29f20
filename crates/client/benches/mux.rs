//! Multiplexed-connection benchmark (not a test): what one connection per
//! server carries when the server speaks the mux extension.
//!
//! ```text
//! cargo build --release -p dflockd-server
//! cargo bench -p dflockd-client --bench mux -- [WAITERS] [SECS] [TASKS]
//! ```
//!
//! Defaults: 10,000 waiters, 5 s per throughput run, 1,000 tasks. The server
//! is the real `dflockd` binary in a separate process (`$DFLOCKD_BIN`, else
//! `target/release/dflockd`).
//!
//! 1. **FIFO**: one holder takes a key; WAITERS two-phase tickets of one
//!    `Client` queue on it (one after another, so the queue order is known),
//!    then all wait at once, in reverse order; the holder lets go and every
//!    grantee releases at once. Checks the grants come in exact enqueue
//!    order with growing fences, all through one connection (the server's
//!    `connections` count).
//! 2. **Throughput**: uncontended `acquire` + `release` on a key per task,
//!    first from one task (each op waits for the one before: unpipelined),
//!    then from TASKS concurrent tasks sharing the client's one connection.
//!    Reports ops/s and the ratio (target ≥ 5×).
//!
//! Prints one line per result and a JSON line at the end. Exits non-zero if
//! the FIFO check fails.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dflockd_client::{Client, Enqueue};

mod common;
use common::{ServerProcess, machine, server_binary};

struct Config {
    waiters: usize,
    secs: u64,
    tasks: usize,
}

fn config() -> Result<Config, String> {
    let positional: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let pick = |index: usize, default: u64| -> Result<u64, String> {
        match positional.get(index) {
            Some(raw) => raw
                .replace('_', "")
                .parse()
                .map_err(|_| format!("bad argument {raw:?}")),
            None => Ok(default),
        }
    };
    let cfg = Config {
        waiters: pick(0, 10_000)? as usize,
        secs: pick(1, 5)?,
        tasks: pick(2, 1_000)? as usize,
    };
    if cfg.waiters == 0 || cfg.secs == 0 || cfg.tasks == 0 {
        return Err("all arguments must be > 0".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let cfg = match config() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!(
                "mux: {e}\nusage: cargo bench -p dflockd-client --bench mux -- [WAITERS] [SECS] [TASKS]"
            );
            return ExitCode::from(2);
        }
    };
    let bin = server_binary();
    if !bin.exists() {
        eprintln!(
            "mux: server binary {} not found; build it with `cargo build --release -p dflockd-server` or set DFLOCKD_BIN",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let server = match ServerProcess::start(&bin, cfg.tasks + 1024) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("mux: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(&cfg, server.port));
    drop(server);
    runtime.shutdown_background();
    code
}

async fn run(cfg: &Config, port: u16) -> ExitCode {
    println!("machine: {}", machine());
    let client = match Client::builder()
        .server(dflockd_client::ServerAddr::new("127.0.0.1", port).expect("address"))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("mux: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.multiplexed(0).await {
        Ok(true) => println!("connection: multiplexed"),
        Ok(false) => println!("connection: plain (the server refused the mux extension)"),
        Err(e) => {
            eprintln!("mux: cannot connect: {e}");
            return ExitCode::FAILURE;
        }
    }
    let fifo = match fifo(&client, cfg.waiters).await {
        Ok(fifo) => fifo,
        Err(e) => {
            eprintln!("mux: FIFO run failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "fifo: {} waiters on one key, {} connection(s); enqueued in {:.2} s, all granted in order in {:.2} s; in order: {}; fences increasing: {}",
        cfg.waiters,
        fifo.connections,
        fifo.enqueue_secs,
        fifo.drain_secs,
        fifo.in_order,
        fifo.fences_increasing
    );
    let secs = Duration::from_secs(cfg.secs);
    let single = throughput(&client, 1, secs).await;
    println!("uncontended, 1 task (unpipelined): {single:.0} ops/s");
    let many = throughput(&client, cfg.tasks, secs).await;
    let connections = client.stats(0).await.map_or(0, |s| s.connections);
    println!(
        "uncontended, {} tasks, {} connection(s): {many:.0} ops/s",
        cfg.tasks, connections
    );
    let ratio = many / single.max(1.0);
    println!("ratio: {ratio:.1}x (target >= 5x)");
    println!(
        "{{\"waiters\":{},\"fifo_in_order\":{},\"fifo_fences_increasing\":{},\"fifo_connections\":{},\"fifo_drain_s\":{:.3},\"single_ops_s\":{single:.0},\"tasks\":{},\"many_ops_s\":{many:.0},\"many_connections\":{connections},\"ratio\":{ratio:.2}}}",
        cfg.waiters,
        fifo.in_order,
        fifo.fences_increasing,
        fifo.connections,
        fifo.drain_secs,
        cfg.tasks
    );
    if fifo.in_order && fifo.fences_increasing {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct Fifo {
    connections: u64,
    enqueue_secs: f64,
    drain_secs: f64,
    in_order: bool,
    fences_increasing: bool,
}

async fn fifo(client: &Client, n: usize) -> Result<Fifo, String> {
    let key = "bench-mux-fifo";
    let lock = client.lock(key).map_err(|e| e.to_string())?;
    let holder = lock.acquire().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut tickets = Vec::with_capacity(n);
    for _ in 0..n {
        match lock.enqueue().await.map_err(|e| e.to_string())? {
            Enqueue::Queued(ticket) => tickets.push(ticket),
            Enqueue::Acquired(_) => return Err("the held key was granted".into()),
        }
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let stats = client.stats(0).await.map_err(|e| e.to_string())?;
    let order = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let tasks: Vec<_> = tickets
        .into_iter()
        .enumerate()
        .rev()
        .map(|(i, ticket)| {
            let order = Arc::clone(&order);
            tokio::spawn(async move {
                let lease = ticket.wait(Duration::from_secs(600)).await?;
                order.lock().expect("not poisoned").push((i, lease.fence()));
                lease.release().await.map(|_| ())
            })
        })
        .collect();
    // Every ticket's wait is on the wire before the holder lets go.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = client.stats(0).await.map_err(|e| e.to_string())?;
        let waiting = stats
            .locks
            .iter()
            .find(|l| l.key == key)
            .map_or(0, |l| l.waiters);
        if waiting as usize == n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {waiting} of {n} waiters queued"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = Instant::now();
    holder.release().await.map_err(|e| e.to_string())?;
    for task in tasks {
        task.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let drain_secs = released.elapsed().as_secs_f64();
    let order = order.lock().expect("not poisoned");
    Ok(Fifo {
        connections: stats.connections,
        enqueue_secs,
        drain_secs,
        in_order: order.iter().map(|(i, _)| *i).eq(0..n),
        fences_increasing: order.windows(2).all(|w| w[0].1 < w[1].1),
    })
}

/// Acquire + release ops/s of `tasks` tasks, each on a key of its own.
async fn throughput(client: &Client, tasks: usize, secs: Duration) -> f64 {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|t| {
            let (stop, ops) = (Arc::clone(&stop), Arc::clone(&ops));
            let lock = client
                .lock(&format!("bench-mux-{run}-{t}"))
                .expect("valid key");
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match lock.acquire().await {
                        Ok(lease) => {
                            if lease.release().await.is_ok() {
                                ops.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            eprintln!("acquire failed: {e}");
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let done = ops.load(Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    done as f64 / elapsed.as_secs_f64()
}
