//! Sans-I/O codec for the dflockd v2 line protocol.
//!
//! Every request is three lines (`command`, `key`, `argument`), every reply one
//! line. This crate parses and encodes both directions without doing any I/O,
//! so servers, clients, fuzzers and property tests share one definition of the
//! wire format:
//!
//! * [`FrameDecoder`] splits a byte stream into frames, enforcing the line caps
//!   (256 bytes, 64 KiB for the `auth` argument) and CR stripping;
//! * [`Request::parse`] validates a frame into a typed [`Request`];
//! * [`Reply`] formats and parses reply lines;
//! * [`Key`], [`Seconds`], [`Lease`], [`Limit`] validate values in types;
//! * [`Token`] and [`fence_from_token`] decode grant tokens and their fences;
//! * [`shard`] picks a server for a key exactly like the Go, Python and
//!   TypeScript clients (CRC-32/IEEE modulo the server count).
//!
//! ```
//! use dflockd_proto::{FrameDecoder, Progress, Request};
//!
//! let mut decoder = FrameDecoder::new();
//! let (used, progress) = decoder.feed(b"l\nmy-key\n10 30\n");
//! assert_eq!((used, progress), (15, Progress::Frame));
//! let request = Request::parse(&decoder.frame()).unwrap();
//! assert_eq!(request.encode_to_vec(), b"l\nmy-key\n10 30\n");
//! ```
#![warn(missing_docs)]

mod decoder;
mod error;
mod inline;
mod key;
mod label;
mod mux;
mod quick;
mod reply;
mod request;
mod shard;
mod stable_ref;
mod stats;
mod token;
mod token_text;
mod values;

pub use decoder::{Decoded, FrameDecoder, Progress, RawFrame};
pub use error::ProtoError;
pub use key::Key;
pub use label::Label;
pub use mux::{
    MUX_ACCEPTED, MUX_HELLO, MUX_VERSION, MuxBody, MuxError, MuxRequest, encode_mux_reply,
    encode_mux_request, is_mux_hello, parse_mux_reply, prefix_frames,
};
pub use reply::{Reply, ReplyError, Status};
pub use request::{Command, Kind, Namespace, Request};
pub use shard::{ShardError, shard};
pub use stable_ref::StableRef;
pub use stats::{ClusterStats, IdleEntry, LockEntry, SemaphoreEntry, Stats};
pub use token::{Token, TokenError, fence_from_token};
pub use token_text::TokenText;
pub use values::{Lease, Limit, Seconds, ValueError};

/// Longest command or key line, and argument line except for `auth`, in bytes
/// (counted before the LF, trailing CRs included).
///
/// ```
/// use dflockd_proto::{Key, MAX_LINE};
/// assert!(Key::new(&"k".repeat(MAX_LINE)).is_ok());
/// assert!(Key::new(&"k".repeat(MAX_LINE + 1)).is_err());
/// ```
pub const MAX_LINE: usize = 256;
/// Longest argument line of an `auth` frame, in bytes.
///
/// ```
/// use dflockd_proto::{FrameDecoder, MAX_AUTH_LINE, Progress};
/// // A 1 KiB secret is too long for any other line, but fine for `auth`.
/// let frame = [b"auth\n_\n".as_slice(), &[b's'; 1024], b"\n"].concat();
/// assert!(1024 <= MAX_AUTH_LINE);
/// assert_eq!(FrameDecoder::new().feed(&frame).1, Progress::Frame);
/// ```
pub const MAX_AUTH_LINE: usize = 65_536;
/// Largest number of seconds a timeout or lease may carry:
/// ⌊(2^63 − 1) / 10^9⌋, the largest whole second count that fits in `i64`
/// nanoseconds.
///
/// ```
/// use dflockd_proto::{Lease, MAX_SECONDS, Seconds};
/// assert!(Seconds::new(MAX_SECONDS).is_ok());
/// assert!(Lease::new(MAX_SECONDS + 1).is_err());
/// ```
pub const MAX_SECONDS: u64 = 9_223_372_036;
/// Largest semaphore limit accepted (2^20, the cluster-branch rule).
///
/// ```
/// use dflockd_proto::{Limit, MAX_LIMIT};
/// assert_eq!(Limit::new(u64::from(MAX_LIMIT)).unwrap().get(), MAX_LIMIT);
/// assert!(Limit::new(u64::from(MAX_LIMIT) + 1).is_err());
/// ```
pub const MAX_LIMIT: u32 = 1_048_576;
/// Longest reply line a client should accept, in bytes (the Python client's cap).
///
/// ```
/// use dflockd_proto::{MAX_REPLY_LINE, Reply, ReplyError};
/// let huge = format!("ok {}\n", "x".repeat(MAX_REPLY_LINE));
/// assert_eq!(Reply::parse(huge.as_bytes()), Err(ReplyError::TooLong));
/// ```
pub const MAX_REPLY_LINE: usize = 1_048_576;
