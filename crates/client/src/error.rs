//! One error type for every failure the client can report: what went wrong
//! (an [`ErrorKind`], one per server status and transport failure) and what
//! it concerned (the key and the server).

use std::sync::Arc;

use dflockd_proto::{Key, Status};
use thiserror::Error;

/// A failure, with the key and server it concerned when there was one.
///
/// Match on [`kind`](Error::kind); print it for a message that names the
/// key and the server:
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let server = dflockd_server::Server::start(dflockd_server::ServerConfig::ephemeral()).await?;
/// use std::time::Duration;
/// use dflockd_client::{Client, ErrorKind};
/// let client = Client::builder().server(server.local_addr().into()).build()?;
/// let held = client.lock("deploy")?.acquire().await?;
/// let error = client.lock("deploy")?.with_timeout(Duration::from_secs(1)).acquire().await.unwrap_err();
/// assert!(matches!(error.kind(), ErrorKind::Timeout));
/// assert_eq!(error.key().map(|key| key.to_string()).as_deref(), Some("deploy"));
/// assert_eq!(
///     error.to_string(),
///     format!("key \"deploy\" on {}: timed out waiting for the grant", server.local_addr())
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Error(Box<Context>);

#[derive(Debug, Clone)]
struct Context {
    kind: ErrorKind,
    key: Option<Key>,
    server: Option<String>,
}

impl Error {
    /// What went wrong.
    ///
    /// ```
    /// use dflockd_client::{Error, ErrorKind};
    /// let error = Error::from(ErrorKind::MaxWaiters);
    /// assert!(matches!(error.kind(), ErrorKind::MaxWaiters));
    /// ```
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The key the failed request was about, if it was about one.
    ///
    /// ```
    /// let error = dflockd_client::Error::from(dflockd_client::ErrorKind::Shutdown);
    /// assert!(error.key().is_none());
    /// ```
    pub fn key(&self) -> Option<&Key> {
        self.0.key.as_ref()
    }

    /// The address of the server the failed request went to, if any.
    ///
    /// ```
    /// let error = dflockd_client::Error::from(dflockd_client::ErrorKind::Shutdown);
    /// assert!(error.server().is_none());
    /// ```
    pub fn server(&self) -> Option<&str> {
        self.0.server.as_deref()
    }

    /// Maps a failure status word to its error (no key or server yet).
    ///
    /// ```
    /// use dflockd_client::{Error, ErrorKind};
    /// use dflockd_proto::Status;
    /// assert!(matches!(Error::from_status(Status::ErrorMaxLocks).kind(), ErrorKind::MaxLocks));
    /// ```
    pub fn from_status(status: Status) -> Error {
        ErrorKind::from_status(status).into()
    }

    /// Whether retrying may succeed: see [`ErrorKind::is_transient`].
    ///
    /// ```no_run
    /// # async fn demo(client: dflockd_client::Client) -> dflockd_client::Result<()> {
    /// let lock = client.lock("deploy")?;
    /// let lease = loop {
    ///     match lock.acquire().await {
    ///         Err(error) if error.is_transient() => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
    ///         other => break other?,
    ///     }
    /// };
    /// # Ok(()) }
    /// ```
    pub fn is_transient(&self) -> bool {
        self.0.kind.is_transient()
    }

    /// Names the key and server this error concerns, unless it already
    /// names some.
    pub(crate) fn about(mut self, key: &Key, server: &impl std::fmt::Display) -> Error {
        if self.0.key.is_none() {
            self.0.key = Some(key.clone());
        }
        self.on(server)
    }

