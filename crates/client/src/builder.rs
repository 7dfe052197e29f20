//! [`ClientBuilder`]: the settings of a [`Client`], and starting its
//! actors.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kameo::actor::Spawn;
use kameo::prelude::*;
use tokio::runtime::Handle;

use crate::client::Client;
use crate::connection::{lease_of, seconds};
use crate::inner::{ClientInner, ServerEntry};
use crate::lane::LaneTiming;
use crate::options::{AuthToken, ConnectOptions, IntoServerAddr, ServerAddr, Sharding, TlsOptions};
use crate::server_conn::{ServerConn, ServerConnArgs};
use crate::supervisor::{LaneClosed, LeaseSupervisor, RenewPolicy, SupervisorArgs};
use crate::{Error, ErrorKind, Result};

/// Builds a [`Client`].
///
/// ```no_run
/// # async fn demo() -> dflockd_client::Result<()> {
/// use std::time::Duration;
/// let client = dflockd_client::Client::builder()
///     .server("10.0.0.1:6388".parse()?)
///     .server("10.0.0.2:6388".parse()?)
///     .auth_token("s3cret")?
///     .default_lease(Duration::from_secs(30))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    /// Each server's nodes: one, or a cluster's.
    servers: Vec<Vec<ServerAddr>>,
    /// An address given to a builder method that did not parse: `build`
    /// reports it.
    invalid: Option<Error>,
    sharding: Sharding,
    options: ConnectOptions,
    renew_ratio: f64,
    default_lease: Option<Duration>,
    acquire_timeout: Duration,
    keepalive: Duration,
    max_renew_interval: Duration,
    renew_retry: Duration,
    reply_timeout: Duration,
    multiplex: bool,
}

impl Default for ClientBuilder {
    fn default() -> ClientBuilder {
        ClientBuilder {
            servers: Vec::new(),
            sharding: Sharding::Crc32,
            options: ConnectOptions::default(),
            renew_ratio: 1.0 / 3.0,
            default_lease: None,
            acquire_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            max_renew_interval: Duration::from_secs(15),
            renew_retry: Duration::from_millis(500),
            reply_timeout: Duration::from_secs(10),
            multiplex: true,
            invalid: None,
        }
    }
}

