//! Raft messages between nodes over TCP.
//!
//! Each frame is a 4-byte big-endian length and a postcard body, at most
//! [`MAX_FRAME`] bytes. A node sends one request and reads its response on
//! a connection of its own per peer, connected lazily and dropped on any
//! error or timeout (the next call connects again). The receiving side
//! checks that a request is addressed to it before handing it to Raft.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::Raft;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::{RaftSecret, as_callee, as_caller};
use crate::member::{self, ChangeRefused, Member, MembershipChange};
use crate::records::{decode, encode};
use crate::tls::RaftTls;
use crate::{NodeId, TypeConfig};

/// How long a peer has to complete the authentication handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn refused_slow() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "no authentication within the handshake timeout",
    )
}

/// The largest frame a node reads (a snapshot chunk is a few MiB).
///
/// ```
/// assert_eq!(dflockd_cluster::MAX_FRAME, 64 * 1024 * 1024);
/// ```
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// The `to` of a request for whichever node answers (membership changes
/// from an operator, who knows an address, not an id).
pub(crate) const ANY_NODE: NodeId = 0;

/// A request, addressed to one node (or [`ANY_NODE`]).
#[derive(Serialize, Deserialize)]
struct Envelope {
    to: NodeId,
    request: Request,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Start an election now: the leader is stopping and this node's log
    /// is as long as its own (a hand-over; see `Node::hand_over`).
    Elect,
    /// A membership change, for the leader to apply.
    Change(MembershipChange),
}

#[derive(Serialize, Deserialize)]
pub(crate) enum Response {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// Whether the election was started (or why not).
    Elect(Result<(), String>),
    Change(Result<(), ChangeRefused>),
    /// The request was for another node.
    WrongNode {
        id: NodeId,
    },
}

