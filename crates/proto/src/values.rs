use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::{MAX_LIMIT, MAX_SECONDS};

/// Why a number could not become a [`Seconds`], [`Lease`] or [`Limit`].
///
/// ```
/// use dflockd_proto::{Lease, Limit, Seconds, ValueError};
/// assert_eq!(Lease::new(0), Err(ValueError::Zero));
/// assert_eq!(Limit::new(0), Err(ValueError::Zero));
/// assert_eq!(Seconds::new(u64::MAX), Err(ValueError::TooLarge(u64::MAX)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ValueError {
    /// Above 9,223,372,036 seconds (or the limit cap).
    #[error("value {0} is above the maximum")]
    TooLarge(u64),
    /// Zero where at least one is required.
    #[error("value must be at least 1")]
    Zero,
}

/// A timeout in whole seconds, 0 ..= 9,223,372,036. Zero means "try once".
///
/// ```
/// use std::time::Duration;
/// use dflockd_proto::Seconds;
/// assert_eq!(Seconds::new(10).unwrap().get(), 10);
/// assert!(Seconds::new(9_223_372_037).is_err());
/// // Durations round up, so a sub-second wait never becomes a try-lock.
/// assert_eq!(Seconds::from_duration_ceil(Duration::from_millis(1200)).unwrap().get(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seconds(u64);

impl Seconds {
    /// Zero seconds: a non-blocking attempt.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dflockd_proto::Seconds;
    /// assert_eq!(Seconds::from_duration_ceil(Duration::ZERO).unwrap(), Seconds::ZERO);
    /// assert_eq!(Seconds::ZERO.as_duration(), Duration::ZERO);
    /// ```
    pub const ZERO: Seconds = Seconds(0);

    /// Validates a second count.
    ///
    /// ```
    /// assert!(dflockd_proto::Seconds::new(0).is_ok());
    /// ```
    pub fn new(secs: u64) -> Result<Seconds, ValueError> {
        if secs > MAX_SECONDS {
            return Err(ValueError::TooLarge(secs));
        }
        Ok(Seconds(secs))
    }

    /// Converts a duration, rounding any fraction of a second up.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(dflockd_proto::Seconds::from_duration_ceil(Duration::from_nanos(1)).unwrap().get(), 1);
    /// ```
    pub fn from_duration_ceil(d: Duration) -> Result<Seconds, ValueError> {
        let whole = d.as_secs();
        let secs = if d.subsec_nanos() > 0 {
            whole.saturating_add(1)
        } else {
            whole
        };
        Seconds::new(secs)
    }

    /// The number of seconds.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Seconds::new(3).unwrap().get(), 3);
    /// ```
    pub fn get(self) -> u64 {
        self.0
    }

    /// As a [`Duration`].
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Seconds::new(3).unwrap().as_duration().as_secs(), 3);
    /// ```
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A lease length in whole seconds, 1 ..= 9,223,372,036.
///
/// ```
/// use dflockd_proto::Lease;
/// assert_eq!(Lease::new(33).unwrap().get(), 33);
/// assert!(Lease::new(0).is_err());
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct Lease(u64);

impl TryFrom<u64> for Lease {
    type Error = ValueError;
    /// [`Lease::new`]: a logged or snapshotted lease is checked again.
    fn try_from(secs: u64) -> Result<Lease, ValueError> {
        Lease::new(secs)
    }
}

impl From<Lease> for u64 {
    fn from(lease: Lease) -> u64 {
        lease.0
    }
}

impl Lease {
    /// Validates a lease length.
    ///
    /// ```
    /// assert!(dflockd_proto::Lease::new(9_223_372_036).is_ok());
    /// ```
    pub fn new(secs: u64) -> Result<Lease, ValueError> {
        if secs == 0 {
            return Err(ValueError::Zero);
        }
        if secs > MAX_SECONDS {
            return Err(ValueError::TooLarge(secs));
        }
        Ok(Lease(secs))
    }

    /// Converts a duration, rounding any fraction of a second up.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(dflockd_proto::Lease::from_duration_ceil(Duration::from_millis(1500)).unwrap().get(), 2);
    /// ```
    pub fn from_duration_ceil(d: Duration) -> Result<Lease, ValueError> {
        Lease::new(Seconds::from_duration_ceil(d)?.get())
    }

    /// The number of seconds.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Lease::new(5).unwrap().get(), 5);
    /// ```
    pub fn get(self) -> u64 {
        self.0
    }

    /// As a [`Duration`].
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Lease::new(5).unwrap().as_duration().as_secs(), 5);
    /// ```
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A semaphore limit, 1 ..= 1,048,576.
///
/// ```
/// use dflockd_proto::Limit;
/// assert_eq!(Limit::new(3).unwrap().get(), 3);
/// assert!(Limit::new(0).is_err());
/// assert!(Limit::new(1_048_577).is_err());
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct Limit(u32);

