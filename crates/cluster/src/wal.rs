//! The Raft log's own file format: numbered segment files of CRC-checked
//! records, appended and fsync'd, never rewritten.
//!
//! A segment starts with [`MAGIC`]; each record after it is
//! `length u32 LE | crc32 u32 LE | kind u8 | payload` (the length counts
//! the payload; the CRC-32 covers kind and payload). Kinds:
//!
//! * [`Kind::Entry`]: the entry's log id, then the entry (postcard each);
//!   an entry at index `i` replaces every entry from `i` on.
//! * [`Kind::Truncate`]: entries from this index on are gone.
//! * [`Kind::Purge`]: entries up to this log id are gone (compacted).
//! * [`Kind::Committed`]: the newest committed log id.
//!
//! Reading the segments in order and applying their records gives the log.
//! Old segments whose entries are all purged are deleted, oldest first and
//! never the newest, right after a purge record went into the newest: so
//! the newest purge record always survives, and a new segment begins with
//! the newest committed log id written so far, so that one does too.
//! Only the last segment can end in a write torn by a crash (every earlier
//! one was fsync'd whole before the next was made), and only in its last
//! write (one writer, each write fsync'd before the next): opening the log
//! cuts such a tail off ([`torn`] says which bad records are one). A bad
//! record anywhere else is damage, and the log refuses to open rather than
//! forget acknowledged entries.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::LogId;
use thiserror::Error;

use crate::records::{decode, encode};
use crate::{Entry, NodeId};

/// The first bytes of every segment file.
pub(crate) const MAGIC: &[u8; 8] = b"DFLWAL01";
/// Once the active segment is this long, the next write starts a new one.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes before a record's payload: length, CRC, kind.
pub(crate) const HEADER: usize = 9;
/// No record is longer: a damaged length is caught before it is believed.
const MAX_PAYLOAD: u32 = 256 << 20;

/// Why the log cannot be opened, written or read.
#[derive(Debug, Error)]
pub enum WalError {
    /// The file system refused.
    #[error("Raft log {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
    /// A record does not check out where a crash cannot explain it.
    #[error("Raft log {path} is damaged at byte {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: String,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Entry = 1,
    Truncate = 2,
    Purge = 3,
    Committed = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        [Kind::Entry, Kind::Truncate, Kind::Purge, Kind::Committed]
            .into_iter()
            .find(|kind| *kind as u8 == byte)
    }
}

/// Appends one record to `buf`; returns where in `buf` it starts.
pub(crate) fn put_record(buf: &mut Vec<u8>, kind: Kind, payload: &[&[u8]]) -> usize {
    let start = buf.len();
    let len: usize = payload.iter().map(|part| part.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind as u8]);
    for part in payload {
        crc.update(part);
    }
    // Entries are bounded far below 4 GiB by the transport's frame limit.
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(kind as u8);
    for part in payload {
        buf.extend_from_slice(part);
    }
    start
}

/// Appends an entry record (its log id, then its postcard bytes).
pub(crate) fn put_entry(buf: &mut Vec<u8>, log_id: &LogId<NodeId>, entry: &[u8]) -> usize {
    put_record(buf, Kind::Entry, &[&encode(log_id), entry])
}

/// Where an entry that is in a segment lies.
#[derive(Clone, Debug)]
pub(crate) struct Located {
    pub(crate) log_id: LogId<NodeId>,
    pub(crate) file: Arc<File>,
    pub(crate) path: Arc<PathBuf>,
    /// Where its record starts.
    pub(crate) offset: u64,
    /// Its record's payload length.
    pub(crate) len: u32,
}

impl Located {
    /// Reads the entry back, checking its record.
    pub(crate) fn read(&self) -> Result<Entry, WalError> {
        let mut bytes = vec![0; HEADER + self.len as usize];
        self.file
            .read_exact_at(&mut bytes, self.offset)
            .map_err(io_error(&self.path))?;
        match parse(&bytes, 0) {
            Parsed::Record {
                kind: Kind::Entry,
                payload,
                ..
            } => {
                let (log_id, entry) =
                    split_entry(payload).map_err(|reason| self.corrupt(reason))?;
                let entry: Entry = decode(entry).map_err(|e| self.corrupt(e.to_string()))?;
                if log_id != self.log_id || entry.log_id != self.log_id {
                    return Err(self.corrupt(format!("expected entry {}", self.log_id)));
                }
                Ok(entry)
            }
            _ => Err(self.corrupt("not the entry record written there".into())),
        }
    }

