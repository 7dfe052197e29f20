//! `dflock bench`: throughput and latency of a dflockd server, read against a
//! zero-work baseline measured in the same run with the same client.
//!
//! Workloads:
//! * `uncontended` — N workers, one connection each, each op `l <own key> 10`
//!   then `r` (the Go dflockd bench's workload);
//! * `contended` — N workers hand one key to each other (`l k 10`, `r`);
//! * `hold` — one client holds `--leases` leases for `--seconds` (renewing);
//! * `baseline` — the uncontended workload against a trivial server that
//!   answers every frame with a canned reply: the ceiling any server can
//!   reach on this machine with this client.

use std::process::Stdio;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::{ConnectionArgs, exit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Uncontended,
    Contended,
    Hold,
    Baseline,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Workloads to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,uncontended,contended"
    )]
    workloads: Vec<Workload>,
    /// Worker counts to run each workload at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    workers: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// `hold`: how many leases.
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// `hold`: lease length in seconds.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Process id of the server (on this machine), to report its CPU and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default)]
struct Sample {
    ops: u64,
    latencies_us: Vec<u32>,
}

struct Summary {
    workload: &'static str,
    workers: usize,
    ops_per_s: f64,
    mean_us: f64,
    p50_us: u32,
    p99_us: u32,
    max_us: u32,
}

fn summarize(
    workload: &'static str,
    workers: usize,
    elapsed: Duration,
    samples: Vec<Sample>,
) -> Summary {
    let ops: u64 = samples.iter().map(|s| s.ops).sum();
    let mut lat: Vec<u32> = samples.into_iter().flat_map(|s| s.latencies_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&l| f64::from(l)).sum::<f64>() / lat.len() as f64
    };
    Summary {
        workload,
        workers,
        ops_per_s: ops as f64 / elapsed.as_secs_f64(),
        mean_us: mean,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: lat.last().copied().unwrap_or(0),
    }
}

pub async fn bench(connection: &ConnectionArgs, args: BenchArgs) -> u8 {
    let addrs = match connection.addrs() {
        Ok(addrs) => addrs,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    let target = format!("{}:{}", addrs[0].host(), addrs[0].port());
    let run_id = std::process::id();
    let duration = Duration::from_secs(args.seconds.max(1));
    let mut baselines: Vec<(usize, f64, u32)> = Vec::new();
    let mut baseline_child = None;
    if !args.json {
        println!(
            "{:<12} {:>7} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10}",
            "workload", "workers", "ops/s", "mean µs", "p50 µs", "p99 µs", "max µs", "vs base"
        );
    }
    for workload in &args.workloads {
        if *workload == Workload::Hold {
            if let Err(error) = hold(connection, &args).await {
                eprintln!("dflock: hold: {error}");
                return exit::UNAVAILABLE;
            }
            continue;
        }
        let addr = if *workload == Workload::Baseline {
            match start_baseline().await {
                Ok((child, addr)) => {
                    baseline_child = Some(child);
                    addr
                }
                Err(error) => {
                    eprintln!("dflock: cannot start the baseline server: {error}");
                    return exit::UNAVAILABLE;
                }
            }
        } else {
            target.clone()
        };
        for &workers in &args.workers {
            let result = match workload {
                Workload::Uncontended | Workload::Baseline => {
                    uncontended(&addr, workers, duration, run_id).await
                }
                Workload::Contended => contended(&addr, workers, duration, run_id).await,
                Workload::Hold => unreachable!(),
            };
            let (elapsed, samples) = match result {
                Ok(r) => r,
                Err(error) => {
                    eprintln!("dflock: {workload:?} with {workers} workers: {error}");
                    return exit::UNAVAILABLE;
                }
            };
            let name = match workload {
                Workload::Uncontended => "uncontended",
                Workload::Contended => "contended",
                Workload::Baseline => "baseline",
                Workload::Hold => "hold",
            };
            let s = summarize(name, workers, elapsed, samples);
            if *workload == Workload::Baseline {
                baselines.push((workers, s.ops_per_s, s.p99_us));
            }
            let base = baselines
                .iter()
                .find(|b| b.0 == workers && *workload == Workload::Uncontended);
            let ratio = base.map(|b| s.ops_per_s / b.1);
            let p99_ratio = base.map(|b| f64::from(s.p99_us) / f64::from(b.2.max(1)));
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "workload": s.workload, "workers": s.workers, "ops_per_s": s.ops_per_s,
                        "mean_us": s.mean_us, "p50_us": s.p50_us, "p99_us": s.p99_us, "max_us": s.max_us,
                        "ops_vs_baseline": ratio, "p99_vs_baseline": p99_ratio,
                    })
                );
            } else {
                let vs = ratio.map_or("-".to_string(), |r| format!("{:.0}%", r * 100.0));
                println!(
                    "{:<12} {:>7} {:>12.0} {:>10.1} {:>9} {:>9} {:>9} {:>10}",
                    s.workload, s.workers, s.ops_per_s, s.mean_us, s.p50_us, s.p99_us, s.max_us, vs
                );
            }
        }
        if let Some(mut child) = baseline_child.take() {
            let _ = child.kill().await;
        }
    }
    0
}

