use dflockd_proto::Token;
use thiserror::Error;

/// Why no token could be minted.
///
/// ```
/// use dflockd_core::{FenceCounter, Mint, MintError};
/// let mut last = FenceCounter::with_fixed_salt(u64::MAX, 0);
/// assert_eq!(last.mint(), Err(MintError::Exhausted)); // fences never wrap
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MintError {
    /// The fence counter reached `u64::MAX`; fences never wrap.
    #[error("fence counter exhausted")]
    Exhausted,
    /// The fence could not be made durable (fence-state file).
    #[error("fence persistence failed: {0}")]
    Persistence(String),
}

/// Source of grant tokens. The lock table calls it once per grant, so the
/// fences it returns must strictly increase.
///
/// ```
/// use dflockd_core::{Mint, MintError};
/// use dflockd_proto::Token;
/// /// Fences from a sequence some other component guarantees to be increasing.
/// struct FromSequence(std::vec::IntoIter<u64>);
/// impl Mint for FromSequence {
///     fn mint(&mut self) -> Result<Token, MintError> {
///         self.0.next().map(|fence| Token::new(fence, 0)).ok_or(MintError::Exhausted)
///     }
/// }
/// let mut mint = FromSequence(vec![7, 9].into_iter());
/// assert_eq!(mint.mint().unwrap().fence(), 7);
/// ```
pub trait Mint {
    /// Returns the next token.
    fn mint(&mut self) -> Result<Token, MintError>;
}

/// A fence counter: each call to [`FenceCounter::next_fence`] returns the
/// previous value plus one and refuses to wrap. The server seeds it with the
/// wall clock in Unix nanoseconds (or a persisted ceiling); the salt source is
/// supplied by the caller so this type stays free of I/O.
///
/// ```
/// use dflockd_core::{FenceCounter, Mint};
/// let mut c = FenceCounter::with_fixed_salt(41, 0);
/// assert_eq!(c.mint().unwrap().fence(), 42);
/// assert_eq!(c.mint().unwrap().fence(), 43);
/// let mut end = FenceCounter::with_fixed_salt(u64::MAX, 0);
/// assert!(end.mint().is_err());
/// ```
pub struct FenceCounter {
    last: u64,
    salt: Box<dyn FnMut() -> u64 + Send>,
}

impl FenceCounter {
    /// A counter whose first fence is `seed + 1`, salting tokens with `salt()`.
    ///
    /// ```
    /// let mut n = 0;
    /// let c = dflockd_core::FenceCounter::new(10, move || { n += 1; n });
    /// assert_eq!(c.last(), 10);
    /// ```
    pub fn new(seed: u64, salt: impl FnMut() -> u64 + Send + 'static) -> FenceCounter {
        FenceCounter {
            last: seed,
            salt: Box::new(salt),
        }
    }

    /// A counter with a constant salt, for tests and examples.
    ///
    /// ```
    /// use dflockd_core::{FenceCounter, Mint};
    /// assert_eq!(FenceCounter::with_fixed_salt(0, 9).mint().unwrap().salt(), 9);
    /// ```
    pub fn with_fixed_salt(seed: u64, salt: u64) -> FenceCounter {
        FenceCounter::new(seed, move || salt)
    }

    /// The last fence handed out (the seed before the first grant).
    ///
    /// ```
    /// assert_eq!(dflockd_core::FenceCounter::with_fixed_salt(5, 0).last(), 5);
    /// ```
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Advances the counter.
    ///
    /// ```
    /// let mut c = dflockd_core::FenceCounter::with_fixed_salt(0, 0);
    /// assert_eq!(c.next_fence(), Ok(1));
    /// ```
    pub fn next_fence(&mut self) -> Result<u64, MintError> {
        let next = self.last.checked_add(1).ok_or(MintError::Exhausted)?;
        self.last = next;
        Ok(next)
    }

    /// A salt from the configured source.
    ///
    /// ```
    /// assert_eq!(dflockd_core::FenceCounter::with_fixed_salt(0, 3).salt(), 3);
    /// ```
    pub fn salt(&mut self) -> u64 {
        (self.salt)()
    }
}

impl Mint for FenceCounter {
    fn mint(&mut self) -> Result<Token, MintError> {
        let fence = self.next_fence()?;
        Ok(Token::new(fence, self.salt()))
    }
}

impl std::fmt::Debug for FenceCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceCounter")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}
