//! Three (or more) dflockd nodes of one cluster in this process, on
//! loopback: each node's client listener and Raft listener are bound
//! before any node starts (so every node knows every address), and every
//! Raft link runs through its own fault proxy (one per ordered pair), so a
//! test can cut a node off in both directions. Nodes can be killed and
//! restarted on the same directory and ports.

use std::net::SocketAddr;
use std::time::Duration;

use crate::faultproxy::{Blackhole, Direction, FaultProxy, Faults};
use dflockd_cluster::openraft::ServerState;
use dflockd_server::{
    ClusterConfig, ClusterPeer, Listeners, RaftSecret, Server, ServerConfig, ServerHandle,
};
use tempfile::TempDir;

use crate::wire::{Client, REPLY_TIMEOUT};

/// How long a cluster may take to elect, fail over or catch up.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(15);

/// A [`TestCluster::start_with`] tweak: nodes keep a closed named
/// session's holds, queue places and waiters for 30 s (`--orphan-ttl`), so
/// that its next connection can take them over.
pub fn with_orphans(config: &mut ServerConfig) {
    if let Some(cluster) = config.cluster.as_mut() {
        cluster.orphan_ttl = Duration::from_secs(30);
    }
}

/// A cluster of in-process nodes, each with its own directory, client
/// listener and Raft listener, the Raft links behind fault proxies.
pub struct TestCluster {
    /// Each node, `None` while it is stopped.
    pub nodes: Vec<Option<ServerHandle>>,
    dirs: Vec<TempDir>,
    /// Each node's client address.
    pub client_addrs: Vec<SocketAddr>,
    raft_addrs: Vec<SocketAddr>,
    /// `proxies[from][to]`, `None` on the diagonal.
    proxies: Vec<Vec<Option<FaultProxy>>>,
    secret: RaftSecret,
    tweak: fn(&mut ServerConfig),
}

fn bind() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback")
}

impl TestCluster {
    /// Starts `n` nodes that form one cluster (ids 1..=n).
    pub async fn start(n: usize) -> TestCluster {
        TestCluster::start_with(n, |_| {}).await
    }

    /// [`start`](Self::start) with every node's configuration changed by
    /// `tweak`.
    pub async fn start_with(n: usize, tweak: fn(&mut ServerConfig)) -> TestCluster {
        let clients: Vec<_> = (0..n).map(|_| bind()).collect();
        let rafts: Vec<_> = (0..n).map(|_| bind()).collect();
        let client_addrs: Vec<SocketAddr> =
            clients.iter().map(|l| l.local_addr().unwrap()).collect();
        let raft_addrs: Vec<SocketAddr> = rafts.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut proxies = Vec::new();
        for from in 0..n {
            let mut row = Vec::new();
            for (to, addr) in raft_addrs.iter().enumerate() {
                row.push(if from == to {
                    None
                } else {
                    Some(FaultProxy::start(*addr).await.expect("proxy starts"))
                });
            }
            proxies.push(row);
        }
        let mut cluster = TestCluster {
            nodes: (0..n).map(|_| None).collect(),
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            client_addrs,
            raft_addrs,
            proxies,
            secret: RaftSecret::new(b"a test secret of at least 32 bytes!".to_vec()).unwrap(),
            tweak,
        };
        let starts: Vec<_> = clients
            .into_iter()
            .zip(rafts)
            .enumerate()
            .map(|(i, (client, raft))| {
                let config = cluster.config(i);
                async move {
                    let listeners = Listeners {
                        client: Some(client),
                        raft: Some(raft),
                        http: None,
                    };
                    Server::start_with_listeners(config, listeners)
                        .await
                        .expect("node starts")
                }
            })
            .collect();
        let handles = futures_util::future::join_all(starts).await;
        for (i, handle) in handles.into_iter().enumerate() {
            cluster.nodes[i] = Some(handle);
        }
        cluster
    }

    /// Node `i`'s configuration: its peers' Raft addresses are the
    /// proxies of its links.
    fn config(&self, i: usize) -> ServerConfig {
        let peers = (0..self.nodes.len())
            .map(|j| ClusterPeer {
                id: j as u64 + 1,
                raft: match &self.proxies[i][j] {
                    Some(proxy) => proxy.addr().to_string(),
                    None => self.raft_addrs[j].to_string(),
                },
                client: self.client_addrs[j].to_string(),
            })
            .collect();
        let cluster = ClusterConfig::new(
            i as u64 + 1,
            self.dirs[i].path(),
            self.raft_addrs[i].to_string(),
            self.secret.clone(),
        )
        .with_peers(peers);
        let mut config = ServerConfig::ephemeral();
        config.cluster = Some(cluster);
        (self.tweak)(&mut config);
        config
    }

