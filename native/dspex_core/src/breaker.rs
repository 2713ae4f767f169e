//! Circuit breakers and retry budgets, with time passed in.
//!
//! A [`Breaker`] publishes its state in one atomic word, so asking a
//! closed breaker is one `Acquire` load: no lock, no write, no clock read.
//! Every caller gives "now" (milliseconds of a monotonic clock) as an
//! argument (a closure, called only where time matters), so the engine is
//! deterministic and the tests drive time explicitly.
//!
//! The word packs `state:3 | probes_in_use:8 | ms:53`, where `ms` is the
//! open-until time while OPEN and the earliest probe lease's expiry while
//! HALF_OPEN ([`NO_TIME`] when no lease is out).
//!
//! Invariants (checked by the model test at the bottom):
//! - the word changes only under `inner`'s lock, and always agrees with
//!   `inner` (state, the number of leases, their earliest expiry);
//! - at most `half_open_probes` leases are out, each owner holds at most one,
//!   and leases exist only while HALF_OPEN;
//! - a report from an owner without a lease, or whose lease ran out, is
//!   ignored while HALF_OPEN (it was admitted in another period, or
//!   overstayed), and every report is ignored while OPEN, FORCED_OPEN or
//!   DISABLED; an owner holds one permit and asking again before it reports
//!   is refused;
//! - consecutive: the breaker opens on the `threshold`-th failure in a row
//!   (not the one after); a success resets the count;
//! - rate: it opens when at least `minimum_calls` of the last `window`
//!   outcomes are in and `failures / calls >= failure_rate`;
//! - HALF_OPEN closes after `half_open_successes` probe successes in a row
//!   and reopens on a probe failure; entering CLOSED clears the counters.
//!
//! Lock order: `inner` only; nothing calls out while holding it.
//!
//! What is shared and written, per operation: `ask` in CLOSED or DISABLED
//! writes nothing; a rejection bumps one stripe of a striped counter; a
//! consecutive-strategy success writes only when a failure is pending; a
//! failure is one `fetch_add`. The rate strategy needs the order of the
//! last N outcomes, so each report is one CAS on the window word (N <= 56
//! bits of outcomes plus a count): exact, lock-free, on its own cache line
//! so it never slows the asks' load.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::value::Value;

/// The largest rate window: its outcomes are bits of one word.
pub const MAX_WINDOW: u32 = 56;
/// The most probes admitted at once while half-open (an 8-bit field).
pub const MAX_PROBES: u32 = 255;
/// The longest duration accepted (about 35 years), so times fit 53 bits.
pub const MAX_MS: u64 = 1 << 40;
/// "No lease out", in the word's time field.
pub const NO_TIME: u64 = (1 << 53) - 1;

const STATE_SHIFT: u32 = 61;
const PROBES_SHIFT: u32 = 53;
const WINDOW_COUNT_SHIFT: u32 = 56;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    Disabled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    fn of_word(w: u64) -> State {
        match w >> STATE_SHIFT {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::Disabled,
        }
    }
}

fn word(state: State, probes: usize, ms: u64) -> u64 {
    (state.code() << STATE_SHIFT) | ((probes as u64 & 0xFF) << PROBES_SHIFT) | (ms & NO_TIME)
}

fn word_probes(w: u64) -> u64 {
    (w >> PROBES_SHIFT) & 0xFF
}

fn word_ms(w: u64) -> u64 {
    w & NO_TIME
}

#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    /// Opens on the `threshold`-th failure in a row.
    Consecutive { threshold: u32 },
    /// Opens when `failure_rate` of the last `window` calls failed, once at
    /// least `minimum_calls` are in.
    Rate {
        window: u32,
        failure_rate: f64,
        minimum_calls: u32,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub strategy: Strategy,
    /// How long it stays open before probing.
    pub open_ms: u64,
    /// Probe successes in a row that close it.
    pub half_open_successes: u32,
    /// Probes admitted at once while half-open.
    pub half_open_probes: u32,
    /// A success that took at least this long counts as a failure.
    pub slow_call_ms: Option<u64>,
    /// A probe that has not reported after this long gives its permit back.
    pub probe_lease_ms: u64,
}

impl Config {
    /// 5 failures in a row, 60 s open, 3 probe successes close it.
    pub fn consecutive() -> Self {
        Config {
            strategy: Strategy::Consecutive { threshold: 5 },
            open_ms: 60_000,
            half_open_successes: 3,
            half_open_probes: 1,
            slow_call_ms: None,
            probe_lease_ms: 10_000,
        }
    }

    /// 50% of the last 10 calls (all 10 in), 30 s open, 3 probe successes.
    pub fn rate() -> Self {
        Config {
            strategy: Strategy::Rate {
                window: 10,
                failure_rate: 0.5,
                minimum_calls: 10,
            },
            open_ms: 30_000,
            ..Config::consecutive()
        }
    }

