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
use std::sync::Arc;
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
    /// Seconds per measurement (fractions allowed: many short rounds
    /// resist a noisy machine better than a few long ones).
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    seconds: Duration,
    /// `hold`: how many leases.
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// `hold`: lease length in seconds.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Process id of the server (on this machine), to report its CPU and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// With both `baseline` and `uncontended`: how many alternating rounds
    /// per worker count (each `--seconds` long); the ratio shown is the
    /// median of the rounds' ratios.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Threads of the load generator's runtime, the same for the baseline
    /// and the server [default: one per core].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    client_threads: Option<u16>,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// `--seconds`: a positive number of seconds, at least a millisecond.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(0.001..=1e9).contains(&seconds) {
        return Err(format!("`{text}`: between 0.001 and 1e9 seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// How each measurement drives its server: for how long, under which
/// run's key names, and on how many load-generator threads.
#[derive(Debug, Clone, Copy)]
struct Load {
    duration: Duration,
    /// Part of every key, so runs do not share keys.
    run_id: u32,
    /// `--client-threads`; `None` is one per core.
    client_threads: Option<u16>,
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
    samples: &[Sample],
) -> Summary {
    let ops: u64 = samples.iter().map(|s| s.ops).sum();
    let mut lat: Vec<u32> = samples
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
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
    if std::env::var_os("DFLOCK_BENCH_DEBUG").is_some() {
        eprintln!(
            "{workload} {workers}: p50 {} p75 {} p90 {} p95 {} p98 {} p99 {} p99.5 {} p99.9 {}",
            pct(0.5),
            pct(0.75),
            pct(0.9),
            pct(0.95),
            pct(0.98),
            pct(0.99),
            pct(0.995),
            pct(0.999)
        );
    }
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
    if connection.is_cluster() {
        eprintln!("dflock: bench measures one server: name its leader with --servers");
        return exit::USAGE;
    }
    let addrs = match connection.addrs() {
        Ok(addrs) => addrs,
        Err(error) => {
            eprintln!("dflock: {error}");
            return exit::USAGE;
        }
    };
    let target = format!("{}:{}", addrs[0].host(), addrs[0].port());
    let load = Load {
        duration: args.seconds,
        run_id: std::process::id(),
        client_threads: args.client_threads,
    };
    let rounds = args.rounds.max(1);
    if !args.json {
        println!(
            "{:<12} {:>7} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "workload",
            "workers",
            "ops/s",
            "mean µs",
            "p50 µs",
            "p99 µs",
            "max µs",
            "vs base",
            "p99 vs"
        );
    }
    let wants = |w: Workload| args.workloads.contains(&w);
    let mut baseline_child = None;
    let baseline_addr = if wants(Workload::Baseline) {
        match start_baseline().await {
            Ok((child, addr)) => {
                baseline_child = Some(child);
                Some(addr)
            }
            Err(error) => {
                eprintln!("dflock: cannot start the baseline server: {error}");
                return exit::UNAVAILABLE;
            }
        }
    } else {
        None
    };
    let code = run_workloads(
        &args,
        connection,
        &target,
        baseline_addr.as_deref(),
        load,
        rounds,
    )
    .await;
    if let Some(mut child) = baseline_child.take() {
        let _ = child.kill().await;
    }
    code
}

/// Runs the workloads in order. When both `baseline` and `uncontended` are
/// asked for, they run as pairs: for each worker count, `rounds` rounds that
/// alternate the two (baseline first in even rounds, ours first in odd
/// ones), so each ratio compares measurements taken seconds apart on the same
/// machine state; the reported ratio is the median of the per-round ratios.
async fn run_workloads(
    args: &BenchArgs,
    connection: &ConnectionArgs,
    target: &str,
    baseline_addr: Option<&str>,
    load: Load,
    rounds: u32,
) -> u8 {
    let paired = args.workloads.contains(&Workload::Baseline)
        && args.workloads.contains(&Workload::Uncontended);
    for workload in &args.workloads {
        match workload {
            Workload::Hold => {
                if let Err(error) = hold(connection, args).await {
                    eprintln!("dflock: hold: {error}");
                    return exit::UNAVAILABLE;
                }
            }
            // Measured together with `baseline`.
            Workload::Uncontended if paired => {}
            Workload::Baseline if paired => {
                let base = baseline_addr.unwrap_or_default();
                for &workers in &args.workers {
                    match paired_rounds(base, target, workers, load, rounds).await {
                        Ok((baseline, ours, ratios)) => {
                            print_row(args.json, &baseline, None, rounds);
                            print_row(args.json, &ours, Some(&ratios), rounds);
                        }
                        Err(error) => {
                            eprintln!("dflock: uncontended with {workers} workers: {error}");
                            return exit::UNAVAILABLE;
                        }
                    }
                }
            }
            Workload::Baseline | Workload::Uncontended | Workload::Contended => {
                let addr = if *workload == Workload::Baseline {
                    baseline_addr.unwrap_or_default()
                } else {
                    target
                };
                for &workers in &args.workers {
                    let result = if *workload == Workload::Contended {
                        contended(addr, workers, load).await
                    } else {
                        uncontended(addr, workers, load).await
                    };
                    match result {
                        Ok((elapsed, samples)) => {
                            let s = summarize(workload_name(*workload), workers, elapsed, &samples);
                            print_row(args.json, &s, None, 1);
                        }
                        Err(error) => {
                            eprintln!("dflock: {workload:?} with {workers} workers: {error}");
                            return exit::UNAVAILABLE;
                        }
                    }
                }
            }
        }
    }
    0
}

fn workload_name(workload: Workload) -> &'static str {
    match workload {
        Workload::Uncontended => "uncontended",
        Workload::Contended => "contended",
        Workload::Baseline => "baseline",
        Workload::Hold => "hold",
    }
}

/// Ours against the baseline, round by round.
struct Ratios {
    ops: Vec<f64>,
    p99: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

async fn paired_rounds(
    base: &str,
    target: &str,
    workers: usize,
    load: Load,
    rounds: u32,
) -> std::io::Result<(Summary, Summary, Ratios)> {
    let mut all = [(Duration::ZERO, Vec::new()), (Duration::ZERO, Vec::new())];
    let mut ratios = Ratios {
        ops: Vec::new(),
        p99: Vec::new(),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [None, None];
        for side in order {
            let addr = if side == 0 { base } else { target };
            let (elapsed, samples) = uncontended(addr, workers, load).await?;
            let summary = summarize("", workers, elapsed, &samples);
            this[side] = Some((summary.ops_per_s, summary.p99_us));
            all[side].0 += elapsed;
            all[side].1.extend(samples);
        }
        if let [Some((b_ops, b_p99)), Some((o_ops, o_p99))] = this {
            ratios.ops.push(o_ops / b_ops.max(f64::MIN_POSITIVE));
            ratios.p99.push(f64::from(o_p99) / f64::from(b_p99.max(1)));
        }
    }
    let [(b_elapsed, b_samples), (o_elapsed, o_samples)] = all;
    Ok((
        summarize("baseline", workers, b_elapsed, &b_samples),
        summarize("uncontended", workers, o_elapsed, &o_samples),
        ratios,
    ))
}

fn print_row(json: bool, s: &Summary, ratios: Option<&Ratios>, rounds: u32) {
    let ops_ratio = ratios.map(|r| median(&r.ops));
    let p99_ratio = ratios.map(|r| median(&r.p99));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "workload": s.workload, "workers": s.workers, "ops_per_s": s.ops_per_s,
                "mean_us": s.mean_us, "p50_us": s.p50_us, "p99_us": s.p99_us, "max_us": s.max_us,
                "rounds": rounds,
                "ops_vs_baseline": ops_ratio, "p99_vs_baseline": p99_ratio,
                "ops_vs_baseline_rounds": ratios.map(|r| r.ops.clone()),
                "p99_vs_baseline_rounds": ratios.map(|r| r.p99.clone()),
            })
        );
    } else {
        let vs = ops_ratio.map_or("-".to_string(), |r| format!("{:.0}%", r * 100.0));
        let p99 = p99_ratio.map_or("-".to_string(), |r| format!("{r:.2}x"));
        println!(
            "{:<12} {:>7} {:>12.0} {:>10.1} {:>9} {:>9} {:>9} {:>10} {:>10}",
            s.workload, s.workers, s.ops_per_s, s.mean_us, s.p50_us, s.p99_us, s.max_us, vs, p99
        );
    }
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

