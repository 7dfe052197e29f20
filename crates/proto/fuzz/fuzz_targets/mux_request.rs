//! Arbitrary bytes through `FrameDecoder` and `MuxRequest::parse` (the
//! multiplexed extension's request parser).
//!
//! Checks, for every input:
//! * nothing panics;
//! * a frame that parses re-encodes (`MuxRequest::encode`) to one frame
//!   that parses back to an equal request.
#![no_main]

use dflockd_proto::{Decoded, FrameDecoder, MuxError, MuxRequest};
use libfuzzer_sys::fuzz_target;

fn frames(data: &[u8]) -> Vec<Result<MuxRequest, MuxError>> {
    let mut decoder = FrameDecoder::new();
    let mut parsed = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (used, decoded) = decoder.decode(rest);
        rest = &rest[used..];
        match decoded {
            Decoded::Frame(frame) => parsed.push(MuxRequest::parse(&frame)),
            // The server closes the connection here.
            Decoded::Oversize => break,
            Decoded::NeedMore => break,
        }
    }
    parsed
}

fuzz_target!(|data: &[u8]| {
    for parsed in frames(data) {
        match parsed {
            Ok(request) => {
                let mut bytes = Vec::new();
                request.encode(&mut bytes);
                let again = frames(&bytes);
                assert_eq!(again.len(), 1, "re-encoded to {} frames", again.len());
                match &again[0] {
                    Ok(back) => assert_eq!(back, &request),
                    Err(error) => panic!("re-encoded request does not parse: {error}"),
                }
            }
            // Refused frames only must not panic.
            Err(MuxError::Invalid { .. } | MuxError::NoId) => {}
        }
    }
});
