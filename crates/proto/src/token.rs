use std::fmt;

use thiserror::Error;

/// Why a string is not a grant token.
///
/// ```
/// use dflockd_proto::{TokenError, fence_from_token};
/// assert_eq!(fence_from_token("abc"), Err(TokenError::Length(3)));
/// assert_eq!(fence_from_token(&"g".repeat(32)), Err(TokenError::NotHex));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Not exactly 32 characters.
    #[error("token must be 32 hex characters, got {0}")]
    Length(usize),
    /// A character is not a hex digit.
    #[error("token contains a non-hex character")]
    NotHex,
}

/// A grant token: a 64-bit fence followed by 64 random bits, written on the
/// wire as 32 lowercase hex digits.
///
/// Fences come from one counter per server and grow by one on every grant, so
/// for one key a larger fence always means a later grant.
///
/// ```
/// use dflockd_proto::Token;
/// let t = Token::new(1_746_403_200_000_000_001, 0x7f3c1f2b3e9a8d6e);
/// assert_eq!(t.to_string(), "183c7875229b00017f3c1f2b3e9a8d6e");
/// assert_eq!(Token::parse_wire(t.to_string().as_bytes()), Some(t));
/// ```
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Token {
    fence: u64,
    salt: u64,
}

impl Token {
    /// Builds a token from its fence and salt.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Token::new(1, 2).fence(), 1);
    /// ```
    pub const fn new(fence: u64, salt: u64) -> Token {
        Token { fence, salt }
    }

    /// The monotonic fence (first 16 hex digits).
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Token::new(7, 0).fence(), 7);
    /// ```
    pub fn fence(self) -> u64 {
        self.fence
    }

    /// The random salt (last 16 hex digits).
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Token::new(7, 9).salt(), 9);
    /// ```
    pub fn salt(self) -> u64 {
        self.salt
    }

    /// Parses a token exactly as the server compares them: 32 *lowercase* hex
    /// bytes. Anything else cannot be a token this server minted.
    ///
    /// ```
    /// use dflockd_proto::Token;
    /// assert!(Token::parse_wire(b"0000000000000001000000000000000a").is_some());
    /// assert!(Token::parse_wire(b"0000000000000001000000000000000A").is_none());
    /// ```
    pub fn parse_wire(bytes: &[u8]) -> Option<Token> {
        if bytes.len() != 32 {
            return None;
        }
        // The server's release/renew hot path: eight digits at a time in a
        // 64-bit word (see `hex8`).
        let word = |i: usize| {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            hex8(u64::from_le_bytes(eight)).map(u64::from)
        };
        Some(Token {
            fence: word(0)? << 32 | word(1)?,
            salt: word(2)? << 32 | word(3)?,
        })
    }

    /// Writes the 32 lowercase hex digits into `out`.
    ///
    /// ```
    /// let mut out = Vec::new();
    /// dflockd_proto::Token::new(1, 2).write_hex(&mut out);
    /// assert_eq!(out, b"00000000000000010000000000000002");
    /// ```
    pub fn write_hex(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hex());
    }

    /// The 32 lowercase hex digits.
    pub(crate) fn hex(self) -> [u8; 32] {
        let mut hex = [0u8; 32];
        let halves = [self.fence >> 32, self.fence, self.salt >> 32, self.salt];
        for (digits, half) in hex.chunks_exact_mut(8).zip(halves) {
            digits.copy_from_slice(&hex_digits8(half as u32));
        }
        hex
    }
}

/// The eight lowercase hex digits of `x`, most significant first.
/// Branch-free in one `u64` (each digit a byte), like [`hex8`] backwards:
/// a table lookup per byte was most of the cost of a grant's reply.
fn hex_digits8(x: u32) -> [u8; 8] {
    // Spread the nibbles a byte each, the least significant in the lowest
    // byte: halves, then bytes, then nibbles.
    let mut v = u64::from(x);
    v = (v | v << 16) & 0x0000_ffff_0000_ffff;
    v = (v | v << 8) & 0x00ff_00ff_00ff_00ff;
    v = (v | v << 4) & (ONES * 0x0f);
    // A nibble of 10 or more gains bit 4 when 6 is added (no carry leaves
    // the byte); those digits are letters, 39 past where '0' + n would be.
    let letters = ((v + ONES * 6) >> 4) & ONES;
    (v + ONES * u64::from(b'0') + letters * 39).to_be_bytes()
}

/// One in every byte of a `u64`.
pub(crate) const ONES: u64 = 0x0101_0101_0101_0101;
/// The top bit of every byte of a `u64`.
pub(crate) const HIGH: u64 = ONES * 0x80;

