//! Who is in the cluster: a member's two addresses, and the membership
//! changes an operator asks for (`dflock cluster add|remove`), applied
//! by the leader.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{NodeId, TypeConfig};

/// A member of the cluster as its membership records it: where peers send
/// it Raft messages, and where clients are sent when it leads (the address
/// in `error_not_leader`). Every node learns both from the log, so a node
/// added later is found by all.
///
/// ```
/// use dflockd_cluster::Member;
/// let member = Member::new("10.0.0.4:7004", "10.0.0.4:6388");
/// assert_eq!(member.to_string(), "10.0.0.4:7004@10.0.0.4:6388");
/// let raft_only: Member = "127.0.0.1:7001".parse::<std::net::SocketAddr>().unwrap().into();
/// assert_eq!(raft_only.client, "");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of its Raft listener.
    pub raft: String,
    /// `host:port` clients use; empty when unknown.
    pub client: String,
}

impl Member {
    /// A member with both addresses.
    ///
    /// ```
    /// let member = dflockd_cluster::Member::new("a:1", "a:2");
    /// assert_eq!((member.raft.as_str(), member.client.as_str()), ("a:1", "a:2"));
    /// ```
    pub fn new(raft: impl Into<String>, client: impl Into<String>) -> Member {
        Member {
            raft: raft.into(),
            client: client.into(),
        }
    }
}

impl From<SocketAddr> for Member {
    fn from(raft: SocketAddr) -> Member {
        Member::new(raft.to_string(), "")
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.raft, self.client)
    }
}

/// A change of the voters, as an operator asks for it.
///
/// ```
/// use dflockd_cluster::{Member, MembershipChange};
/// let add = MembershipChange::AddVoter { id: 4, member: Member::new("h:7004", "h:6391") };
/// assert_eq!(add.to_string(), "add node 4 (h:7004@h:6391)");
/// assert_eq!(MembershipChange::RemoveVoter { id: 4 }.to_string(), "remove node 4");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add node `id` as a learner, wait until it has caught up with the
    /// log, then make it a voter.
    AddVoter {
        /// The new node's id.
        id: NodeId,
        /// Its addresses.
        member: Member,
    },
    /// Remove node `id` from the voters and the cluster.
    RemoveVoter {
        /// The node to remove.
        id: NodeId,
    },
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::AddVoter { id, member } => write!(f, "add node {id} ({member})"),
            MembershipChange::RemoveVoter { id } => write!(f, "remove node {id}"),
        }
    }
}

/// Why a node did not apply a [`MembershipChange`].
///
/// ```
/// use dflockd_cluster::{ChangeRefused, Member};
/// let refused = ChangeRefused::NotLeader { leader: Some((2, Member::new("h:7002", "h:6389"))) };
/// assert!(refused.to_string().contains("node 2"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ChangeRefused {
    /// Only the leader changes the membership; this is the leader known.
    #[error("{}", match leader {
        Some((id, member)) => format!("not the leader; node {id} at {} leads", member.raft),
        None => "not the leader, and no leader is known".to_string(),
    })]
    NotLeader {
        /// The leader's id and addresses, when known.
        leader: Option<(NodeId, Member)>,
    },
    /// The change failed (an invalid change, no quorum, shutdown, …).
    #[error("{0}")]
    Failed(String),
}

fn refused(error: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ChangeRefused {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ChangeRefused::NotLeader {
                leader: forward.leader_id.zip(forward.leader_node),
            }
        }
        other => ChangeRefused::Failed(other.to_string()),
    }
}

/// Applies `change` on this node's `raft` (which must lead).
pub(crate) async fn apply(
    raft: &Raft<TypeConfig>,
    change: MembershipChange,
) -> Result<(), ChangeRefused> {
    match change {
        MembershipChange::AddVoter { id, member } => {
            if member.raft.parse::<SocketAddr>().is_err() {
                return Err(ChangeRefused::Failed(format!(
                    "node {id}: the Raft address {:?} is not host:port with an IP address",
                    member.raft
                )));
            }
            raft.add_learner(id, member, true).await.map_err(refused)?;
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(refused)?;
        }
        MembershipChange::RemoveVoter { id } => {
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(refused)?;
        }
    }
    Ok(())
}
