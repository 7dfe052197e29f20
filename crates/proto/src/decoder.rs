use crate::{MAX_AUTH_LINE, MAX_LINE};

/// What [`FrameDecoder::feed`] found in the bytes it consumed.
///
/// ```
/// use dflockd_proto::{FrameDecoder, Progress};
/// let mut d = FrameDecoder::new();
/// assert_eq!(d.feed(b"stats\n_\n").1, Progress::NeedMore);
/// assert_eq!(d.feed(b"_\n").1, Progress::Frame);
/// let mut d = FrameDecoder::new();
/// let long_key = [b"l\n".as_slice(), &[b'k'; 300], b"\n"].concat();
/// assert_eq!(d.feed(&long_key), (long_key.len(), Progress::Oversize));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Every byte was consumed and no frame is complete yet.
    NeedMore,
    /// A whole frame is ready: read it with [`FrameDecoder::frame`].
    Frame,
    /// A line exceeded its cap; its remainder up to the LF was consumed.
    /// The server answers `error` and closes the connection.
    Oversize,
}

/// What [`FrameDecoder::decode`] found.
///
/// ```
/// use dflockd_proto::{Decoded, FrameDecoder};
/// let mut d = FrameDecoder::new();
/// assert_eq!(d.decode(b"ping\n_\n"), (7, Decoded::NeedMore));
/// assert!(matches!(d.decode(b"_\n"), (2, Decoded::Frame(f)) if f.command == b"ping"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Every byte was consumed and no frame is complete yet.
    NeedMore,
    /// A whole frame.
    Frame(RawFrame<'a>),
    /// A line exceeded its cap (see [`Progress::Oversize`]).
    Oversize,
}

/// The three lines of one request frame, trailing CRs removed.
///
/// ```
/// use dflockd_proto::{FrameDecoder, RawFrame};
/// let mut d = FrameDecoder::new();
/// d.feed(b"sl\r\njobs\r\n5 3\r\n");
/// assert_eq!(d.frame(), RawFrame { command: b"sl", key: b"jobs", argument: b"5 3" });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The command line (`l`, `sl`, `ping`, …).
    pub command: &'a [u8],
    /// The key line.
    pub key: &'a [u8],
    /// The argument line.
    pub argument: &'a [u8],
}

/// Incremental splitter of a byte stream into three-line frames.
///
/// Lines end at LF; all trailing CRs are removed afterwards. A line may hold
/// at most [`MAX_LINE`] bytes before its LF (trailing CRs count), except the
/// argument of an `auth` frame, which may hold [`MAX_AUTH_LINE`]. An oversize
/// line is consumed up to its LF without being stored, so memory stays
/// bounded whatever the peer sends.
///
/// ```
/// use dflockd_proto::{FrameDecoder, Progress};
/// let mut d = FrameDecoder::new();
/// assert_eq!(d.feed(b"ping\r\n_"), (7, Progress::NeedMore));
/// assert_eq!(d.feed(b"\r\n_\r\nrest"), (5, Progress::Frame));
/// assert_eq!(d.frame().command, b"ping");
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    lines: [Vec<u8>; 3],
    current: usize,
    discarding: bool,
    lines_completed: u64,
    frame_ready: bool,
}

