//! The cluster the cluster-aware client suite runs against: three nodes in
//! this process ([`TestCluster`]) by default, or — when
//! `DFLOCKD_TEST_CLUSTER` is set — an external cluster of separate
//! processes, ours or any server with the same cluster protocol (the Go
//! cluster branch: flags, redirects, `barrier`, `stable-ref`).
//!
//! | variable | meaning |
//! |---|---|
//! | `DFLOCKD_TEST_CLUSTER` | the nodes' client addresses, `host:port,host:port,host:port` |
//! | `DFLOCKD_TEST_CLUSTER_PIDS` | optional: their process ids, in the same order |
//!
//! A test kills a node with `SIGKILL` and restarts it the way it was
//! started: the same executable, arguments, working directory and
//! environment, read from `/proc` before the kill (so Linux only). The
//! process is the one listening on the node's port (found through
//! `/proc/net/tcp*`), or the one `DFLOCKD_TEST_CLUSTER_PIDS` names. The
//! nodes must keep a closed session's holds for its next connection
//! (`--orphan-ttl 30`). External tests run one at a time (a lock held for
//! the test's whole run), since they kill shared nodes; tests that need
//! what only an in-process cluster offers (isolating a node behind its
//! Raft proxies) use [`ClusterUnderTest::local`] in both modes.
//!
//! `scripts/external-cluster-test.sh` starts three `dflockd` processes and
//! runs the suite against them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dflockd_server::ServerConfig;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::cluster::{CLUSTER_WAIT, TestCluster};
use crate::wire::{Client, REPLY_TIMEOUT};

/// A cluster for a test: in this process, or external.
pub enum ClusterUnderTest {
    /// Three nodes in this process.
    Local(TestCluster),
    /// Separate processes.
    External(ExternalCluster),
}

impl ClusterUnderTest {
    /// The external cluster if `DFLOCKD_TEST_CLUSTER` is set, else three
    /// nodes in this process configured by `tweak`.
    pub async fn start(tweak: fn(&mut ServerConfig)) -> ClusterUnderTest {
        match ExternalCluster::from_env().await {
            Some(external) => ClusterUnderTest::External(external),
            None => ClusterUnderTest::local(tweak).await,
        }
    }

    /// Three nodes in this process, whatever the environment says.
    pub async fn local(tweak: fn(&mut ServerConfig)) -> ClusterUnderTest {
        ClusterUnderTest::Local(TestCluster::start_with(3, tweak).await)
    }

    /// The nodes' client addresses.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        match self {
            ClusterUnderTest::Local(cluster) => cluster.client_addrs.clone(),
            ClusterUnderTest::External(cluster) => cluster.addrs.clone(),
        }
    }

    /// The in-process cluster, for what only it can do (isolate a node).
    pub fn local_mut(&mut self) -> Option<&mut TestCluster> {
        match self {
            ClusterUnderTest::Local(cluster) => Some(cluster),
            ClusterUnderTest::External(_) => None,
        }
    }

    /// Waits until a node leads and serves: its index and a connection on
    /// which a `barrier` was answered `ok`.
    pub async fn leader(&self) -> (usize, Client) {
        match self {
            ClusterUnderTest::Local(cluster) => cluster.leader().await,
            ClusterUnderTest::External(cluster) => cluster.leader().await,
        }
    }

    /// Kills node `i` at once.
    pub async fn kill(&mut self, i: usize) {
        match self {
            ClusterUnderTest::Local(cluster) => cluster.kill(i).await,
            ClusterUnderTest::External(cluster) => cluster.kill(i).await,
        }
    }

    /// Starts node `i` again, on its state.
    pub async fn restart(&mut self, i: usize) {
        match self {
            ClusterUnderTest::Local(cluster) => cluster.restart(i).await,
            ClusterUnderTest::External(cluster) => cluster.restart(i).await,
        }
    }
}

/// How a killed process is started again.
struct Launch {
    exe: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    env: Vec<(String, String)>,
}

/// Nodes in processes of their own, killed and restarted by this test.
pub struct ExternalCluster {
    addrs: Vec<SocketAddr>,
    /// The pids `DFLOCKD_TEST_CLUSTER_PIDS` gave, while they are current.
    pids: Vec<Option<u32>>,
    /// Each killed node's launch, until it is restarted.
    killed: Vec<Option<Launch>>,
    /// Held for the test's whole run: one external test at a time.
    _turn: OwnedMutexGuard<()>,
}

/// Whose turn it is on the external cluster.
fn turns() -> Arc<Mutex<()>> {
    static TURNS: OnceLock<Arc<Mutex<()>>> = OnceLock::new();
    Arc::clone(TURNS.get_or_init(|| Arc::new(Mutex::new(()))))
}

