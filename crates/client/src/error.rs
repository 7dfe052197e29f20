//! One error type for every failure the client can report, with a variant
//! for each server status.

use std::sync::Arc;

use dflockd_proto::Status;
use thiserror::Error;

/// Everything that can go wrong talking to dflockd.
///
/// Each server status has its own variant, so callers can match on
/// `Error::MaxWaiters` rather than on strings; transport failures carry their
/// cause.
///
/// ```
/// use dflockd_client::Error;
/// use dflockd_proto::Status;
/// assert!(matches!(Error::from_status(Status::ErrorMaxLocks), Error::MaxLocks));
/// assert!(Error::ConnectionClosed.is_transient());
/// assert!(!Error::Server.is_transient());
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
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

impl Error {
    /// Maps a failure status word to its error.
    ///
    /// ```
    /// use dflockd_client::Error;
    /// use dflockd_proto::Status;
    /// assert!(matches!(Error::from_status(Status::Timeout), Error::Timeout));
    /// assert!(matches!(Error::from_status(Status::ErrorNotLeader), Error::NotLeader { leader: None }));
    /// ```
    pub fn from_status(status: Status) -> Error {
        match status {
            Status::Timeout => Error::Timeout,
            Status::Error => Error::Server,
            Status::ErrorAuth => Error::Auth,
            Status::ErrorMaxLocks => Error::MaxLocks,
            Status::ErrorMaxWaiters => Error::MaxWaiters,
            Status::ErrorLimitMismatch => Error::LimitMismatch,
            Status::ErrorNotEnqueued => Error::NotEnqueued,
            Status::ErrorAlreadyEnqueued => Error::AlreadyEnqueued,
            Status::ErrorLeaseExpired => Error::LeaseExpired,
            Status::ErrorDraining => Error::Draining,
            Status::ErrorNotLeader => Error::NotLeader { leader: None },
        }
    }

    /// Whether retrying on a fresh connection to the same server may
    /// succeed (transport trouble, a draining server), as opposed to a
    /// definitive answer. `NotLeader` is not transient: the same node will
    /// keep answering it; go to the leader it names.
    ///
    /// ```
    /// use dflockd_client::Error;
    /// assert!(!Error::NotLeader { leader: Some("10.0.0.2:6388".into()) }.is_transient());
    /// ```
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
        matches!(
            self,
            Error::Connect { .. }
                | Error::Io(_)
                | Error::ConnectionClosed
                | Error::ReplyTimeout
                | Error::Poisoned
                | Error::Protocol(_)
                | Error::Draining
        )
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Error {
        Error::Io(Arc::new(error))
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
