//! The multiplexing extension (`docs/protocol-mux.md`): after a client's
//! `hello _ mux` is accepted, every request carries an id on its command
//! line and every reply starts with the id of the request it answers, so
//! blocking waits and everything else interleave on one connection.
//!
//! A plain dflockd v2 server answers the `hello` with `error` and keeps the
//! connection open (spec §1.11, §2.12), so a client can probe for the
//! extension and fall back.

use crate::values::{push_decimal, trim_space};
use crate::{ProtoError, RawFrame, Reply, ReplyError, Request};

/// Version of the extension this crate speaks.
///
/// ```
/// use dflockd_proto::{MUX_ACCEPTED, MUX_VERSION};
/// assert_eq!(MUX_ACCEPTED, format!("ok mux {MUX_VERSION}"));
/// ```
pub const MUX_VERSION: u32 = 1;

/// The negotiation request, as a client sends it.
///
/// ```
/// assert_eq!(dflockd_proto::MUX_HELLO, b"hello\n_\nmux\n");
/// ```
pub const MUX_HELLO: &[u8] = b"hello\n_\nmux\n";

/// The reply line (without LF) by which a server accepts the extension.
///
/// ```
/// assert_eq!(dflockd_proto::MUX_ACCEPTED, "ok mux 1");
/// ```
pub const MUX_ACCEPTED: &str = "ok mux 1";

/// Whether a plain frame is the mux negotiation request (`hello`, any key,
/// argument `mux`).
///
/// ```
/// use dflockd_proto::{FrameDecoder, is_mux_hello};
/// let mut d = FrameDecoder::new();
/// d.feed(b"hello\n_\nmux\n");
/// assert!(is_mux_hello(&d.frame()));
/// ```
pub fn is_mux_hello(frame: &RawFrame<'_>) -> bool {
    trim_space(frame.command) == b"hello" && trim_space(frame.argument) == b"mux"
}

/// What a mux request asks for.
///
/// ```
/// use dflockd_proto::{FrameDecoder, MuxBody, MuxRequest, Request};
/// let mut d = FrameDecoder::new();
/// d.feed(b"4 ping\n_\n_\n");
/// assert_eq!(MuxRequest::parse(&d.frame()).unwrap().body, MuxBody::Request(Request::Ping));
/// d.feed(b"5 cancel\n_\n4\n");
/// assert_eq!(MuxRequest::parse(&d.frame()).unwrap().body, MuxBody::Cancel(4));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxBody {
    /// Any dflockd v2 request.
    Request(Request),
    /// `cancel`: withdraw the waiting request with this id.
    Cancel(u64),
}

/// One validated mux request.
///
/// ```
/// use dflockd_proto::{FrameDecoder, MuxBody, MuxRequest, Request};
/// let mut d = FrameDecoder::new();
/// d.feed(b"7 w 3\nk\n10\n");
/// let m = MuxRequest::parse(&d.frame()).unwrap();
/// assert_eq!((m.id, m.ticket), (7, 3));
/// assert!(matches!(m.body, MuxBody::Request(Request::Wait { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxRequest {
    /// The request id, echoed in its reply.
    pub id: u64,
    /// The two-phase ticket of an `e`/`se`/`w`/`sw` (0 when not given).
    pub ticket: u64,
    /// The request itself.
    pub body: MuxBody,
}

/// Why a mux frame was rejected.
///
/// ```
/// use dflockd_proto::{FrameDecoder, MuxError, MuxRequest, ProtoError};
/// let mut d = FrameDecoder::new();
/// d.feed(b"7 l\na b\n0\n");
/// // Answered `7 error`; the connection stays open.
/// assert_eq!(MuxRequest::parse(&d.frame()), Err(MuxError::Invalid { id: 7, error: ProtoError::InvalidKey }));
/// d.feed(b"x l\nk\n0\n");
/// assert_eq!(MuxRequest::parse(&d.frame()), Err(MuxError::NoId));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// No usable id: the reply cannot be addressed, so the server answers a
    /// bare `error` and closes the connection.
    #[error("mux frame without a valid request id")]
    NoId,
    /// The id is fine but the request is not: answered `<id> error`, and
    /// the connection stays open.
    #[error("request {id}: {error}")]
    Invalid {
        /// The request id.
        id: u64,
        /// What was wrong.
        error: ProtoError,
    },
}