impl FrameDecoder {
    /// A decoder at the start of a frame.
    ///
    /// ```
    /// assert!(!dflockd_proto::FrameDecoder::new().in_frame());
    /// ```
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Consumes bytes from `input` until a frame completes, a line proves
    /// oversize, or the input runs out. Returns how many bytes were consumed;
    /// bytes after a completed frame are left for the next call.
    ///
    /// ```
    /// use dflockd_proto::{FrameDecoder, Progress};
    /// let mut d = FrameDecoder::new();
    /// let input = b"ping\n_\n_\nstats\n_\n_\n";
    /// let (n, p) = d.feed(input);
    /// assert_eq!((n, p), (9, Progress::Frame));
    /// assert_eq!(d.feed(&input[n..]), (10, Progress::Frame));
    /// ```
    pub fn feed(&mut self, input: &[u8]) -> (usize, Progress) {
        self.forget_finished_frame();
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            let cap = self.cap();
            match memchr::memchr(b'\n', rest) {
                None => {
                    used += rest.len();
                    if !self.discarding {
                        let line = &mut self.lines[self.current];
                        if line.len() + rest.len() > cap {
                            self.discarding = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(rest);
                        }
                    }
                    return (used, Progress::NeedMore);
                }
                Some(lf) => {
                    used += lf + 1;
                    let line = &mut self.lines[self.current];
                    if self.discarding || line.len() + lf > cap {
                        self.discarding = false;
                        line.clear();
                        self.lines_completed += 1;
                        return (used, Progress::Oversize);
                    }
                    line.extend_from_slice(&rest[..lf]);
                    let kept = without_trailing_cr(line).len();
                    line.truncate(kept);
                    self.lines_completed += 1;
                    self.current += 1;
                    if self.current == 3 {
                        self.frame_ready = true;
                        return (used, Progress::Frame);
                    }
                }
            }
        }
        (used, Progress::NeedMore)
    }

    /// [`feed`](Self::feed) and [`frame`](Self::frame) in one step, without
    /// copying when it can: if no part of a frame is buffered and `input`
    /// holds a whole frame, the frame is returned borrowed from `input`
    /// (the common case for a server reading request after request);
    /// otherwise the bytes go through `feed`. Either way the result, the
    /// bytes consumed and the line count are the same as `feed`'s.
    ///
    /// ```
    /// use dflockd_proto::{Decoded, FrameDecoder, RawFrame};
    /// let mut d = FrameDecoder::new();
    /// let input = b"r\r\njobs\r\n0123\r\nping\n";
    /// let (used, decoded) = d.decode(input);
    /// assert_eq!(used, 15);
    /// assert_eq!(decoded, Decoded::Frame(RawFrame { command: b"r", key: b"jobs", argument: b"0123" }));
    /// assert_eq!(d.decode(&input[used..]), (5, Decoded::NeedMore));
    /// assert_eq!(d.lines_completed(), 4);
    /// ```
    pub fn decode<'a>(&'a mut self, input: &'a [u8]) -> (usize, Decoded<'a>) {
        if input.is_empty() {
            // The usual call after the last buffered frame: nothing to do.
            return (0, Decoded::NeedMore);
        }
        if let Some((used, frame)) = self.whole_frame(input) {
            return (used, Decoded::Frame(frame));
        }
        let (used, progress) = self.feed(input);
        let decoded = match progress {
            Progress::Frame => Decoded::Frame(self.frame()),
            Progress::NeedMore => Decoded::NeedMore,
            Progress::Oversize => Decoded::Oversize,
        };
        (used, decoded)
    }

    /// A whole frame at the start of `input`, borrowed, if the decoder is
    /// between frames and every line is within its cap (anything else is
    /// left to `feed`, which also reports oversize lines).
    fn whole_frame<'a>(&mut self, input: &'a [u8]) -> Option<(usize, RawFrame<'a>)> {
        if self.in_frame() {
            return None;
        }
        let ends = first_three_lfs(input)?;
        let mut lines: [&[u8]; 3] = [&[]; 3];
        let mut used = 0;
        for (i, end) in ends.into_iter().enumerate() {
            if end - used > line_cap(i, lines[0]) {
                return None;
            }
            lines[i] = without_trailing_cr(&input[used..end]);
            used = end + 1;
        }
        self.pass_whole_frame();
        let [command, key, argument] = lines;
        Some((
            used,
            RawFrame {
                command,
                key,
                argument,
            },
        ))
    }

    /// The frame completed by the last [`feed`](Self::feed) that returned
    /// [`Progress::Frame`]. Before that, the lines read so far.
    ///
    /// ```
    /// let mut d = dflockd_proto::FrameDecoder::new();
    /// d.feed(b"r\nk\ntok\n");
    /// assert_eq!(d.frame().argument, b"tok");
    /// ```
    pub fn frame(&self) -> RawFrame<'_> {
        RawFrame {
            command: &self.lines[0],
            key: &self.lines[1],
            argument: &self.lines[2],
        }
    }

    /// Whether part of a frame has been received (a line, or bytes of one).
    ///
    /// ```
    /// let mut d = dflockd_proto::FrameDecoder::new();
    /// d.feed(b"l");
    /// assert!(d.in_frame());
    /// ```
    pub fn in_frame(&self) -> bool {
        !self.frame_ready && (self.current > 0 || self.discarding || !self.lines[0].is_empty())
    }

    /// How many lines have been completed since the decoder was created. A
    /// server arms a fresh per-line read deadline whenever this changes.
    ///
    /// ```
    /// let mut d = dflockd_proto::FrameDecoder::new();
    /// d.feed(b"l\nk");
    /// assert_eq!(d.lines_completed(), 1);
    /// ```
    pub fn lines_completed(&self) -> u64 {
        self.lines_completed
    }

    /// Accounts for a whole frame read straight from the input: between
    /// frames again, as after `feed` and `frame`, three lines later.
    pub(crate) fn pass_whole_frame(&mut self) {
        self.forget_finished_frame();
        self.lines_completed += 3;
    }

    /// Drops the lines of a frame already handed out, before the next one.
    fn forget_finished_frame(&mut self) {
        if self.frame_ready {
            self.frame_ready = false;
            for line in &mut self.lines {
                line.clear();
            }
            self.current = 0;
        }
    }

    fn cap(&self) -> usize {
        line_cap(self.current, &self.lines[0])
    }
}

