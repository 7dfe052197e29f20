//! How long a node's storage takes to open after a crash (every record of
//! the Raft log's segments is read and checked, and a torn last record cut
//! off):
//!
//! ```sh
//! cargo run --release -p dflockd-cluster --example crash_repair -- 20000
//! ```
//!
//! It appends that many one-command entries (a child process that aborts
//! without closing its files), then times opening the storage, once after
//! the crash and once more after a clean close.

use std::time::Instant;

use dflockd_cluster::Storage;
use openraft::storage::RaftLogStorageExt;

#[path = "support/one_command.rs"]
mod one_command;
use one_command::one_command_entry;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, path, count] = args.as_slice()
        && mode == "write"
    {
        let storage = Storage::open(std::path::Path::new(path))?;
        let mut log = storage.log_store();
        let count: u64 = count.parse()?;
        for index in 1..=count {
            let entry = one_command_entry(index)?;
            log.blocking_append([entry]).await?;
        }
        // A crash: the file is never closed.
        std::process::abort();
    }
    let count = args.get(1).map(String::as_str).unwrap_or("20000");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raft.redb");
    let status = std::process::Command::new(&args[0])
        .args(["write", &path.display().to_string(), count])
        .status()?;
    println!("writer ended: {status} (aborted on purpose)");
    let size: u64 = std::fs::read_dir(dir.path().join("raft.wal"))?
        .map(|item| item.and_then(|item| item.metadata()).map(|m| m.len()))
        .sum::<Result<u64, _>>()?
        + std::fs::metadata(&path)?.len();
    let started = Instant::now();
    let storage = Storage::open(&path)?;
    println!(
        "{count} entries, {:.1} MB: opened after the crash in {:.1} ms",
        size as f64 / 1e6,
        started.elapsed().as_secs_f64() * 1e3
    );
    drop(storage);
    let started = Instant::now();
    let _storage = Storage::open(&path)?;
    println!(
        "opened after a clean close in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
