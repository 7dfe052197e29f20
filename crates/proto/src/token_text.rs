//! The token argument of a release or renew, as the peer sent it.

use std::fmt;
use std::ops::Deref;

use crate::inline::InlineBytes;

/// The bytes a release or renew names as its token (trimmed), valid or not:
/// the server looks them up, and [`Token::parse_wire`](crate::Token::parse_wire)
/// reads them. A token of up to 32 bytes — every token a server mints — is
/// kept in place, so parsing a request allocates nothing for it.
///
/// ```
/// use dflockd_proto::{Token, TokenText};
/// let text = TokenText::from(Token::new(1, 2).to_string().as_bytes());
/// assert_eq!(text.len(), 32);
/// assert_eq!(Token::parse_wire(&text), Some(Token::new(1, 2)));
/// assert_eq!(TokenText::from(&b"junk"[..]), *b"junk");
/// ```
#[derive(Clone)]
pub struct TokenText(Repr);

#[derive(Clone)]
enum Repr {
    Inline(InlineBytes<INLINE>),
    Heap(Vec<u8>),
}

/// The longest text kept in place: a minted token's 32 hex digits.
const INLINE: usize = 32;

impl TokenText {
    /// The bytes.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::TokenText::from(&b"t"[..]).as_bytes(), b"t");
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(inline) => inline.as_bytes(),
            Repr::Heap(bytes) => bytes,
        }
    }
}

impl From<&[u8]> for TokenText {
    fn from(text: &[u8]) -> TokenText {
        TokenText(match InlineBytes::new(text) {
            Some(inline) => Repr::Inline(inline),
            None => Repr::Heap(text.to_vec()),
        })
    }
}

impl From<Vec<u8>> for TokenText {
    fn from(text: Vec<u8>) -> TokenText {
        TokenText(match InlineBytes::new(&text) {
            Some(inline) => Repr::Inline(inline),
            None => Repr::Heap(text),
        })
    }
}

impl From<crate::Token> for TokenText {
    /// The token's wire form.
    fn from(token: crate::Token) -> TokenText {
        TokenText(Repr::Inline(InlineBytes::full(token.hex())))
    }
}

impl Deref for TokenText {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for TokenText {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for TokenText {
    fn eq(&self, other: &TokenText) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for TokenText {}

impl PartialEq<[u8]> for TokenText {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for TokenText {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.as_bytes() == other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for TokenText {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.as_bytes() == *other
    }
}

impl fmt::Debug for TokenText {
    /// The text, lossily decoded; a valid token names a lease, so show it
    /// only in debugging output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TokenText({:?})",
            String::from_utf8_lossy(self.as_bytes())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_keeps_its_bytes() {
        for len in [0, 1, 31, 32, 33, 300] {
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(TokenText::from(&text[..]).as_bytes(), &text[..]);
            assert_eq!(TokenText::from(text.clone()).as_bytes(), &text[..]);
            assert_eq!(TokenText::from(&text[..]), TokenText::from(text.clone()));
        }
        let token = crate::Token::new(7, 9);
        assert_eq!(
            TokenText::from(token).as_bytes(),
            token.to_string().as_bytes()
        );
    }
}
