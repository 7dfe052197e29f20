use thiserror::Error;

/// Why no token could be minted.
///
/// ```
/// use dflockd_core::{FenceCounter, FenceSource, MintError};
/// let mut last = FenceCounter::starting_after(u64::MAX);
/// assert_eq!(last.next_fence(), Err(MintError::Exhausted)); // fences never wrap
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum MintError {
    /// The fence counter reached its end; fences never wrap.
    #[error("fence counter exhausted")]
    Exhausted,
    /// The fence could not be made durable (fence-state file).
    #[error("fence persistence failed: {0}")]
    Persistence(String),
}

/// Where a table's fences come from. The table asks once per grant, so the
/// fences must strictly increase.
///
/// A table keeps its own [`FenceCounter`] by default: the counter is then
/// part of the table's state (and of its snapshot), so replaying one log
/// gives the same fences everywhere. A server that splits its keys over
/// several tables gives them one shared source instead, so that fences grow
/// across all keys.
///
/// ```
/// use dflockd_core::{FenceSource, MintError};
/// /// Fences from a sequence some other component guarantees to be increasing.
/// struct FromSequence(std::vec::IntoIter<u64>, u64);
/// impl FenceSource for FromSequence {
///     fn next_fence(&mut self) -> Result<u64, MintError> {
///         let next = self.0.next().ok_or(MintError::Exhausted)?;
///         self.1 = next;
///         Ok(next)
///     }
///     fn last(&self) -> u64 { self.1 }
/// }
/// let mut fences = FromSequence(vec![7, 9].into_iter(), 0);
/// assert_eq!(fences.next_fence(), Ok(7));
/// assert_eq!(fences.last(), 7);
/// ```
pub trait FenceSource {
    /// The next fence, greater than every fence returned before.
    fn next_fence(&mut self) -> Result<u64, MintError>;
    /// The last fence handed out (or the starting point before the first).
    fn last(&self) -> u64;
}

/// A fence counter held in a table's state: each fence is the previous one
/// plus one, and the counter refuses to wrap. A server seeds it with the
/// wall clock in Unix nanoseconds (or a persisted ceiling).
///
/// ```
/// use dflockd_core::{FenceCounter, FenceSource};
/// let mut c = FenceCounter::starting_after(41);
/// assert_eq!(c.next_fence(), Ok(42));
/// assert_eq!(c.next_fence(), Ok(43));
/// assert!(FenceCounter::starting_after(u64::MAX).next_fence().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FenceCounter {
    last: u64,
}

impl FenceCounter {
    /// A counter whose first fence is `last + 1`.
    ///
    /// ```
    /// use dflockd_core::{FenceCounter, FenceSource};
    /// assert_eq!(FenceCounter::starting_after(10).last(), 10);
    /// ```
    pub fn starting_after(last: u64) -> FenceCounter {
        FenceCounter { last }
    }
}

impl FenceSource for FenceCounter {
    fn next_fence(&mut self) -> Result<u64, MintError> {
        let next = self.last.checked_add(1).ok_or(MintError::Exhausted)?;
        self.last = next;
        Ok(next)
    }

    fn last(&self) -> u64 {
        self.last
    }
}
