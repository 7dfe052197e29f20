//! Shared test support for the client suite.
//!
//! [`TestServer::start`] gives the server the shared tests run against: an
//! embedded `dflockd-server` on an ephemeral port by default, or — when
//! `DFLOCKD_TEST_HOST` and/or `DFLOCKD_TEST_PORT` are set — an external
//! server (for instance the Go one), with the same variable names as the
//! Python client's suite:
//!
//! | variable | meaning |
//! |---|---|
//! | `DFLOCKD_TEST_HOST` / `DFLOCKD_TEST_PORT` | plain server (default `127.0.0.1` / `6388`) |
//! | `DFLOCKD_TEST_AUTH_PORT` + `DFLOCKD_TEST_AUTH_TOKEN` | server requiring that token (same host) |
//! | `DFLOCKD_TEST_TLS_PORT` + `DFLOCKD_TEST_TLS_CA` | TLS server on `127.0.0.1`, certificate signed by that CA (PEM file) |
//!
//! External mode never assumes it owns the server: every test draws a random
//! key prefix ([`Keys`]) and only looks at stats entries for its own keys.
//! Tests that need server-side settings (short sweeps, auto-release off, a
//! short read timeout, force-closing the server) call
//! [`TestServer::embedded`]; they always run against an embedded server of
//! their own, also in external mode, and say so in their doc comment.
//! Auth and TLS tests in external mode without their variables print a
//! `SKIPPED …` line and return.

use crate::pki;

use std::future::Future;
use std::time::Duration;

use dflockd_client::{Client, ClientBuilder, ConnectOptions, Connection, ServerAddr, TlsOptions};
use dflockd_server::{Secret, Server, ServerConfig, ServerHandle, TlsConfig};
use tokio::time::Instant;

/// Upper bound for anything that "should happen promptly" in these tests.
pub const BOUND: Duration = Duration::from_secs(5);

/// The external server, if the environment names one.
fn external_addr() -> Option<ServerAddr> {
    let host = std::env::var("DFLOCKD_TEST_HOST").ok();
    let port = std::env::var("DFLOCKD_TEST_PORT").ok();
    if host.is_none() && port.is_none() {
        return None;
    }
    let host = host.unwrap_or_else(|| "127.0.0.1".to_owned());
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .expect("DFLOCKD_TEST_PORT must be a port number")
        })
        .unwrap_or(6388);
    Some(ServerAddr::new(host, port).expect("valid DFLOCKD_TEST_HOST"))
}

/// Whether the suite runs against an external server.
pub fn is_external() -> bool {
    external_addr().is_some()
}