    /// `{:invalid_argument, {option, value}}` for the first option out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, v: Value| Err(Error::InvalidArgument(Value::tagged(key, v)));
        let int = |n: u64| Value::Int(n.min(i64::MAX as u64) as i64);
        match self.strategy {
            Strategy::Consecutive { threshold } => {
                if threshold == 0 {
                    return bad("threshold", int(threshold.into()));
                }
            }
            Strategy::Rate {
                window,
                failure_rate,
                minimum_calls,
            } => {
                if window == 0 || window > MAX_WINDOW {
                    return bad("window", int(window.into()));
                }
                if !(failure_rate > 0.0 && failure_rate <= 1.0) {
                    return bad("failure_rate", Value::Float(failure_rate));
                }
                if minimum_calls == 0 || minimum_calls > window {
                    return bad("minimum_calls", int(minimum_calls.into()));
                }
            }
        }
        if self.open_ms == 0 || self.open_ms > MAX_MS {
            return bad("timeout", int(self.open_ms));
        }
        if self.half_open_successes == 0 {
            return bad("half_open_successes", int(self.half_open_successes.into()));
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_PROBES {
            return bad("half_open_probes", int(self.half_open_probes.into()));
        }
        if let Some(ms) = self.slow_call_ms {
            if ms == 0 || ms > MAX_MS {
                return bad("slow_call_ms", int(ms));
            }
        }
        if self.probe_lease_ms == 0 || self.probe_lease_ms > MAX_MS {
            return bad("probe_lease_ms", int(self.probe_lease_ms));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Closed or disabled: go ahead, and report.
    Admitted,
    /// Half-open: go ahead as a probe, holding one of the permits (watch
    /// the caller; its report, death or lease expiry gives it back).
    Probe,
    /// Not admitted; the state that refused.
    Rejected(State),
}

/// What an operation changed, beyond its answer.
#[derive(Debug, PartialEq)]
pub struct Effects<O> {
    pub transition: Option<Transition>,
    /// Owners whose lease ended (reported, expired, or the period ended):
    /// stop watching them.
    pub released: Vec<O>,
}

impl<O> Effects<O> {
    fn none() -> Self {
        Effects {
            transition: None,
            released: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// A snapshot for introspection. `state` is the effective state: an open
/// breaker past its open time shows `HalfOpen` (the next ask probes).
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub state: State,
    /// Consecutive failures so far (consecutive strategy).
    pub failures: u64,
    /// Outcomes in the window and failures among them (rate strategy).
    pub window_calls: u32,
    pub window_failures: u32,
    /// Milliseconds until an open breaker probes, when open.
    pub retry_in_ms: Option<u64>,
    pub opened_at: Option<u64>,
    pub changed_at: u64,
    pub probes_in_use: u32,
    pub half_open_successes: u32,
    pub rejected: u64,
    pub opened: u64,
}

struct Lease<O> {
    owner: O,
    expires: u64,
}

struct Inner<O> {
    leases: Vec<Lease<O>>,
    /// Probe successes in this half-open period.
    successes: u32,
    opened_at: Option<u64>,
    changed_at: u64,
}

/// A counter bumped from many threads: one cache line per stripe, a thread
/// keeping its stripe, so bumps on different schedulers do not collide.
pub struct Striped {
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

const STRIPES: usize = 8;

impl Default for Striped {
    fn default() -> Self {
        Striped {
            stripes: std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0))),
        }
    }
}

impl Striped {
    pub fn add(&self, n: u64) {
        thread_local!(static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) });
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let i = STRIPE.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
            }
            s.get()
        });
        self.stripes[i % STRIPES].fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.stripes.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// One circuit breaker. `O` identifies a caller holding a probe permit
/// (a pid in the NIF).
pub struct Breaker<O> {
    word: CachePadded<AtomicU64>,
    /// Consecutive failures, or the rate window: outcome bits (1 = failure,
    /// newest lowest) and the number of outcomes above bit 56.
    count: CachePadded<AtomicU64>,
    config: Config,
    inner: Mutex<Inner<O>>,
    rejected: Striped,
    opened: AtomicU64,
}

impl<O: Clone + PartialEq> Breaker<O> {
    /// A closed breaker; `config` must be valid ([`Config::validate`]).
    pub fn new(config: Config, now: u64) -> Result<Self> {
        config.validate()?;
        Ok(Breaker {
            word: CachePadded::new(AtomicU64::new(word(State::Closed, 0, 0))),
            count: CachePadded::new(AtomicU64::new(0)),
            config,
            inner: Mutex::new(Inner {
                leases: Vec::new(),
                successes: 0,
                opened_at: None,
                changed_at: now,
            }),
            rejected: Striped::default(),
            opened: AtomicU64::new(0),
        })
    }