/// The cap of line `index` (0 to 2) of a frame whose command line is
/// `command`: only an `auth` argument may be longer.
fn line_cap(index: usize, command: &[u8]) -> usize {
    if index == 2 && command == b"auth" {
        MAX_AUTH_LINE
    } else {
        MAX_LINE
    }
}

/// How far [`first_three_lfs`] looks word by word before it hands the
/// rest to `memchr`: past any usual frame, short of the long lines `memchr`
/// is built for.
const WORD_SCAN: usize = 64;

/// The offsets of the first three LFs in `input`, if it holds three.
///
/// Request frames are short (`l`, a key, `10`), so three `memchr` calls
/// cost more in setup than in scanning; eight bytes at a time in a `u64`
/// finds all three in a few words. Past [`WORD_SCAN`] bytes `memchr` takes
/// over.
fn first_three_lfs(input: &[u8]) -> Option<[usize; 3]> {
    let mut found = [0; 3];
    let mut count = 0;
    let head = &input[..input.len().min(WORD_SCAN)];
    let (words, tail) = head.as_chunks::<8>();
    for (index, word) in words.iter().enumerate() {
        let mut lfs = lf_bytes(u64::from_le_bytes(*word));
        while lfs != 0 {
            found[count] = index * 8 + (lfs.trailing_zeros() / 8) as usize;
            count += 1;
            if count == 3 {
                return Some(found);
            }
            lfs &= lfs - 1;
        }
    }
    let tail_start = words.len() * 8;
    for (offset, &byte) in tail.iter().enumerate() {
        if byte == b'\n' {
            found[count] = tail_start + offset;
            count += 1;
            if count == 3 {
                return Some(found);
            }
        }
    }
    let mut from = head.len();
    while count < 3 {
        found[count] = from + memchr::memchr(b'\n', &input[from..])?;
        from = found[count] + 1;
        count += 1;
    }
    Some(found)
}

