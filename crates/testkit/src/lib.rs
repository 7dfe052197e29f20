//! Test support for the dflockd-rs workspace (not published): everything
//! the suites share, in one place.
//!
//! * [`faultproxy`]: a fault-injecting TCP proxy (latency, jitter,
//!   throttling, blackholes, half-close, symmetric and asymmetric resets);
//! * [`wire`]: a raw-bytes protocol client and parsers for the server's
//!   conformance suites, with an embedded server on an ephemeral port;
//! * [`cluster`]: three (or more) cluster nodes in one process on loopback,
//!   every Raft link behind its own fault proxy;
//! * [`cluster_under_test`]: that, or an external cluster of processes
//!   (`DFLOCKD_TEST_CLUSTER`), for the cluster-aware client suite;
//! * [`client`]: the client suite's server (embedded, or external through
//!   `DFLOCKD_TEST_*`), unique keys, and [`both_modes!`] to run a test once
//!   per client transport;
//! * [`queue`]: queue observations through the client;
//! * [`pki`]: a throwaway CA and leaf certificate;
//! * [`python`]: the virtual environment with the real Python client.
//!
//! ```
//! let pki = dflockd_testkit::pki::generate("testkit CA");
//! assert!(pki.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! ```

pub mod client;
pub mod cluster;
pub mod cluster_under_test;
pub mod faultproxy;
pub mod pki;
pub mod python;
pub mod queue;
pub mod wire;