    /// A breaker with a new configuration that keeps `old`'s state: open
    /// stays open until the same time, forced open and disabled stay so,
    /// closed starts with clear counters, and half-open becomes open until
    /// `now` (the next ask probes again under the new rules; the old
    /// probes' reports are ignored).
    pub fn reconfigured(config: Config, old: &Breaker<O>, now: u64) -> Result<Self> {
        let new = Breaker::new(config, now)?;
        let oi = old.inner.lock();
        let w = old.word.load(Ordering::Acquire);
        let carried = match State::of_word(w) {
            State::Closed => word(State::Closed, 0, 0),
            State::Open => w,
            State::HalfOpen => word(State::Open, 0, now),
            s => word(s, 0, 0),
        };
        new.word.store(carried, Ordering::Release);
        {
            let mut ni = new.inner.lock();
            ni.opened_at = oi.opened_at;
            ni.changed_at = oi.changed_at;
        }
        new.rejected.add(old.rejected.sum());
        new.opened
            .store(old.opened.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(new)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// May a call go ahead? In CLOSED and DISABLED this is one load and
    /// neither `now` nor `owner` is called.
    pub fn ask(
        &self,
        now: impl FnOnce() -> u64,
        owner: impl FnOnce() -> O,
    ) -> (Verdict, Effects<O>) {
        let w = self.word.load(Ordering::Acquire);
        match State::of_word(w) {
            State::Closed | State::Disabled => return (Verdict::Admitted, Effects::none()),
            State::ForcedOpen => return self.reject(State::ForcedOpen),
            State::Open | State::HalfOpen => {}
        }
        let now = now();
        match State::of_word(w) {
            State::Open if now < word_ms(w) => self.reject(State::Open),
            State::HalfOpen
                if word_probes(w) >= u64::from(self.config.half_open_probes)
                    && now < word_ms(w) =>
            {
                // Every permit is out and none has expired.
                self.reject(State::HalfOpen)
            }
            _ => self.ask_locked(now, owner()),
        }
    }

    fn reject(&self, state: State) -> (Verdict, Effects<O>) {
        self.rejected.add(1);
        (Verdict::Rejected(state), Effects::none())
    }

    fn ask_locked(&self, now: u64, owner: O) -> (Verdict, Effects<O>) {
        let mut inner = self.inner.lock();
        let w = self.word.load(Ordering::Acquire);
        let mut fx = Effects::none();
        match State::of_word(w) {
            State::Closed | State::Disabled => return (Verdict::Admitted, fx),
            State::ForcedOpen => {
                drop(inner);
                return self.reject(State::ForcedOpen);
            }
            State::Open if now < word_ms(w) => {
                drop(inner);
                return self.reject(State::Open);
            }
            State::Open => {
                inner.successes = 0;
                inner.changed_at = now;
                fx.transition = Some(Transition {
                    from: State::Open,
                    to: State::HalfOpen,
                });
            }
            State::HalfOpen => {}
        }
        // Half-open: hand back expired permits, then grant one if free.
        let mut i = 0;
        while i < inner.leases.len() {
            if inner.leases[i].expires <= now {
                fx.released.push(inner.leases.swap_remove(i).owner);
            } else {
                i += 1;
            }
        }
        // One permit per owner: a holder asking again is refused, as it is
        // by the lock-free path when every permit is out.
        let free = inner.leases.len() < self.config.half_open_probes as usize;
        let verdict = if free && !inner.leases.iter().any(|l| l.owner == owner) {
            inner.leases.push(Lease {
                owner,
                expires: now.saturating_add(self.config.probe_lease_ms),
            });
            Verdict::Probe
        } else {
            self.rejected.add(1);
            Verdict::Rejected(State::HalfOpen)
        };
        self.publish_half_open(&inner);
        (verdict, fx)
    }

    fn publish_half_open(&self, inner: &Inner<O>) {
        let next = inner
            .leases
            .iter()
            .map(|l| l.expires)
            .min()
            .unwrap_or(NO_TIME);
        self.word.store(
            word(State::HalfOpen, inner.leases.len(), next),
            Ordering::Release,
        );
    }

    /// Reports a call's outcome. `duration_ms` turns a slow success into a
    /// failure when `slow_call_ms` is set. `owner` is called only while
    /// half-open (a report counts there only from a permit holder).
    pub fn record(
        &self,
        outcome: Outcome,
        duration_ms: Option<u64>,
        now: impl FnOnce() -> u64,
        owner: impl FnOnce() -> O,
    ) -> Effects<O> {
        let outcome = match (outcome, self.config.slow_call_ms, duration_ms) {
            (Outcome::Success, Some(slow), Some(took)) if took >= slow => Outcome::Failure,
            (o, _, _) => o,
        };
        let w = self.word.load(Ordering::Acquire);
        match State::of_word(w) {
            State::Closed => {
                if self.count_closed(outcome) {
                    self.trip(now())
                } else {
                    Effects::none()
                }
            }
            State::HalfOpen => self.record_probe(outcome, now(), owner()),
            State::Open | State::ForcedOpen | State::Disabled => Effects::none(),
        }
    }

    /// Counts a closed-state outcome; true when it should open.
    fn count_closed(&self, outcome: Outcome) -> bool {
        match self.config.strategy {
            Strategy::Consecutive { threshold } => match outcome {
                Outcome::Success => {
                    if self.count.load(Ordering::Relaxed) != 0 {
                        self.count.store(0, Ordering::Relaxed);
                    }
                    false
                }
                Outcome::Failure => {
                    self.count.fetch_add(1, Ordering::Relaxed) + 1 >= u64::from(threshold)
                }
            },
            Strategy::Rate {
                window,
                failure_rate,
                minimum_calls,
            } => {
                let fail = u64::from(outcome == Outcome::Failure);
                let mask = (1u64 << window) - 1;
                let mut old = self.count.load(Ordering::Relaxed);
                loop {
                    let calls = (old >> WINDOW_COUNT_SHIFT).min(u64::from(window));
                    let bits = ((old << 1) | fail) & mask;
                    let calls = (calls + 1).min(u64::from(window));
                    let new = (calls << WINDOW_COUNT_SHIFT) | bits;
                    match self.count.compare_exchange_weak(
                        old,
                        new,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            let failures = bits.count_ones();
                            return fail == 1
                                && calls >= u64::from(minimum_calls)
                                && f64::from(failures) >= failure_rate * calls as f64;
                        }
                        Err(cur) => old = cur,
                    }
                }
            }
        }
    }

    fn trip(&self, now: u64) -> Effects<O> {
        let mut inner = self.inner.lock();
        let w = self.word.load(Ordering::Acquire);
        if State::of_word(w) != State::Closed {
            return Effects::none();
        }
        self.open(&mut inner, now);
        Effects {
            transition: Some(Transition {
                from: State::Closed,
                to: State::Open,
            }),
            released: Vec::new(),
        }
    }

    fn open(&self, inner: &mut Inner<O>, now: u64) {
        let until = now.saturating_add(self.config.open_ms).min(NO_TIME - 1);
        self.word
            .store(word(State::Open, 0, until), Ordering::Release);
        inner.opened_at = Some(now);
        inner.changed_at = now;
        inner.successes = 0;
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn close(&self, inner: &mut Inner<O>, now: u64, state: State) {
        // Counters first: a report racing with the store counts afresh.
        self.count.store(0, Ordering::Relaxed);
        self.word.store(word(state, 0, 0), Ordering::Release);
        inner.successes = 0;
        inner.changed_at = now;
    }

    fn record_probe(&self, outcome: Outcome, now: u64, owner: O) -> Effects<O> {
        let mut inner = self.inner.lock();
        let w = self.word.load(Ordering::Acquire);
        if State::of_word(w) != State::HalfOpen {
            return Effects::none();
        }
        let Some(i) = inner.leases.iter().position(|l| l.owner == owner) else {
            return Effects::none();
        };
        let mut fx = Effects::none();
        let lease = inner.leases.swap_remove(i);
        fx.released.push(lease.owner);
        if lease.expires <= now {
            // It overstayed: its permit is back and its report ignored.
            self.publish_half_open(&inner);
            return fx;
        }
        match outcome {
            Outcome::Success => {
                inner.successes += 1;
                if inner.successes >= self.config.half_open_successes {
                    fx.released.extend(inner.leases.drain(..).map(|l| l.owner));
                    self.close(&mut inner, now, State::Closed);
                    fx.transition = Some(Transition {
                        from: State::HalfOpen,
                        to: State::Closed,
                    });
                } else {
                    self.publish_half_open(&inner);
                }
            }
            Outcome::Failure => {
                fx.released.extend(inner.leases.drain(..).map(|l| l.owner));
                self.open(&mut inner, now);
                fx.transition = Some(Transition {
                    from: State::HalfOpen,
                    to: State::Open,
                });
            }
        }
        fx
    }

    /// The permit holder `owner` died: its permit comes back.
    pub fn owner_down(&self, owner: &O) -> Effects<O> {
        let mut inner = self.inner.lock();
        let mut fx = Effects::none();
        if let Some(i) = inner.leases.iter().position(|l| l.owner == *owner) {
            fx.released.push(inner.leases.swap_remove(i).owner);
            if State::of_word(self.word.load(Ordering::Acquire)) == State::HalfOpen {
                self.publish_half_open(&inner);
            }
        }
        fx
    }

    /// Moves to `to` by hand: `Closed` (reset), `ForcedOpen` or `Disabled`.
    /// Counters are cleared and every permit is handed back.
    pub fn set(&self, to: State, now: u64) -> Effects<O> {
        let mut inner = self.inner.lock();
        let from = State::of_word(self.word.load(Ordering::Acquire));
        let mut fx = Effects::none();
        fx.released.extend(inner.leases.drain(..).map(|l| l.owner));
        match to {
            State::Open => self.open(&mut inner, now),
            State::HalfOpen => {
                inner.successes = 0;
                inner.changed_at = now;
                self.publish_half_open(&inner);
            }
            s => self.close(&mut inner, now, s),
        }
        if from != to {
            fx.transition = Some(Transition { from, to });
        }
        fx
    }

    /// The effective state: an open breaker whose time is up shows
    /// `HalfOpen`.
    pub fn state(&self, now: u64) -> State {
        let w = self.word.load(Ordering::Acquire);
        match State::of_word(w) {
            State::Open if now >= word_ms(w) => State::HalfOpen,
            s => s,
        }
    }

    pub fn info(&self, now: u64) -> Info {
        let inner = self.inner.lock();
        let w = self.word.load(Ordering::Acquire);
        let count = self.count.load(Ordering::Relaxed);
        let (failures, window_calls, window_failures) = match self.config.strategy {
            Strategy::Consecutive { .. } => (count, 0, 0),
            Strategy::Rate { window, .. } => {
                let calls = (count >> WINDOW_COUNT_SHIFT).min(u64::from(window)) as u32;
                let bits = count & ((1 << WINDOW_COUNT_SHIFT) - 1);
                (0, calls, bits.count_ones())
            }
        };
        let open = State::of_word(w) == State::Open;
        let (probes_in_use, successes) = if open && now >= word_ms(w) {
            (0, 0)
        } else {
            (inner.leases.len() as u32, inner.successes)
        };
        Info {
            state: self.state(now),
            failures,
            window_calls,
            window_failures,
            retry_in_ms: open.then(|| word_ms(w).saturating_sub(now)),
            opened_at: inner.opened_at,
            changed_at: inner.changed_at,
            probes_in_use,
            half_open_successes: successes,
            rejected: self.rejected.sum(),
            opened: self.opened.load(Ordering::Relaxed),
        }
    }
}

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

/// A breaker's or budget's name: an atom's term word (atoms live as long as
/// the VM, so the word is stable), or any other term's external format.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Name {
    Atom(usize),
    Term(Box<[u8]>),
}

/// Named breakers or budgets: lookups take no lock and write no shared
/// memory (papaya), so asks from every scheduler run in parallel.
/// Inserts and removals are rare; callers serialise them if they must.
pub struct Registry<V> {
    map: papaya::HashMap<Name, V, foldhash::fast::RandomState>,
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Registry {
            map: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        }
    }
}

