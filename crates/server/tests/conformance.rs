//! The conformance checklist of the protocol spec (§11), as raw bytes over
//! TCP against an embedded server (`conformance_in_process.rs` runs the
//! same items over in-process pipes). One test per item (or small group); the
//! item numbers are in the test names.
//!
//! Every test starts its own server on 127.0.0.1 with an ephemeral port;
//! items that need flags set the matching `ServerConfig` fields. Where the
//! spec uses `--read-timeout 2`, these tests use a 1 s read timeout and
//! scale the other durations of the item by the same ratio. Leases are whole
//! seconds on the wire, so items about lease expiry take 1–3 s of real time.
//!
//! Not applicable to a single-node v2.1 server (cluster branch only), so
//! not covered:
//! * 36 — `stable-ref` argument validation;
//! * 100 — single-node `barrier` answering `ok`;
//! * 101 — `stable-ref` binding;
//! * 102 — follower redirects (`error_not_leader`).
//!
//! Like v2.1, this server answers `barrier` and `stable-ref` as unknown
//! commands (`error`, connection open); see
//! `v21_barrier_and_stable_ref_are_unknown_commands`. Item 31 follows the
//! cluster-branch rule (semaphore limits capped at 1,048,576), which this
//! server implements.

use dflockd_testkit::wire as support;

/// This run's connections: TCP to 127.0.0.1.
const TRANSPORT: support::Transport = support::Transport::Tcp;

/// An item: a test on the real clock.
macro_rules! conformance_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test]
        async fn $name() $body
    };
}

/// An item that opens sockets of its own: a test on the real clock.
macro_rules! socket_test {
    ($($item:tt)*) => { conformance_test! { $($item)* } };
}

include!("conformance/suite.rs");
