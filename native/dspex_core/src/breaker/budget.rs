//! A retry budget (Finagle's rule), lock-free.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::error::{Error, Result};
use crate::value::Value;

/// A retry budget: each call deposits `ratio` of a token, each retry
/// takes one, and `min_per_second` retries are allowed every second
/// whatever the balance, so retries stay a bounded fraction of calls
/// (Finagle's rule: 20% plus 10 per second). Lock-free: the balance is one
/// atomic of milli-tokens, the per-second reserve one word `second:44 |
/// used:20`.
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    pub max_tokens: u32,
    deposit_milli: i64,
    balance_milli: CachePadded<AtomicI64>,
    reserve: CachePadded<AtomicU64>,
    allowed: AtomicU64,
    denied: AtomicU64,
}

const MILLI: i64 = 1000;
const RESERVE_SHIFT: u32 = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct BudgetInfo {
    pub balance: f64,
    pub allowed: u64,
    pub denied: u64,
}

impl RetryBudget {
    /// `ratio` in `[0, 1]`; `min_per_second` below 2^20; `max_tokens` > 0.
    pub fn new(ratio: f64, min_per_second: u32, max_tokens: u32) -> Result<Self> {
        let bad = |key: &str, v: Value| Err(Error::InvalidArgument(Value::tagged(key, v)));
        if !(0.0..=1.0).contains(&ratio) {
            return bad("ratio", Value::Float(ratio));
        }
        if min_per_second >= 1 << RESERVE_SHIFT {
            return bad("min_per_second", Value::Int(min_per_second.into()));
        }
        if max_tokens == 0 || max_tokens > 1_000_000 {
            return bad("max_tokens", Value::Int(max_tokens.into()));
        }
        Ok(RetryBudget {
            ratio,
            min_per_second,
            max_tokens,
            deposit_milli: (ratio * MILLI as f64).round() as i64,
            balance_milli: CachePadded::new(AtomicI64::new(0)),
            reserve: CachePadded::new(AtomicU64::new(0)),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        })
    }

    /// 20% of calls plus 10 retries a second, at most 100 saved up.
    pub fn default_budget() -> Self {
        RetryBudget::new(0.2, 10, 100).unwrap_or_else(|_| unreachable!("valid defaults"))
    }

    /// A logical call was made.
    pub fn deposit(&self) {
        if self.deposit_milli == 0 {
            return;
        }
        let max = i64::from(self.max_tokens) * MILLI;
        let _ = self
            .balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b < max).then(|| (b + self.deposit_milli).min(max))
            });
    }

    /// May one retry go ahead? Takes a token, or one of this second's
    /// reserve.
    pub fn withdraw(&self, now_ms: u64) -> bool {
        let took = self
            .balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= MILLI).then_some(b - MILLI)
            })
            .is_ok();
        let ok = took || self.take_reserve(now_ms / 1000);
        if ok {
            self.allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn take_reserve(&self, second: u64) -> bool {
        let min = u64::from(self.min_per_second);
        if min == 0 {
            return false;
        }
        let used_mask = (1u64 << RESERVE_SHIFT) - 1;
        self.reserve
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                let (sec, used) = (r >> RESERVE_SHIFT, r & used_mask);
                let sec_now = second & (u64::MAX >> RESERVE_SHIFT);
                if sec != sec_now {
                    Some((sec_now << RESERVE_SHIFT) | 1)
                } else if used < min {
                    Some(r + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }

    pub fn info(&self) -> BudgetInfo {
        BudgetInfo {
            balance: self.balance_milli.load(Ordering::Relaxed) as f64 / MILLI as f64,
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
        }
    }
}
