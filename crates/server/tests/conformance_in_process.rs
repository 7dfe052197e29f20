//! The conformance checklist of the protocol spec (§11) again, each
//! connection an in-process pipe (`ServerHandle::connect_in_process`)
//! instead of a TCP socket: the same items (`conformance/suite.rs`) through
//! the same session and driver, with no socket in the way. Items that are
//! about sockets themselves (TLS, the listener closing on drain) still open
//! those over TCP.

mod support;

/// This run's connections: in-process pipes.
const TRANSPORT: support::Transport = support::Transport::InProcess;

include!("conformance/suite.rs");