impl MuxRequest {
    /// Validates a mux frame: `<id> <command>[ <ticket>]`, then the key and
    /// argument lines of the v2 command (`cancel` takes `_` and the target
    /// id).
    ///
    /// ```
    /// use dflockd_proto::{FrameDecoder, MuxBody, MuxError, MuxRequest};
    /// let mut d = FrameDecoder::new();
    /// d.feed(b"9 cancel\n_\n7\n");
    /// assert_eq!(MuxRequest::parse(&d.frame()).unwrap().body, MuxBody::Cancel(7));
    /// d.feed(b"ping\n_\n_\n");
    /// assert_eq!(MuxRequest::parse(&d.frame()), Err(MuxError::NoId));
    /// ```
    pub fn parse(frame: &RawFrame<'_>) -> Result<MuxRequest, MuxError> {
        let mut words = frame
            .command
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty());
        let id = words.next().and_then(parse_u64).ok_or(MuxError::NoId)?;
        let invalid = |error| MuxError::Invalid { id, error };
        let command = words.next().ok_or(invalid(ProtoError::UnknownCommand))?;
        let ticket = match words.next() {
            None => None,
            Some(word) => Some(parse_u64(word).ok_or(invalid(ProtoError::InvalidInteger))?),
        };
        if words.next().is_some() {
            return Err(invalid(ProtoError::BadArity));
        }
        if command == b"cancel" {
            if ticket.is_some() {
                return Err(invalid(ProtoError::BadArity));
            }
            let target =
                parse_u64(trim_space(frame.argument)).ok_or(invalid(ProtoError::InvalidInteger))?;
            return Ok(MuxRequest {
                id,
                ticket: 0,
                body: MuxBody::Cancel(target),
            });
        }
        let inner = RawFrame {
            command,
            key: frame.key,
            argument: frame.argument,
        };
        let request = Request::parse(&inner).map_err(invalid)?;
        let two_phase = matches!(request, Request::Enqueue { .. } | Request::Wait { .. });
        if ticket.is_some() && !two_phase {
            return Err(invalid(ProtoError::BadArity));
        }
        Ok(MuxRequest {
            id,
            ticket: ticket.unwrap_or(0),
            body: MuxBody::Request(request),
        })
    }

    /// Appends the mux frame to `out`.
    ///
    /// ```
    /// use dflockd_proto::{Key, MuxBody, MuxRequest, Namespace, Request, Seconds};
    /// let wait = Request::Wait { key: Key::new("k").unwrap(), namespace: Namespace::Lock, timeout: Seconds::new(5).unwrap() };
    /// let m = MuxRequest { id: 12, ticket: 4, body: MuxBody::Request(wait) };
    /// let mut out = Vec::new();
    /// m.encode(&mut out);
    /// assert_eq!(out, b"12 w 4\nk\n5\n");
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        match &self.body {
            MuxBody::Request(request) => encode_request(self.id, self.ticket, request, out),
            MuxBody::Cancel(target) => {
                push_decimal(out, self.id);
                out.extend_from_slice(b" cancel\n_\n");
                push_decimal(out, *target);
                out.push(b'\n');
            }
        }
    }
}

/// Appends `request` as a mux frame with this id (and ticket, when not 0,
/// for two-phase commands) without building a [`MuxRequest`].
///
/// ```
/// let mut out = Vec::new();
/// dflockd_proto::encode_mux_request(3, 0, &dflockd_proto::Request::Ping, &mut out);
/// assert_eq!(out, b"3 ping\n_\n_\n");
/// ```
pub fn encode_mux_request(id: u64, ticket: u64, request: &Request, out: &mut Vec<u8>) {
    encode_request(id, ticket, request, out);
}

fn encode_request(id: u64, ticket: u64, request: &Request, out: &mut Vec<u8>) {
    push_decimal(out, id);
    out.push(b' ');
    let start = out.len();
    request.encode(out);
    let two_phase = matches!(request, Request::Enqueue { .. } | Request::Wait { .. });
    if ticket != 0 && two_phase {
        let command_end = start + request.command().word().len();
        let mut suffix = Vec::with_capacity(21);
        suffix.push(b' ');
        push_decimal(&mut suffix, ticket);
        out.splice(command_end..command_end, suffix);
    }
}

/// Prefixes every frame of already-encoded plain requests with ids
/// `first_id`, `first_id + 1`, … (for batches encoded before the lane knew
/// it speaks mux). Returns how many frames were prefixed.
///
/// ```
/// let mut out = Vec::new();
/// let n = dflockd_proto::prefix_frames(b"ping\n_\n_\nstats\n_\n_\n", 5, &mut out);
/// assert_eq!(n, 2);
/// assert_eq!(out, b"5 ping\n_\n_\n6 stats\n_\n_\n");
/// ```
pub fn prefix_frames(frames: &[u8], first_id: u64, out: &mut Vec<u8>) -> u64 {
    let mut id = first_id;
    for (line, chunk) in frames.split_inclusive(|&b| b == b'\n').enumerate() {
        if line.is_multiple_of(3) {
            push_decimal(out, id);
            out.push(b' ');
            id += 1;
        }
        out.extend_from_slice(chunk);
    }
    id - first_id
}

