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
//! Invariants (checked by the model test in `tests.rs`):
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
//!
//! Layout: the breaker is here; [`budget`] holds the retry budget and
//! [`registry`] the named breakers or budgets.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::value::Value;

pub mod budget;
pub mod registry;
#[cfg(test)]
mod tests;

pub use budget::{BudgetInfo, RetryBudget};
pub use registry::{Name, Registry};

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
