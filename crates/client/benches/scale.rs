//! Client scale benchmark (not a test): one `Client` holding N leases on one
//! server for a while, measuring what it costs.
//!
//! ```text
//! cargo build --release -p dflockd-server
//! cargo bench -p dflockd-client --bench scale -- 10000 60
//! cargo bench -p dflockd-client --bench scale -- 100000 60
//! ```
//!
//! Arguments (positional, after `--`): N leases (default 10 000) and hold
//! seconds (default 60); or the environment variables `DFLOCKD_SCALE_N` and
//! `DFLOCKD_SCALE_SECS`. The lease TTL is 10 s (`DFLOCKD_SCALE_TTL` to
//! change it). The server is the real `dflockd` binary, started as a
//! separate process: `$DFLOCKD_BIN`, else `target/release/dflockd`.
//!
//! Phases: acquire N distinct keys with `try_acquire` (uncontended, 512 in
//! flight), then hold them. Every second of the hold it samples this
//! process's RSS and CPU time, the client's established TCP connections to
//! the server port (from `/proc/net/tcp`, restricted to this process's
//! socket inodes), the leases known lost, and `Client::renewals_sent()`.
//! CPU is reported as the average share of one core over the hold window
//! only; acquisition is reported separately.
//!
//! Targets (from the issue): ≤ 2 connections per server, 0 leases lost,
//! ≤ 64 MB RSS, ≤ 10 % of one core. The exit status is non-zero if any lease
//! was lost; the other targets are reported (`targets_met` in the JSON
//! line) but do not fail the run.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dflockd_client::{Client, Lease};

mod common;
use common::{ServerProcess, machine, server_binary};

const CONCURRENCY: usize = 512;
const TARGET_CONNS: usize = 2;
const TARGET_RSS_KB: u64 = 64 * 1024;
const TARGET_CPU_PCT: f64 = 10.0;

struct Config {
    n: usize,
    secs: u64,
    ttl: Duration,
}

fn config() -> Result<Config, String> {
    // cargo bench passes `--bench`; other flags are ignored too.
    let positional: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let pick = |index: usize, env: &str, default: u64| -> Result<u64, String> {
        let raw = positional
            .get(index)
            .cloned()
            .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()));
        match raw {
            Some(raw) => raw
                .replace('_', "")
                .parse()
                .map_err(|_| format!("bad value {raw:?} for {env}")),
            None => Ok(default),
        }
    };
    let n = pick(0, "DFLOCKD_SCALE_N", 10_000)? as usize;
    let secs = pick(1, "DFLOCKD_SCALE_SECS", 60)?;
    let ttl = std::env::var("DFLOCKD_SCALE_TTL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10u64);
    if n == 0 || secs == 0 || ttl == 0 {
        return Err("N, seconds and TTL must be > 0".into());
    }
    Ok(Config {
        n,
        secs,
        ttl: Duration::from_secs(ttl),
    })
}

// ---- /proc readers -------------------------------------------------------

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / ticks
}

/// CPU time of the calling thread, in seconds (nanosecond precision, from
/// the scheduler's accounting).
fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

/// (VmRSS, VmHWM) in kB.
fn rss_kb(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, std::iter::Iterator::count)
}

/// Established TCP connections of this process whose remote port is `port`.
fn connections_to(port: u16) -> usize {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if let Some(ino) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(ino.to_owned());
                }
            }
        }
    }
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let remote_port = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let established = f[3] == "01";
            if established && remote_port == Some(port) && inodes.contains(f[9]) {
                count += 1;
            }
        }
    }
    count
}

/// The server's own view, over a raw connection of the bench's own (opened
/// only after the last sample, so it is not counted above).
fn server_stats(port: u16) -> Result<(u64, usize), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&dflockd_proto::Request::Stats.encode_to_vec())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let json = line
        .trim_end()
        .strip_prefix("ok ")
        .ok_or_else(|| format!("unexpected stats reply: {line:.80}"))?;
    let stats: dflockd_proto::Stats = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok((stats.connections, stats.locks.len()))
}

// ---- the run -------------------------------------------------------------

struct Sample {
    t: f64,
    rss_kb: u64,
    cpu_pct: f64,
    renews_per_s: f64,
    conns: usize,
    lost: usize,
}

