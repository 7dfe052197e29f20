//! A leader cut off from the majority: it cannot commit, so it grants
//! nothing, while the majority elects a new leader that grants; once the
//! partition heals, every node holds the same single holder.
//!
//! Every Raft link runs through its own fault proxy (one per ordered pair
//! of nodes, set as a route on the sending node), so a node can be cut
//! off in both directions.

use std::net::SocketAddr;
use std::time::Duration;

mod support;

use dflockd_cluster::{Network, Node, NodeOptions};
use dflockd_testkit::faultproxy::{Blackhole, Direction, FaultProxy, Faults};
use support::{WAIT, acquire, agreed_leader, commit, granted, listeners, start_cluster};

async fn cut(proxy: &FaultProxy) {
    for dir in Direction::BOTH {
        proxy.set_default_faults(dir, Faults::none().with_blackhole(Blackhole::Drop));
    }
    for link in proxy.links() {
        link.blackhole(Blackhole::Drop);
    }
}

async fn heal(proxy: &FaultProxy) {
    for dir in Direction::BOTH {
        proxy.set_default_faults(dir, Faults::none());
    }
    // Dropped bytes broke the framing of the links that were open: reset
    // them, the nodes connect again.
    proxy.cut_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_grants_nothing_and_the_majority_goes_on() {
    let listeners = listeners(3).await;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // proxies[from][to], for from != to.
    let mut proxies: Vec<Vec<Option<FaultProxy>>> = Vec::new();
    for from in 0..3 {
        let mut row = Vec::new();
        for (to, addr) in addrs.iter().enumerate() {
            row.push(if from == to {
                None
            } else {
                Some(FaultProxy::start(*addr).await.unwrap())
            });
        }
        proxies.push(row);
    }
    // Each node sends to each peer through the proxy of that link.
    let (dirs, nodes) = start_cluster(listeners, |from| {
        let network = Network::default();
        for (to, proxy) in proxies[from].iter().enumerate() {
            if let Some(proxy) = proxy {
                network.route(to as u64 + 1, proxy.addr());
            }
        }
        NodeOptions {
            network,
            ..NodeOptions::default()
        }
    })
    .await;
    let all: Vec<&Node> = nodes.iter().collect();
    let old = agreed_leader(&all).await;
    let old_index = (old - 1) as usize;
    let before = granted(&commit(&nodes[old_index], acquire(1, "k")).await).expect("granted");

    // Cut the leader off, both ways.
    for (from, row) in proxies.iter().enumerate() {
        for (to, proxy) in row.iter().enumerate() {
            if let Some(proxy) = proxy
                && (from == old_index || to == old_index)
            {
                cut(proxy).await;
            }
        }
    }
    // The majority elects a new leader and grants `x`.
    let majority: Vec<&Node> = nodes.iter().filter(|n| n.id() != old).collect();
    let new = agreed_leader(&majority).await;
    assert_ne!(new, old);
    let new_node = majority.iter().find(|n| n.id() == new).unwrap();
    let granted_x =
        granted(&commit(new_node, acquire(2, "x")).await).expect("granted on the majority");
    assert!(granted_x > before);
    // The isolated old leader cannot commit `x` for someone else.
    let isolated = tokio::time::timeout(
        Duration::from_secs(3),
        nodes[old_index].propose(acquire(3, "x")),
    )
    .await;
    match isolated {
        Err(_) => {} // still waiting for a quorum: nothing granted
        Ok(Ok(effects)) => panic!("the isolated leader committed: {effects:?}"),
        Ok(Err(_)) => {} // refused
    }

    // Heal: everyone ends up with the majority's table, one holder of `x`.
    for proxy in proxies.iter().flatten().flatten() {
        heal(proxy).await;
    }
    let leader = agreed_leader(&all).await;
    assert_ne!(leader, 0);
    let last = nodes[(leader - 1) as usize]
        .raft()
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |id| id.index);
    let mut tables = Vec::new();
    for node in &nodes {
        node.raft()
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "applied")
            .await
            .unwrap();
        tables.push(node.view().read(|t| t.snapshot().encode()));
        assert_eq!(
            node.view().read(dflockd_core::LockTable::holder_count),
            2,
            "node {}",
            node.id()
        );
    }
    assert!(
        tables.windows(2).all(|w| w[0] == w[1]),
        "the tables differ after healing"
    );
    drop(dirs);
}
