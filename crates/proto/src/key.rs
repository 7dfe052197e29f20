use std::fmt;

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
#[derive(Clone, Eq, PartialOrd, Ord)]
// Shared bytes: the lock table keeps the key in several indexes, and a
// clone is then a reference-count bump, not an allocation.
pub struct Key(std::sync::Arc<[u8]>);

impl PartialEq for Key {
    /// Byte equality; clones of one key compare without reading the bytes
    /// (`Arc`'s own shortcut does not apply to an unsized `[u8]`).
    fn eq(&self, other: &Key) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0[..] == other.0[..]
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0[..].hash(state);
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
        Ok(Key(key.into()))
    }

    /// The key's bytes.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Key::new("k").unwrap().as_bytes(), b"k");
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as text, with invalid UTF-8 replaced by U+FFFD (as the Go
    /// server's JSON encoder does in `stats`).
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Key::new("k").unwrap().to_string_lossy(), "k");
    /// ```
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl TryFrom<&str> for Key {
    type Error = ProtoError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Key::new(value)
    }
}
