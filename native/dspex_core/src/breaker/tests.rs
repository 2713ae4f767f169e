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

    fn record(&mut self, now: u64, who: u8, failed: bool, took: Option<u64>) -> Option<Transition> {
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
    let rate = (1u32..12, prop_oneof![Just(0.2), Just(0.5), Just(1.0)]).prop_flat_map(|(w, r)| {
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
