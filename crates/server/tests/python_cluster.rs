//! What the real Python client 2.1.1 (which knows nothing of clusters)
//! sees against a three-node cluster of ours, in this process: on the
//! leader everything works; a follower refuses a lock with
//! `error_not_leader <leader>`, which the Python client reports as a
//! generic `DflockdError` naming the status.

use std::process::Command;

use dflockd_testkit::cluster::TestCluster;
use dflockd_testkit::python::interop_python;

/// Takes and releases a lock on the leader, then tries one on the
/// follower; prints one line per outcome.
const SCRIPT: &str = r#"
import sys
from dflockd_client import SyncDistributedLock
from dflockd_client.errors import DflockdError
leader, follower = int(sys.argv[1]), int(sys.argv[2])
lk = SyncDistributedLock("py-cluster", acquire_timeout_s=5, lease_ttl_s=10,
                         servers=[("127.0.0.1", leader)])
print("leader acquire", lk.acquire(), "fence" if lk.token else "no token")
print("leader release", lk.release())
lk.close()
other = SyncDistributedLock("py-cluster", acquire_timeout_s=5,
                            servers=[("127.0.0.1", follower)])
try:
    other.acquire()
    print("follower granted")
except DflockdError as error:
    print("follower refused:", type(error).__name__, error)
finally:
    other.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_works_on_the_leader_and_is_refused_by_a_follower() {
    let cluster = TestCluster::start(3).await;
    let (leader, _) = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let python = interop_python(env!("CARGO_TARGET_TMPDIR"));
    let (leader_port, follower_port) = (
        cluster.client_addrs[leader].port(),
        cluster.client_addrs[follower].port(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", SCRIPT])
            .arg(leader_port.to_string())
            .arg(follower_port.to_string())
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed");
    assert!(text.contains("leader acquire True fence"), "{text}");
    assert!(text.contains("leader release True"), "{text}");
    let leader_addr = cluster.client_addrs[leader].to_string();
    let refused = text
        .lines()
        .find(|l| l.starts_with("follower refused:"))
        .unwrap_or_else(|| panic!("the follower granted: {text}"));
    assert!(
        refused.contains("error_not_leader") && refused.contains(&leader_addr),
        "{refused}"
    );
}
