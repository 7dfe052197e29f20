//! Token minting for the server: a fence counter seeded from the wall clock
//! (or from the fence-state file, spec §4.3) and CSPRNG salts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use dflockd_core::{FenceSource, MintError};
use thiserror::Error;

/// Fences reserved per persisted extension of the ceiling.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::{FENCE_RANGE, FenceFile};
/// let dir = tempfile::tempdir()?;
/// let (file, start) = FenceFile::open(&dir.path().join("fences"), 1_000)?;
/// assert_eq!(file.ceiling(), start + FENCE_RANGE); // ~1M grants before the next write
/// # Ok(()) }
/// ```
pub const FENCE_RANGE: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"dflfnc1\n";
const RECORD: usize = 32;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO);

/// Why the fence-state file could not be used.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::{FenceFile, FenceFileError};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("fences");
/// let (_held, _) = FenceFile::open(&path, 0)?;
/// // A second server on the same file is refused.
/// assert!(matches!(FenceFile::open(&path, 0), Err(FenceFileError::Locked(_))));
/// std::fs::write(dir.path().join("junk"), b"not a journal")?;
/// assert!(matches!(FenceFile::open(&dir.path().join("junk"), 0), Err(FenceFileError::Corrupt { .. })));
/// # Ok(()) }
/// ```
#[derive(Debug, Error)]
pub enum FenceFileError {
    /// An I/O operation on the file failed.
    #[error("fence state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Another process holds the file's lock.
    #[error("fence state file {0} is locked by another process")]
    Locked(PathBuf),
    /// The file's contents are not a valid journal.
    #[error("fence state file {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// The journal of fence ceilings: two 32-byte slots, each
/// `magic | seq | ceiling | crc64(ISO)`, big-endian; the valid record with
/// the highest sequence wins.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dflockd_server::FenceFile;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("fences");
/// let (file, first_start) = FenceFile::open(&path, 5_000)?;
/// drop(file); // the server restarts, with a clock that went backwards
/// let (_file, second_start) = FenceFile::open(&path, 10)?;
/// assert!(second_start > first_start); // fences stay monotonic
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FenceFile {
    file: File,
    path: PathBuf,
    seq: u64,
    ceiling: u64,
}

impl FenceFile {
    /// Opens (or creates) and locks the file, recovers the ceiling, and
    /// persists `max(ceiling, now) + 2^20`. Returns the file and the value
    /// the counter must start from (its first fence is that value + 1).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dflockd_server::FenceFile;
    /// let dir = tempfile::tempdir()?;
    /// // A fresh file starts from the clock; the first fence is `start + 1`.
    /// let (_file, start) = FenceFile::open(&dir.path().join("fences"), 1_700_000_000_000_000_000)?;
    /// assert_eq!(start, 1_700_000_000_000_000_000);
    /// # Ok(()) }
    /// ```
    pub fn open(path: &Path, now_nanos: u64) -> Result<(FenceFile, u64), FenceFileError> {
        let io = |source| FenceFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(FenceFileError::Locked(path.to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let corrupt = |why| FenceFileError::Corrupt {
            path: path.to_owned(),
            why,
        };
        let (seq, ceiling, legacy) = match bytes.len() {
            0 => (0, 0, false),
            8 => (
                0,
                u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
                true,
            ),
            32 | 64 => {
                let best = bytes
                    .chunks(RECORD)
                    .filter_map(decode_record)
                    .max_by_key(|(seq, _)| *seq);
                let (seq, ceiling) = best.ok_or_else(|| corrupt("no valid record"))?;
                (seq, ceiling, false)
            }
            _ => return Err(corrupt("unexpected size")),
        };
        if legacy {
            file.set_len(0).map_err(io)?;
        }
        let start = ceiling.max(now_nanos);
        let mut fence_file = FenceFile {
            file,
            path: path.to_owned(),
            seq,
            ceiling,
        };
        let target = start
            .checked_add(FENCE_RANGE)
            .ok_or_else(|| corrupt("ceiling at the end of the range"))?;
        fence_file.persist(target).map_err(io)?;
        Ok((fence_file, start))
    }

    /// The last persisted ceiling: every fence issued is below it.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dflockd_server::{FENCE_RANGE, FenceFile};
    /// let dir = tempfile::tempdir()?;
    /// let (file, start) = FenceFile::open(&dir.path().join("fences"), 0)?;
    /// assert_eq!(file.ceiling(), start + FENCE_RANGE);
    /// # Ok(()) }
    /// ```
    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// Writes the next journal record and syncs file and directory.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dflockd_server::FenceFile;
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("fences");
    /// let (mut file, _) = FenceFile::open(&path, 0)?;
    /// file.persist(5_000_000)?; // about to issue fences up to 5,000,000
    /// drop(file);
    /// let (_file, start) = FenceFile::open(&path, 0)?;
    /// assert_eq!(start, 5_000_000); // a restart never reissues them
    /// # Ok(()) }
    /// ```
    pub fn persist(&mut self, ceiling: u64) -> std::io::Result<()> {
        let seq = self.seq + 1;
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(MAGIC);
        record[8..16].copy_from_slice(&seq.to_be_bytes());
        record[16..24].copy_from_slice(&ceiling.to_be_bytes());
        let crc = CRC64.checksum(&record[..24]);
        record[24..].copy_from_slice(&crc.to_be_bytes());
        let offset = ((seq - 1) % 2) * RECORD as u64;
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(&record)?;
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.seq = seq;
        self.ceiling = ceiling;
        Ok(())
    }
}

fn decode_record(record: &[u8]) -> Option<(u64, u64)> {
    if record.len() != RECORD || &record[..8] != MAGIC {
        return None;
    }
    let crc = u64::from_be_bytes(record[24..32].try_into().ok()?);
    if CRC64.checksum(&record[..24]) != crc {
        return None;
    }
    let seq = u64::from_be_bytes(record[8..16].try_into().ok()?);
    let ceiling = u64::from_be_bytes(record[16..24].try_into().ok()?);
    Some((seq, ceiling))
}

/// Current wall-clock time in Unix nanoseconds (saturating).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The server's fence source: one fence counter for all keys and both
/// namespaces, shared by every shard of the lock table.
/// [`ServerMint::share`] makes another handle on the same counter.
#[derive(Debug)]
pub struct ServerMint {
    fences: Arc<Fences>,
}

/// The shared fence counter. Fences come from one atomic, so they strictly
/// increase in the order they are minted, whichever shard mints them; with
/// a fence-state file no fence at or above the persisted ceiling is handed
/// out before a higher ceiling is on disk.
#[derive(Debug)]
struct Fences {
    last: AtomicU64,
    /// Every fence handed out is below this (`u64::MAX` without a file).
    ceiling: AtomicU64,
    file: Mutex<Option<FenceFile>>,
}

/// Fences stop here: a counter at or past it is exhausted. Far above any
/// clock-seeded start (about 2^61 in this century), and far enough below
/// `u64::MAX` that the increments of failed calls can never wrap it.
const EXHAUSTED_AT: u64 = u64::MAX - (1 << 32);

impl Fences {
    fn next(&self) -> Result<u64, MintError> {
        // One read-modify-write: the counter's cache line moves between
        // cores once per fence, not twice as with a load and a
        // compare-exchange.
        let last = self.last.fetch_add(1, Ordering::AcqRel);
        if last >= EXHAUSTED_AT {
            // Hold the counter in the band so that it never wraps around to
            // small fences, however many calls fail.
            self.last.store(EXHAUSTED_AT, Ordering::Release);
            return Err(MintError::Exhausted);
        }
        let next = last + 1;
        if next >= self.ceiling.load(Ordering::Acquire) {
            // `next` is ours alone; it is handed out only once a ceiling
            // above it is on disk.
            self.extend(next)?;
        }
        Ok(next)
    }

    /// Persists a ceiling above `next` unless another shard already did.
    /// Rare (once per [`FENCE_RANGE`] fences), so a lock is fine here.
    fn extend(&self, next: u64) -> Result<(), MintError> {
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(file) = file.as_mut() else {
            // No file: the ceiling is `u64::MAX`, and `next` reached it.
            return Err(MintError::Exhausted);
        };
        if next >= file.ceiling() {
            let target = next.checked_add(FENCE_RANGE).ok_or(MintError::Exhausted)?;
            file.persist(target)
                .map_err(|e| MintError::Persistence(e.to_string()))?;
        }
        self.ceiling.store(file.ceiling(), Ordering::Release);
        Ok(())
    }
}

impl ServerMint {
    /// Seeds from the wall clock, or from the fence-state file if given.
    pub fn open(fence_state_file: Option<&Path>) -> Result<ServerMint, FenceFileError> {
        let now = unix_nanos();
        let (seed, ceiling, file) = match fence_state_file {
            Some(path) => {
                let (file, start) = FenceFile::open(path, now)?;
                (start, file.ceiling(), Some(file))
            }
            None => (now, u64::MAX, None),
        };
        Ok(ServerMint {
            fences: Arc::new(Fences {
                last: AtomicU64::new(seed),
                ceiling: AtomicU64::new(ceiling),
                file: Mutex::new(file),
            }),
        })
    }

    /// Another handle on the same fence counter: one per shard of the
    /// lock table.
    pub fn share(&self) -> ServerMint {
        ServerMint {
            fences: Arc::clone(&self.fences),
        }
    }
}

impl FenceSource for ServerMint {
    fn next_fence(&mut self) -> Result<u64, MintError> {
        self.fences.next()
    }

    fn last(&self) -> u64 {
        self.fences.last.load(Ordering::Acquire).min(EXHAUSTED_AT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_is_final_and_the_counter_never_wraps() {
        let mint = ServerMint::open(None).unwrap();
        let fences = &mint.fences;
        fences.last.store(EXHAUSTED_AT - 2, Ordering::Relaxed);
        assert_eq!(fences.next().unwrap(), EXHAUSTED_AT - 1);
        assert_eq!(fences.next().unwrap(), EXHAUSTED_AT);
        for _ in 0..10_000 {
            assert!(matches!(fences.next(), Err(MintError::Exhausted)));
        }
        // Failed calls leave the counter in the band, nowhere near wrapping.
        let last = fences.last.load(Ordering::Relaxed);
        assert!((EXHAUSTED_AT..EXHAUSTED_AT + 2).contains(&last), "{last}");
    }

    #[test]
    fn shared_handles_mint_distinct_increasing_fences() {
        let mint = ServerMint::open(None).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let mut handle = mint.share();
                std::thread::spawn(move || {
                    (0..20_000)
                        .map(|_| handle.next_fence().unwrap())
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            let fences = handle.join().unwrap();
            assert!(fences.windows(2).all(|w| w[0] < w[1]), "not increasing");
            all.extend(fences);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 80_000, "a fence was minted twice");
    }

    #[test]
    fn crc64_is_go_iso() {
        // Check value of CRC-64/GO-ISO over "123456789".
        assert_eq!(CRC64.checksum(b"123456789"), 0xb909_56c7_75a4_1001);
    }

    #[test]
    fn fresh_file_persists_ceiling_and_restarts_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        let (f, start) = FenceFile::open(&path, 1_000).unwrap();
        assert_eq!(start, 1_000);
        assert_eq!(f.ceiling(), 1_000 + FENCE_RANGE);
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..8], MAGIC);
        // Clock set back: restart starts at the persisted ceiling.
        let (f, start) = FenceFile::open(&path, 5).unwrap();
        assert_eq!(start, 1_000 + FENCE_RANGE);
        assert_eq!(f.ceiling(), 1_000 + 2 * FENCE_RANGE);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap().len(), 64);
    }

    #[test]
    fn legacy_eight_byte_file_is_rewritten_as_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        std::fs::write(&path, 77_777u64.to_be_bytes()).unwrap();
        let (_f, start) = FenceFile::open(&path, 10).unwrap();
        assert_eq!(start, 77_777);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(decode_record(&bytes), Some((1, 77_777 + FENCE_RANGE)));
    }