impl ExternalCluster {
    /// The cluster `DFLOCKD_TEST_CLUSTER` names, if set; waits for this
    /// test's turn and for every node to accept connections.
    pub async fn from_env() -> Option<ExternalCluster> {
        let list = std::env::var("DFLOCKD_TEST_CLUSTER").ok()?;
        let addrs: Vec<SocketAddr> = list
            .split(',')
            .map(|node| {
                node.trim()
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .unwrap_or_else(|| panic!("DFLOCKD_TEST_CLUSTER: {node:?} is not host:port"))
            })
            .collect();
        let pids = match std::env::var("DFLOCKD_TEST_CLUSTER_PIDS") {
            Ok(list) => list
                .split(',')
                .map(|pid| {
                    Some(
                        pid.trim()
                            .parse()
                            .expect("DFLOCKD_TEST_CLUSTER_PIDS: a pid"),
                    )
                })
                .collect(),
            Err(_) => vec![None; addrs.len()],
        };
        assert_eq!(pids.len(), addrs.len(), "one pid per node");
        let turn = turns().lock_owned().await;
        let killed = addrs.iter().map(|_| None).collect();
        let cluster = ExternalCluster {
            addrs,
            pids,
            killed,
            _turn: turn,
        };
        // A previous test may have restarted a node moments ago.
        let _ = cluster.leader().await;
        Some(cluster)
    }

    async fn leader(&self) -> (usize, Client) {
        tokio::time::timeout(CLUSTER_WAIT, async {
            loop {
                for (i, addr) in self.addrs.iter().enumerate() {
                    if self.killed[i].is_some() {
                        continue;
                    }
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(REPLY_TIMEOUT, tokio::net::TcpStream::connect(addr))
                            .await
                    else {
                        continue;
                    };
                    let mut c = Client::new(crate::wire::Stream::Tcp(stream));
                    c.send(b"barrier\n_\n\n").await;
                    if let Ok(reply) = c.read_line_within(REPLY_TIMEOUT).await
                        && reply == "ok"
                    {
                        return (i, c);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("an external node leads in time")
    }

    /// The process serving node `i`: the one listening on its port, or
    /// the pid the environment gave.
    fn pid(&self, i: usize) -> u32 {
        listener_pid(self.addrs[i].port())
            .or(self.pids[i])
            .unwrap_or_else(|| panic!("no process found for node {}", self.addrs[i]))
    }

    async fn kill(&mut self, i: usize) {
        let pid = self.pid(i);
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let split = |bytes: Vec<u8>| -> Vec<String> {
            bytes
                .split(|&b| b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect()
        };
        let mut args = split(std::fs::read(proc_dir.join("cmdline")).expect("read cmdline"));
        let env = split(std::fs::read(proc_dir.join("environ")).expect("read environ"))
            .into_iter()
            .filter_map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let launch = Launch {
            exe: std::fs::read_link(proc_dir.join("exe")).expect("read exe"),
            args: args.split_off(1.min(args.len())),
            cwd: std::fs::read_link(proc_dir.join("cwd")).expect("read cwd"),
            env,
        };
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -9 {pid}");
        eprintln!(
            "external cluster: killed node {} (pid {pid})",
            self.addrs[i]
        );
        self.pids[i] = None;
        self.killed[i] = Some(launch);
        // Gone when its port refuses connections.
        until_listening(self.addrs[i], false).await;
    }

    async fn restart(&mut self, i: usize) {
        self.relaunch(i);
        until_listening(self.addrs[i], true).await;
    }

    /// Starts killed node `i` as it was started before. The node outlives
    /// this test (the next one uses it; whoever started the cluster stops
    /// it), so it is not waited for here: once this process exits, init
    /// reaps it.
    #[allow(clippy::zombie_processes)]
    fn relaunch(&mut self, i: usize) {
        let launch = self.killed[i].take().expect("node was killed");
        let child = std::process::Command::new(&launch.exe)
            .args(&launch.args)
            .current_dir(&launch.cwd)
            .env_clear()
            .envs(launch.env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("restart the node");
        eprintln!(
            "external cluster: restarted node {} (pid {})",
            self.addrs[i],
            child.id()
        );
        self.pids[i] = Some(child.id());
    }
}

/// The next test finds every node running: those this one killed are
/// started again (and waited for) before its turn passes on.
impl Drop for ExternalCluster {
    fn drop(&mut self) {
        for i in 0..self.addrs.len() {
            if self.killed[i].is_none() {
                continue;
            }
            self.relaunch(i);
            let until = std::time::Instant::now() + CLUSTER_WAIT;
            while std::net::TcpStream::connect(self.addrs[i]).is_err()
                && std::time::Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Waits until `addr` accepts connections (`listening`) or refuses them.
async fn until_listening(addr: SocketAddr, listening: bool) {
    tokio::time::timeout(CLUSTER_WAIT, async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() != listening {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{addr} not {} in time",
            if listening { "listening" } else { "closed" }
        )
    });
}

/// The process listening on TCP `port`, from `/proc/net/tcp{,6}` (the
/// socket's inode) and `/proc/*/fd` (who has it open).
fn listener_pid(port: u16) -> Option<u32> {
    const LISTEN: &str = "0A";
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local = fields.get(1)?;
                let (_, hex_port) = local.rsplit_once(':')?;
                (u16::from_str_radix(hex_port, 16).ok()? == port && fields.get(3)? == &LISTEN)
                    .then(|| fields.get(9).map(|inode| inode.to_string()))
                    .flatten()
            })
        })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|link| link.as_os_str() == socket.as_str())
                })
                .then_some(pid)
        })
}