    /// Starts one more node (the next id), empty, with every current node
    /// and itself as peers (so it waits to be added: the seed is node 1),
    /// its links through proxies like the others'. Returns its index and
    /// the member to add (Raft messages reach it through one of its
    /// proxies).
    pub async fn add_node(&mut self) -> (usize, dflockd_cluster::Member) {
        let i = self.nodes.len();
        let (client, raft) = (bind(), bind());
        let raft_addr = raft.local_addr().unwrap();
        for row in self.proxies.iter_mut() {
            row.push(Some(
                FaultProxy::start(raft_addr).await.expect("proxy starts"),
            ));
        }
        let mut row = Vec::new();
        for addr in &self.raft_addrs {
            row.push(Some(FaultProxy::start(*addr).await.expect("proxy starts")));
        }
        row.push(None);
        self.proxies.push(row);
        self.client_addrs.push(client.local_addr().unwrap());
        self.raft_addrs.push(raft_addr);
        self.dirs.push(tempfile::tempdir().unwrap());
        self.nodes.push(None);
        let listeners = Listeners {
            client: Some(client),
            raft: Some(raft),
            http: None,
        };
        let handle = Server::start_with_listeners(self.config(i), listeners)
            .await
            .expect("node starts");
        self.nodes[i] = Some(handle);
        let through = self.proxies[0][i].as_ref().expect("a proxy").addr();
        let member =
            dflockd_cluster::Member::new(through.to_string(), self.client_addrs[i].to_string());
        (i, member)
    }

    /// Node `i`'s own Raft address (no proxy).
    pub fn raft_addr(&self, i: usize) -> SocketAddr {
        self.raft_addrs[i]
    }

    /// The cluster's Raft secret.
    pub fn secret(&self) -> &RaftSecret {
        &self.secret
    }

    /// Node `i`, which must be running.
    pub fn node(&self, i: usize) -> &ServerHandle {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// The highest Raft term any running node knows (its growth counts
    /// failovers).
    pub fn term(&self) -> u64 {
        self.running()
            .into_iter()
            .filter_map(|i| self.node(i).cluster_node())
            .map(|node| node.raft().metrics().borrow().current_term)
            .max()
            .unwrap_or(0)
    }

    /// The indexes of the running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    /// Waits until the running nodes agree on a leader among them that
    /// serves: returns its index and a connection on which a `barrier`
    /// committed.
    pub async fn leader(&self) -> (usize, Client) {
        tokio::time::timeout(CLUSTER_WAIT, async {
            loop {
                for i in self.running() {
                    let node = self.node(i).cluster_node().unwrap();
                    let leads = node
                        .raft()
                        .wait(Some(Duration::from_millis(200)))
                        .state(ServerState::Leader, "leads")
                        .await
                        .is_ok();
                    if !leads {
                        continue;
                    }
                    let mut c = Client::connect(self.client_addrs[i]).await;
                    c.send(b"barrier\n_\n\n").await;
                    if let Ok(reply) = c.read_line_within(REPLY_TIMEOUT).await
                        && reply == "ok"
                    {
                        return (i, c);
                    }
                }
            }
        })
        .await
        .expect("a leader serves in time")
    }

    /// Kills node `i` at once: connections dropped, Raft stopped, nothing
    /// handed over.
    pub async fn kill(&mut self, i: usize) {
        let handle = self.nodes[i].take().expect("node is running");
        handle.force_close();
        handle.wait().await;
    }

    /// Stops node `i` gracefully, as SIGTERM does (drain, then stop).
    pub async fn stop(&mut self, i: usize) {
        let handle = self.nodes[i].take().expect("node is running");
        handle.shutdown().await;
    }

    /// Sends `request` to whichever running node leads (following
    /// redirects, retrying while there is none) and returns its reply.
    pub async fn ask_leader(&self, request: &[u8]) -> String {
        tokio::time::timeout(CLUSTER_WAIT, async {
            loop {
                for i in self.running() {
                    let mut c = Client::connect(self.client_addrs[i]).await;
                    c.send(request).await;
                    match c.read_line_within(REPLY_TIMEOUT).await {
                        Ok(reply)
                            if !reply.starts_with("error_not_leader")
                                && reply != "error_draining" =>
                        {
                            return reply;
                        }
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a leader answers in time")
    }

    /// Restarts node `i` on its directory and ports.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let listeners = Listeners {
            client: Some(std::net::TcpListener::bind(self.client_addrs[i]).expect("rebind client")),
            raft: Some(std::net::TcpListener::bind(self.raft_addrs[i]).expect("rebind raft")),
            http: None,
        };
        let handle = Server::start_with_listeners(self.config(i), listeners)
            .await
            .expect("node restarts");
        self.nodes[i] = Some(handle);
    }

    /// Cuts node `i` off from every other node, both ways.
    pub async fn isolate(&self, i: usize) {
        for (from, row) in self.proxies.iter().enumerate() {
            for (to, proxy) in row.iter().enumerate() {
                if let Some(proxy) = proxy
                    && (from == i || to == i)
                {
                    for dir in Direction::BOTH {
                        proxy.set_default_faults(
                            dir,
                            Faults::none().with_blackhole(Blackhole::Drop),
                        );
                    }
                    for link in proxy.links() {
                        link.blackhole(Blackhole::Drop);
                    }
                }
            }
        }
    }

    /// Heals every link.
    pub async fn heal(&self) {
        for proxy in self.proxies.iter().flatten().flatten() {
            for dir in Direction::BOTH {
                proxy.set_default_faults(dir, Faults::none());
            }
            // Dropped bytes broke the framing of open links: reset them.
            proxy.cut_all().await;
        }
    }
}