impl ClientBuilder {
    /// Adds a server (default when none is added: `127.0.0.1:6388`).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder()
    ///     .server("10.0.0.1:6388".parse()?)
    ///     .server("10.0.0.2:6388".parse()?)
    ///     .build()?; // connects lazily, on first use
    /// assert_eq!(client.servers().len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn server(mut self, addr: ServerAddr) -> Self {
        self.servers.push(vec![addr]);
        self
    }

    /// Adds a server that is a dflockd cluster: every node's client
    /// address, in any order. The client talks to the leader: it asks each
    /// node it connects to whether it leads (`barrier`), follows a
    /// follower's `error_not_leader <addr>` to a node of this list (never
    /// elsewhere), and otherwise tries the next node; after a failure it
    /// reconnects the same way. Several clusters are several shards.
    ///
    /// Nodes are anything [`IntoServerAddr`]: `"host:port"` strings,
    /// `SocketAddr`s or [`ServerAddr`]s; one that does not parse makes
    /// [`build`](Self::build) fail with an error naming it.
    ///
    /// ```no_run
    /// # async fn demo() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder()
    ///     .cluster(["10.0.0.1:6388", "10.0.0.2:6388", "10.0.0.3:6388"])
    ///     .build()?;
    /// let lease = client.lock("deploy")?.acquire().await?; // on whichever node leads
    /// # Ok(()) }
    /// ```
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let error = dflockd_client::Client::builder().cluster(["10.0.0.1:6388", "10.0.0.2"]).build().unwrap_err();
    /// assert!(error.to_string().contains("10.0.0.2"), "{error}");
    /// # }
    /// ```
    ///
    /// The client names its session on every connection, so a failover is
    /// not a loss: leases are renewed through the new leader (same tokens,
    /// same fences), and a request whose answer the failover lost is sent
    /// again and answered with what it got (docs/CLUSTER.md; the nodes need
    /// `--orphan-ttl`). Each cluster added is one shard:
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder()
    ///     .cluster(["10.0.1.1:6388", "10.0.1.2:6388", "10.0.1.3:6388"]) // shard 0
    ///     .cluster(["10.0.2.1:6388", "10.0.2.2:6388", "10.0.2.3:6388"]) // shard 1
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn cluster<A: IntoServerAddr>(mut self, nodes: impl IntoIterator<Item = A>) -> Self {
        let nodes: Result<Vec<ServerAddr>> = nodes
            .into_iter()
            .map(IntoServerAddr::into_server_addr)
            .collect();
        match nodes {
            Ok(nodes) => self.servers.push(nodes),
            Err(error) => {
                self.invalid.get_or_insert(error);
            }
        }
        self
    }

    /// Sets all servers at once.
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// use dflockd_client::{Client, ServerAddr};
    /// let addrs = ["10.0.0.1:6388", "10.0.0.2:6388"].map(|a| a.parse::<ServerAddr>());
    /// let client = Client::builder().servers(addrs.into_iter().collect::<Result<Vec<_>, _>>()?).build()?;
    /// assert_eq!(client.servers()[1].host(), "10.0.0.2");
    /// # Ok(()) }
    /// ```
    pub fn servers(mut self, addrs: impl IntoIterator<Item = ServerAddr>) -> Self {
        self.servers = addrs.into_iter().map(|addr| vec![addr]).collect();
        self
    }

    /// How keys map to servers (default CRC-32).
    ///
    /// ```
    /// # #[tokio::main] async fn main() -> dflockd_client::Result<()> {
    /// use std::sync::Arc;
    /// use dflockd_client::{Client, Sharding};
    /// let client = Client::builder()
    ///     .servers(["10.0.0.1:6388".parse()?, "10.0.0.2:6388".parse()?])
    ///     .sharding(Sharding::Custom(Arc::new(|_key: &str, _n: usize| 1)))
    ///     .build()?;
    /// assert_eq!(client.server_for("anything")?, 1);
    /// # Ok(()) }
    /// ```
    pub fn sharding(mut self, sharding: Sharding) -> Self {
        self.sharding = sharding;
        self
    }

    /// Connect with TLS.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use dflockd_client::{Client, TlsOptions};
    /// let client = Client::builder()
    ///     .server("locks.internal:6388".parse()?)
    ///     .tls(TlsOptions::with_ca_file("/etc/dflockd/ca.pem")?)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.options.tls = Some(tls);
        self
    }

    /// Send this shared secret first on every connection.
    ///
    /// ```
    /// use dflockd_client::Client;
    /// let builder = Client::builder().auth_token("s3cret")?;
    /// // A token must be a single line.
    /// assert!(Client::builder().auth_token("two\nlines").is_err());
    /// # Ok::<(), dflockd_client::Error>(())
    /// ```
    pub fn auth_token(mut self, token: &str) -> Result<Self> {
        self.options.auth_token = Some(AuthToken::new(token)?);
        Ok(self)
    }

    /// Bound on TCP connect + TLS + auth (default 10 s).
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // Fail fast when a server is unreachable.
    /// let client = dflockd_client::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
    /// # Ok(()) }
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Renew after this fraction of the lease (default 1/3; must be in (0, 1)).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use dflockd_client::{Client, ErrorKind};
    /// // Renew a 30 s lease every 15 s.
    /// assert!(Client::builder().renew_ratio(0.5).build().is_ok());
    /// let error = Client::builder().renew_ratio(1.5).build().unwrap_err();
    /// assert!(matches!(error.kind(), ErrorKind::InvalidArgument(_)));
    /// # }
    /// ```
    pub fn renew_ratio(mut self, ratio: f64) -> Self {
        self.renew_ratio = ratio;
        self
    }

    /// Lease to request when a handle names none (default: the server's, 33 s).
    ///
    /// ```no_run
    /// # async fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let client = dflockd_client::Client::builder().default_lease(Duration::from_secs(60)).build()?;
    /// let lease = client.lock("batch/import")?.acquire().await?; // asks for a 60 s lease
    /// assert_eq!(lease.ttl(), Duration::from_secs(60));
    /// # Ok(()) }
    /// ```
    pub fn default_lease(mut self, lease: Duration) -> Self {
        self.default_lease = Some(lease);
        self
    }

    /// How long `acquire()` waits by default (default 10 s).
    ///
    /// ```no_run
    /// # async fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// let client = dflockd_client::Client::builder().acquire_timeout(Duration::from_secs(1)).build()?;
    /// // `acquire()` now gives up with `ErrorKind::Timeout` after one second.
    /// match client.lock("deploy")?.acquire().await {
    ///     Err(error) if matches!(error.kind(), dflockd_client::ErrorKind::Timeout) => println!("someone else is deploying"),
    ///     other => { other?; }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Ping a connection after this much silence (default 10 s, below the
    /// server's 23 s idle timeout). Also caps the renew interval.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// use std::time::Duration;
    /// // A proxy in between closes connections silent for 5 s.
    /// let client = dflockd_client::Client::builder().keepalive(Duration::from_secs(3)).build()?;
    /// # Ok(()) }
    /// ```
    pub fn keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Longest wait for a non-blocking reply before the connection is
    /// dropped (default 10 s).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use std::time::Duration;
    /// use dflockd_client::Client;
    /// assert!(Client::builder().reply_timeout(Duration::from_secs(3)).build().is_ok());
    /// assert!(Client::builder().reply_timeout(Duration::ZERO).build().is_err());
    /// # }
    /// ```
    pub fn reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// Whether to ask each server for the multiplexed extension (default
    /// true). A server that speaks it (this crate's `dflockd`) then carries
    /// every request of the process — blocking waits and two-phase tickets
    /// included — over one connection; a plain dflockd server refuses it and
    /// the client falls back to a control connection plus one connection per
    /// blocking wait, with no visible difference. `false` always uses the
    /// plain protocol.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// let plain_only = dflockd_client::Client::builder().multiplex(false).build()?;
    /// # Ok(()) }
    /// ```
    pub fn multiplex(mut self, multiplex: bool) -> Self {
        self.multiplex = multiplex;
        self
    }

    /// Builds the client and starts its actors on the current tokio runtime.
    ///
    /// ```
    /// use dflockd_client::{Client, ErrorKind};
    /// // Outside a tokio runtime there is nothing to run the client's actors on.
    /// let error = Client::builder().build().unwrap_err();
    /// assert!(matches!(error.kind(), ErrorKind::InvalidArgument(_)));
    /// let runtime = tokio::runtime::Runtime::new()?;
    /// let client = runtime.block_on(async { Client::builder().build() })?;
    /// assert_eq!(client.servers()[0].to_string(), "127.0.0.1:6388");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build(self) -> Result<Client> {
        if let Some(error) = self.invalid {
            return Err(error);
        }
        let runtime = Handle::try_current().map_err(|_| {
            ErrorKind::InvalidArgument("Client::build needs a tokio runtime".into())
        })?;
        if !(self.renew_ratio.is_finite() && self.renew_ratio > 0.0 && self.renew_ratio < 1.0) {
            return Err(ErrorKind::InvalidArgument(format!(
                "renew ratio must be in (0, 1), got {}",
                self.renew_ratio
            ))
            .into());
        }
        if self.keepalive.is_zero()
            || self.reply_timeout.is_zero()
            || self.options.connect_timeout.is_zero()
        {
            return Err(ErrorKind::InvalidArgument(
                "keepalive, reply and connect timeouts must be > 0".into(),
            )
            .into());
        }
        lease_of(self.default_lease)?;
        seconds(self.acquire_timeout)?;
        let servers = if self.servers.is_empty() {
            vec![vec![ServerAddr::new("127.0.0.1", 6388)?]]
        } else {
            self.servers
        };
        if servers.iter().any(Vec::is_empty) {
            return Err(
                ErrorKind::InvalidArgument("a cluster needs at least one node".into()).into(),
            );
        }
        let timing = LaneTiming {
            keepalive: self.keepalive,
            reply_timeout: self.reply_timeout,
        };

        let supervisor_slot: Arc<OnceLock<WeakActorRef<LeaseSupervisor>>> =
            Arc::new(OnceLock::new());
        let on_lane_closed = {
            let slot = Arc::clone(&supervisor_slot);
            Arc::new(move |lane, reattach| {
                if let Some(supervisor) = slot.get().and_then(WeakActorRef::upgrade) {
                    let _ = supervisor.tell(LaneClosed { lane, reattach }).try_send();
                }
            })
        };
        let actors: Vec<ActorRef<ServerConn>> = servers
            .iter()
            .map(|addr| {
                let args = ServerConnArgs {
                    nodes: addr.clone(),
                    options: self.options.clone(),
                    timing,
                    on_lane_closed: on_lane_closed.clone(),
                    multiplex: self.multiplex,
                };
                ServerConn::spawn_with_mailbox(args, kameo::mailbox::unbounded())
            })
            .collect();
        let policy = RenewPolicy {
            ratio: self.renew_ratio,
            max_interval: self.max_renew_interval.min(self.keepalive),
            retry: self.renew_retry,
        };
        let renewals = Arc::new(AtomicU64::new(0));
        let supervisor = LeaseSupervisor::spawn_with_mailbox(
            SupervisorArgs {
                servers: actors.clone(),
                policy,
                renewals: Arc::clone(&renewals),
            },
            kameo::mailbox::unbounded(),
        );
        let _ = supervisor_slot.set(supervisor.downgrade());
        let inner = ClientInner {
            servers: servers
                .into_iter()
                .zip(actors)
                .map(|(nodes, actor)| ServerEntry::new(nodes, actor))
                .collect(),
            supervisor,
            options: self.options,
            timing,
            on_lane_closed,
            sharding: self.sharding,
            default_lease: self.default_lease,
            acquire_timeout: self.acquire_timeout,
            runtime,
            next_lease: AtomicU64::new(1),
            renewals,
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }
}

impl Client {
    /// A builder with the defaults.
    ///
    /// ```no_run
    /// # fn demo() -> dflockd_client::Result<()> {
    /// let client = dflockd_client::Client::builder().server("127.0.0.1:6388".parse()?).build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }
}
