//! The decoder's fast path (`FrameDecoder::decode_common`) against the
//! general one (`decode` + `Request::parse_reusing`).
//!
//! Checks, for every input (the first byte picks a recent key, the rest is
//! the buffer):
//! * nothing panics;
//! * when the fast path takes a frame, the general path on a fresh decoder
//!   gives the same request from the same bytes, and both decoders end in
//!   the same state (lines completed, inside a frame or not);
//! * the fast path never takes more bytes than the buffer holds.
#![no_main]

use dflockd_proto::{Decoded, FrameDecoder, Key, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let keys = ["k", "jobs/nightly", "a-key-longer-than-twenty-two-bytes"];
    let recent = (pick as usize % 4 < 3).then(|| Key::new(keys[pick as usize % 4]).unwrap());
    let mut fast = FrameDecoder::new();
    let Some((used, request)) = fast.decode_common(input, recent.as_ref()) else {
        return;
    };
    assert!(used >= 1 && used <= input.len(), "used {used} of {}", input.len());
    let mut general = FrameDecoder::new();
    let (general_used, decoded) = general.decode(input);
    let Decoded::Frame(frame) = decoded else {
        panic!("the fast path took a frame the general path does not see: {decoded:?}");
    };
    let expected: Request = Request::parse_reusing(&frame, recent.as_ref())
        .unwrap_or_else(|error| panic!("the fast path took a frame that does not parse: {error}"));
    assert_eq!(used, general_used, "bytes used differ");
    assert_eq!(request, expected, "requests differ");
    assert_eq!(fast.lines_completed(), general.lines_completed());
    assert_eq!(fast.in_frame(), general.in_frame());
});
