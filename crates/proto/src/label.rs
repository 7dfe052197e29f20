//! The label a holder proclaims on its lock (`label`, an extension of the
//! multiplexed protocol): who leads, in words others can read in `stats`.

use std::fmt;

/// A validated holder label: 1–64 bytes of printable ASCII without
/// spaces (0x21–0x7E), such as `"node-a:8080"`.
///
/// ```
/// use dflockd_proto::Label;
/// assert_eq!(Label::new("node-a:8080").unwrap().as_str(), "node-a:8080");
/// assert!(Label::new("").is_none());
/// assert!(Label::new("two words").is_none());
/// assert!(Label::new(&"x".repeat(65)).is_none());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// The longest label, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates `value`.
    ///
    /// ```
    /// assert!(dflockd_proto::Label::new("a").is_some());
    /// ```
    pub fn new(value: &str) -> Option<Label> {
        Label::from_bytes(value.as_bytes())
    }

    /// Validates raw bytes.
    ///
    /// ```
    /// assert!(dflockd_proto::Label::from_bytes(&[0xff]).is_none());
    /// ```
    pub fn from_bytes(value: &[u8]) -> Option<Label> {
        let valid = (1..=Label::MAX_LEN).contains(&value.len())
            && value.iter().all(|b| (0x21..=0x7e).contains(b));
        // Printable ASCII is UTF-8.
        valid.then(|| Label(String::from_utf8_lossy(value).into_owned()))
    }

    /// The label as text.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Label::new("w1").unwrap().as_str(), "w1");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Written as its text and validated again when read back.
impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Label, D::Error> {
        let text = String::deserialize(deserializer)?;
        Label::new(&text).ok_or_else(|| {
            serde::de::Error::custom("a label is 1–64 printable ASCII bytes without spaces")
        })
    }
}
