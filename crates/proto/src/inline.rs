//! Short byte strings kept in place (see [`InlineBytes`]).

/// Up to `N` bytes stored in place: making or cloning one is a copy, with
/// no allocation and no shared reference count. [`crate::Key`] and
/// [`crate::TokenText`] keep short values this way and longer ones on the
/// heap.
///
/// The bytes past `len` are always zero, so two values hold the same bytes
/// exactly when they are equal as a whole: the derived comparison is a
/// fixed-size one the compiler turns into a few word compares, not a call
/// to `memcmp`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct InlineBytes<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> InlineBytes<N> {
    /// `bytes` in place, or `None` if they do not fit.
    pub(crate) fn new(bytes: &[u8]) -> Option<InlineBytes<N>> {
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|_| bytes.len() <= N)?;
        let mut stored = [0; N];
        stored[..bytes.len()].copy_from_slice(bytes);
        Some(InlineBytes { len, bytes: stored })
    }

    /// Exactly `N` bytes (`N` must fit a `u8`, which the compiler checks).
    pub(crate) const fn full(bytes: [u8; N]) -> InlineBytes<N> {
        const { assert!(N <= u8::MAX as usize) };
        InlineBytes {
            len: N as u8,
            bytes,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_exactly_what_fits() {
        for len in 0..=5 {
            let bytes: Vec<u8> = (0..len).collect();
            let inline = InlineBytes::<4>::new(&bytes);
            assert_eq!(
                inline.as_ref().map(InlineBytes::as_bytes),
                (len <= 4).then_some(&bytes[..])
            );
        }
        assert_eq!(InlineBytes::full(*b"abcd").as_bytes(), b"abcd");
        // Whole-value equality is byte equality.
        for (a, b) in [
            (&b"ab"[..], &b"ab"[..]),
            (b"ab", b"ab\0"),
            (b"", b"\0"),
            (b"abc", b"abd"),
        ] {
            let (x, y) = (
                InlineBytes::<4>::new(a).unwrap(),
                InlineBytes::<4>::new(b).unwrap(),
            );
            assert_eq!(x == y, a == b, "{a:?} {b:?}");
        }
        assert!(
            InlineBytes::<300>::new(&[0; 256]).is_none(),
            "a length past u8 never fits"
        );
    }
}