/// Appends `<id> <reply>` and LF to `out`.
///
/// ```
/// let mut out = Vec::new();
/// dflockd_proto::encode_mux_reply(42, &dflockd_proto::Reply::Queued, &mut out);
/// assert_eq!(out, b"42 queued\n");
/// ```
pub fn encode_mux_reply(id: u64, reply: &Reply, out: &mut Vec<u8>) {
    push_decimal(out, id);
    out.push(b' ');
    reply.encode(out);
}

/// Parses a mux reply line into its id and reply.
///
/// ```
/// use dflockd_proto::{Reply, Status, parse_mux_reply};
/// assert_eq!(parse_mux_reply(b"8 timeout\n").unwrap(), (8, Reply::Failure(Status::Timeout)));
/// assert!(parse_mux_reply(b"timeout\n").is_err());
/// ```
pub fn parse_mux_reply(line: &[u8]) -> Result<(u64, Reply), ReplyError> {
    let space = line.iter().position(|&b| b == b' ');
    let malformed =
        || ReplyError::Malformed(String::from_utf8_lossy(&line[..line.len().min(64)]).into_owned());
    let space = space.ok_or_else(malformed)?;
    let id = parse_u64(&line[..space]).ok_or_else(malformed)?;
    Ok((id, Reply::parse(&line[space + 1..])?))
}

/// A decimal u64 of 1–20 ASCII digits (no sign, no spaces).
fn parse_u64(word: &[u8]) -> Option<u64> {
    if word.is_empty() || word.len() > 20 || !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(word).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameDecoder, Key, Kind, Namespace, Seconds};

    fn parse(bytes: &[u8]) -> Result<MuxRequest, MuxError> {
        let mut d = FrameDecoder::new();
        let (_, progress) = d.feed(bytes);
        assert_eq!(progress, crate::Progress::Frame);
        MuxRequest::parse(&d.frame())
    }

    #[test]
    fn ids_and_tickets() {
        let m = parse(b"1 l\nk\n5 30\n").unwrap();
        assert_eq!((m.id, m.ticket), (1, 0));
        assert!(matches!(
            m.body,
            MuxBody::Request(Request::Acquire {
                kind: Kind::Lock,
                ..
            })
        ));
        assert_eq!(
            parse(b"18446744073709551615 ping\n_\n_\n").unwrap().id,
            u64::MAX
        );
        assert_eq!(
            parse(b"18446744073709551616 ping\n_\n_\n"),
            Err(MuxError::NoId)
        );
        assert_eq!(parse(b"-1 ping\n_\n_\n"), Err(MuxError::NoId));
        assert_eq!(parse(b"\n_\n_\n"), Err(MuxError::NoId));
        assert_eq!(
            parse(b"4\n_\n_\n"),
            Err(MuxError::Invalid {
                id: 4,
                error: ProtoError::UnknownCommand
            })
        );
        assert_eq!(
            parse(b"4 l 2\nk\n0\n"),
            Err(MuxError::Invalid {
                id: 4,
                error: ProtoError::BadArity
            })
        );
        assert_eq!(
            parse(b"4 se x\nk\n2\n"),
            Err(MuxError::Invalid {
                id: 4,
                error: ProtoError::InvalidInteger
            })
        );
        assert_eq!(parse(b"4 se 9\nk\n2\n").unwrap().ticket, 9);
        assert_eq!(
            parse(b"4 hello\n_\nmux\n"),
            Err(MuxError::Invalid {
                id: 4,
                error: ProtoError::UnknownCommand
            })
        );
    }

    #[test]
    fn round_trip() {
        let key = Key::new("k").unwrap();
        let requests = [
            MuxRequest {
                id: 5,
                ticket: 77,
                body: MuxBody::Request(Request::Enqueue {
                    key: key.clone(),
                    kind: Kind::Lock,
                    lease: None,
                }),
            },
            MuxRequest {
                id: 6,
                ticket: 0,
                body: MuxBody::Request(Request::Wait {
                    key,
                    namespace: Namespace::Semaphore,
                    timeout: Seconds::new(3).unwrap(),
                }),
            },
            MuxRequest {
                id: 7,
                ticket: 0,
                body: MuxBody::Cancel(6),
            },
        ];
        for request in requests {
            let mut out = Vec::new();
            request.encode(&mut out);
            assert_eq!(parse(&out).unwrap(), request);
        }
    }

    #[test]
    fn replies() {
        let mut out = Vec::new();
        encode_mux_reply(9, &Reply::Ok, &mut out);
        assert_eq!(parse_mux_reply(&out).unwrap(), (9, Reply::Ok));
        assert!(parse_mux_reply(b"x ok\n").is_err());
        assert!(parse_mux_reply(b"9 okay\n").is_err());
        assert!(parse_mux_reply(b"\n").is_err());
    }
}