    fn corrupt(&self, reason: String) -> WalError {
        WalError::Corrupt {
            path: self.path.display().to_string(),
            offset: self.offset,
            reason,
        }
    }
}

fn split_entry(payload: &[u8]) -> Result<(LogId<NodeId>, &[u8]), String> {
    postcard::take_from_bytes::<LogId<NodeId>>(payload)
        .map_err(|e| format!("undecodable entry log id: {e}"))
}

/// One record read from a segment, or why none could be.
enum Parsed<'a> {
    Record {
        kind: Kind,
        payload: &'a [u8],
        next: usize,
    },
    /// The segment ends here, cleanly.
    End,
    /// The bytes left are too few for the record they begin.
    Short,
    /// The record is whole but wrong.
    Bad(String),
}

fn parse(bytes: &[u8], at: usize) -> Parsed<'_> {
    let rest = &bytes[at.min(bytes.len())..];
    if rest.is_empty() {
        return Parsed::End;
    }
    let Some((header, body)) = rest.split_first_chunk::<HEADER>() else {
        return Parsed::Short;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_PAYLOAD {
        return Parsed::Bad(format!("record length {len} is past the limit"));
    }
    let Some(payload) = body.get(..len as usize) else {
        return Parsed::Short;
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Parsed::Bad("CRC-32 mismatch".into());
    }
    match Kind::from_byte(header[8]) {
        Some(kind) => Parsed::Record {
            kind,
            payload,
            next: at + HEADER + len as usize,
        },
        None => Parsed::Bad(format!("unknown record kind {}", header[8])),
    }
}

/// The unit a disk writes whole (or not at all).
const SECTOR: usize = 512;

/// Whether the record at `at` of the newest segment, short or bad, is the
/// end of a write a crash cut short (everything from it on is then cut
/// off) rather than damage to acknowledged data (which refuses to open).
///
/// Torn: the rest is zeros; or a part of the record within one sector is
/// all zeros (the disk wrote some sectors of the last write and not
/// others); or no whole record follows it anywhere (garbage at the end).
/// A whole record after a bad one, with no zeroed sector to explain it,
/// means the bad one was acknowledged once, so it is damage.
fn torn(bytes: &[u8], at: usize) -> bool {
    let rest = &bytes[at..];
    if rest.iter().all(|b| *b == 0) {
        return true;
    }
    if let Some(len) = rest.first_chunk::<4>() {
        let end = at.saturating_add(HEADER + u32::from_le_bytes(*len) as usize);
        let end = end.min(bytes.len());
        let mut start = at;
        while start < end {
            let sector_end = (start / SECTOR + 1) * SECTOR;
            if bytes[start..sector_end.min(end)].iter().all(|b| *b == 0) {
                return true;
            }
            start = sector_end;
        }
    }
    !(at + 1..bytes.len()).any(|from| matches!(parse(bytes, from), Parsed::Record { .. }))
}

/// A segment file.
pub(crate) struct Segment {
    pub(crate) file: Arc<File>,
    pub(crate) path: Arc<PathBuf>,
    /// The highest entry index written to it, if any.
    pub(crate) last_index: Option<u64>,
}

