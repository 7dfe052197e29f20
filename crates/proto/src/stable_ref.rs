//! The name a client gives its session with `stable-ref` (spec §2.11).

use std::fmt;

/// A validated stable ref: 1–64 bytes, each printable ASCII (0x20–0x7E),
/// taken from the key line of a `stable-ref` request, trimmed.
///
/// ```
/// use dflockd_proto::StableRef;
/// assert_eq!(StableRef::new("worker 7").unwrap().as_str(), "worker 7");
/// assert!(StableRef::new("").is_none());
/// assert!(StableRef::new(&"x".repeat(65)).is_none());
/// assert!(StableRef::new("tab\there").is_none());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StableRef(String);

impl StableRef {
    /// The longest stable ref, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates `value` (not trimmed here).
    ///
    /// ```
    /// assert!(dflockd_proto::StableRef::new("a").is_some());
    /// ```
    pub fn new(value: &str) -> Option<StableRef> {
        StableRef::from_bytes(value.as_bytes())
    }

    /// Validates raw bytes (not trimmed here).
    ///
    /// ```
    /// assert!(dflockd_proto::StableRef::from_bytes(&[0xff]).is_none());
    /// ```
    pub fn from_bytes(value: &[u8]) -> Option<StableRef> {
        let valid = (1..=StableRef::MAX_LEN).contains(&value.len())
            && value.iter().all(|b| (0x20..=0x7e).contains(b));
        // Printable ASCII is UTF-8.
        valid.then(|| StableRef(String::from_utf8_lossy(value).into_owned()))
    }

    /// The ref as text.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::StableRef::new("w1").unwrap().as_str(), "w1");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for StableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Written as its text and validated again when read back.
impl serde::Serialize for StableRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for StableRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<StableRef, D::Error> {
        let text = String::deserialize(deserializer)?;
        StableRef::new(&text)
            .ok_or_else(|| serde::de::Error::custom("a stable ref is 1–64 printable ASCII bytes"))
    }
}
