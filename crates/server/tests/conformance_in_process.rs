//! The conformance checklist of the protocol spec (§11) again, each
//! connection an in-process pipe (`ServerHandle::connect_in_process`)
//! instead of a TCP socket, on a virtual clock: the same items
//! (`conformance/suite.rs`) through the same session and driver, with no
//! socket in the way and tokio's time paused (the server counts lease time
//! on the runtime's clock, `ServerConfig::runtime_clock`), so the items'
//! timeouts and leases pass without waiting. The two items that open
//! sockets themselves (the listener closing on drain, TLS) run on the real
//! clock, since paused time would race their real I/O.

use dflockd_testkit::wire as support;

use dflockd_server::ServerConfig;

/// This run's connections: in-process pipes.
const TRANSPORT: support::Transport = support::Transport::InProcess;

/// An item: a test on a paused (virtual) clock.
macro_rules! conformance_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test(start_paused = true)]
        async fn $name() $body
    };
}

/// An item that opens sockets of its own: a test on the real clock.
macro_rules! socket_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test]
        async fn $name() $body
    };
}

/// A server whose table counts time on the runtime's clock, so it follows
/// the paused one (shadows `support::start`).
async fn start() -> ServerHandle {
    start_with(|_| {}).await
}

/// [`start`] with `tweak` applied (shadows `support::start_with`).
async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    support::start_with(|config| {
        config.runtime_clock = true;
        tweak(config);
    })
    .await
}

include!("conformance/suite.rs");