    /// Names the server this error concerns, unless it already names one.
    pub(crate) fn on(mut self, server: &impl std::fmt::Display) -> Error {
        if self.0.server.is_none() {
            self.0.server = Some(server.to_string());
        }
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Context { kind, key, server } = &*self.0;
        // A connect failure names its address itself.
        let server = server
            .as_deref()
            .filter(|_| !matches!(kind, ErrorKind::Connect { .. }));
        match (key, server) {
            (Some(key), Some(server)) => write!(f, "key {:?} on {server}: {kind}", key.to_string()),
            (Some(key), None) => write!(f, "key {:?}: {kind}", key.to_string()),
            (None, Some(server)) => write!(f, "{server}: {kind}"),
            (None, None) => write!(f, "{kind}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.kind {
            ErrorKind::Io(error) => Some(&**error),
            _ => None,
        }
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error(Box::new(Context {
            kind,
            key: None,
            server: None,
        }))
    }
}

/// What went wrong talking to dflockd.
///
/// Each server status has its own variant, so callers can match on
/// `ErrorKind::MaxWaiters` rather than on strings; transport failures carry
/// their cause.
///
/// ```
/// use dflockd_client::ErrorKind;
/// use dflockd_proto::Status;
/// assert!(matches!(ErrorKind::from_status(Status::ErrorMaxLocks), ErrorKind::MaxLocks));
/// assert!(ErrorKind::ConnectionClosed.is_transient());
/// assert!(!ErrorKind::Server.is_transient());
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `timeout`: not granted within the requested time.
    #[error("timed out waiting for the grant")]
    Timeout,
    /// `error_max_locks`: the server's key table is full.
    #[error("server has too many keys (error_max_locks)")]
    MaxLocks,
    /// `error_max_waiters`: the key's wait queue is full.
    #[error("wait queue is full (error_max_waiters)")]
    MaxWaiters,
    /// `error_limit_mismatch`: the semaphore exists with another limit.
    #[error("semaphore exists with a different limit (error_limit_mismatch)")]
    LimitMismatch,
    /// `error_not_enqueued`: wait without a matching enqueue on the connection.
    #[error("not enqueued (error_not_enqueued)")]
    NotEnqueued,
    /// `error_already_enqueued`: a second enqueue for the same key.
    #[error("already enqueued (error_already_enqueued)")]
    AlreadyEnqueued,
    /// `error_lease_expired`: the grant's lease ran out before it was observed.
    #[error("lease expired before the grant was observed (error_lease_expired)")]
    LeaseExpired,
    /// `error_draining`: the server is shutting down.
    #[error("server is draining (error_draining)")]
    Draining,
    /// `error_not_leader`: a cluster follower, with the leader's address if known.
    #[error("server is not the cluster leader (leader: {leader:?})")]
    NotLeader {
        /// The leader's client address, when the server named one.
        leader: Option<String>,
    },
    /// `error_auth`, or the server rejected the `auth` handshake.
    #[error("authentication rejected")]
    Auth,
    /// `error`: malformed request, token not held, lease expired, …
    #[error("server answered error")]
    Server,
    /// The server's reply could not be understood; the connection is dropped.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Could not connect (TCP, TLS handshake).
    #[error("cannot connect to {addr}: {cause}")]
    Connect {
        /// The server address.
        addr: String,
        /// What failed.
        cause: String,
    },
    /// An I/O error on an established connection.
    #[error("I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    ConnectionClosed,
    /// The server did not answer in time; the connection is dropped.
    #[error("no reply from the server in time")]
    ReplyTimeout,
    /// An earlier request on this connection was interrupted, so replies
    /// can no longer be matched to requests.
    #[error("connection poisoned by an interrupted request")]
    Poisoned,
    /// A caller-supplied value is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The lease was lost (renewal refused, connection lost or local expiry).
    #[error("lease lost")]
    LeaseLost,
    /// The client has been shut down.
    #[error("client is shut down")]
    Shutdown,
    /// A blocking call was interrupted through its [`Interrupt`](crate::blocking::Interrupt).
    #[error("interrupted")]
    Interrupted,
}

impl ErrorKind {
    /// Maps a failure status word to its error.
    ///
    /// ```
    /// use dflockd_client::ErrorKind;
    /// use dflockd_proto::Status;
    /// assert!(matches!(ErrorKind::from_status(Status::Timeout), ErrorKind::Timeout));
    /// assert!(matches!(ErrorKind::from_status(Status::ErrorNotLeader), ErrorKind::NotLeader { leader: None }));
    /// ```
    pub fn from_status(status: Status) -> ErrorKind {
        match status {
            Status::Timeout => ErrorKind::Timeout,
            Status::Error => ErrorKind::Server,
            Status::ErrorAuth => ErrorKind::Auth,
            Status::ErrorMaxLocks => ErrorKind::MaxLocks,
            Status::ErrorMaxWaiters => ErrorKind::MaxWaiters,
            Status::ErrorLimitMismatch => ErrorKind::LimitMismatch,
            Status::ErrorNotEnqueued => ErrorKind::NotEnqueued,
            Status::ErrorAlreadyEnqueued => ErrorKind::AlreadyEnqueued,
            Status::ErrorLeaseExpired => ErrorKind::LeaseExpired,
            Status::ErrorDraining => ErrorKind::Draining,
            Status::ErrorNotLeader => ErrorKind::NotLeader { leader: None },
        }
    }

    /// Whether retrying on a fresh connection to the same server may
    /// succeed (transport trouble, a draining server), as opposed to a
    /// definitive answer. `NotLeader` is not transient: the same node will
    /// keep answering it; go to the leader it names.
    ///
    /// ```
    /// use dflockd_client::ErrorKind;
    /// assert!(!ErrorKind::NotLeader { leader: Some("10.0.0.2:6388".into()) }.is_transient());
    /// ```
    ///
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ErrorKind::Connect { .. }
                | ErrorKind::Io(_)
                | ErrorKind::ConnectionClosed
                | ErrorKind::ReplyTimeout
                | ErrorKind::Poisoned
                | ErrorKind::Protocol(_)
                | ErrorKind::Draining
        )
    }
}

impl From<std::io::Error> for ErrorKind {
    fn from(error: std::io::Error) -> ErrorKind {
        ErrorKind::Io(Arc::new(error))
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Error {
        ErrorKind::from(error).into()
    }
}

/// Shorthand for `Result<T, dflockd_client::Error>`.
///
/// ```
/// fn parse_servers(list: &str) -> dflockd_client::Result<Vec<dflockd_client::ServerAddr>> {
///     list.split(',').map(str::parse).collect()
/// }
/// assert_eq!(parse_servers("a:1,b:2").unwrap().len(), 2);
/// assert!(parse_servers("a:1,b").is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