/// The high bit of each byte of `word` that is an LF, and no other bit.
/// Exact (no false positives): `(b & 0x7f) + 0x7f` sets a byte's high bit
/// iff its low seven bits are not all zero, with no carry out of the byte.
fn lf_bytes(word: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = word ^ 0x0a0a_0a0a_0a0a_0a0a;
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// `line` without its trailing CRs (all of them).
fn without_trailing_cr(mut line: &[u8]) -> &[u8] {
    while let [head @ .., b'\r'] = line {
        line = head;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> (usize, Progress, Vec<Vec<u8>>) {
        let mut d = FrameDecoder::new();
        let (n, p) = d.feed(input);
        let f = d.frame();
        (
            n,
            p,
            vec![f.command.to_vec(), f.key.to_vec(), f.argument.to_vec()],
        )
    }

    #[test]
    fn lf_scan_finds_exactly_the_lfs() {
        // Every byte value next to an LF, at every offset of a word and
        // beyond the word scan, against a plain search.
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 130] {
            for fill in [0u8, b'\n' ^ 0x80, 0x0b, 0x09, 0x8a, 0xff, b'x'] {
                for positions in [
                    [1, 2, 3],
                    [0, 8, 16],
                    [7, 62, 64],
                    [5, 66, 120],
                    [63, 64, 65],
                ] {
                    let mut input = vec![fill; len];
                    for p in positions.into_iter().filter(|&p| p < len) {
                        input[p] = b'\n';
                    }
                    let expected: Vec<usize> = input
                        .iter()
                        .enumerate()
                        .filter(|&(_, &b)| b == b'\n')
                        .map(|(i, _)| i)
                        .take(3)
                        .collect();
                    let got = first_three_lfs(&input);
                    assert_eq!(
                        got.map(Vec::from),
                        (expected.len() == 3).then_some(expected),
                        "{input:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn strips_all_trailing_crs_only() {
        let (_, p, lines) = one(b"l\r\nk\r\r\na\rb\r\n");
        assert_eq!(p, Progress::Frame);
        assert_eq!(lines, vec![b"l".to_vec(), b"k".to_vec(), b"a\rb".to_vec()]);
    }

    #[test]
    fn exactly_the_cap_is_accepted_one_more_is_not() {
        let key = vec![b'a'; 256];
        let ok = [b"l\n".as_slice(), &key, b"\n0\n"].concat();
        assert_eq!(one(&ok).1, Progress::Frame);
        let long = [b"l\n".as_slice(), &key, b"a\n0\n"].concat();
        assert_eq!(one(&long).1, Progress::Oversize);
        // CR counts toward the cap.
        let crlf = [b"l\n".as_slice(), &key, b"\r\n0\n"].concat();
        assert_eq!(one(&crlf).1, Progress::Oversize);
    }

    #[test]
    fn auth_argument_gets_64k() {
        let tok = vec![b't'; 65_536];
        let ok = [b"auth\n_\n".as_slice(), &tok, b"\n"].concat();
        assert_eq!(one(&ok).1, Progress::Frame);
        let long = [b"auth\n_\n".as_slice(), &tok, b"t\n"].concat();
        assert_eq!(one(&long).1, Progress::Oversize);
        let ping = [b"ping\n_\n".as_slice(), &tok[..1000], b"\n"].concat();
        assert_eq!(one(&ping).1, Progress::Oversize);
    }

    #[test]
    fn oversize_waits_for_the_lf_without_storing() {
        let mut d = FrameDecoder::new();
        for _ in 0..1000 {
            assert_eq!(d.feed(&[b'x'; 1000]).1, Progress::NeedMore);
        }
        assert!(d.lines.iter().all(|l| l.capacity() <= MAX_LINE * 2));
        assert_eq!(d.feed(b"\n"), (1, Progress::Oversize));
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"sl\r\nsem\n10 2 30\r\n";
        let mut d = FrameDecoder::new();
        let mut last = Progress::NeedMore;
        for b in input.iter() {
            let (n, p) = d.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            last = p;
        }
        assert_eq!(last, Progress::Frame);
        assert_eq!(d.frame().argument, b"10 2 30");
    }
}
