//! `dflock run KEY -- CMD…`: hold a lock while a command runs.

use std::time::Duration;

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::{ConnectionArgs, exit};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The key to lock.
    key: String,
    /// Take a slot of a semaphore with this many slots instead of a lock.
    #[arg(long)]
    limit: Option<u32>,
    /// Lease in seconds (renewed while the command runs; default: the server's).
    #[arg(long)]
    lease: Option<u64>,
    /// Seconds to wait for the lock; 0 = try once.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// After a lease loss: seconds between SIGTERM and SIGKILL (capped at
    /// the time left on the lease).
    #[arg(long, default_value_t = 5)]
    grace: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn run(connection: &ConnectionArgs, args: RunArgs) -> u8 {
    let client = match connection.client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let acquired = match args.limit {
        None => match client.lock(&args.key) {
            Ok(mut lock) => {
                if let Some(lease) = args.lease {
                    lock = lock.with_lease(Duration::from_secs(lease));
                }
                lock.acquire_within(timeout).await
            }
            Err(error) => Err(error),
        },
        Some(limit) => match client.semaphore(&args.key, limit) {
            Ok(mut sem) => {
                if let Some(lease) = args.lease {
                    sem = sem.with_lease(Duration::from_secs(lease));
                }
                sem.acquire_within(timeout).await
            }
            Err(error) => Err(error),
        },
    };
    let lease = match acquired {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            eprintln!(
                "dflock: could not acquire {:?} within {}s",
                args.key, args.timeout
            );
            return exit::TIMEOUT;
        }
        Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::InvalidArgument(_)) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::UNAVAILABLE;
        }
    };
    // Before the command starts: a SIGINT/SIGTERM that arrived between its
    // start and the handlers would kill dflock with the default action and
    // leave the command running, orphaned and unsignalled.
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("dflock: cannot install signal handlers");
            let _ = lease.release().await;
            return exit::UNAVAILABLE;
        }
    };
    let mut child = match Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("DFLOCK_KEY", &args.key)
        .env("DFLOCK_FENCE", lease.fence().to_string())
        .env("DFLOCK_TOKEN", lease.token().to_string())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            eprintln!("dflock: cannot run {:?}: {error}", args.command[0]);
            let _ = lease.release().await;
            return 127;
        }
    };
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let forward = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill(pid, sig);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(status) => status_code(status),
                    Err(error) => {
                        eprintln!("dflock: waiting for the command failed: {error}");
                        exit::UNAVAILABLE
                    }
                };
                if let Err(error) = lease.release().await {
                    eprintln!("dflock: release failed ({error}); the lease will expire on the server");
                }
                return code;
            }
            _ = sigint.recv() => forward(Signal::SIGINT),
            _ = sigterm.recv() => forward(Signal::SIGTERM),
            _ = lease.lost() => {
                let left = lease.deadline().saturating_duration_since(Instant::now());
                let grace = Duration::from_secs(args.grace).min(left);
                eprintln!(
                    "dflock: lease on {:?} lost ({:?}); stopping the command (SIGTERM, SIGKILL after {:?})",
                    args.key,
                    lease.loss_reason(),
                    grace
                );
                forward(Signal::SIGTERM);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    forward(Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                return exit::LEASE_LOST;
            }
        }
    }
}

/// The command's exit code, or 128 + signal number if a signal ended it
/// (the shell convention).
fn status_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    }
}