impl<V: Clone + Send + Sync> Registry<V> {
    pub fn with<R>(&self, name: &Name, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.map.pin().get(name).map(f)
    }

    /// Inserts or replaces.
    pub fn insert(&self, name: Name, v: V) {
        self.map.pin().insert(name, v);
    }

    pub fn remove(&self, name: &Name) -> bool {
        self.map.pin().remove(name).is_some()
    }

    pub fn values(&self) -> Vec<V> {
        self.map.pin().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    //! Unit tests, a model test (proptest: random operation sequences on a
    //! breaker and on a plain reference model, compared after every step),
    //! and a threaded stress test of the probe budget.

    use std::collections::VecDeque;
    use std::sync::Arc;

    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just};
    use proptest::strategy::Strategy as Gen;
    use proptest::test_runner::Config as ProptestConfig;

    use super::*;

    type B = Breaker<u8>;

    fn consecutive(threshold: u32) -> Config {
        Config {
            strategy: Strategy::Consecutive { threshold },
            ..Config::consecutive()
        }
    }

    fn ask(b: &B, now: u64, who: u8) -> Verdict {
        b.ask(|| now, || who).0
    }

    fn fail(b: &B, now: u64, who: u8) -> Option<Transition> {
        b.record(Outcome::Failure, None, || now, || who).transition
    }