async fn connect(
    addr: &str,
) -> std::io::Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    Ok((BufReader::new(r), w))
}

/// The token of an `ok <token> <lease>` reply.
fn grant_token(line: &str) -> Option<&str> {
    line.strip_prefix("ok ")
        .and_then(|r| r.split(' ').next())
        .filter(|t| t.len() == 32)
}

fn elapsed_us(t0: Instant) -> u32 {
    u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX)
}

async fn uncontended(
    addr: &str,
    workers: usize,
    duration: Duration,
    run_id: u32,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut read, mut write) = connect(&addr).await?;
            let key = format!("bench-{run_id}-{w}");
            let acquire = format!("l\n{key}\n10\n").into_bytes();
            let mut release = Vec::with_capacity(64);
            let mut line = String::with_capacity(64);
            let mut sample = Sample::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                write.write_all(&acquire).await?;
                line.clear();
                read.read_line(&mut line).await?;
                let Some(token) = grant_token(&line) else {
                    return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
                };
                release.clear();
                release.extend_from_slice(b"r\n");
                release.extend_from_slice(key.as_bytes());
                release.push(b'\n');
                release.extend_from_slice(token.as_bytes());
                release.push(b'\n');
                write.write_all(&release).await?;
                line.clear();
                read.read_line(&mut line).await?;
                if line != "ok\n" {
                    return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
                }
                sample.ops += 1;
                sample.latencies_us.push(elapsed_us(t0));
            }
            Ok::<_, std::io::Error>(sample)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await.map_err(std::io::Error::other)??);
    }
    Ok((start.elapsed(), samples))
}

async fn contended(
    addr: &str,
    workers: usize,
    duration: Duration,
    run_id: u32,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    let start = Instant::now();
    let deadline = start + duration;
    let key = format!("bench-{run_id}-contended");
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let addr = addr.to_owned();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (mut read, mut write) = connect(&addr).await?;
            let acquire = format!("l\n{key}\n10\n").into_bytes();
            let mut line = String::with_capacity(64);
            let mut sample = Sample::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                write.write_all(&acquire).await?;
                line.clear();
                read.read_line(&mut line).await?;
                if line == "timeout\n" {
                    continue;
                }
                let Some(token) = grant_token(&line) else {
                    return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
                };
                sample.latencies_us.push(elapsed_us(t0));
                sample.ops += 1;
                write
                    .write_all(format!("r\n{key}\n{token}\n").as_bytes())
                    .await?;
                line.clear();
                read.read_line(&mut line).await?;
            }
            Ok::<_, std::io::Error>(sample)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await.map_err(std::io::Error::other)??);
    }
    Ok((start.elapsed(), samples))
}