async fn acquire_all(client: &Client, n: usize, ttl: Duration) -> Result<Vec<Lease>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    // One preallocated vector for every guard, so the bench itself does not
    // inflate the RSS it measures with per-worker vectors.
    let held = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY.min(n) {
        let client = client.clone();
        let next = Arc::clone(&next);
        let held = Arc::clone(&held);
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(());
                }
                let key = format!("scale/{i}");
                let lock = client
                    .lock(&key)
                    .map_err(|e| e.to_string())?
                    .with_lease(ttl);
                match lock.try_acquire().await {
                    Ok(Some(lease)) => held.lock().expect("not poisoned").push(lease),
                    Ok(None) => return Err(format!("{key} was busy")),
                    Err(e) => return Err(format!("{key}: {e}")),
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    let leases = std::mem::take(&mut *held.lock().expect("not poisoned"));
    Ok(leases)
}

fn main() -> ExitCode {
    let cfg = match config() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!(
                "scale: {e}\nusage: cargo bench -p dflockd-client --bench scale -- [N] [SECS]"
            );
            return ExitCode::from(2);
        }
    };
    let bin = server_binary();
    if !bin.exists() {
        eprintln!(
            "scale: server binary {} not found.\n\
             Build it first:  cargo build --release -p dflockd-server\n\
             (or point DFLOCKD_BIN at a dflockd binary)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let server = match ServerProcess::start(&bin, cfg.n + 1024) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("scale: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(&cfg, &server));
    drop(server);
    // Do not wait for 100 000 background releases against a dead server.
    runtime.shutdown_background();
    code
}