    fn succeed(b: &B, now: u64, who: u8) -> Option<Transition> {
        b.record(Outcome::Success, None, || now, || who).transition
    }

    fn t(from: State, to: State) -> Option<Transition> {
        Some(Transition { from, to })
    }

    #[test]
    fn defaults_are_the_specs() {
        let c = Config::consecutive();
        assert_eq!(c.strategy, Strategy::Consecutive { threshold: 5 });
        assert_eq!(
            (c.open_ms, c.half_open_successes, c.half_open_probes),
            (60_000, 3, 1)
        );
        let r = Config::rate();
        assert_eq!(
            r.strategy,
            Strategy::Rate {
                window: 10,
                failure_rate: 0.5,
                minimum_calls: 10
            }
        );
        assert_eq!(r.open_ms, 30_000);
    }

    #[test]
    fn closed_ask_reads_no_clock_and_no_owner() {
        let b = B::new(Config::consecutive(), 0).unwrap();
        let (v, fx) = b.ask(|| panic!("clock read"), || panic!("owner built"));
        assert_eq!(v, Verdict::Admitted);
        assert_eq!(fx, Effects::none());
        // A success with nothing pending reads neither either.
        let fx = b.record(Outcome::Success, None, || panic!(), || panic!());
        assert_eq!(fx.transition, None);
    }

    #[test]
    fn opens_on_the_fifth_failure_in_a_row_and_a_success_resets_the_count() {
        let b = B::new(Config::consecutive(), 0).unwrap();
        for _ in 0..4 {
            assert_eq!(fail(&b, 1, 0), None);
        }
        assert_eq!(succeed(&b, 1, 0), None);
        for _ in 0..4 {
            assert_eq!(fail(&b, 2, 0), None);
        }
        assert_eq!(b.info(2).failures, 4);
        assert_eq!(fail(&b, 2, 0), t(State::Closed, State::Open));
        assert_eq!(b.state(2), State::Open);
        assert_eq!(ask(&b, 3, 0), Verdict::Rejected(State::Open));
        assert_eq!(b.info(3).retry_in_ms, Some(59_999));
        // Reports while open are ignored.
        assert_eq!(succeed(&b, 4, 0), None);
        assert_eq!(b.state(4), State::Open);
    }

    #[test]
    fn after_the_open_time_one_probe_at_a_time_and_three_successes_close() {
        let b = B::new(Config::consecutive(), 0).unwrap();
        for _ in 0..5 {
            fail(&b, 0, 0);
        }
        assert_eq!(ask(&b, 59_999, 1), Verdict::Rejected(State::Open));
        // The effective state shows the probe to come.
        assert_eq!(b.state(60_000), State::HalfOpen);
        let (v, fx) = b.ask(|| 60_000, || 1);
        assert_eq!(
            (v, fx.transition),
            (Verdict::Probe, t(State::Open, State::HalfOpen))
        );
        assert_eq!(ask(&b, 60_001, 2), Verdict::Rejected(State::HalfOpen));
        assert_eq!(ask(&b, 60_001, 1), Verdict::Rejected(State::HalfOpen));
        // A report from someone without a permit does not count.
        assert_eq!(succeed(&b, 60_002, 2), None);
        assert_eq!(b.info(60_002).half_open_successes, 0);
        let fx = b.record(Outcome::Success, None, || 60_003, || 1);
        assert_eq!((fx.transition, fx.released), (None, vec![1]));
        assert_eq!(ask(&b, 60_004, 2), Verdict::Probe);
        assert_eq!(succeed(&b, 60_005, 2), None);
        assert_eq!(ask(&b, 60_006, 3), Verdict::Probe);
        assert_eq!(succeed(&b, 60_007, 3), t(State::HalfOpen, State::Closed));
        assert_eq!(b.info(60_007).failures, 0);
        assert_eq!(ask(&b, 60_008, 4), Verdict::Admitted);
    }

    #[test]
    fn a_probe_failure_reopens_for_another_open_time() {
        let b = B::new(consecutive(1), 0).unwrap();
        assert_eq!(fail(&b, 0, 0), t(State::Closed, State::Open));
        assert_eq!(ask(&b, 60_000, 1), Verdict::Probe);
        assert_eq!(fail(&b, 60_010, 1), t(State::HalfOpen, State::Open));
        assert_eq!(ask(&b, 120_009, 1), Verdict::Rejected(State::Open));
        assert_eq!(ask(&b, 120_010, 1), Verdict::Probe);
        assert_eq!(b.info(120_010).opened, 2);
    }