impl TryFrom<u64> for Limit {
    type Error = ValueError;
    /// [`Limit::new`]: a logged or snapshotted limit is checked again.
    fn try_from(limit: u64) -> Result<Limit, ValueError> {
        Limit::new(limit)
    }
}

impl From<Limit> for u64 {
    fn from(limit: Limit) -> u64 {
        u64::from(limit.0)
    }
}

impl Limit {
    /// The limit of a plain lock.
    ///
    /// ```
    /// use dflockd_proto::{Kind, Limit};
    /// assert_eq!(Kind::Lock.limit(), Limit::ONE);
    /// assert_eq!(Limit::new(1).unwrap(), Limit::ONE);
    /// ```
    pub const ONE: Limit = Limit(1);

    /// Validates a limit.
    ///
    /// ```
    /// assert!(dflockd_proto::Limit::new(1_048_576).is_ok());
    /// ```
    pub fn new(limit: u64) -> Result<Limit, ValueError> {
        if limit == 0 {
            return Err(ValueError::Zero);
        }
        if limit > u64::from(MAX_LIMIT) {
            return Err(ValueError::TooLarge(limit));
        }
        Ok(Limit(limit as u32))
    }

    /// The limit.
    ///
    /// ```
    /// assert_eq!(dflockd_proto::Limit::ONE.get(), 1);
    /// ```
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Parses a base-10 signed 64-bit integer with Go `strconv.ParseInt`
/// semantics: optional `+`/`-`, digits only, leading zeros allowed.
pub(crate) fn parse_i64(field: &str) -> Option<i64> {
    // Rust's parser accepts exactly the Go syntax for base 10.
    field.parse::<i64>().ok()
}

/// The units Go's `strings` functions see in a byte string, as
/// `(byte range, is white space)`: each valid UTF-8 sequence is one character,
/// each byte of an invalid sequence is a non-space unit of its own
/// (`utf8.RuneError`). Lines are raw bytes on the wire, so this is how
/// [`fields`] and [`trim_space`] keep non-UTF-8 bytes intact.
fn units(bytes: &[u8]) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + '_ {
    let mut offset = 0;
    bytes.utf8_chunks().flat_map(move |chunk| {
        let base = offset;
        let valid = chunk.valid();
        offset += valid.len() + chunk.invalid().len();
        let chars = valid
            .char_indices()
            .map(move |(i, c)| (base + i..base + i + c.len_utf8(), c.is_whitespace()));
        let bad = base + valid.len();
        chars.chain((bad..bad + chunk.invalid().len()).map(|i| (i..i + 1, false)))
    })
}

/// The number written by the 1 to 18 ASCII digits at the start of `bytes`
/// (18 cannot overflow), and the rest; `None` without a digit or past 18.
pub(crate) fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0;
    let mut len = 0;
    while let Some(digit) = bytes.get(len).map(|b| b.wrapping_sub(b'0')) {
        if digit > 9 {
            break;
        }
        if len == 18 {
            return None;
        }
        value = value * 10 + u64::from(digit);
        len += 1;
    }
    (len > 0).then(|| (value, &bytes[len..]))
}

/// Appends `n` in decimal without allocating.
pub(crate) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let len = write_decimal(&mut digits, n);
    out.extend_from_slice(&digits[..len]);
}

