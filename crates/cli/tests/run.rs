//! `dflock run` end to end: the real binary against an embedded server.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dflockd_client::Client;
use dflockd_server::{Server, ServerConfig, ServerHandle};

const DFLOCK: &str = env!("CARGO_BIN_EXE_dflock");

async fn server() -> ServerHandle {
    Server::start(ServerConfig::ephemeral())
        .await
        .expect("server")
}

fn dflock(server: &ServerHandle, args: &[&str]) -> Command {
    let mut cmd = Command::new(DFLOCK);
    cmd.arg("--servers")
        .arg(server.local_addr().to_string())
        .args(args);
    cmd.env_remove("DFLOCKD_SERVERS")
        .env_remove("DFLOCKD_AUTH_TOKEN")
        .env_remove("DFLOCKD_TLS_CA");
    cmd
}

async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run dflock"))
        .await
        .expect("join")
}

/// Waits (bounded) until the command under `dflock run` prints "ready".
async fn await_ready(mut stdout: std::process::ChildStdout) {
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 6];
        stdout.read_exact(&mut buf).map(|_| buf)
    });
    assert_eq!(
        &tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        b"ready\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_command_exit_status_through() {
    let server = server().await;
    let out = output(dflock(
        &server,
        &["run", "cli-status", "--", "sh", "-c", "exit 3"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = output(dflock(&server, &["run", "cli-status", "--", "true"])).await;
    assert_eq!(out.status.code(), Some(0));
    // The lock was released afterwards.
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    assert!(
        client
            .lock("cli-status")
            .unwrap()
            .try_acquire()
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposes_the_fence_to_the_command() {
    let server = server().await;
    let out = output(dflock(
        &server,
        &[
            "run",
            "cli-env",
            "--",
            "sh",
            "-c",
            "echo $DFLOCK_KEY $DFLOCK_FENCE",
        ],
    ))
    .await;
    let text = String::from_utf8(out.stdout).unwrap();
    let mut parts = text.split_whitespace();
    assert_eq!(parts.next(), Some("cli-env"));
    assert!(parts.next().unwrap().parse::<u64>().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_out_with_code_75_when_the_lock_stays_busy() {
    let server = server().await;
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    let held = client.lock("cli-busy").unwrap().acquire().await.unwrap();
    let started = Instant::now();
    let out = output(dflock(
        &server,
        &["run", "cli-busy", "--timeout", "1", "--", "true"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Semaphore slots: a full semaphore times out the same way.
    let _slot = client
        .semaphore("cli-sem", 1)
        .unwrap()
        .acquire()
        .await
        .unwrap();
    let out = output(dflock(
        &server,
        &[
            "run",
            "cli-sem",
            "--limit",
            "1",
            "--timeout",
            "0",
            "--",
            "true",
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(75));
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_sigterm_to_the_command() {
    let server = server().await;
    let mut cmd = dflock(
        &server,
        &[
            "run",
            "cli-signal",
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    await_ready(stdout).await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(
        status.code(),
        Some(42),
        "the command's trap ran and its status came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_the_command_when_the_lease_is_lost() {
    let server = server().await;
    let mut cmd = dflock(
        &server,
        &[
            "run",
            "cli-lost",
            "--lease",
            "5",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    await_ready(stdout).await;
    // The server goes away: every connection closes, the lease is lost.
    server.force_close();
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("dflock exits after the loss")
    .unwrap()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(76),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The command ignored SIGTERM, so it took SIGKILL after the grace period.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_and_stats_subcommands() {
    let server = server().await;
    let out = output(dflock(
        &server,
        &["fence", "183c7875229b00017f3c1f2b3e9a8d6e"],
    ))
    .await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "1746403200000000001"
    );
    let out = output(dflock(&server, &["fence", "nope"])).await;
    assert_eq!(out.status.code(), Some(64));
    let client = Client::builder()
        .server(server.local_addr().into())
        .build()
        .unwrap();
    let _held = client.lock("cli-stats").unwrap().acquire().await.unwrap();
    let out = output(dflock(&server, &["stats", "--json"])).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["key"] == "cli-stats")
    );
    let out = output(dflock(&server, &["stats"])).await;
    assert!(String::from_utf8(out.stdout).unwrap().contains("cli-stats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_the_leader_and_a_plain_server() {
    let dir = tempfile::tempdir().unwrap();
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = cluster_node(1, dir.path(), bind(), bind(), &[], true).await;
    elected(&node, 1).await;
    let plain = server().await;
    let servers = format!("{},{}", node.local_addr(), plain.local_addr());
    let mut cmd = Command::new(DFLOCK);
    cmd.args(["--servers", &servers, "cluster", "status"])
        .env_remove("DFLOCKD_SERVERS");
    let out = output(cmd).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let node_line = text
        .lines()
        .find(|l| l.starts_with(&node.local_addr().to_string()))
        .expect("a line for the node");
    assert!(node_line.contains("leader"), "{text}");
    assert!(text.contains("not in cluster mode"), "{text}");
}

/// A cluster node with id `id`, `peers` as (id, raft listener address,
/// client address); it forms a cluster alone if `bootstrap`.
async fn cluster_node(
    id: u64,
    dir: &std::path::Path,
    raft: std::net::TcpListener,
    client: std::net::TcpListener,
    peers: &[(u64, String, String)],
    bootstrap: bool,
) -> ServerHandle {
    let secret = dflockd_server::RaftSecret::new(vec![7; 32]).unwrap();
    let mut cluster =
        dflockd_server::ClusterConfig::new(id, dir, raft.local_addr().unwrap().to_string(), secret)
            .with_peers(
                peers
                    .iter()
                    .map(|(id, raft, client)| dflockd_server::ClusterPeer {
                        id: *id,
                        raft: raft.clone(),
                        client: client.clone(),
                    })
                    .collect(),
            );
    cluster.bootstrap = bootstrap;
    let mut config = ServerConfig::ephemeral();
    config.cluster = Some(cluster);
    let listeners = dflockd_server::Listeners {
        client: Some(client),
        raft: Some(raft),
        http: None,
    };
    Server::start_with_listeners(config, listeners)
        .await
        .expect("node")
}

/// Waits (bounded) until `node` sees node `id` lead.
async fn elected(node: &ServerHandle, id: u64) {
    node.cluster_node()
        .unwrap()
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .current_leader(id, "elected")
        .await
        .unwrap();
}

fn voters(node: &ServerHandle) -> Vec<u64> {
    let metrics = node
        .cluster_node()
        .unwrap()
        .raft()
        .metrics()
        .borrow()
        .clone();
    metrics.membership_config.voter_ids().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_add_and_remove_change_the_voters() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (raft1, raft2, client1, client2) = (bind(), bind(), bind(), bind());
    let addr = |l: &std::net::TcpListener| l.local_addr().unwrap().to_string();
    let peers = [
        (1, addr(&raft1), addr(&client1)),
        (2, addr(&raft2), addr(&client2)),
    ];
    let one = cluster_node(1, dirs[0].path(), raft1, client1, &peers[..1], true).await;
    elected(&one, 1).await;
    // Node 2 starts empty; node 1, the lowest id, is the seed: 2 waits.
    let two = cluster_node(2, dirs[1].path(), raft2, client2, &peers, false).await;
    let secret_file = dirs[0].path().join("raft-secret");
    std::fs::write(&secret_file, [b'\x07'; 32]).unwrap();
    let admin = |args: &[&str]| {
        let mut cmd = Command::new(DFLOCK);
        cmd.args(["cluster"])
            .args(args)
            .env_remove("DFLOCKD_RAFT_AUTH_TOKEN")
            .env_remove("DFLOCKD_RAFT_ADDR")
            .env_remove("DFLOCKD_RAFT_TLS_CERT")
            .env_remove("DFLOCKD_RAFT_TLS_KEY")
            .env_remove("DFLOCKD_RAFT_TLS_CA")
            .env("DFLOCKD_RAFT_AUTH_TOKEN_FILE", &secret_file);
        cmd
    };
    let node2 = format!("2={}@{}", peers[1].1, peers[1].2);
    // A wrong secret is refused; a malformed node is a usage error.
    let mut wrong = admin(&["add", &node2, "--via", &peers[0].1]);
    wrong.env("DFLOCKD_RAFT_AUTH_TOKEN", "x".repeat(32));
    let out = output(wrong).await;
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let out = output(admin(&["add", "2=nowhere", "--via", &peers[0].1])).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("id=raftHost"));
    assert_eq!(voters(&one), [1]);

    let out = output(admin(&["add", &node2, "--via", &peers[0].1])).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(voters(&one), [1, 2]);
    // Node 2 learnt the membership (and node 1's client address) from
    // the log: it redirects to the leader.
    two.cluster_node()
        .unwrap()
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .voter_ids([1, 2], "node 2 knows it votes")
        .await
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(two.local_addr())
        .await
        .unwrap();
    let redirect = {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        stream.write_all(b"l\nk\n0\n").await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await
            .unwrap();
        line
    };
    assert_eq!(redirect, format!("error_not_leader {}\n", peers[0].2));

    // Removal asked of the follower goes on to the leader.
    let out = output(admin(&["remove", "2", "--via", &peers[1].1])).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(voters(&one), [1]);
    two.shutdown().await;
    one.shutdown().await;
}

/// `--cluster`: the nodes of one cluster, a follower first; `dflock run`
/// gets the lock through the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_through_a_cluster_reaches_its_leader() {
    let cluster = dflockd_testkit::cluster::TestCluster::start(3).await;
    let (leader, _) = cluster.leader().await;
    let order = [(leader + 1) % 3, leader, (leader + 2) % 3];
    let nodes: Vec<String> = order
        .iter()
        .map(|&i| cluster.client_addrs[i].to_string())
        .collect();
    let mut cmd = Command::new(DFLOCK);
    cmd.args([
        "--cluster",
        &nodes.join(","),
        "run",
        "cli-cluster",
        "--",
        "sh",
        "-c",
    ])
    .arg("echo fence=$DFLOCK_FENCE")
    .env_remove("DFLOCKD_SERVERS")
    .env_remove("DFLOCKD_CLUSTER");
    let out = output(cmd).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("fence="), "{text}");
    // `cluster status` asks every listed node for its own view.
    let mut status = Command::new(DFLOCK);
    status
        .args(["--cluster", &nodes.join(","), "cluster", "status"])
        .env_remove("DFLOCKD_SERVERS")
        .env_remove("DFLOCKD_CLUSTER");
    let out = output(status).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for node in &nodes {
        assert!(
            text.lines().any(|l| l.starts_with(node.as_str())),
            "{node} missing: {text}"
        );
    }
    assert_eq!(text.matches(" leader ").count(), 1, "{text}");
    // bench measures one server: --cluster is refused.
    let mut bench = Command::new(DFLOCK);
    bench
        .args(["--cluster", &nodes.join(","), "bench"])
        .env_remove("DFLOCKD_SERVERS");
    assert_eq!(output(bench).await.status.code(), Some(64));
    // --servers and --cluster together are a usage error.
    let mut both = Command::new(DFLOCK);
    both.args([
        "--servers",
        &nodes[0],
        "--cluster",
        &nodes.join(","),
        "stats",
    ]);
    assert_eq!(output(both).await.status.code(), Some(64));
}