async fn run(cfg: &Config, server: &ServerProcess) -> ExitCode {
    let ticks = clock_ticks_per_sec();
    let server_pid = server.pid().to_string();
    let port = server.port;
    println!(
        "scale: N={} ttl={}s hold={}s server={} (pid {server_pid}, port {port}) machine: {}",
        cfg.n,
        cfg.ttl.as_secs(),
        cfg.secs,
        server_binary().display(),
        machine()
    );
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let client = Client::builder()
        .server(addr)
        .build()
        .expect("client builds");

    // ---- acquire ----
    let cpu_before = cpu_seconds("self", ticks);
    let started = Instant::now();
    let leases = match acquire_all(&client, cfg.n, cfg.ttl).await {
        Ok(leases) => leases,
        Err(e) => {
            eprintln!("scale: acquisition failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let acquire_secs = started.elapsed().as_secs_f64();
    let acquire_cpu = cpu_seconds("self", ticks) - cpu_before;
    let (rss_after_acquire, _) = rss_kb("self");
    println!(
        "acquired {} leases in {:.2} s ({:.0}/s), client CPU {:.2} s, RSS {:.1} MB, {} connection(s)",
        leases.len(),
        acquire_secs,
        leases.len() as f64 / acquire_secs,
        acquire_cpu,
        rss_after_acquire as f64 / 1024.0,
        connections_to(port)
    );

    // ---- hold ----
    // Sampling runs on a thread of its own so that its CPU time (reading
    // /proc, checking every guard) can be measured exactly and reported
    // apart from the client's.
    println!(
        "{:>5} {:>9} {:>7} {:>10} {:>5} {:>5}",
        "t(s)", "RSS(MB)", "CPU%", "renews/s", "conns", "lost"
    );
    let leases = Arc::new(leases);
    let hold_start = Instant::now();
    let cpu_start = cpu_seconds("self", ticks);
    let server_cpu_start = cpu_seconds(&server_pid, ticks);
    let renews_start = client.renewals_sent();
    let sampler = {
        let (client, leases, secs) = (client.clone(), Arc::clone(&leases), cfg.secs);
        tokio::task::spawn_blocking(move || {
            sample_hold(&client, &leases, port, secs, ticks, hold_start, cpu_start)
        })
    };
    let (samples, sampler_cpu) = sampler.await.expect("sampler thread");
    let hold_secs = hold_start.elapsed().as_secs_f64();
    let cpu_total = cpu_seconds("self", ticks) - cpu_start;
    let cpu_pct_gross = 100.0 * cpu_total / hold_secs;
    let sampler_pct = 100.0 * sampler_cpu / hold_secs;
    let cpu_pct = 100.0 * (cpu_total - sampler_cpu).max(0.0) / hold_secs;
    let server_cpu_pct = 100.0 * (cpu_seconds(&server_pid, ticks) - server_cpu_start) / hold_secs;
    let renews = client.renewals_sent() - renews_start;
    let renews_per_s = renews as f64 / hold_secs;
    let (rss_end, hwm) = rss_kb("self");
    let rss_max = samples.iter().map(|s| s.rss_kb).max().unwrap_or(rss_end);
    let conns_max = samples.iter().map(|s| s.conns).max().unwrap_or(0);
    let lost = leases.iter().filter(|l| l.is_lost()).count();
    // Default renew ratio 1/3, jittered to 90–100 % of that.
    let nominal_interval = cfg.ttl.as_secs_f64() / 3.0 * 0.95;
    let expected_renews = cfg.n as f64 / nominal_interval.min(10.0);
    let threads = thread_count();
    let server_view = server_stats(port);

    let conns_ok = conns_max <= TARGET_CONNS;
    let lost_ok = lost == 0;
    let rss_ok = rss_max <= TARGET_RSS_KB;
    let cpu_ok = cpu_pct <= TARGET_CPU_PCT;
    let mark = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!(
        "---- summary: N={} ttl={}s hold={:.1}s ----",
        cfg.n,
        cfg.ttl.as_secs(),
        hold_secs
    );
    println!("time to acquire all   {acquire_secs:>10.2} s   (client CPU {acquire_cpu:.2} s)");
    println!(
        "connections (max)     {conns_max:>10}     target ≤ {TARGET_CONNS}: {}",
        mark(conns_ok)
    );
    println!(
        "renews/s (avg)        {renews_per_s:>10.0}     expected ≈ {expected_renews:.0} ({renews} sent)"
    );
    println!(
        "leases lost           {lost:>10}     target 0: {}",
        mark(lost_ok)
    );
    println!(
        "RSS max / end / HWM   {:>10.1} MB  {:.1} / {:.1} MB, target ≤ 64 MB: {}",
        rss_max as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        hwm as f64 / 1024.0,
        mark(rss_ok)
    );
    println!(
        "client CPU (hold avg) {cpu_pct:>10.1} %   of one core, target ≤ {TARGET_CPU_PCT} %: {}",
        mark(cpu_ok)
    );
    println!(
        "  process / sampler   {cpu_pct_gross:>10.1} %   / {sampler_pct:.1} % (the bench's own sampling, excluded above)"
    );
    println!("server CPU (hold avg) {server_cpu_pct:>10.1} %   (separate process, for context)");
    println!("client threads        {threads:>10}");
    match &server_view {
        Ok((conns, locks)) => println!(
            "server view           {locks:>10} locks held, {conns} connections (incl. the stats one)"
        ),
        Err(e) => println!("server view           unavailable: {e}"),
    }
    let json = serde_json::json!({
        "bench": "client_scale",
        "n": cfg.n,
        "ttl_s": cfg.ttl.as_secs(),
        "hold_s": hold_secs,
        "machine": machine(),
        "acquire_s": acquire_secs,
        "acquire_cpu_s": acquire_cpu,
        "connections_max": conns_max,
        "renews_per_s": renews_per_s,
        "renews_expected_per_s": expected_renews,
        "leases_lost": lost,
        "rss_max_mb": rss_max as f64 / 1024.0,
        "rss_hwm_mb": hwm as f64 / 1024.0,
        "cpu_pct_one_core": cpu_pct,
        "process_cpu_pct_one_core": cpu_pct_gross,
        "sampler_cpu_pct_one_core": sampler_pct,
        "server_cpu_pct_one_core": server_cpu_pct,
        "server_locks_held": server_view.as_ref().ok().map(|v| v.1),
        "targets_met": conns_ok && lost_ok && rss_ok && cpu_ok,
    });
    println!("{json}");
    drop(leases);
    if lost_ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("scale: {lost} lease(s) lost");
        ExitCode::FAILURE
    }
}

/// Samples once a second for `secs` seconds and prints a row each time.
/// Returns the samples and the CPU seconds this thread spent.
fn sample_hold(
    client: &Client,
    leases: &[Lease],
    port: u16,
    secs: u64,
    ticks: f64,
    hold_start: Instant,
    cpu_start: f64,
) -> (Vec<Sample>, f64) {
    let own_start = thread_cpu_seconds();
    let mut prev = (hold_start, cpu_start, client.renewals_sent());
    let mut samples = Vec::with_capacity(secs as usize);
    for k in 1..=secs {
        let due = hold_start + Duration::from_secs(k);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        let cpu = cpu_seconds("self", ticks);
        let renews = client.renewals_sent();
        let dt = now.duration_since(prev.0).as_secs_f64();
        let sample = Sample {
            t: now.duration_since(hold_start).as_secs_f64(),
            rss_kb: rss_kb("self").0,
            cpu_pct: 100.0 * (cpu - prev.1) / dt,
            renews_per_s: (renews - prev.2) as f64 / dt,
            conns: connections_to(port),
            lost: leases.iter().filter(|l| l.is_lost()).count(),
        };
        prev = (now, cpu, renews);
        println!(
            "{:>5.0} {:>9.1} {:>7.1} {:>10.0} {:>5} {:>5}",
            sample.t,
            sample.rss_kb as f64 / 1024.0,
            sample.cpu_pct,
            sample.renews_per_s,
            sample.conns,
            sample.lost
        );
        samples.push(sample);
    }
    (samples, thread_cpu_seconds() - own_start)
}
