//! A per-session token bucket, lock-free.
//!
//! Implemented as GCRA (the generic cell rate algorithm), which is an exact
//! token bucket kept in one atomic: the "theoretical arrival time" `tat` of
//! the next operation. Admitting `n` operations moves `tat` forward by
//! `n * interval`; they are admitted when `tat` would end at most
//! `burst * interval` ahead of now. A full bucket therefore admits `burst`
//! operations at once and refills at `ops_per_sec`.
//!
//! Invariants (tests below):
//! - From a full bucket exactly `burst` operations pass at one instant.
//! - After `k / ops_per_sec` seconds, `k` more pass (never more than `burst`).
//! - A rejected call consumes nothing.
//! - Never panics or overflows, whatever the configuration or the clock.
//!
//! Why hand-written rather than `governor` (`cargo bench -p dspex_core
//! --bench compare`, issue 12, one run on the shared 2-core machine): its
//! direct limiter is the same GCRA and took the same 40 000 of 40 000
//! decisions on a shared schedule, but it reads its own clock, so a call
//! cannot carry the stamp of its command and two replicas applying the same
//! commands could decide differently; it refuses a cost above the burst
//! outright (`InsufficientCapacity`) where the contract caps the cost at
//! the burst; and an admitted check costs 13 ns on its fake clock (60 ns
//! on its quanta clock) against 7.7 ns here with the stamp given (refused
//! checks: about 5 ns each). Reading the wall clock costs more than either
//! check (60-160 ns on this machine), which is why the engine reads it once
//! per command, at its entry point, and not per check.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::value::Value;

/// Highest rate and burst a session may configure.
pub const MAX_OPS_PER_SEC: u64 = 1_000_000_000;
pub const MAX_BURST: u64 = 1_000_000;

/// `{ops_per_sec, burst}` as given to `create_session`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub ops_per_sec: u64,
    pub burst: u64,
}

impl RateLimit {
    pub fn new(ops_per_sec: u64, burst: u64) -> Result<RateLimit> {
        if !(1..=MAX_OPS_PER_SEC).contains(&ops_per_sec) || !(1..=MAX_BURST).contains(&burst) {
            return Err(Error::InvalidArgument(Value::tagged(
                "rate_limit",
                Value::Tuple(vec![Value::Int(ops_per_sec as i64), Value::Int(burst as i64)].into()),
            )));
        }
        Ok(RateLimit { ops_per_sec, burst })
    }

