//! The lock table's clock: time since the server started, read on every
//! request, so it must be cheap.
//!
//! On Linux it is the kernel's coarse monotonic clock, which the kernel
//! updates on each timer tick: a read copies a value instead of reading
//! the CPU's time-stamp counter and scaling it (`Instant::elapsed`, twice
//! per lock and release, several times dearer on virtual machines; see
//! docs/PERFORMANCE.md). The price is resolution: a read lags the true time
//! by less than one tick ([`TableClock::granularity`], 1–10 ms). The table
//! lengthens every lease and lock-delay by that much
//! (`TableConfig::clock_granularity`), so none ends before its full length
//! has passed; each may last up to two ticks longer.
//!
//! Elsewhere the clock is the runtime's (`tokio::time::Instant`), with no
//! granularity.

use std::time::Duration;

use tokio::time::Instant;

/// Time since the server started, as the lock table counts it.
#[derive(Debug)]
pub(crate) struct TableClock {
    /// The runtime's instant at the start: a table time `t` is about
    /// `origin + t` (see [`Self::instant_after`]).
    origin: Instant,
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// The coarse clock's reading at the start, and its resolution.
    #[cfg(target_os = "linux")]
    Coarse { start: Duration, tick: Duration },
    /// The runtime's clock.
    Runtime,
}

impl TableClock {
    /// A clock that starts at zero now: the best one, or the runtime's
    /// (which follows tokio's paused test time) if `runtime`.
    pub(crate) fn start(runtime: bool) -> TableClock {
        // The coarse start first: then it is no later than `origin`.
        let source = if runtime {
            Source::Runtime
        } else {
            Source::best()
        };
        TableClock {
            origin: Instant::now(),
            source,
        }
    }

    /// Time since the start. Never decreases.
    pub(crate) fn now(&self) -> Duration {
        match &self.source {
            #[cfg(target_os = "linux")]
            Source::Coarse { start, .. } => coarse_now().saturating_sub(*start),
            Source::Runtime => self.origin.elapsed(),
        }
    }

    /// How far a reading may lag the true time.
    pub(crate) fn granularity(&self) -> Duration {
        match &self.source {
            #[cfg(target_os = "linux")]
            Source::Coarse { tick, .. } => *tick,
            Source::Runtime => Duration::ZERO,
        }
    }

    /// A runtime instant by which [`Self::now`] has reached `time`: a timer
    /// set for it finds that time has come.
    pub(crate) fn instant_after(&self, time: Duration) -> Instant {
        // The coarse start was read no later than `origin` and lags it by
        // less than a tick; a reading lags by less than a tick too.
        self.origin + time + self.granularity()
    }
}

impl Source {
    fn best() -> Source {
        #[cfg(target_os = "linux")]
        {
            use nix::time::{ClockId, clock_getres};
            if let Ok(res) = clock_getres(ClockId::CLOCK_MONOTONIC_COARSE) {
                let tick = Duration::from(res);
                // A kernel without a usable coarse clock reports no sensible
                // tick; the precise clock is the fallback.
                if !tick.is_zero() && tick <= Duration::from_millis(100) {
                    return Source::Coarse {
                        start: coarse_now(),
                        tick,
                    };
                }
            }
        }
        Source::Runtime
    }
}

/// The coarse monotonic clock's reading (zero if it cannot be read, which
/// `clock_getres` succeeding rules out).
#[cfg(target_os = "linux")]
fn coarse_now() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_never_decrease_and_follow_the_precise_clock() {
        let precise = std::time::Instant::now();
        let clock = TableClock::start(false);
        let mut last = clock.now();
        // Until the table clock has moved by several ticks (bounded: the
        // coarse clock moves at least once per tick).
        while clock.now() < Duration::from_millis(30) {
            let now = clock.now();
            assert!(now >= last, "went back from {last:?} to {now:?}");
            last = now;
            assert!(
                precise.elapsed() < Duration::from_secs(5),
                "the table clock does not advance"
            );
        }
        // A reading lags the true time by less than the granularity, and
        // the table clock started after the precise one.
        let now = clock.now();
        let elapsed = precise.elapsed();
        assert!(
            now <= elapsed + clock.granularity(),
            "{now:?} ahead of {elapsed:?}"
        );
        let elapsed = precise.elapsed();
        let now = clock.now();
        let slack = clock.granularity() * 2 + Duration::from_millis(1);
        assert!(now + slack >= elapsed, "{now:?} behind {elapsed:?}");
    }

    #[test]
    fn an_instant_after_a_time_is_one_at_which_the_clock_has_reached_it() {
        let clock = TableClock::start(false);
        let target = clock.now() + Duration::from_millis(20);
        let at = clock.instant_after(target);
        while Instant::now() < at {
            std::thread::yield_now();
        }
        assert!(clock.now() >= target, "{:?} < {target:?}", clock.now());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_uses_the_coarse_clock_with_its_tick() {
        let clock = TableClock::start(false);
        assert!(matches!(clock.source, Source::Coarse { .. }));
        assert!(clock.granularity() > Duration::ZERO);
    }
}
