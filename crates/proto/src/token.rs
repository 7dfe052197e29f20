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
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    pub fn new(fence: u64, salt: u64) -> Token {
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
        // One pass, lowercase hex only (the server's release/renew hot path).
        let mut words = [0u64; 2];
        for (i, &b) in bytes.iter().enumerate() {
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => return None,
            };
            words[i / 16] = (words[i / 16] << 4) | u64::from(digit);
        }
        Some(Token {
            fence: words[0],
            salt: words[1],
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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (half, word) in [self.fence, self.salt].into_iter().enumerate() {
            for i in 0..16 {
                hex[half * 16 + i] = HEX[((word >> ((15 - i) * 4)) & 0xf) as usize];
            }
        }
        out.extend_from_slice(&hex);
    }
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