/// Writes a line to the real stderr, past libtest's output capture, so it
/// shows in a plain `cargo test` run.
fn announce(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Prints the line that marks a skipped test (the test itself passes).
pub fn skip(test: &str, why: &str) {
    announce(&format!("SKIPPED {test}: {why}"));
}

/// Notes, in external mode, that an embedded-only test uses its own server.
pub fn embedded_only(test: &str, why: &str) {
    if is_external() {
        announce(&format!(
            "NOTE {test}: embedded-only ({why}); runs against its own embedded server"
        ));
    }
}

/// A server to test against, embedded or external.
pub struct TestServer {
    /// The transport the clients made for this server use: the mode of
    /// the test that started it.
    mode: Mode,
    handle: Option<ServerHandle>,
    addr: ServerAddr,
    tls: Option<TlsOptions>,
    auth: Option<String>,
}

impl TestServer {
    /// The shared-test server: external if configured, else an embedded one
    /// with the default configuration.
    pub async fn start() -> TestServer {
        match external_addr() {
            Some(addr) => TestServer {
                mode: Mode::current(),
                handle: None,
                addr,
                tls: None,
                auth: None,
            },
            None => TestServer::embedded(ServerConfig::ephemeral()).await,
        }
    }

    /// Always an embedded server with this configuration (embedded-only tests).
    pub async fn embedded(config: ServerConfig) -> TestServer {
        let auth = config.auth_token.as_ref().map(|s| s.expose().to_owned());
        let handle = Server::start(config).await.expect("embedded server starts");
        let addr = handle.local_addr().into();
        TestServer {
            mode: Mode::current(),
            handle: Some(handle),
            addr,
            tls: None,
            auth,
        }
    }

    /// A server requiring an auth token: embedded (random token) or the
    /// external one named by `DFLOCKD_TEST_AUTH_PORT` + `DFLOCKD_TEST_AUTH_TOKEN`.
    /// `None` (after printing a skip line) in external mode without them.
    pub async fn with_auth(test: &str) -> Option<TestServer> {
        match external_addr() {
            Some(plain) => {
                let port = std::env::var("DFLOCKD_TEST_AUTH_PORT").ok();
                let token = std::env::var("DFLOCKD_TEST_AUTH_TOKEN").ok();
                let (Some(port), Some(token)) = (port, token) else {
                    skip(
                        test,
                        "external mode without DFLOCKD_TEST_AUTH_PORT and DFLOCKD_TEST_AUTH_TOKEN",
                    );
                    return None;
                };
                let port = port.parse().expect("DFLOCKD_TEST_AUTH_PORT must be a port");
                Some(TestServer {
                    mode: Mode::current(),
                    handle: None,
                    addr: ServerAddr::new(plain.host(), port).expect("auth address"),
                    tls: None,
                    auth: Some(token),
                })
            }
            None => {
                let mut config = ServerConfig::ephemeral();
                config.auth_token = Some(Secret::new(format!("tok-{}", random_hex())));
                Some(TestServer::embedded(config).await)
            }
        }
    }

    /// A TLS server: embedded (fresh CA and leaf for `localhost` and
    /// 127.0.0.1) or the external one named by `DFLOCKD_TEST_TLS_PORT` +
    /// `DFLOCKD_TEST_TLS_CA` on 127.0.0.1. `None` (after printing a skip
    /// line) in external mode without them.
    pub async fn with_tls(test: &str) -> Option<TestServer> {
        if is_external() {
            let port = std::env::var("DFLOCKD_TEST_TLS_PORT").ok();
            let ca = std::env::var("DFLOCKD_TEST_TLS_CA").ok();
            let (Some(port), Some(ca)) = (port, ca) else {
                skip(
                    test,
                    "external mode without DFLOCKD_TEST_TLS_PORT and DFLOCKD_TEST_TLS_CA",
                );
                return None;
            };
            let port = port.parse().expect("DFLOCKD_TEST_TLS_PORT must be a port");
            return Some(TestServer {
                mode: Mode::current(),
                handle: None,
                addr: ServerAddr::new("127.0.0.1", port).expect("TLS address"),
                tls: Some(TlsOptions::with_ca_file(ca).expect("DFLOCKD_TEST_TLS_CA")),
                auth: None,
            });
        }
        let pki = TestPki::generate();
        let mut config = ServerConfig::ephemeral();
        config.tls = Some(pki.server_config());
        let mut server = TestServer::embedded(config).await;
        server.tls = Some(TlsOptions::with_ca_pem(pki.ca_pem.as_bytes()).expect("CA PEM"));
        Some(server)
    }

    /// Whether this is an embedded server.
    pub fn is_embedded(&self) -> bool {
        self.handle.is_some()
    }

    /// The embedded server's handle (embedded-only tests).
    pub fn handle(&self) -> &ServerHandle {
        self.handle
            .as_ref()
            .expect("this test needs an embedded server")
    }

    /// The address clients use.
    pub fn addr(&self) -> ServerAddr {
        self.addr.clone()
    }

    /// The auth token the server expects, if any.
    pub fn auth_token(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    /// The TLS options a client needs, if any.
    pub fn tls(&self) -> Option<TlsOptions> {
        self.tls.clone()
    }

    /// Options for a low-level [`Connection`].
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            tls: self.tls.clone(),
            auth_token: self
                .auth
                .as_ref()
                .map(|t| dflockd_client::AuthToken::new(t.as_str()).expect("auth token")),
            connect_timeout: BOUND,
        }
    }

    /// A client builder pointed at this server (with its TLS and auth), in
    /// the test's transport mode (see [`Mode`]).
    pub fn builder(&self) -> ClientBuilder {
        let mut builder = Client::builder()
            .server(self.addr.clone())
            .connect_timeout(BOUND)
            .multiplex(self.mode == Mode::Mux);
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.clone());
        }
        if let Some(token) = &self.auth {
            builder = builder.auth_token(token).expect("auth token");
        }
        builder
    }

    /// A client with the defaults.
    pub fn client(&self) -> Client {
        self.builder().build().expect("client builds")
    }

    /// A low-level connection.
    pub async fn connection(&self) -> Connection {
        Connection::connect(&self.addr, &self.connect_options())
            .await
            .expect("connect")
    }
}

/// 16 random hex digits.
pub fn random_hex() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Unique keys for one test: `t<random>-<test>-<name>`.
#[derive(Debug, Clone)]
pub struct Keys(String);

impl Keys {
    /// A fresh prefix for `test`.
    pub fn new(test: &str) -> Keys {
        Keys(format!("t{}-{test}", random_hex()))
    }

    /// The key `name` under this test's prefix.
    pub fn key(&self, name: impl std::fmt::Display) -> String {
        format!("{}-{name}", self.0)
    }
}

/// Polls `check` every 20 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waiters queued on `key` (lock or semaphore) of server `index`, from stats.
pub async fn waiters(client: &Client, index: usize, key: &str) -> u64 {
    let stats = client.stats(index).await.expect("stats");
    stats
        .locks
        .iter()
        .filter(|l| l.key == key)
        .map(|l| l.waiters)
        .chain(
            stats
                .semaphores
                .iter()
                .filter(|s| s.key == key)
                .map(|s| s.waiters),
        )
        .sum()
}