    #[test]
    fn a_dead_probers_permit_comes_back() {
        let b = B::new(consecutive(1), 0).unwrap();
        fail(&b, 0, 0);
        assert_eq!(ask(&b, 60_000, 1), Verdict::Probe);
        assert_eq!(ask(&b, 60_000, 2), Verdict::Rejected(State::HalfOpen));
        assert_eq!(b.owner_down(&1).released, vec![1]);
        assert_eq!(b.info(60_000).probes_in_use, 0);
        assert_eq!(ask(&b, 60_000, 2), Verdict::Probe);
        // Its late report, had it come, would be ignored: it holds nothing.
        assert_eq!(succeed(&b, 60_001, 1), None);
        assert_eq!(b.info(60_001).half_open_successes, 0);
    }

    #[test]
    fn an_overstaying_probes_permit_expires_and_its_report_is_ignored() {
        let b = B::new(consecutive(1), 0).unwrap();
        fail(&b, 0, 0);
        assert_eq!(ask(&b, 60_000, 1), Verdict::Probe);
        assert_eq!(ask(&b, 69_999, 2), Verdict::Rejected(State::HalfOpen));
        let (v, fx) = b.ask(|| 70_000, || 2);
        assert_eq!((v, fx.released), (Verdict::Probe, vec![1]));
        assert_eq!(succeed(&b, 70_001, 1), None);
        // And a lease that ran out before anyone asked: ignored too.
        let fx = b.record(Outcome::Failure, None, || 80_000, || 2);
        assert_eq!((fx.transition, fx.released), (None, vec![2]));
        assert_eq!(b.state(80_000), State::HalfOpen);
    }

    #[test]
    fn bounded_probes() {
        let cfg = Config {
            half_open_probes: 3,
            ..consecutive(1)
        };
        let b = B::new(cfg, 0).unwrap();
        fail(&b, 0, 0);
        for who in 1..=3 {
            assert_eq!(ask(&b, 60_000, who), Verdict::Probe);
        }
        assert_eq!(ask(&b, 60_000, 4), Verdict::Rejected(State::HalfOpen));
        assert_eq!(b.info(60_000).probes_in_use, 3);
        // One probe failing reopens and hands every permit back.
        let fx = b.record(Outcome::Failure, None, || 60_001, || 2);
        assert_eq!(fx.transition, t(State::HalfOpen, State::Open));
        let mut released = fx.released;
        released.sort();
        assert_eq!(released, vec![1, 2, 3]);
    }

    #[test]
    fn rate_waits_for_minimum_calls_then_opens_at_half_failed() {
        let b = B::new(Config::rate(), 0).unwrap();
        for _ in 0..9 {
            assert_eq!(fail(&b, 0, 0), None);
        }
        let i = b.info(0);
        assert_eq!((i.window_calls, i.window_failures), (9, 9));
        assert_eq!(fail(&b, 0, 0), t(State::Closed, State::Open));

        let b = B::new(Config::rate(), 0).unwrap();
        // 4 failures in the last 10: stays closed; a 5th opens.
        for i in 0..10 {
            let r = if i % 2 == 0 && i < 8 {
                fail(&b, 0, 0)
            } else {
                succeed(&b, 0, 0)
            };
            assert_eq!(r, None);
        }
        assert_eq!(b.info(0).window_failures, 4);
        // The oldest outcome (a failure) slides out as this one comes in.
        assert_eq!(fail(&b, 0, 0), None);
        assert_eq!(fail(&b, 0, 0), t(State::Closed, State::Open));
    }

    #[test]
    fn rate_with_fewer_minimum_calls() {
        let cfg = Config {
            strategy: Strategy::Rate {
                window: 10,
                failure_rate: 0.5,
                minimum_calls: 4,
            },
            ..Config::rate()
        };
        let b = B::new(cfg, 0).unwrap();
        succeed(&b, 0, 0);
        succeed(&b, 0, 0);
        assert_eq!(fail(&b, 0, 0), None);
        assert_eq!(fail(&b, 0, 0), t(State::Closed, State::Open));
    }

    #[test]
    fn slow_successes_are_failures() {
        let cfg = Config {
            slow_call_ms: Some(100),
            ..consecutive(2)
        };
        let b = B::new(cfg, 0).unwrap();
        let rec = |d| b.record(Outcome::Success, Some(d), || 0, || 0).transition;
        assert_eq!(rec(99), None);
        assert_eq!(rec(100), None);
        assert_eq!(rec(500), t(State::Closed, State::Open));
    }

    #[test]
    fn forced_open_disabled_and_reset() {
        let b = B::new(consecutive(1), 0).unwrap();
        assert_eq!(
            b.set(State::ForcedOpen, 0).transition,
            t(State::Closed, State::ForcedOpen)
        );
        assert_eq!(ask(&b, 1_000_000, 0), Verdict::Rejected(State::ForcedOpen));
        assert_eq!(fail(&b, 1, 0), None);
        assert_eq!(
            b.set(State::Disabled, 1).transition,
            t(State::ForcedOpen, State::Disabled)
        );
        assert_eq!(fail(&b, 2, 0), None);
        assert_eq!(ask(&b, 2, 0), Verdict::Admitted);
        assert_eq!(b.set(State::Disabled, 2).transition, None);
        assert_eq!(
            b.set(State::Closed, 3).transition,
            t(State::Disabled, State::Closed)
        );
        assert_eq!(fail(&b, 4, 0), t(State::Closed, State::Open));
        assert_eq!(b.info(5).rejected, 1);
    }

