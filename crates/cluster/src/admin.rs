//! The operator's side of membership changes: send a
//! [`MembershipChange`] to any node's Raft address, authenticated with the
//! cluster secret, and follow it to the leader.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

use crate::member::{ChangeRefused, MembershipChange};
use crate::network::{CallError, Network, Peer, Request, Response};

/// How many leaders a change follows before giving up (a leader that
/// moves while the change travels is sent on once or twice, no more).
const MAX_REDIRECTS: usize = 3;

/// Why a membership change was not made.
///
/// ```
/// use dflockd_cluster::{AdminError, ChangeRefused};
/// let error = AdminError::Refused { addr: "127.0.0.1:7001".parse().unwrap(), refused: ChangeRefused::Failed("no".into()) };
/// assert_eq!(error.to_string(), "node at 127.0.0.1:7001 refused the change: no");
/// ```
#[derive(Debug, Error)]
pub enum AdminError {
    /// No answer from the node (down, wrong address, wrong secret, or the
    /// change took longer than the time allowed).
    #[error("no answer from the node at {addr}: {reason}")]
    Unreachable {
        /// The node's Raft address.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The node answered no.
    #[error("node at {addr} refused the change: {refused}")]
    Refused {
        /// The node's Raft address.
        addr: SocketAddr,
        /// Its answer.
        refused: ChangeRefused,
    },
    /// The leader moved on every try.
    #[error("the leader moved {MAX_REDIRECTS} times; last asked the node at {addr}")]
    TooManyRedirects {
        /// The last node asked.
        addr: SocketAddr,
    },
}

/// Asks the cluster of the node listening at `addr` (its Raft address) to
/// make `change`, going on to the leader when that node does not lead;
/// links are secured as `network`'s (the cluster secret, TLS).
/// Returns once the change has committed; adding a voter waits until the
/// new node has caught up with the log. `within` bounds each node's part.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_cluster::{Member, MembershipChange, Network, RaftSecret, change_membership};
/// let secret = RaftSecret::new(std::fs::read("/etc/dflockd/raft-secret")?)?;
/// let add = MembershipChange::AddVoter { id: 4, member: Member::new("10.0.0.4:7004", "10.0.0.4:6388") };
/// let network = Network::with_secret(secret);
/// change_membership("10.0.0.1:7001".parse()?, &network, add, std::time::Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
pub async fn change_membership(
    addr: SocketAddr,
    network: &Network,
    change: MembershipChange,
    within: Duration,
) -> Result<(), AdminError> {
    let mut addr = addr;
    for _ in 0..=MAX_REDIRECTS {
        let mut peer = Peer::to_any(addr, network);
        let reason = match peer.call(Request::Change(change.clone()), within).await {
            Ok(Response::Change(Ok(()))) => return Ok(()),
            Ok(Response::Change(Err(ChangeRefused::NotLeader {
                leader: Some((id, leader)),
            }))) => match leader.raft.parse::<SocketAddr>() {
                Ok(next) if next != addr => {
                    tracing::debug!(%addr, leader = id, %next, "following the leader");
                    addr = next;
                    continue;
                }
                _ => {
                    return Err(AdminError::Refused {
                        addr,
                        refused: ChangeRefused::NotLeader {
                            leader: Some((id, leader)),
                        },
                    });
                }
            },
            Ok(Response::Change(Err(refused))) => {
                return Err(AdminError::Refused { addr, refused });
            }
            Ok(_) => "an answer of the wrong kind".to_string(),
            Err(CallError::Unreachable(e) | CallError::Network(e)) => e.to_string(),
            Err(CallError::TooLarge) => "the request does not fit in a frame".to_string(),
        };
        return Err(AdminError::Unreachable { addr, reason });
    }
    Err(AdminError::TooManyRedirects { addr })
}
