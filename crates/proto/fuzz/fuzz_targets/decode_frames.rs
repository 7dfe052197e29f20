//! Arbitrary bytes through `FrameDecoder` and `Request::parse`.
//!
//! Checks, for every input:
//! * nothing panics;
//! * `feed` consumes at least one byte per call, `NeedMore` only when it
//!   consumed everything, and frames end right after an LF;
//! * no stored line is above its cap (256 bytes; 64 KiB for the argument of
//!   `auth`);
//! * feeding the same bytes in pieces (size taken from the first byte)
//!   produces the same frames as feeding them whole;
//! * every request that parses re-encodes to one frame that parses back to
//!   an equal request;
//! * every line that parses as a reply re-encodes to a line that parses back
//!   to an equal reply.
#![no_main]

use dflockd_proto::{FrameDecoder, MAX_AUTH_LINE, MAX_LINE, Progress, Reply, Request};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame(Vec<u8>, Vec<u8>, Vec<u8>),
    Oversize,
}

/// Decodes `data` fed in pieces of at most `piece` bytes, up to the first
/// oversize line (where the server closes the connection).
fn decode(data: &[u8], piece: usize) -> Vec<Event> {
    let mut decoder = FrameDecoder::new();
    let mut events = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let (used, progress) = decoder.feed(rest);
            assert!(
                used >= 1 && used <= rest.len(),
                "consumed {used} of {}",
                rest.len()
            );
            let line_end = rest[used - 1] == b'\n';
            rest = &rest[used..];
            let frame = decoder.frame();
            assert!(frame.command.len() <= MAX_LINE);
            assert!(frame.key.len() <= MAX_LINE);
            let arg_cap = if frame.command == b"auth" {
                MAX_AUTH_LINE
            } else {
                MAX_LINE
            };
            assert!(frame.argument.len() <= arg_cap);
            match progress {
                Progress::NeedMore => assert!(rest.is_empty()),
                Progress::Frame => {
                    assert!(line_end);
                    events.push(Event::Frame(
                        frame.command.to_vec(),
                        frame.key.to_vec(),
                        frame.argument.to_vec(),
                    ));
                }
                Progress::Oversize => {
                    assert!(line_end);
                    events.push(Event::Oversize);
                    return events;
                }
            }
        }
    }
    events
}

fn parse(command: &[u8], key: &[u8], argument: &[u8]) -> Option<Request> {
    let bytes = [command, b"\n", key, b"\n", argument, b"\n"].concat();
    let mut decoder = FrameDecoder::new();
    assert_eq!(decoder.feed(&bytes), (bytes.len(), Progress::Frame));
    Request::parse(&decoder.frame()).ok()
}

fn assert_round_trip(request: &Request) {
    let bytes = request.encode_to_vec();
    let mut decoder = FrameDecoder::new();
    assert_eq!(
        decoder.feed(&bytes),
        (bytes.len(), Progress::Frame),
        "{request:?} -> {bytes:?}"
    );
    assert_eq!(
        Request::parse(&decoder.frame()).as_ref(),
        Ok(request),
        "{bytes:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let piece = data.first().map_or(1, |&b| usize::from(b % 64) + 1);
    let events = decode(data, usize::MAX);
    assert_eq!(decode(data, piece), events);

    for event in &events {
        if let Event::Frame(command, key, argument) = event
            && let Some(request) = parse(command, key, argument)
        {
            assert_round_trip(&request);
        }
    }

    for line in data.split(|&b| b == b'\n') {
        if let Ok(reply) = Reply::parse(line) {
            assert_eq!(Reply::parse(&reply.encode_to_vec()), Ok(reply));
        }
    }
});