    #[test]
    fn reconfiguring_keeps_the_state() {
        let b = B::new(consecutive(1), 0).unwrap();
        fail(&b, 0, 0);
        let c = B::reconfigured(consecutive(3), &b, 10).unwrap();
        assert_eq!(c.state(10), State::Open);
        assert_eq!(c.info(10).retry_in_ms, Some(59_990));
        assert_eq!(ask(&b, 60_000, 1), Verdict::Probe);
        let d = B::reconfigured(consecutive(3), &b, 60_001).unwrap();
        assert_eq!(ask(&d, 60_001, 2), Verdict::Probe);
        assert_eq!(succeed(&d, 60_002, 1), None);
    }

    #[test]
    fn validation_names_the_option() {
        let e = |c: Config| B::new(c, 0).err().unwrap();
        let detail = |k: &str, v: Value| Error::InvalidArgument(Value::tagged(k, v));
        assert_eq!(e(consecutive(0)), detail("threshold", Value::Int(0)));
        let rate = |w, r, m| Config {
            strategy: Strategy::Rate {
                window: w,
                failure_rate: r,
                minimum_calls: m,
            },
            ..Config::rate()
        };
        assert_eq!(e(rate(57, 0.5, 1)), detail("window", Value::Int(57)));
        assert_eq!(
            e(rate(10, 1.5, 1)),
            detail("failure_rate", Value::Float(1.5))
        );
        assert_eq!(
            e(rate(10, 0.5, 11)),
            detail("minimum_calls", Value::Int(11))
        );
        let c = Config {
            half_open_probes: 256,
            ..Config::consecutive()
        };
        assert_eq!(e(c), detail("half_open_probes", Value::Int(256)));
        assert!(B::new(rate(56, 1.0, 56), 0).is_ok());
    }