/// The log as the segments left it.
pub(crate) struct Recovered {
    pub(crate) entries: BTreeMap<u64, Located>,
    pub(crate) last_purged: Option<LogId<NodeId>>,
    pub(crate) committed: Option<LogId<NodeId>>,
    pub(crate) appender: Appender,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The segment numbers in `dir`, oldest first.
pub(crate) fn segments_in(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut found = Vec::new();
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for item in listing {
        let item = item.map_err(io_error(dir))?;
        if let Some(seq) = item.file_name().to_str().and_then(segment_seq) {
            found.push(seq);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Creates the log in `dir` as one segment holding `records`, fsync'd.
pub(crate) fn create_with(dir: &Path, records: &[u8]) -> Result<(), WalError> {
    make_dir(dir)?;
    Appender::create(dir, 1, records, SEGMENT_BYTES).map(drop)
}

/// Makes `dir` if it is missing, its entry in its parent fsync'd (else a
/// crash could lose the whole directory with what was written in it).
fn make_dir(dir: &Path) -> Result<(), WalError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)
            .and_then(|parent| parent.sync_all())
            .map_err(io_error(parent)),
        _ => Ok(()),
    }
}

/// Opens (or creates) the log in `dir`, cutting off a torn last record.
pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<Recovered, WalError> {
    make_dir(dir)?;
    let seqs = segments_in(dir)?;
    if seqs.is_empty() {
        let appender = Appender::create(dir, 1, &[], segment_bytes)?;
        return Ok(Recovered {
            entries: BTreeMap::new(),
            last_purged: None,
            committed: None,
            appender,
        });
    }
    let mut state = Replay::default();
    let mut segments = BTreeMap::new();
    let mut active_len = 0;
    for (position, seq) in seqs.iter().enumerate() {
        let last = position + 1 == seqs.len();
        let path = Arc::new(dir.join(segment_name(*seq)));
        let file = OpenOptions::new()
            .read(true)
            .write(last)
            .open(&*path)
            .map_err(io_error(&path))?;
        let file = Arc::new(file);
        let bytes = std::fs::read(&*path).map_err(io_error(&path))?;
        let (valid, last_index) = state.segment(&bytes, &file, &path, last)?;
        // Only the last segment can come back shorter than it is.
        active_len = valid.max(MAGIC.len()) as u64;
        if valid < MAGIC.len() {
            file.set_len(0).map_err(io_error(&path))?;
            file.write_all_at(MAGIC, 0).map_err(io_error(&path))?;
        } else if valid < bytes.len() {
            file.set_len(valid as u64).map_err(io_error(&path))?;
        }
        if valid < bytes.len() || valid < MAGIC.len() {
            file.sync_all().map_err(io_error(&path))?;
            tracing::warn!(
                path = %path.display(),
                bytes = bytes.len() - valid,
                "cut a record torn by a crash off the end of the Raft log"
            );
        }
        segments.insert(
            *seq,
            Segment {
                file,
                path,
                last_index,
            },
        );
    }
    let appender = Appender {
        dir: dir.to_path_buf(),
        segments,
        len: active_len,
        segment_bytes,
        failed: false,
    };
    Ok(Recovered {
        entries: state.entries,
        last_purged: state.last_purged,
        committed: state.committed,
        appender,
    })
}

/// The log so far, while the segments are read.
#[derive(Default)]
struct Replay {
    entries: BTreeMap<u64, Located>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl Replay {
    /// Applies one segment's records; returns how many bytes are valid and
    /// the highest entry index in it.
    fn segment(
        &mut self,
        bytes: &[u8],
        file: &Arc<File>,
        path: &Arc<PathBuf>,
        last: bool,
    ) -> Result<(usize, Option<u64>), WalError> {
        let corrupt = |offset: usize, reason: String| WalError::Corrupt {
            path: path.display().to_string(),
            offset: offset as u64,
            reason,
        };
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            // A segment is created with its magic fsync'd before anything
            // goes in, so only the newest one can lack it (a crash while it
            // was made), and then it holds nothing.
            if last && (MAGIC.starts_with(bytes) || bytes.iter().all(|b| *b == 0)) {
                return Ok((0, None));
            }
            return Err(corrupt(0, "not a dflockd Raft log segment".into()));
        }
        let mut at = MAGIC.len();
        let mut last_index = None;
        loop {
            match parse(bytes, at) {
                Parsed::End => return Ok((at, last_index)),
                Parsed::Record {
                    kind,
                    payload,
                    next,
                } => {
                    let index = self
                        .apply(kind, payload, file, path, at)
                        .map_err(|reason| corrupt(at, reason))?;
                    if index.is_some() {
                        last_index = last_index.max(index);
                    }
                    at = next;
                }
                Parsed::Short | Parsed::Bad(_) if last && torn(bytes, at) => {
                    return Ok((at, last_index));
                }
                Parsed::Short => return Err(corrupt(at, "segment ends inside a record".into())),
                Parsed::Bad(reason) => return Err(corrupt(at, reason)),
            }
        }
    }

