use std::fmt;

use crate::inline::InlineBytes;
use crate::{MAX_LINE, ProtoError};

/// A validated lock or semaphore key: 1–256 bytes, no space, tab, CR or LF.
///
/// The server compares keys byte for byte and does not require UTF-8, so a
/// key is bytes; [`Key::new`] builds one from a string.
///
/// ```
/// use dflockd_proto::Key;
/// assert!(Key::new("jobs/nightly").is_ok());
/// assert!(Key::new("").is_err());
/// assert!(Key::new("a b").is_err());
/// assert!(Key::new(&"x".repeat(257)).is_err());
/// assert_eq!(Key::new("日本").unwrap().as_bytes().len(), 6);
/// ```
#[derive(Clone)]
pub struct Key(Repr);

/// Most keys are short: they live in place, so making or cloning one is a
/// copy, with no allocation and no shared reference count for two threads
/// to pass between them. A longer key's bytes are shared, and a clone is a
/// reference-count bump.
#[derive(Clone)]
enum Repr {
    Inline(InlineBytes<INLINE>),
    Shared(std::sync::Arc<[u8]>),
}

/// The longest key kept in place (the key stays 24 bytes, the size of the
/// shared form plus its tag).
const INLINE: usize = 22;
const _: () = assert!(std::mem::size_of::<Key>() == 24);

impl PartialEq for Key {
    /// Byte equality; clones of one shared key compare without reading the
    /// bytes (`Arc`'s own shortcut does not apply to an unsized `[u8]`).
    fn eq(&self, other: &Key) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline(a), Repr::Inline(b)) => a == b,
            (Repr::Shared(a), Repr::Shared(b)) if std::sync::Arc::ptr_eq(a, b) => true,
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    /// Byte order.
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Key {
    /// Validates a UTF-8 key.
    ///
    /// ```
    /// assert!(dflockd_proto::Key::new("row:42").is_ok());
    /// ```
    pub fn new(key: &str) -> Result<Key, ProtoError> {
        Key::from_bytes(key.as_bytes())
    }

    /// Validates a key given as raw bytes (the server's view).
    ///
    /// ```
    /// assert!(dflockd_proto::Key::from_bytes(&[0xff, b'k']).is_ok());
    /// ```
    pub fn from_bytes(key: &[u8]) -> Result<Key, ProtoError> {
        if key.is_empty()
            || key.len() > MAX_LINE
            || key
                .iter()
                .any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            return Err(ProtoError::InvalidKey);
        }
        Ok(Key(match InlineBytes::new(key) {
            Some(inline) => Repr::Inline(inline),
            None => Repr::Shared(key.into()),
        }))
    }

    /// The key's bytes.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Key::new("k").unwrap().as_bytes(), b"k");
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(inline) => inline.as_bytes(),
            Repr::Shared(bytes) => bytes,
        }
    }

    /// The key as text, with invalid UTF-8 replaced by U+FFFD (as the Go
    /// server's JSON encoder does in `stats`).
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Key::new("k").unwrap().to_string_lossy(), "k");
    /// ```
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A key is written as its bytes (a sequence, so every serde format can
/// carry it) and validated again when read back.
impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_bytes().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        Key::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<&str> for Key {
    type Error = ProtoError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Key::new(value)
    }
}