async fn hold(connection: &ConnectionArgs, args: &BenchArgs) -> Result<(), String> {
    let client = connection.client()?;
    let ttl = Duration::from_secs(args.lease_ttl);
    let started = Instant::now();
    let mut leases = Vec::with_capacity(args.leases);
    let run_id = std::process::id();
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while leases.len() < args.leases {
        while pending.len() < 256 && next < args.leases {
            let lock = client
                .lock(&format!("hold-{run_id}-{next}"))
                .map_err(|e| e.to_string())?
                .with_lease(ttl);
            pending.spawn(async move { lock.try_acquire().await });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(Some(lease)))) => leases.push(lease),
            Some(Ok(Ok(None))) => return Err("a hold key was busy".into()),
            Some(Ok(Err(error))) => return Err(error.to_string()),
            Some(Err(error)) => return Err(error.to_string()),
            None => break,
        }
    }
    let acquired_in = started.elapsed();
    let cpu0 = args.server_pid.and_then(proc_cpu);
    let renew0 = client.renewals_sent();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let held_for = t0.elapsed();
    let renews = client.renewals_sent() - renew0;
    let lost = leases.iter().filter(|l| l.is_lost()).count();
    let server_cpu = match (cpu0, args.server_pid.and_then(proc_cpu)) {
        (Some(a), Some(b)) => Some((b - a) / held_for.as_secs_f64() * 100.0),
        _ => None,
    };
    let server_rss = args.server_pid.and_then(proc_rss_mb);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "hold", "leases": leases.len(), "ttl_s": args.lease_ttl, "seconds": held_for.as_secs_f64(),
                "acquire_all_s": acquired_in.as_secs_f64(), "renews_per_s": renews as f64 / held_for.as_secs_f64(),
                "lost": lost, "server_cpu_pct": server_cpu, "server_rss_mb": server_rss,
            })
        );
    } else {
        println!(
            "hold: {} leases (ttl {}s) acquired in {:.2}s, held {:.0}s: {:.0} renews/s, {lost} lost, server CPU {}, server RSS {}",
            leases.len(),
            args.lease_ttl,
            acquired_in.as_secs_f64(),
            held_for.as_secs_f64(),
            renews as f64 / held_for.as_secs_f64(),
            server_cpu.map_or("n/a".into(), |c| format!("{c:.1}% of a core")),
            server_rss.map_or("n/a".into(), |r| format!("{r:.1} MB")),
        );
    }
    for lease in leases {
        let _ = lease.release().await;
    }
    Ok(())
}

/// CPU seconds (user + system) of a process.
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn proc_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

async fn start_baseline() -> std::io::Result<(tokio::process::Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["baseline-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| std::io::Error::other("baseline server did not start"))??
        .ok_or_else(|| std::io::Error::other("baseline server exited"))?;
    let addr = line
        .strip_prefix("listening ")
        .ok_or_else(|| std::io::Error::other(line.clone()))?
        .to_owned();
    Ok((child, addr))
}

/// The zero-work server: every complete three-line frame gets a canned
/// reply (`ok <token> 33` for `l`, `ok` otherwise), replies of one read
/// coalesced into one write.
pub async fn baseline_server(listen: &str) -> u8 {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::UNAVAILABLE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("listening {addr}"),
        Err(_) => return exit::UNAVAILABLE,
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut out = Vec::with_capacity(16 * 1024);
            let (mut lines, mut first_is_l, mut at_line_start) = (0u32, false, true);
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                out.clear();
                for &b in &buf[..n] {
                    if at_line_start && lines == 0 {
                        first_is_l = b == b'l';
                    }
                    at_line_start = b == b'\n';
                    if b == b'\n' {
                        lines += 1;
                        if lines == 3 {
                            lines = 0;
                            out.extend_from_slice(if first_is_l {
                                b"ok 0123456789abcdef0123456789abcdef 33\n".as_slice()
                            } else {
                                b"ok\n".as_slice()
                            });
                        }
                    }
                }
                if !out.is_empty() && stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}