    /// `nil` or `{ops_per_sec, burst}` as Elixir gives it.
    pub fn from_value(v: &Value) -> Result<Option<RateLimit>> {
        let bad = || Error::InvalidArgument(Value::tagged("rate_limit", v.clone()));
        match v {
            Value::Nil => Ok(None),
            Value::Tuple(parts) => match parts[..] {
                [Value::Int(rate), Value::Int(burst)] if rate > 0 && burst > 0 => {
                    RateLimit::new(rate as u64, burst as u64)
                        .map(Some)
                        .map_err(|_| bad())
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Nanoseconds one token takes to refill.
    interval: u64,
    /// `burst * interval`: how far ahead of now `tat` may run.
    tolerance: u64,
    /// Theoretical arrival time, in nanoseconds since the Unix epoch.
    tat: AtomicU64,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> TokenBucket {
        let interval = (1_000_000_000 / limit.ops_per_sec.max(1)).max(1);
        TokenBucket {
            limit,
            interval,
            tolerance: interval.saturating_mul(limit.burst),
            tat: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes `cost` tokens at `now_us` (the call's stamp, microseconds since
    /// the epoch) if there are that many; `cost` is capped at the burst, so
    /// a large batch empties a full bucket rather than never passing. The
    /// clock is the caller's: a stamp older than the last one refills
    /// nothing, and the same stamps give the same answers.
    pub fn try_acquire(&self, cost: u64, now_us: i64) -> bool {
        self.try_acquire_at(nanos(now_us), cost)
    }

    /// [`try_acquire`](Self::try_acquire) at a time in nanoseconds.
    pub fn try_acquire_at(&self, now: u64, cost: u64) -> bool {
        let step = cost
            .clamp(1, self.limit.burst)
            .saturating_mul(self.interval);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(step);
            if next - now > self.tolerance {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }

    /// Whole tokens available at `now_us`.
    pub fn available(&self, now_us: i64) -> u64 {
        let now = nanos(now_us);
        let ahead = self.tat.load(Ordering::Relaxed).saturating_sub(now);
        (self.tolerance - ahead.min(self.tolerance)) / self.interval
    }
}

/// Nanoseconds since the epoch of a microsecond stamp (a stamp before the
/// epoch counts as the epoch).
fn nanos(now_us: i64) -> u64 {
    u64::try_from(crate::time::resolve(now_us))
        .unwrap_or(0)
        .saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_refill() {
        let b = TokenBucket::new(RateLimit::new(10, 5).unwrap());
        let t0 = 1_000 * SEC;
        for _ in 0..5 {
            assert!(b.try_acquire_at(t0, 1));
        }
        assert!(!b.try_acquire_at(t0, 1));
        // One token back every 100 ms.
        assert!(!b.try_acquire_at(t0 + SEC / 10 - 1, 1));
        assert!(b.try_acquire_at(t0 + SEC / 10, 1));
        assert!(!b.try_acquire_at(t0 + SEC / 10, 1));
        // A long pause refills to the burst, not beyond.
        let later = t0 + 100 * SEC;
        for _ in 0..5 {
            assert!(b.try_acquire_at(later, 1));
        }
        assert!(!b.try_acquire_at(later, 1));
    }

    #[test]
    fn batches_cost_their_size_capped_at_burst() {
        let b = TokenBucket::new(RateLimit::new(1, 4).unwrap());
        assert!(b.try_acquire_at(SEC, 3));
        assert!(!b.try_acquire_at(SEC, 2));
        assert!(b.try_acquire_at(SEC, 1));
        let b = TokenBucket::new(RateLimit::new(1, 4).unwrap());
        assert!(b.try_acquire_at(SEC, 100));
        assert!(!b.try_acquire_at(SEC, 1));
    }

    #[test]
    fn bad_limits_are_rejected() {
        assert!(RateLimit::new(0, 1).is_err());
        assert!(RateLimit::new(1, 0).is_err());
        assert!(RateLimit::new(MAX_OPS_PER_SEC + 1, 1).is_err());
        assert!(RateLimit::new(1, MAX_BURST + 1).is_err());
        // The extremes work without overflow.
        let b = TokenBucket::new(RateLimit::new(1, MAX_BURST).unwrap());
        assert!(b.try_acquire_at(u64::MAX - 1, MAX_BURST));
        let b = TokenBucket::new(RateLimit::new(MAX_OPS_PER_SEC, 1).unwrap());
        assert!(b.try_acquire_at(0, 1));
    }

    #[test]
    fn concurrent_callers_never_exceed_the_burst() {
        let b = Arc::new(TokenBucket::new(RateLimit::new(1, 1000).unwrap()));
        let passed: u64 = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.try_acquire_at(SEC, 1)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as u64)
            .sum();
        assert_eq!(passed, 1000);
    }

    proptest! {
        /// Over any schedule, admitted <= burst + elapsed * rate.
        #[test]
        fn never_admits_more_than_the_bucket_holds(
            rate in 1u64..1000,
            burst in 1u64..50,
            steps in prop::collection::vec((0u64..SEC / 10, 1u64..5), 1..200),
        ) {
            let b = TokenBucket::new(RateLimit::new(rate, burst).unwrap());
            let (mut now, mut admitted) = (SEC, 0u64);
            for (dt, cost) in steps {
                now += dt;
                if b.try_acquire_at(now, cost) {
                    admitted += cost.min(burst);
                }
                let elapsed = now - SEC;
                let interval = SEC / rate;
                prop_assert!(admitted <= burst + elapsed / interval);
            }
        }
    }
}