    #[test]
    fn budget_allows_a_fraction_of_calls_plus_a_reserve_per_second() {
        let b = RetryBudget::new(0.2, 2, 100).unwrap();
        // Empty: only this second's reserve.
        assert!(b.withdraw(0));
        assert!(b.withdraw(999));
        assert!(!b.withdraw(999));
        assert!(b.withdraw(1000));
        let b = RetryBudget::new(0.2, 0, 100).unwrap();
        assert!(!b.withdraw(0));
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.withdraw(0));
        assert!(b.withdraw(0));
        assert!(!b.withdraw(0));
        assert_eq!((b.info().allowed, b.info().denied), (2, 2));
        // Saved tokens are capped.
        let b = RetryBudget::new(1.0, 0, 3).unwrap();
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!(b.info().balance, 3.0);
        assert!(RetryBudget::new(1.5, 0, 3).is_err());
        assert!(RetryBudget::new(0.1, 0, 0).is_err());
    }

    #[test]
    fn concurrent_askers_never_hold_more_permits_than_the_budget() {
        let cfg = Config {
            half_open_probes: 2,
            half_open_successes: 1_000_000,
            ..consecutive(1)
        };
        let b = Arc::new(Breaker::<u32>::new(cfg, 0).unwrap());
        b.record(Outcome::Failure, None, || 0, || 0);
        let held = Arc::new(AtomicU64::new(0));
        let max = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let (b, held, max) = (b.clone(), held.clone(), max.clone());
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let who = t * 10_000 + i;
                        if b.ask(|| 60_000, || who).0 == Verdict::Probe {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            b.record(Outcome::Success, None, || 60_000, || who);
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(max.load(Ordering::SeqCst) <= 2);
        assert!(max.load(Ordering::SeqCst) >= 1);
        assert_eq!(b.info(60_000).probes_in_use, 0);
    }

    // ---- the model ----

    #[derive(Clone, Debug)]
    enum Op {
        Ask(u8),
        Record(u8, bool, Option<u64>),
        Advance(u64),
        Down(u8),
        Set(State),
    }

    /// The breaker's rules written as plainly as possible.
    struct Model {
        cfg: Config,
        state: State,
        until: u64,
        failures: u64,
        window: VecDeque<bool>,
        successes: u32,
        leases: Vec<(u8, u64)>,
    }

    impl Model {
        fn open(&mut self, now: u64) {
            self.state = State::Open;
            self.until = now + self.cfg.open_ms;
            self.successes = 0;
            self.leases.clear();
        }

        fn clear(&mut self, to: State) {
            self.state = to;
            self.failures = 0;
            self.window.clear();
            self.successes = 0;
            self.leases.clear();
        }

        fn ask(&mut self, now: u64, who: u8) -> (Verdict, Option<Transition>) {
            let mut tr = None;
            match self.state {
                State::Closed | State::Disabled => return (Verdict::Admitted, None),
                State::ForcedOpen => return (Verdict::Rejected(State::ForcedOpen), None),
                State::Open if now < self.until => return (Verdict::Rejected(State::Open), None),
                State::Open => {
                    self.state = State::HalfOpen;
                    self.successes = 0;
                    tr = t(State::Open, State::HalfOpen);
                }
                State::HalfOpen => {}
            }
            self.leases.retain(|l| l.1 > now);
            let full = self.leases.len() >= self.cfg.half_open_probes as usize;
            if full || self.leases.iter().any(|l| l.0 == who) {
                return (Verdict::Rejected(State::HalfOpen), tr);
            }
            self.leases.push((who, now + self.cfg.probe_lease_ms));
            (Verdict::Probe, tr)
        }

        fn record(
            &mut self,
            now: u64,
            who: u8,
            failed: bool,
            took: Option<u64>,
        ) -> Option<Transition> {
            let slow = matches!((self.cfg.slow_call_ms, took), (Some(s), Some(d)) if d >= s);
            let failed = failed || slow;
            match self.state {
                State::Closed => {
                    let trip = match self.cfg.strategy {
                        Strategy::Consecutive { threshold } => {
                            if failed {
                                self.failures += 1;
                                self.failures >= u64::from(threshold)
                            } else {
                                self.failures = 0;
                                false
                            }
                        }
                        Strategy::Rate {
                            window,
                            failure_rate,
                            minimum_calls,
                        } => {
                            self.window.push_back(failed);
                            if self.window.len() > window as usize {
                                self.window.pop_front();
                            }
                            let calls = self.window.len();
                            let fails = self.window.iter().filter(|f| **f).count();
                            failed
                                && calls >= minimum_calls as usize
                                && fails as f64 >= failure_rate * calls as f64
                        }
                    };
                    if trip {
                        self.open(now);
                        return t(State::Closed, State::Open);
                    }
                    None
                }
                State::HalfOpen => {
                    let i = self.leases.iter().position(|l| l.0 == who)?;
                    let (_, expires) = self.leases.remove(i);
                    if expires <= now {
                        return None;
                    }
                    if failed {
                        self.open(now);
                        return t(State::HalfOpen, State::Open);
                    }
                    self.successes += 1;
                    if self.successes >= self.cfg.half_open_successes {
                        self.clear(State::Closed);
                        return t(State::HalfOpen, State::Closed);
                    }
                    None
                }
                _ => None,
            }
        }

        fn effective(&self, now: u64) -> State {
            match self.state {
                State::Open if now >= self.until => State::HalfOpen,
                s => s,
            }
        }
    }

    fn config_strategy() -> impl Gen<Value = Config> {
        let consecutive = (1u32..6).prop_map(|threshold| Strategy::Consecutive { threshold });
        let rate =
            (1u32..12, prop_oneof![Just(0.2), Just(0.5), Just(1.0)]).prop_flat_map(|(w, r)| {
                (1..=w).prop_map(move |m| Strategy::Rate {
                    window: w,
                    failure_rate: r,
                    minimum_calls: m,
                })
            });
        (
            prop_oneof![consecutive, rate],
            1u64..60,
            1u32..4,
            1u32..4,
            prop::option::of(1u64..50),
            1u64..30,
        )
            .prop_map(|(strategy, open_ms, hos, probes, slow, lease)| Config {
                strategy,
                open_ms,
                half_open_successes: hos,
                half_open_probes: probes,
                slow_call_ms: slow,
                probe_lease_ms: lease,
            })
    }

    fn op_strategy() -> impl Gen<Value = Op> {
        prop_oneof![
            4 => (0u8..4).prop_map(Op::Ask),
            6 => (0u8..4, any::<bool>(), prop::option::of(0u64..100))
                .prop_map(|(w, f, d)| Op::Record(w, f, d)),
            3 => prop_oneof![3 => 0u64..3, 1 => 0u64..40].prop_map(Op::Advance),
            1 => (0u8..4).prop_map(Op::Down),
            1 => prop_oneof![
                Just(State::Closed),
                Just(State::ForcedOpen),
                Just(State::Disabled)
            ]
            .prop_map(Op::Set),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn the_breaker_behaves_as_the_model(
            cfg in config_strategy(),
            ops in prop::collection::vec(op_strategy(), 1..120),
        ) {
            let b = B::new(cfg.clone(), 0).unwrap();
            let mut m = Model {
                cfg,
                state: State::Closed,
                until: 0,
                failures: 0,
                window: VecDeque::new(),
                successes: 0,
                leases: Vec::new(),
            };
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Ask(who) => {
                        let (v, fx) = b.ask(|| now, || who);
                        prop_assert_eq!((v, fx.transition), m.ask(now, who), "{:?}", op);
                    }
                    Op::Record(who, failed, took) => {
                        let outcome = if failed { Outcome::Failure } else { Outcome::Success };
                        let fx = b.record(outcome, took, || now, || who);
                        prop_assert_eq!(fx.transition, m.record(now, who, failed, took), "{:?}", op);
                    }
                    Op::Advance(ms) => now += ms,
                    Op::Down(who) => {
                        b.owner_down(&who);
                        m.leases.retain(|l| l.0 != who);
                    }
                    Op::Set(to) => {
                        let fx = b.set(to, now);
                        let from = m.state;
                        m.clear(to);
                        let expected = (from != to).then_some(Transition { from, to });
                        prop_assert_eq!(fx.transition, expected);
                    }
                }
                let info = b.info(now);
                prop_assert_eq!(info.state, m.effective(now));
                prop_assert!(info.probes_in_use <= m.cfg.half_open_probes);
                if m.state == State::HalfOpen {
                    prop_assert_eq!(info.probes_in_use as usize, m.leases.len());
                    prop_assert_eq!(info.half_open_successes, m.successes);
                }
                if m.state == State::Closed {
                    match m.cfg.strategy {
                        Strategy::Consecutive { .. } => prop_assert_eq!(info.failures, m.failures),
                        Strategy::Rate { .. } => {
                            prop_assert_eq!(info.window_calls as usize, m.window.len());
                            let fails = m.window.iter().filter(|f| **f).count();
                            prop_assert_eq!(info.window_failures as usize, fails);
                        }
                    }
                }
            }
        }
    }
}
