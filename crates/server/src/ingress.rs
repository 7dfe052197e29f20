//! In-process connections handed to the accept loop: the embedder's
//! [`ServerHandle::connect_in_process`](crate::ServerHandle::connect_in_process)
//! and the HTTP API's sessions.

use tokio::io::DuplexStream;
use tokio::sync::oneshot;

/// The server's end of an in-process connection, for the accept loop.
pub(crate) struct InProcess {
    pub(crate) stream: DuplexStream,
    /// Set for an HTTP session's connection.
    pub(crate) http: Option<HttpLink>,
}

/// What the HTTP layer learns about its session's connection: its id once
/// admitted, and when the server has cleaned up after it. An HTTP
/// session's connection is not subject to the TCP connection caps (the
/// session caps apply).
pub(crate) struct HttpLink {
    pub(crate) opened: oneshot::Sender<u64>,
    pub(crate) closed: oneshot::Sender<()>,
}
