//! Arbitrary bytes to one connection's sans-I/O session, in memory on a
//! virtual clock (no sockets, no runtime), beside a second session that
//! holds the lock and the semaphore `k`.
//!
//! `dflockd_server::fuzzing::session_bytes` checks, for every input:
//! * nothing panics;
//! * every reply line is a well-formed reply (plain or multiplexed);
//! * no more replies than frames (no desync);
//! * once time has passed every timeout, no request is left waiting;
//! * once both sessions are gone, the table holds nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dflockd_server::fuzzing::session_bytes(data);
});
