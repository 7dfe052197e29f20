//! The requests a busy server reads most, parsed straight from the bytes.
//!
//! A lock's round trip is an `l` and an `r`, and a client keeping leases
//! alive sends `n`s. Spelled the way every client sends them (no CRs, one
//! space between fields, plain digits, a minted token's 32 visible
//! characters), [`FrameDecoder::decode_common`] reads one in a single pass,
//! instead of splitting the frame into lines and then parsing the lines.
//! Every other spelling, and every invalid frame, is left to the general
//! path: the fast path only ever returns what
//! [`FrameDecoder::decode`] followed by [`Request::parse_reusing`] returns.

use crate::token::{HIGH, bytes_at_least};
use crate::values::leading_number;
use crate::{FrameDecoder, Key, Kind, Lease, Namespace, Request, Seconds, TokenText};

/// The length of every token a server mints (32 hex digits).
const TOKEN_LEN: usize = 32;

impl FrameDecoder {
    /// The request at the start of `input`, if it is a whole `l`, `r` or
    /// `n` frame in its usual spelling and the decoder is between frames;
    /// with the bytes it used. `recent` is shared as in
    /// [`Request::parse_reusing`]. `None` leaves everything as it was, for
    /// [`decode`](Self::decode); `Some` is exactly what `decode` and
    /// `parse_reusing` would have made of the frame, and leaves the decoder
    /// as `decode` would.
    ///
    /// ```
    /// use dflockd_proto::{Decoded, FrameDecoder, Key, Kind, Request, Seconds};
    /// let mut d = FrameDecoder::new();
    /// let input = b"l\njobs\n10\nl\r\njobs\r\n10\r\n";
    /// let (used, request) = d.decode_common(input, None).unwrap();
    /// assert_eq!(used, 10);
    /// assert_eq!(request, Request::Acquire {
    ///     key: Key::new("jobs").unwrap(),
    ///     kind: Kind::Lock,
    ///     timeout: Seconds::new(10).unwrap(),
    ///     lease: None,
    /// });
    /// // CRLF is valid, but not the usual spelling: the general path reads it.
    /// assert_eq!(d.decode_common(&input[used..], None), None);
    /// assert!(matches!(d.decode(&input[used..]), (13, Decoded::Frame(_))));
    /// ```
    pub fn decode_common(
        &mut self,
        input: &[u8],
        recent: Option<&Key>,
    ) -> Option<(usize, Request)> {
        if self.in_frame() {
            return None;
        }
        let (used, request) = common_request(input, recent)?;
        self.pass_whole_frame();
        Some((used, request))
    }
}

/// The request and the bytes it used, or `None` for anything unusual.
fn common_request(input: &[u8], recent: Option<&Key>) -> Option<(usize, Request)> {
    let [command, b'\n', rest @ ..] = input else {
        return None;
    };
    let (key, argument) = key_line(rest, recent)?;
    let (request, after) = match command {
        b'l' => {
            let (timeout, rest) = leading_number(argument)?;
            let (lease, rest) = optional_lease(rest)?;
            let request = Request::Acquire {
                key,
                kind: Kind::Lock,
                timeout: Seconds::new(timeout).ok()?,
                lease,
            };
            (request, rest)
        }
        b'r' => {
            let (token, rest) = token(argument)?;
            let request = Request::Release {
                key,
                namespace: Namespace::Lock,
                token,
            };
            (request, rest)
        }
        b'n' => {
            let (token, rest) = token(argument)?;
            let (lease, rest) = optional_lease(rest)?;
            let request = Request::Renew {
                key,
                namespace: Namespace::Lock,
                token,
                lease,
            };
            (request, rest)
        }
        _ => return None,
    };
    // Every argument read here is far below the line cap.
    let [b'\n', ..] = after else {
        return None;
    };
    Some((input.len() - after.len() + 1, request))
}

/// The key line's key and the bytes after its LF. A key equal to `recent`
/// is `recent` again, found with one comparison.
fn key_line<'a>(bytes: &'a [u8], recent: Option<&Key>) -> Option<(Key, &'a [u8])> {
    if let Some(recent) = recent {
        let same = recent.as_bytes();
        if let Some((line, [b'\n', rest @ ..])) = bytes.split_at_checked(same.len())
            && line == same
        {
            return Some((recent.clone(), rest));
        }
    }
    // A key is at most `MAX_LINE` bytes, which `Key::from_bytes` checks,
    // with the other key rules.
    let end = bytes
        .iter()
        .take(crate::MAX_LINE + 1)
        .position(|&b| b == b'\n')?;
    let key = Key::from_bytes(&bytes[..end]).ok()?;
    Some((key, &bytes[end + 1..]))
}

/// A minted token's length of visible ASCII at the start of `bytes`, and
/// the rest. Visible ASCII is never white space, so the general path would
/// keep these bytes as they are, as one field.
fn token(bytes: &[u8]) -> Option<(TokenText, &[u8])> {
    let (text, rest) = bytes.split_first_chunk::<TOKEN_LEN>()?;
    let (words, []) = text.as_chunks::<8>() else {
        return None;
    };
    words
        .iter()
        .all(|word| visible_ascii(u64::from_le_bytes(*word)))
        .then(|| (TokenText::from(&text[..]), rest))
}

/// Whether every byte of `word` is visible ASCII (`!` to `~`), a word at a
/// time like the token's hex digits (see `hex8`).
fn visible_ascii(word: u64) -> bool {
    word & HIGH == 0 && bytes_at_least(word, b'!') == HIGH && bytes_at_least(word, 0x7f) == 0
}

/// ` <lease>` if `bytes` starts with a space, and the rest.
fn optional_lease(bytes: &[u8]) -> Option<(Option<Lease>, &[u8])> {
    match bytes {
        [b' ', rest @ ..] => {
            let (secs, rest) = leading_number(rest)?;
            Some((Some(Lease::new(secs).ok()?), rest))
        }
        _ => Some((None, bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_ascii_is_exact_per_byte() {
        for b in 0..=u8::MAX {
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                assert_eq!(
                    visible_ascii(u64::from_le_bytes(word)),
                    (b'!'..=b'~').contains(&b),
                    "byte {b:#x} at {at}"
                );
            }
        }
    }
}
