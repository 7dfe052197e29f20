//! One durable log write, two ways, on this disk: the node's log store
//! (a record appended to a segment and fdatasync'd) against a one-entry
//! redb transaction committed with an fsync (how the log was kept before):
//!
//! ```sh
//! cargo run --release -p dflockd-cluster --example log_write_bench -- 2000 5 3
//! ```
//!
//! arguments: writes per round and way, rounds (the two ways take turns),
//! writers at once (default 1; 3 is a three-node cluster's nodes sharing
//! one disk), each in a temporary directory under the current one (so on
//! its disk).
//! Each write is one entry carrying one acquire command. Prints the
//! latency of a write (p50, p90, p99) for each way, and the ratio of the
//! medians.

use std::time::Instant;

use dflockd_cluster::Storage;
use openraft::storage::RaftLogStorageExt;
use redb::TableDefinition;

#[path = "support/one_command.rs"]
mod one_command;
use one_command::one_command_entry;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");

fn percentiles(name: &str, mut micros: Vec<f64>) -> f64 {
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    println!(
        "{name:>8}: p50 {:6.1} µs  p90 {:6.1} µs  p99 {:6.1} µs  ({} writes)",
        at(0.5),
        at(0.9),
        at(0.99),
        micros.len()
    );
    at(0.5)
}

/// One writer's latencies: `per_round` writes each way per round.
fn one_writer(per_round: u64, rounds: u64) -> Result<(Vec<f64>, Vec<f64>), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(writes(per_round, rounds))
        .map_err(|e| e.to_string())
}

async fn writes(
    per_round: u64,
    rounds: u64,
) -> Result<(Vec<f64>, Vec<f64>), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in(".")?;
    let storage = Storage::open(&dir.path().join("raft.redb"))?;
    let mut log = storage.log_store();
    let db = redb::Database::create(dir.path().join("old-log.redb"))?;
    let (mut segments, mut redb) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for n in 1..=per_round {
            let entry = one_command_entry(round * per_round + n)?;
            let started = Instant::now();
            log.blocking_append([entry]).await?;
            segments.push(started.elapsed().as_secs_f64() * 1e6);
        }
        for n in 1..=per_round {
            let index = round * per_round + n;
            let bytes = postcard::to_allocvec(&one_command_entry(index)?)?;
            let started = Instant::now();
            let txn = db.begin_write()?;
            txn.open_table(LOGS)?.insert(index, bytes.as_slice())?;
            txn.commit()?;
            redb.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((segments, redb))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let per_round = args.first().copied().unwrap_or(2000);
    let rounds = args.get(1).copied().unwrap_or(5);
    let writers = args.get(2).copied().unwrap_or(1).max(1);
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| std::thread::spawn(move || one_writer(per_round, rounds)))
        .collect();
    let (mut segments, mut redb) = (Vec::new(), Vec::new());
    for thread in threads {
        let (s, r) = thread.join().map_err(|_| "a writer panicked")??;
        segments.extend(s);
        redb.extend(r);
    }
    println!(
        "{writers} writer(s) at once, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let segment = percentiles("segments", segments);
    let old = percentiles("redb", redb);
    println!("redb ÷ segments at the median: {:.2}", old / segment);
    Ok(())
}