/// Each worker takes its own key, `l key 10` then `r`: one op is both
/// requests (the Go dflockd bench's workload).
async fn uncontended(
    addr: &str,
    workers: usize,
    load: Load,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    let key = move |w: usize| format!("bench-{}-{w}", load.run_id);
    drive(addr, workers, load, key, Handoff::No).await
}

/// All workers hand one key to each other; an op is one grant (its
/// acquire's latency), a `timeout` is retried.
async fn contended(
    addr: &str,
    workers: usize,
    load: Load,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    let key = move |_| format!("bench-{}-contended", load.run_id);
    drive(addr, workers, load, key, Handoff::Yes).await
}

/// Whether workers share a key and queue for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// A key per worker: an op is acquire + release, the release must be `ok`.
    No,
    /// One key: an op is a grant, timed from its acquire; `timeout` retries.
    Yes,
}

/// Runs `workers` workers, one persistent connection each, until
/// `load.duration` has passed; worker `w` locks `key(w)`.
///
/// The workers run on a runtime of their own (`--client-threads`), on its
/// own OS threads, so the load generator's shape is the same whatever the
/// rest of `dflock` runs on.
async fn drive(
    addr: &str,
    workers: usize,
    load: Load,
    key: impl Fn(usize) -> String,
    handoff: Handoff,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    let threads = load.client_threads.map(usize::from);
    let duration = load.duration;
    let keys: Vec<String> = (0..workers).map(key).collect();
    let addr = addr.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || {
            let runtime = match threads {
                Some(1) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                Some(threads) => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build(),
                None => tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build(),
            };
            let result =
                runtime.and_then(|rt| rt.block_on(drive_workers(addr, keys, duration, handoff)));
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the load generator's thread panicked"))?
}

async fn drive_workers(
    addr: String,
    keys: Vec<String>,
    duration: Duration,
    handoff: Handoff,
) -> std::io::Result<(Duration, Vec<Sample>)> {
    // The clock starts once every worker is connected: connection set-up
    // is not part of any workload.
    let ready = Arc::new(tokio::sync::Barrier::new(keys.len() + 1));
    let mut tasks = Vec::new();
    for key in keys {
        let addr = addr.clone();
        let ready = Arc::clone(&ready);
        tasks.push(tokio::spawn(async move {
            let connected = connect(&addr).await;
            ready.wait().await;
            let (mut read, mut write) = connected?;
            let deadline = Instant::now() + duration;
            let acquire = format!("l\n{key}\n10\n").into_bytes();
            let mut release = Vec::with_capacity(64);
            let mut line = String::with_capacity(64);
            let mut sample = Sample::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                write.write_all(&acquire).await?;
                line.clear();
                read.read_line(&mut line).await?;
                if handoff == Handoff::Yes && line == "timeout\n" {
                    continue;
                }
                let Some(token) = grant_token(&line) else {
                    return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
                };
                if handoff == Handoff::Yes {
                    sample.latencies_us.push(elapsed_us(t0));
                    sample.ops += 1;
                }
                release.clear();
                release.extend_from_slice(b"r\n");
                release.extend_from_slice(key.as_bytes());
                release.push(b'\n');
                release.extend_from_slice(token.as_bytes());
                release.push(b'\n');
                write.write_all(&release).await?;
                line.clear();
                read.read_line(&mut line).await?;
                if handoff == Handoff::No {
                    if line != "ok\n" {
                        return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
                    }
                    sample.ops += 1;
                    sample.latencies_us.push(elapsed_us(t0));
                }
            }
            Ok::<_, std::io::Error>(sample)
        }));
    }
    ready.wait().await;
    let start = Instant::now();
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
    tokio::time::sleep(args.seconds).await;
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