/// The top bit of each byte of `word` that is at least `c` (`c` ≤ 0x80),
/// for a word whose bytes are all below 0x80: adding `0x80 - c` sets a
/// byte's top bit exactly when the byte is at least `c`, and never carries
/// into the next byte.
pub(crate) fn bytes_at_least(word: u64, c: u8) -> u64 {
    debug_assert_eq!(word & HIGH, 0);
    (word + ONES * u64::from(0x80 - c)) & HIGH
}

/// The value of eight lowercase hex digits loaded little-endian (the first
/// digit in the lowest byte, and the most significant), or `None` if any
/// byte is not one. Branch-free across the bytes: a lookup per digit cost
/// the server more than the rest of a release's parsing.
fn hex8(x: u64) -> Option<u32> {
    let splat = |b: u8| ONES * u64::from(b);
    if x & HIGH != 0 {
        return None; // a byte ≥ 0x80
    }
    let at_least = |c: u8| bytes_at_least(x, c);
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if digit | letter != HIGH {
        return None;
    }
    // '0'..='9' keep their low nibble; 'a'..='f' (low nibble 1..=6) add 9.
    let nibbles = (x & splat(0x0f)) + (letter >> 7) * 9;
    // Merge neighbouring lanes, most significant digit first: bytes of
    // digit pairs, then 16-bit groups of four, then the 32-bit value.
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let quads = ((pairs << 8) | (pairs >> 16)) & 0x0000_ffff_0000_ffff;
    Some(((quads << 16) | (quads >> 32)) as u32)
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.fence, self.salt)
    }
}

impl fmt::Debug for Token {
    // The salt is what makes a token unguessable: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(fence={})", self.fence)
    }
}

impl std::str::FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fence = fence_from_token(s)?;
        let salt = u64::from_str_radix(&s[16..], 16).map_err(|_| TokenError::NotHex)?;
        Ok(Token { fence, salt })
    }
}

/// Extracts the fence from a token: the string must be exactly 32 hex digits
/// (either case, as the Python client accepts); the first 16 are the fence.
///
/// ```
/// use dflockd_proto::fence_from_token;
/// assert_eq!(fence_from_token("183c7875229b00017f3c1f2b3e9a8d6e"), Ok(1_746_403_200_000_000_001));
/// assert_eq!(fence_from_token("183C7875229B00017F3C1F2B3E9A8D6E"), Ok(1_746_403_200_000_000_001));
/// assert!(fence_from_token("0x3c7875229b00017f3c1f2b3e9a8d6e").is_err());
/// assert!(fence_from_token(" 83c7875229b00017f3c1f2b3e9a8d6e").is_err());
/// ```
pub fn fence_from_token(token: &str) -> Result<u64, TokenError> {
    if token.len() != 32 {
        return Err(TokenError::Length(token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::NotHex);
    }
    u64::from_str_radix(&token[..16], 16).map_err(|_| TokenError::NotHex)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digit rule, one byte at a time.
    fn lower_hex(b: u8) -> Option<u64> {
        match b {
            b'0'..=b'9' => Some(u64::from(b - b'0')),
            b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
            _ => None,
        }
    }

    fn reference(bytes: &[u8]) -> Option<Token> {
        let word = |half: &[u8]| {
            half.iter()
                .try_fold(0u64, |acc, &b| Some(acc << 4 | lower_hex(b)?))
        };
        Some(Token::new(word(&bytes[..16])?, word(&bytes[16..])?))
    }

    #[test]
    fn every_byte_at_every_position_agrees_with_the_digit_rule() {
        let valid = *b"0123456789abcdeffedcba9876543210";
        for position in 0..32 {
            for byte in 0..=255u8 {
                let mut text = valid;
                text[position] = byte;
                assert_eq!(
                    Token::parse_wire(&text),
                    reference(&text),
                    "byte {byte:#04x} at {position}"
                );
            }
        }
        assert_eq!(
            Token::parse_wire(&valid),
            Some(Token::new(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210))
        );
    }

    #[test]
    fn hex_agrees_with_format_for_every_digit_at_every_position() {
        let mut values = vec![0, u64::MAX, 0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        for position in 0..16 {
            for digit in 0..16u64 {
                values.push(digit << (position * 4));
                values.push(!(digit << (position * 4)));
            }
        }
        for &fence in &values {
            for salt in [0, fence.rotate_left(13), u64::MAX] {
                let token = Token::new(fence, salt);
                assert_eq!(
                    token.hex().as_slice(),
                    format!("{fence:016x}{salt:016x}").as_bytes()
                );
                assert_eq!(Token::parse_wire(&token.hex()), Some(token));
            }
        }
    }
}