    /// Applies one record; returns the index of an entry record.
    fn apply(
        &mut self,
        kind: Kind,
        payload: &[u8],
        file: &Arc<File>,
        path: &Arc<PathBuf>,
        offset: usize,
    ) -> Result<Option<u64>, String> {
        match kind {
            Kind::Entry => {
                let (log_id, _) = split_entry(payload)?;
                drop(self.entries.split_off(&log_id.index));
                self.entries.insert(
                    log_id.index,
                    Located {
                        log_id,
                        file: Arc::clone(file),
                        path: Arc::clone(path),
                        offset: offset as u64,
                        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    },
                );
                Ok(Some(log_id.index))
            }
            Kind::Truncate => {
                let from: u64 = decode(payload).map_err(|e| format!("truncate: {e}"))?;
                drop(self.entries.split_off(&from));
                Ok(None)
            }
            Kind::Purge => {
                let upto: LogId<NodeId> = decode(payload).map_err(|e| format!("purge: {e}"))?;
                self.entries = self.entries.split_off(&upto.index.saturating_add(1));
                self.last_purged = Some(upto);
                Ok(None)
            }
            Kind::Committed => {
                self.committed = decode(payload).map_err(|e| format!("committed: {e}"))?;
                Ok(None)
            }
        }
    }
}

/// The writing end: the segments, and the newest one's length. Any write
/// error leaves it refusing every later write (after a failed fsync the
/// kernel may have dropped the pages; retrying could lose data silently).
pub(crate) struct Appender {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    len: u64,
    segment_bytes: u64,
    failed: bool,
}

impl Appender {
    /// Makes segment `seq` holding `header` records, fsync'd, and its
    /// directory entry fsync'd too.
    fn create(
        dir: &Path,
        seq: u64,
        header: &[u8],
        segment_bytes: u64,
    ) -> Result<Appender, WalError> {
        let mut appender = Appender {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            len: 0,
            segment_bytes,
            failed: false,
        };
        appender.start_segment(seq, header)?;
        Ok(appender)
    }

    fn start_segment(&mut self, seq: u64, header: &[u8]) -> Result<(), WalError> {
        let path = Arc::new(self.dir.join(segment_name(seq)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&*path)
            .map_err(io_error(&path))?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(header);
        file.write_all_at(&bytes, 0).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))?;
        self.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                path,
                last_index: None,
            },
        );
        self.len = bytes.len() as u64;
        Ok(())
    }

    fn active(&self) -> Result<(&u64, &Segment), WalError> {
        self.segments.last_key_value().ok_or_else(|| WalError::Io {
            path: self.dir.display().to_string(),
            source: io::Error::other("no segment"),
        })
    }

    /// Writes `records` at the end of the active segment and fsyncs it;
    /// returns the segment and where the records start.
    pub(crate) fn write(
        &mut self,
        records: &[u8],
    ) -> Result<(Arc<File>, Arc<PathBuf>, u64), WalError> {
        if self.failed {
            return Err(WalError::Io {
                path: self.dir.display().to_string(),
                source: io::Error::other("an earlier write failed"),
            });
        }
        let at = self.len;
        let (file, path) = {
            let (_, segment) = self.active()?;
            (Arc::clone(&segment.file), Arc::clone(&segment.path))
        };
        let written = file
            .write_all_at(records, at)
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            self.failed = true;
            return Err(io_error(&path)(e));
        }
        self.len += records.len() as u64;
        Ok((file, path, at))
    }

    /// Notes that an entry up to `index` went into the active segment.
    pub(crate) fn wrote_entry(&mut self, index: u64) {
        if let Some(mut last) = self.segments.last_entry() {
            let segment = last.get_mut();
            segment.last_index = segment.last_index.max(Some(index));
        }
    }

    /// Starts a new segment with `header` once the active one is full.
    pub(crate) fn roll_if_full(&mut self, header: &[u8]) -> Result<(), WalError> {
        if self.len < self.segment_bytes || self.failed {
            return Ok(());
        }
        let next = self.active()?.0 + 1;
        if let Err(e) = self.start_segment(next, header) {
            self.failed = true;
            return Err(e);
        }
        Ok(())
    }

    /// Deletes the oldest segments (never the active one) whose entries
    /// are all purged, just after the purge of `upto` was written to the
    /// active one (see the module doc).
    pub(crate) fn delete_purged(&mut self, upto: u64) {
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.first_entry() else {
                return;
            };
            if oldest.get().last_index.is_some_and(|last| last > upto) {
                return;
            }
            let segment = oldest.remove();
            // Left behind (say a crash before the unlink reached the
            // disk), it is read again harmlessly: later records purge it.
            if let Err(error) = std::fs::remove_file(&*segment.path) {
                tracing::warn!(path = %segment.path.display(), %error, "cannot delete a purged Raft log segment");
            }
        }
    }
}
