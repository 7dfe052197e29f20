//! Mutual TLS on Raft links: nodes whose certificates chain to the
//! cluster's CA form a cluster; a node with a certificate from another CA
//! is kept out, and so is a peer that does not speak TLS.

use std::time::Duration;

use dflockd_cluster::{
    AdminError, MembershipChange, Network, NodeOptions, RaftSecret, RaftTls, change_membership,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

use support::{WAIT, acquire, agreed_leader, commit, fence_of, listeners, start_cluster};

/// A CA, and a node identity for 127.0.0.1 issued by it.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn node(&self) -> RaftTls {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        RaftTls::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            self.pem.as_bytes(),
        )
        .unwrap()
    }
}

fn secret() -> RaftSecret {
    RaftSecret::new(vec![5; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_the_ca_replicate_and_a_stranger_is_kept_out() {
    let (ours, theirs) = (Ca::new(), Ca::new());
    // Nodes 1 and 2 hold certificates of the cluster's CA; node 3, with
    // the right secret, one of another CA.
    let (_dirs, nodes) = start_cluster(listeners(3).await, |i| NodeOptions {
        network: Network::with_secret(secret()).with_tls(if i < 2 {
            ours.node()
        } else {
            theirs.node()
        }),
        ..NodeOptions::default()
    })
    .await;
    let leader = agreed_leader(&[&nodes[0], &nodes[1]]).await;
    let leader = &nodes[(leader - 1) as usize];
    let effects = commit(leader, acquire(1, "a")).await;
    fence_of(&effects);
    let follower = &nodes[if leader.id() == 1 { 1 } else { 0 }];
    follower
        .raft()
        .wait(Some(WAIT))
        .applied_index_at_least(
            leader
                .raft()
                .metrics()
                .borrow()
                .last_applied
                .map(|l| l.index),
            "applied",
        )
        .await
        .unwrap();
    assert_eq!(
        follower.view().read(dflockd_core::LockTable::holder_count),
        1
    );
    // Node 3 never received an entry (an observation window: it is the
    // absence of an event).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(nodes[2].raft().metrics().borrow().last_log_index, None);
    // An operator removes the stranger: over TLS with an identity of the
    // cluster's CA; without TLS the member hangs up.
    let remove = MembershipChange::RemoveVoter { id: 3 };
    let plain = Network::with_secret(secret());
    let refused = change_membership(follower.raft_addr(), &plain, remove.clone(), WAIT).await;
    assert!(
        matches!(refused, Err(AdminError::Unreachable { .. })),
        "{refused:?}"
    );
    let operator = Network::with_secret(secret()).with_tls(ours.node());
    change_membership(follower.raft_addr(), &operator, remove, WAIT)
        .await
        .unwrap();
    leader
        .raft()
        .wait(Some(WAIT))
        .voter_ids([1, 2], "node 3 removed")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_peer_without_tls_is_disconnected() {
    let ca = Ca::new();
    let (_dirs, nodes) = start_cluster(listeners(1).await, |_| NodeOptions {
        network: Network::with_secret(secret()).with_tls(ca.node()),
        ..NodeOptions::default()
    })
    .await;
    // The secret's first message in the clear is no TLS hello.
    let mut stream = TcpStream::connect(nodes[0].raft_addr()).await.unwrap();
    stream.write_all(&[0u8; 32]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert!(matches!(&read, Ok(Ok(_) | Err(_))), "still open: {read:?}");
    // Whatever came back was a TLS alert at most, never the secret's
    // 64-byte hello.
    assert_ne!(rest.len(), 64, "answered in the clear");
}
