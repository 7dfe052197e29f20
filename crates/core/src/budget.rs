//! The resource cap (`max_locks`) shared by the shards of one server.

use std::sync::atomic::{AtomicUsize, Ordering};

/// How many resources may exist at once, counted across every
/// [`LockTable`](crate::LockTable) that shares the budget. A server that
/// splits its keys over several tables (one lock each, so requests on
/// different keys do not wait for each other) gives them all one budget,
/// and the cap stays a server-wide cap.
///
/// ```
/// use dflockd_core::ResourceBudget;
/// let budget = ResourceBudget::new(2);
/// assert!(budget.try_take());
/// assert!(budget.try_take());
/// assert!(!budget.try_take()); // full
/// budget.give_back(1);
/// assert_eq!(budget.used(), 1);
/// assert!(budget.try_take());
/// ```
#[derive(Debug)]
pub struct ResourceBudget {
    max: AtomicUsize,
    used: AtomicUsize,
}

impl ResourceBudget {
    /// A budget of `max` resources, none used.
    ///
    /// ```
    /// let budget = dflockd_core::ResourceBudget::new(1024);
    /// assert_eq!((budget.max(), budget.used()), (1024, 0));
    /// ```
    pub fn new(max: usize) -> ResourceBudget {
        ResourceBudget {
            max: AtomicUsize::new(max),
            used: AtomicUsize::new(0),
        }
    }

    /// The cap.
    ///
    /// ```
    /// assert_eq!(dflockd_core::ResourceBudget::new(7).max(), 7);
    /// ```
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Changes the cap (a policy change). Resources that exist stay; new
    /// ones are refused while `used` is at or above the new cap.
    ///
    /// ```
    /// let budget = dflockd_core::ResourceBudget::new(1);
    /// assert!(budget.try_take());
    /// budget.set_max(2);
    /// assert!(budget.try_take());
    /// assert!(!budget.try_take());
    /// ```
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// Resources that exist now, across the tables sharing the budget.
    ///
    /// ```
    /// let budget = dflockd_core::ResourceBudget::new(7);
    /// budget.try_take();
    /// assert_eq!(budget.used(), 1);
    /// ```
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Reserves room for one new resource; `false` when the cap is reached.
    ///
    /// ```
    /// let budget = dflockd_core::ResourceBudget::new(0);
    /// assert!(!budget.try_take()); // a cap of zero admits nothing
    /// ```
    pub fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < max).then_some(used + 1)
            })
            .is_ok()
    }

    /// Counts `count` resources that already exist (a restored table's),
    /// even past the cap: they exist, and new ones wait for room.
    pub(crate) fn take_existing(&self, count: usize) {
        self.used.fetch_add(count, Ordering::AcqRel);
    }

    /// Returns room for `count` deleted resources.
    ///
    /// ```
    /// let budget = dflockd_core::ResourceBudget::new(3);
    /// budget.try_take();
    /// budget.try_take();
    /// budget.give_back(2);
    /// assert_eq!(budget.used(), 0);
    /// ```
    pub fn give_back(&self, count: usize) {
        // Saturating: a table never returns more than it took, but an
        // underflow here would turn the cap off.
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(count))
            });
    }
}