/// Whether `key` appears anywhere in server `index`'s stats.
pub async fn listed(client: &Client, index: usize, key: &str) -> bool {
    let stats = client.stats(index).await.expect("stats");
    stats.locks.iter().any(|l| l.key == key)
        || stats.semaphores.iter().any(|s| s.key == key)
        || stats.idle_locks.iter().any(|i| i.key == key)
        || stats.idle_semaphores.iter().any(|i| i.key == key)
}

/// Waits until `key` has no waiters on server `index`.
pub async fn no_waiters(client: &Client, index: usize, key: &str) {
    eventually(&format!("no waiter left on {key}"), BOUND, || async {
        waiters(client, index, key).await == 0
    })
    .await;
}

/// Waits until a try-lock of `key` from `client` succeeds, then releases it.
pub async fn lock_becomes_free(client: &Client, key: &str, within: Duration) {
    let lock = client.lock(key).expect("lock handle");
    let deadline = Instant::now() + within;
    loop {
        if let Some(lease) = lock.try_acquire().await.expect("try-lock") {
            lease.release().await.expect("release");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} still held after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test PKI: a CA and a leaf for `localhost` and 127.0.0.1 signed by it
/// (see the shared `pki` module).
pub struct TestPki {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The leaf certificate (PEM).
    pub cert_pem: String,
    /// The leaf's private key (PEM).
    pub key_pem: String,
}

impl TestPki {
    /// Generates a fresh CA and leaf with rcgen.
    pub fn generate() -> TestPki {
        let pem = pki::generate("dflockd client test CA");
        TestPki {
            ca_pem: pem.ca_pem,
            cert_pem: pem.cert_pem,
            key_pem: pem.key_pem,
        }
    }

    /// The server side of it.
    pub fn server_config(&self) -> TlsConfig {
        TlsConfig::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
            .expect("server TLS config")
    }
}

/// A lease granted on a wait lane: `holder` takes `key`, `waiter` queues for
/// it on a connection of its own (a contended acquire), `holder` releases.
pub async fn contended_lease(
    holder: &Client,
    waiter: &Client,
    key: &str,
    lease: Duration,
) -> dflockd_client::Lease {
    let held = holder
        .lock(key)
        .expect("lock")
        .acquire()
        .await
        .expect("holder acquires");
    let lock = waiter.lock(key).expect("lock").with_lease(lease);
    let index = lock.server();
    let task = tokio::spawn(async move { lock.acquire_within(BOUND).await });
    eventually(&format!("waiter queued on {key}"), BOUND, || async {
        waiters(holder, index, key).await == 1
    })
    .await;
    assert_eq!(
        held.release().await.expect("holder releases"),
        dflockd_client::Released::Released
    );
    task.await
        .expect("waiter task")
        .expect("contended acquire")
        .expect("granted once the holder released")
}

/// The client transport a test runs with. [`both_modes!`] runs each test
/// once per mode; the mode is set on the test's thread before its body
/// runs, and every [`TestServer`] made there keeps it, so the clients it
/// builds use it (also from spawned tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ask for the multiplexed extension: our server grants it (a plain
    /// dflockd refuses it and the client falls back).
    Mux,
    /// Never ask: blocking waits and tickets use connections of their own.
    Plain,
}

thread_local! {
    static MODE: std::cell::Cell<Mode> = const { std::cell::Cell::new(Mode::Mux) };
}

impl Mode {
    /// Makes this the mode of the tests' clients on this thread.
    pub fn enter(self) {
        MODE.with(|mode| mode.set(self));
    }

    /// The mode set on this thread (mux unless a test entered another).
    pub fn current() -> Mode {
        MODE.with(std::cell::Cell::get)
    }
}

/// Runs each test function given once per transport mode: a test `name`
/// becomes `name::mux` and `name::plain`, and fails if either fails.
/// Attributes (the test attribute, doc comments) apply to both.
#[macro_export]
macro_rules! both_modes {
    ($(#[$attr:meta])* async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn mux() {
                $crate::client::Mode::Mux.enter();
                $body
            }

            $(#[$attr])*
            async fn plain() {
                $crate::client::Mode::Plain.enter();
                $body
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            fn mux() {
                $crate::client::Mode::Mux.enter();
                $body
            }

            $(#[$attr])*
            fn plain() {
                $crate::client::Mode::Plain.enter();
                $body
            }
        }
    };
}
pub use crate::both_modes;

/// A two-phase ticket of `client` for lock `key`, which must be held by
/// someone else (so the enqueue answers `queued`).
pub async fn queued_ticket(client: &Client, key: &str) -> dflockd_client::Ticket {
    match client
        .lock(key)
        .expect("lock")
        .enqueue()
        .await
        .expect("enqueue")
    {
        dflockd_client::Enqueue::Queued(ticket) => ticket,
        dflockd_client::Enqueue::Acquired(_) => panic!("{key}: expected a held key to queue"),
    }
}