/// A link's byte stream: TCP, or TLS over TCP.
pub(crate) trait Link: AsyncRead + AsyncWrite + Unpin + Send + Sync {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync> Link for S {}

async fn write_frame<T: Serialize>(stream: &mut (dyn Link + '_), value: &T) -> io::Result<()> {
    let body = encode(value);
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    stream.flush().await
}

async fn read_frame<T: DeserializeOwned>(stream: &mut (dyn Link + '_)) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    // Read as the bytes come, not into a buffer of the announced size: a
    // length alone must not cost memory.
    let mut body = Vec::new();
    let read = (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if read < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Serves Raft requests arriving on `listener` to `raft` (node `id`) until
/// the task is dropped or aborted, which also ends every connection it
/// accepted (a restarted node must not find its peers still talking to
/// the stopped one).
pub(crate) async fn serve(
    listener: TcpListener,
    id: NodeId,
    raft: Raft<TypeConfig>,
    secret: Option<RaftSecret>,
    tls: Option<RaftTls>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let raft = raft.clone();
        let secret = secret.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match serve_connection(stream, id, raft, secret.as_ref(), tls.as_ref()).await {
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::warn!(%peer, %error, "raft connection refused");
                }
                Err(error) if error.kind() != io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, %error, "raft connection ended");
                }
                _ => {}
            }
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    id: NodeId,
    raft: Raft<TypeConfig>,
    secret: Option<&RaftSecret>,
    tls: Option<&RaftTls>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    // A peer gets the handshakes' time to prove itself, no more.
    let handshakes = async {
        let mut stream: Box<dyn Link> = match tls {
            Some(tls) => Box::new(tls.accept(stream).await.map_err(|e| {
                io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS: {e}"))
            })?),
            None => Box::new(stream),
        };
        if let Some(secret) = secret {
            as_callee(&mut *stream, secret).await?;
        }
        Ok::<_, io::Error>(stream)
    };
    let mut stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
        .await
        .map_err(|_| refused_slow())??;
    let stream = &mut *stream;
    loop {
        let envelope: Envelope = read_frame(stream).await?;
        let response = match envelope.request {
            Request::Change(change) if envelope.to == id || envelope.to == ANY_NODE => {
                tracing::info!(node = id, %change, "membership change asked for");
                let outcome = member::apply(&raft, change).await;
                if let Err(refused) = &outcome {
                    tracing::info!(node = id, %refused, "membership change refused");
                }
                Response::Change(outcome)
            }
            _ if envelope.to != id => Response::WrongNode { id },
            Request::Append(rpc) => Response::Append(raft.append_entries(rpc).await),
            Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
            Request::Snapshot(rpc) => Response::Snapshot(raft.install_snapshot(rpc).await),
            Request::Elect => {
                tracing::info!(node = id, "the stopping leader hands over: electing");
                Response::Elect(raft.trigger().elect().await.map_err(|e| e.to_string()))
            }
            Request::Change(_) => Response::WrongNode { id },
        };
        write_frame(stream, &response).await?;
    }
}

/// Makes a [`Peer`] per target node; registered with openraft. A node
/// reaches a peer at the address in the cluster's membership, unless a
/// route says otherwise (a fault proxy in tests).
///
/// ```
/// # #[tokio::main] async fn main() {
/// use openraft::network::RaftNetworkFactory;
/// let mut network = dflockd_cluster::Network::default();
/// network.route(2, "127.0.0.1:2".parse().unwrap());
/// // Connects only when Raft first sends to node 2, and then to the route.
/// let peer = network.new_client(2, &dflockd_cluster::Member::new("127.0.0.1:1", "")).await;
/// assert!(format!("{peer:?}").contains("127.0.0.1:2"));
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Network {
    routes: Arc<Mutex<HashMap<NodeId, SocketAddr>>>,
    secret: Option<RaftSecret>,
    tls: Option<RaftTls>,
}

impl Network {
    /// A network whose links authenticate with `secret` (both ways, the
    /// secret never on the wire; see the module `auth`).
    ///
    /// ```
    /// let secret = dflockd_cluster::RaftSecret::new(vec![9; 32]).unwrap();
    /// let _network = dflockd_cluster::Network::with_secret(secret);
    /// ```
    pub fn with_secret(secret: RaftSecret) -> Network {
        Network {
            routes: Arc::default(),
            secret: Some(secret),
            tls: None,
        }
    }

    /// This network with mutual TLS on its links (under the secret's
    /// handshake, if there is a secret); see [`RaftTls`].
    ///
    /// ```no_run
    /// let tls = dflockd_cluster::RaftTls::from_pem_files("node.pem", "node.key", "ca.pem").unwrap();
    /// let secret = dflockd_cluster::RaftSecret::new(vec![9; 32]).unwrap();
    /// let _network = dflockd_cluster::Network::with_secret(secret).with_tls(tls);
    /// ```
    pub fn with_tls(mut self, tls: RaftTls) -> Network {
        self.tls = Some(tls);
        self
    }

    pub(crate) fn secret(&self) -> Option<&RaftSecret> {
        self.secret.as_ref()
    }

    pub(crate) fn tls(&self) -> Option<&RaftTls> {
        self.tls.as_ref()
    }

    /// Sends to node `target` at `addr` instead of its membership address,
    /// from the next connection on.
    ///
    /// ```
    /// let network = dflockd_cluster::Network::default();
    /// network.route(3, "127.0.0.1:7000".parse().unwrap());
    /// ```
    pub fn route(&self, target: NodeId, addr: SocketAddr) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(target, addr);
    }
}

impl Network {
    /// The connection to node `target` (made when first used).
    pub(crate) fn peer(&self, target: NodeId, node: &Member) -> Peer {
        let routed = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target)
            .map(SocketAddr::to_string);
        Peer {
            target,
            addr: routed.unwrap_or_else(|| node.raft.clone()),
            secret: self.secret.clone(),
            tls: self.tls.clone(),
            stream: None,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Peer {
        self.peer(target, node)
    }
}

/// The connection to one peer, made when first needed (see [`Network`]).
///
/// ```
/// # #[tokio::main] async fn main() {
/// use openraft::network::RaftNetworkFactory;
/// let peer: dflockd_cluster::Peer = dflockd_cluster::Network::default().new_client(2, &dflockd_cluster::Member::new("127.0.0.1:1", "")).await;
/// assert!(format!("{peer:?}").contains("127.0.0.1:1"));
/// # }
/// ```
pub struct Peer {
    target: NodeId,
    addr: String,
    secret: Option<RaftSecret>,
    tls: Option<RaftTls>,
    stream: Option<Box<dyn Link>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("target", &self.target)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("connected", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a call to a peer failed.
pub(crate) enum CallError {
    /// No connection could be made.
    Unreachable(io::Error),
    /// The connection failed or timed out mid-call.
    Network(io::Error),
    /// The request does not fit in a frame.
    TooLarge,
}

impl Peer {
    /// A connection to whichever node listens at `addr` (for requests to
    /// [`ANY_NODE`]), secured as `network`'s links are.
    pub(crate) fn to_any(addr: SocketAddr, network: &Network) -> Peer {
        Peer {
            target: ANY_NODE,
            addr: addr.to_string(),
            secret: network.secret.clone(),
            tls: network.tls.clone(),
            stream: None,
        }
    }

    pub(crate) async fn call(
        &mut self,
        request: Request,
        ttl: Duration,
    ) -> Result<Response, CallError> {
        let envelope = Envelope {
            to: self.target,
            request,
        };
        let result = tokio::time::timeout(ttl, async {
            if self.stream.is_none() {
                let addr: SocketAddr = self.addr.parse().map_err(|e| {
                    CallError::Unreachable(io::Error::new(io::ErrorKind::InvalidInput, e))
                })?;
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(CallError::Unreachable)?;
                let _ = tcp.set_nodelay(true);
                let mut stream: Box<dyn Link> = match &self.tls {
                    Some(tls) => Box::new(tls.connect(addr, tcp).await.map_err(|e| {
                        CallError::Unreachable(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!("TLS: {e}"),
                        ))
                    })?),
                    None => Box::new(tcp),
                };
                if let Some(secret) = &self.secret {
                    as_caller(&mut *stream, secret)
                        .await
                        .map_err(CallError::Unreachable)?;
                }
                self.stream = Some(stream);
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(CallError::Unreachable(io::ErrorKind::NotConnected.into()));
            };
            write_frame(&mut **stream, &envelope).await.map_err(|e| {
                if e.kind() == io::ErrorKind::InvalidInput {
                    CallError::TooLarge
                } else {
                    CallError::Network(e)
                }
            })?;
            read_frame::<Response>(&mut **stream)
                .await
                .map_err(CallError::Network)
        })
        .await;
        let result = result.unwrap_or_else(|_| {
            Err(CallError::Network(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from node {} within {ttl:?}", self.target),
            )))
        });
        if result.is_err() {
            // The connection may be in the middle of a frame: start afresh.
            self.stream = None;
        }
        match result {
            Ok(Response::WrongNode { id }) => Err(CallError::Unreachable(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is node {id}, not node {}", self.addr, self.target),
            ))),
            other => other,
        }
    }
}

fn rpc_error<E: std::error::Error>(error: CallError) -> RPCError<NodeId, Member, E> {
    match error {
        CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
        // Too many entries: openraft sends fewer next time.
        CallError::TooLarge => RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(8)),
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<NodeId, Member, E> {
    let error = io::Error::new(io::ErrorKind::InvalidData, "answer of the wrong kind");
    RPCError::Network(NetworkError::new(&error))
}

fn remote<E: std::error::Error>(
    target: NodeId,
    error: RaftError<NodeId, E>,
) -> RPCError<NodeId, Member, RaftError<NodeId, E>> {
    RPCError::RemoteError(openraft::error::RemoteError::new(target, error))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.call(Request::Append(rpc), option.hard_ttl()).await {
            Ok(Response::Append(Ok(response))) => Ok(response),
            Ok(Response::Append(Err(error))) => Err(remote(self.target, error)),
            Ok(_) => Err(unexpected()),
            Err(error) => Err(rpc_error(error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(Request::Snapshot(rpc), option.hard_ttl()).await {
            Ok(Response::Snapshot(Ok(response))) => Ok(response),
            Ok(Response::Snapshot(Err(error))) => Err(remote(self.target, error)),
            Ok(_) => Err(unexpected()),
            Err(error) => Err(rpc_error(error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.call(Request::Vote(rpc), option.hard_ttl()).await {
            Ok(Response::Vote(Ok(response))) => Ok(response),
            Ok(Response::Vote(Err(error))) => Err(remote(self.target, error)),
            Ok(_) => Err(unexpected()),
            Err(error) => Err(rpc_error(error)),
        }
    }
}