    #[test]
    fn torn_record_falls_back_to_the_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        drop(FenceFile::open(&path, 100).unwrap());
        drop(FenceFile::open(&path, 100).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[32 + 20] ^= 0xff; // corrupt record 2
        std::fs::write(&path, &bytes).unwrap();
        let (_f, start) = FenceFile::open(&path, 0).unwrap();
        assert_eq!(start, 100 + FENCE_RANGE);
    }

    #[test]
    fn bad_sizes_and_second_opener_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        std::fs::write(&path, [1u8; 5]).unwrap();
        assert!(matches!(
            FenceFile::open(&path, 0),
            Err(FenceFileError::Corrupt { .. })
        ));
        std::fs::write(&path, [1u8; 32]).unwrap();
        assert!(matches!(
            FenceFile::open(&path, 0),
            Err(FenceFileError::Corrupt { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        let held = FenceFile::open(&path, 0).unwrap();
        assert!(matches!(
            FenceFile::open(&path, 0),
            Err(FenceFileError::Locked(_))
        ));
        drop(held);
    }

    #[test]
    fn mint_extends_the_ceiling_before_crossing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        let mut mint = ServerMint::open(Some(&path)).unwrap();
        let first = mint.next_fence().unwrap();
        let ceiling = mint.fences.ceiling.load(Ordering::Acquire);
        assert!(first < ceiling);
        // Jump the counter to just below the ceiling.
        mint.fences.last.store(ceiling - 2, Ordering::Release);
        assert_eq!(mint.next_fence().unwrap(), ceiling - 1);
        // The next fence would reach the ceiling: a higher one is persisted
        // first, by whichever handle mints it.
        let mut other = mint.share();
        assert_eq!(other.next_fence().unwrap(), ceiling);
        let persisted = mint.fences.file.lock().unwrap().as_ref().unwrap().ceiling();
        assert_eq!(persisted, ceiling + FENCE_RANGE);
        drop((mint, other));
        let (_file, start) = FenceFile::open(&path, 0).unwrap();
        assert_eq!(start, ceiling + FENCE_RANGE);
    }
}