/// Writes `n` in decimal at the start of `to` (which must have room for
/// its digits, at most 20) and returns how many bytes it wrote.
pub(crate) fn write_decimal(to: &mut [u8], mut n: u64) -> usize {
    // Leases and timeouts are mostly one or two digits: written in place,
    // without the scratch buffer, which a grant's reply would otherwise go
    // through for every number.
    if n < 10 {
        to[0] = b'0' + n as u8;
        return 1;
    }
    if n < 100 {
        to[..2].copy_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
        return 2;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    to[..len].copy_from_slice(&digits[i..]);
    len
}

/// Unicode white space restricted to ASCII: TAB, LF, VT, FF, CR, SPACE.
fn ascii_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Splits on runs of Unicode white space (Go `strings.Fields`), returning
/// the fields as the bytes that were sent.
pub(crate) fn fields(arg: &[u8]) -> Fields<'_> {
    let mut out = Fields::empty();
    // The common case, ASCII, in one pass without UTF-8 decoding; the first
    // byte above ASCII sends the whole line the Unicode way.
    let mut start = None;
    for (i, &b) in arg.iter().enumerate() {
        if !b.is_ascii() {
            return fields_unicode(arg);
        }
        if ascii_space(b) {
            if let Some(s) = start.take() {
                out.push(&arg[s..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(&arg[s..]);
    }
    out
}

/// [`fields`] for a line with bytes above ASCII.
fn fields_unicode(arg: &[u8]) -> Fields<'_> {
    let mut out = Fields::empty();
    let mut start = None;
    for (range, space) in units(arg) {
        match (space, start) {
            (true, Some(s)) => {
                out.push(&arg[s..range.start]);
                start = None;
            }
            (false, None) => start = Some(range.start),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(&arg[s..]);
    }
    out
}

/// The fields of an argument line, without allocating. No command takes
/// more than three, so only four are kept: an argument with more still has
/// the wrong arity.
pub(crate) struct Fields<'a> {
    items: [&'a [u8]; 4],
    len: usize,
}

impl<'a> Fields<'a> {
    fn empty() -> Fields<'a> {
        Fields {
            items: [&[]; 4],
            len: 0,
        }
    }

    fn push(&mut self, field: &'a [u8]) {
        if self.len < self.items.len() {
            self.items[self.len] = field;
            self.len += 1;
        }
    }

    pub(crate) fn as_slice(&self) -> &[&'a [u8]] {
        &self.items[..self.len]
    }
}

/// Trims Unicode white space from both ends (Go `strings.TrimSpace`); bytes
/// that are not UTF-8 are kept and never count as white space.
pub(crate) fn trim_space(bytes: &[u8]) -> &[u8] {
    if bytes.is_ascii() {
        let start = bytes
            .iter()
            .position(|&b| !ascii_space(b))
            .unwrap_or(bytes.len());
        let end = bytes
            .iter()
            .rposition(|&b| !ascii_space(b))
            .map_or(start, |i| i + 1);
        return &bytes[start..end];
    }
    let mut kept: Option<(usize, usize)> = None;
    for (range, space) in units(bytes) {
        if !space {
            kept = Some((kept.map_or(range.start, |(s, _)| s), range.end));
        }
    }
    kept.map_or(&[], |(s, e)| &bytes[s..e])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_numbers_take_one_to_eighteen_digits() {
        assert_eq!(leading_number(b"0\n"), Some((0, &b"\n"[..])));
        assert_eq!(leading_number(b"007 5"), Some((7, &b" 5"[..])));
        assert_eq!(
            leading_number(b"999999999999999999"),
            Some((999_999_999_999_999_999, &b""[..]))
        );
        assert_eq!(leading_number(b"1234567890123456789"), None);
        assert_eq!(leading_number(b"+1"), None);
        assert_eq!(leading_number(b""), None);
    }

    #[test]
    fn decimal_agrees_with_format() {
        let mut values: Vec<u64> = (0..=1000).collect();
        values.extend([9_999, 10_000, u64::from(u32::MAX), u64::MAX - 1, u64::MAX]);
        values.extend((1..20).map(|e| 10u64.pow(e) - 1));
        values.extend((1..20).map(|e| 10u64.pow(e)));
        for n in values {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }

    #[test]
    fn go_integer_syntax() {
        assert_eq!(parse_i64("+5"), Some(5));
        assert_eq!(parse_i64("007"), Some(7));
        assert_eq!(parse_i64("-0"), Some(0));
        assert_eq!(parse_i64("1_0"), None);
        assert_eq!(parse_i64("0x10"), None);
        assert_eq!(parse_i64("1.5"), None);
        assert_eq!(parse_i64(""), None);
        assert_eq!(parse_i64("+"), None);
        assert_eq!(parse_i64("99999999999999999999"), None);
    }

    #[test]
    fn unicode_whitespace_splits_fields() {
        for arg in [
            "0\u{a0}45",
            "0\u{3000}45",
            "0\u{85}45",
            "0\u{b}45",
            "  0   45 ",
            "0\t45",
        ] {
            assert_eq!(
                fields(arg.as_bytes()).as_slice(),
                [b"0".as_slice(), b"45"],
                "{arg:?}"
            );
        }
    }

    #[test]
    fn more_than_four_fields_keep_a_wrong_arity() {
        assert_eq!(fields(b"1 2 3 4 5 6").as_slice().len(), 4);
    }

    #[test]
    fn non_utf8_bytes_are_kept_and_never_white_space() {
        // A lone 0x85 or 0xA0 is not U+0085 / U+00A0: Go sees utf8.RuneError.
        assert_eq!(
            fields(b"\xff\x85 \xc2\xa0\xa0x\x0b").as_slice(),
            [b"\xff\x85".as_slice(), b"\xa0x"]
        );
        assert_eq!(
            trim_space(b"\x0b \xc2\xa0\xfftok\xe3\x80\x80\xc2\x85\r"),
            b"\xfftok"
        );
        assert_eq!(trim_space(b"\xa0tok\x85"), b"\xa0tok\x85");
        assert_eq!(trim_space(b" \t\x0b\x0c\r\xc2\x85 "), b"");
        assert_eq!(trim_space(b"a b"), b"a b");
    }

    #[test]
    fn ceil_rounding() {
        assert_eq!(
            Seconds::from_duration_ceil(Duration::ZERO).unwrap().get(),
            0
        );
        assert_eq!(
            Seconds::from_duration_ceil(Duration::from_secs(2))
                .unwrap()
                .get(),
            2
        );
        assert!(Lease::from_duration_ceil(Duration::ZERO).is_err());
        assert!(Seconds::from_duration_ceil(Duration::MAX).is_err());
    }
}
