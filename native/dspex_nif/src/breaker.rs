//! Named circuit breakers and retry budgets (`breaker_*`), one registry
//! per VM held by this library, like the store: any process asks by name
//! with one NIF call.
//!
//! `breaker_ask` on a closed breaker is a lock-free map lookup (papaya, no
//! shared write) plus one atomic load: no clock read, no term built but
//! `:ok`. A half-open probe's permit is tied to the asking process: the
//! breaker resource monitors it, and `down` gives the permit back, so a
//! prober that dies never leaves the breaker stuck half-open (a prober that
//! overstays its lease loses the permit at the next ask).
//!
//! Every answer says whether the call changed the state (`{:changed, from,
//! to}`), so Elixir emits telemetry for transitions only, never per ask.
//!
//! Times are milliseconds of a monotonic clock private to this library,
//! plus a per-breaker skew that only tests move (`breaker_advance`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dspex_core::breaker::{
    Breaker, Config, Effects, Name, Outcome, Registry, RetryBudget, State, Strategy, Transition,
    Verdict,
};
use dspex_core::Error;
use parking_lot::Mutex;
use rustler::{Atom, Encoder, Env, LocalPid, Monitor, ResourceArc, Term};

use crate::error::error;

mod atoms {
    rustler::atoms! {
        ok,
        nil,
        probe,
        rejected,
        changed,
        created,
        unchanged,
        reconfigured,
        // states
        closed,
        open,
        half_open,
        forced_open,
        disabled,
        // strategies and outcomes
        consecutive,
        rate,
        error,
        // options and info keys
        strategy,
        threshold,
        window,
        failure_rate,
        minimum_calls,
        timeout,
        half_open_successes,
        half_open_probes,
        slow_call_ms,
        probe_lease_ms,
        name,
        state,
        config,
        failures,
        window_calls,
        window_failures,
        retry_in_ms,
        opened_at,
        changed_at,
        probes_in_use,
        rejected_total,
        opened_total,
        ratio,
        min_per_second,
        max_tokens,
        balance,
        allowed,
        denied,
        invalid_argument,
    }
}

pub struct BreakerRef {
    core: Breaker<LocalPid>,
    /// The name as the caller gave it, in the external term format.
    name: Box<[u8]>,
    /// Added to the clock: tests move a breaker's time forward with it.
    skew: AtomicU64,
    /// Probe holders this resource monitors.
    watched: Mutex<Vec<(LocalPid, Monitor)>>,
}

#[rustler::resource_impl]
impl rustler::Resource for BreakerRef {
    // Runs on the VM's own thread while the process exits: must not panic.
    // Nothing here unwraps or indexes; parking_lot locks do not poison.
    fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        self.watched.lock().retain(|(p, _)| *p != pid);
        self.core.owner_down(&pid);
    }
}

impl BreakerRef {
    fn now(&self) -> u64 {
        now_ms().saturating_add(self.skew.load(Ordering::Relaxed))
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

type Handle = ResourceArc<BreakerRef>;

fn breakers() -> &'static Registry<Handle> {
    static BREAKERS: OnceLock<Registry<Handle>> = OnceLock::new();
    BREAKERS.get_or_init(Registry::default)
}

fn budgets() -> &'static Registry<Arc<RetryBudget>> {
    static BUDGETS: OnceLock<Registry<Arc<RetryBudget>>> = OnceLock::new();
    BUDGETS.get_or_init(Registry::default)
}

/// Serialises installs and removals (rare); lookups never take it.
static INSTALLS: Mutex<()> = Mutex::new(());

fn name_of(term: Term) -> Name {
    match Atom::from_term(term) {
        Ok(a) => Name::Atom(a.as_c_arg()),
        Err(_) => Name::Term(term.to_binary().as_slice().into()),
    }
}

fn not_found(env: Env) -> Term {
    error(env, &Error::NotFound)
}

fn with_breaker<'a>(env: Env<'a>, name: Term<'a>, f: impl FnOnce(&Handle) -> Term<'a>) -> Term<'a> {
    breakers()
        .with(&name_of(name), f)
        .unwrap_or_else(|| not_found(env))
}

fn state_atom(s: State) -> Atom {
    match s {
        State::Closed => atoms::closed(),
        State::Open => atoms::open(),
        State::HalfOpen => atoms::half_open(),
        State::ForcedOpen => atoms::forced_open(),
        State::Disabled => atoms::disabled(),
    }
}

/// Stops watching the owners whose permits ended.
fn settle(env: Env, res: &Handle, released: &[LocalPid]) {
    if released.is_empty() {
        return;
    }
    let mut watched = res.watched.lock();
    watched.retain(|(pid, mon)| {
        if released.contains(pid) {
            env.demonitor(res, mon);
            false
        } else {
            true
        }
    });
}

fn changed_or_ok<'a>(env: Env<'a>, t: Option<Transition>) -> Term<'a> {
    match t {
        Some(t) => (atoms::changed(), state_atom(t.from), state_atom(t.to)).encode(env),
        None => atoms::ok().encode(env),
    }
}

fn finish<'a>(env: Env<'a>, res: &Handle, fx: Effects<LocalPid>) -> Term<'a> {
    settle(env, res, &fx.released);
    changed_or_ok(env, fx.transition)
}

/// `:ok` (go ahead), `:probe` (go ahead as a half-open probe; report with
/// `breaker_record`), `{:probe, {:changed, :open, :half_open}}`,
/// `{:rejected, state}` or `{:error, :not_found}`.
#[rustler::nif(name = "breaker_ask")]
fn ask<'a>(env: Env<'a>, name: Term<'a>) -> Term<'a> {
    with_breaker(env, name, |res| {
        let (verdict, fx) = res.core.ask(|| res.now(), || env.pid());
        match verdict {
            Verdict::Admitted => atoms::ok().encode(env),
            Verdict::Rejected(s) => (atoms::rejected(), state_atom(s)).encode(env),
            Verdict::Probe => {
                // Settle first: an expired lease of this same process may be
                // among the released, and its new monitor must survive.
                settle(env, res, &fx.released);
                let pid = env.pid();
                match env.monitor(res, &pid) {
                    Some(mon) => res.watched.lock().push((pid, mon)),
                    // Cannot happen for the calling process; never leak it.
                    None => {
                        res.core.owner_down(&pid);
                    }
                }
                match fx.transition {
                    None => atoms::probe().encode(env),
                    t => (atoms::probe(), changed_or_ok(env, t)).encode(env),
                }
            }
        }
    })
}

/// outcome `:ok | :error`, duration `nil | ms`: `:ok`, `{:changed, from,
/// to}` or `{:error, reason}`.
#[rustler::nif(name = "breaker_record")]
fn record<'a>(env: Env<'a>, name: Term<'a>, outcome: Term<'a>, duration: Term<'a>) -> Term<'a> {
    let outcome = match outcome.decode::<Atom>() {
        Ok(a) if a == atoms::ok() => Outcome::Success,
        Ok(a) if a == atoms::error() => Outcome::Failure,
        _ => return invalid(env, "outcome", outcome),
    };
    let duration = match decode_opt_ms(duration) {
        Ok(d) => d,
        Err(()) => return invalid(env, "duration_ms", duration),
    };
    with_breaker(env, name, |res| {
        let fx = res
            .core
            .record(outcome, duration, || res.now(), || env.pid());
        finish(env, res, fx)
    })
}

/// The effective state's atom, or `{:error, :not_found}`.
#[rustler::nif(name = "breaker_state")]
fn state<'a>(env: Env<'a>, name: Term<'a>) -> Term<'a> {
    with_breaker(env, name, |res| {
        state_atom(res.core.state(res.now())).encode(env)
    })
}

/// Moves the breaker by hand to `:closed` (reset), `:forced_open` or
/// `:disabled`: `:ok`, `{:changed, from, to}` or `{:error, reason}`.
#[rustler::nif(name = "breaker_set")]
fn set<'a>(env: Env<'a>, name: Term<'a>, to: Term<'a>) -> Term<'a> {
    let to = match to.decode::<Atom>() {
        Ok(a) if a == atoms::closed() => State::Closed,
        Ok(a) if a == atoms::forced_open() => State::ForcedOpen,
        Ok(a) if a == atoms::disabled() => State::Disabled,
        _ => return invalid(env, "state", to),
    };
    with_breaker(env, name, |res| {
        let fx = res.core.set(to, res.now());
        finish(env, res, fx)
    })
}

/// `{:invalid_argument, {key, term}}`.
fn invalid<'a>(env: Env<'a>, key: &str, term: Term<'a>) -> Term<'a> {
    let key = Atom::from_str(env, key).map_or_else(|_| atoms::nil().encode(env), |a| a.encode(env));
    (atoms::error(), (atoms::invalid_argument(), (key, term))).encode(env)
}

fn decode_opt_ms(term: Term) -> Result<Option<u64>, ()> {
    if term.decode::<Atom>().is_ok_and(|a| a == atoms::nil()) {
        return Ok(None);
    }
    term.decode::<u64>().map(Some).map_err(|_| ())
}

/// Options as a map of what the caller gave; the strategy's defaults fill
/// the rest. `Err(term)` is the reply.
fn decode_config<'a>(env: Env<'a>, opts: Term<'a>) -> Result<Config, Term<'a>> {
    if !opts.is_map() {
        return Err(invalid(env, "options", opts));
    }
    let get = |key: Atom| opts.map_get(key.encode(env)).ok();
    let strategy = match get(atoms::strategy()) {
        None => atoms::consecutive(),
        Some(t) => match t.decode::<Atom>() {
            Ok(a) if a == atoms::consecutive() || a == atoms::rate() => a,
            _ => return Err(invalid(env, "strategy", t)),
        },
    };
    let mut c = if strategy == atoms::rate() {
        Config::rate()
    } else {
        Config::consecutive()
    };
    let int = |key: Atom, name: &str| -> Result<Option<u64>, Term<'a>> {
        match get(key) {
            None => Ok(None),
            Some(t) => t
                .decode::<u64>()
                .map(Some)
                .map_err(|_| invalid(env, name, t)),
        }
    };
    let small = |key: Atom, name: &str| -> Result<Option<u32>, Term<'a>> {
        match int(key, name)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| invalid(env, name, n.encode(env))),
        }
    };
    let foreign = |key: Atom, name: &str| match get(key) {
        Some(t) => Err(invalid(env, name, t)),
        None => Ok(()),
    };
    match &mut c.strategy {
        Strategy::Consecutive { threshold } => {
            if let Some(n) = small(atoms::threshold(), "threshold")? {
                *threshold = n;
            }
            foreign(atoms::window(), "window")?;
            foreign(atoms::failure_rate(), "failure_rate")?;
            foreign(atoms::minimum_calls(), "minimum_calls")?;
        }
        Strategy::Rate {
            window,
            failure_rate,
            minimum_calls,
        } => {
            foreign(atoms::threshold(), "threshold")?;
            if let Some(n) = small(atoms::window(), "window")? {
                *window = n;
                // The minimum follows a smaller window unless given.
                *minimum_calls = (*minimum_calls).min(n);
            }
            if let Some(t) = get(atoms::failure_rate()) {
                *failure_rate = match (t.decode::<f64>(), t.decode::<u64>()) {
                    (Ok(f), _) => f,
                    (_, Ok(n)) => n as f64,
                    _ => return Err(invalid(env, "failure_rate", t)),
                };
            }
            if let Some(n) = small(atoms::minimum_calls(), "minimum_calls")? {
                *minimum_calls = n;
            }
        }
    }
    if let Some(n) = int(atoms::timeout(), "timeout")? {
        c.open_ms = n;
    }
    if let Some(n) = small(atoms::half_open_successes(), "half_open_successes")? {
        c.half_open_successes = n;
    }
    if let Some(n) = small(atoms::half_open_probes(), "half_open_probes")? {
        c.half_open_probes = n;
    }
    if let Some(t) = get(atoms::slow_call_ms()) {
        c.slow_call_ms = decode_opt_ms(t).map_err(|_| invalid(env, "slow_call_ms", t))?;
    }
    if let Some(n) = int(atoms::probe_lease_ms(), "probe_lease_ms")? {
        c.probe_lease_ms = n;
    }
    c.validate().map_err(|e| error(env, &e))?;
    Ok(c)
}

/// Creates a breaker, or reconfigures one (keeping its state):
/// `{:ok, :created | :unchanged | :reconfigured}` or `{:error, reason}`.
#[rustler::nif(name = "breaker_install")]
fn install<'a>(env: Env<'a>, name: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let config = match decode_config(env, opts) {
        Ok(c) => c,
        Err(reply) => return reply,
    };
    let key = name_of(name);
    let _serial = INSTALLS.lock();
    let existing = breakers().with(&key, Clone::clone);
    let (core, how) = match &existing {
        Some(old) if old.core.config() == &config => {
            return (atoms::ok(), atoms::unchanged()).encode(env)
        }
        Some(old) => (
            Breaker::reconfigured(config, &old.core, old.now()),
            atoms::reconfigured(),
        ),
        None => (Breaker::new(config, now_ms()), atoms::created()),
    };
    let core = match core {
        Ok(c) => c,
        Err(e) => return error(env, &e),
    };
    let skew = existing.map_or(0, |old| old.skew.load(Ordering::Relaxed));
    let res = ResourceArc::new(BreakerRef {
        core,
        name: name.to_binary().as_slice().into(),
        skew: AtomicU64::new(skew),
        watched: Mutex::new(Vec::new()),
    });
    breakers().insert(key, res);
    (atoms::ok(), how).encode(env)
}

/// `:ok` or `{:error, :not_found}`.
#[rustler::nif(name = "breaker_remove")]
fn remove<'a>(env: Env<'a>, name: Term<'a>) -> Term<'a> {
    let _serial = INSTALLS.lock();
    if breakers().remove(&name_of(name)) {
        atoms::ok().encode(env)
    } else {
        not_found(env)
    }
}

/// Every breaker's name.
#[rustler::nif(name = "breaker_list")]
fn list(env: Env) -> Term {
    let names: Vec<Term> = breakers()
        .values()
        .iter()
        .filter_map(|b| env.binary_to_term(&b.name).map(|(t, _)| t))
        .collect();
    names.encode(env)
}

fn map<'a>(env: Env<'a>, pairs: &[(Atom, Term<'a>)]) -> Term<'a> {
    let keys: Vec<Term> = pairs.iter().map(|p| p.0.encode(env)).collect();
    let values: Vec<Term> = pairs.iter().map(|p| p.1).collect();
    Term::map_from_term_arrays(env, &keys, &values).unwrap_or_else(|_| Term::map_new(env))
}

fn opt<'a, T: Encoder>(env: Env<'a>, v: Option<T>) -> Term<'a> {
    match v {
        Some(v) => v.encode(env),
        None => atoms::nil().encode(env),
    }
}

fn config_term<'a>(env: Env<'a>, c: &Config) -> Term<'a> {
    let mut pairs = Vec::with_capacity(9);
    match c.strategy {
        Strategy::Consecutive { threshold } => {
            pairs.push((atoms::strategy(), atoms::consecutive().encode(env)));
            pairs.push((atoms::threshold(), threshold.encode(env)));
        }
        Strategy::Rate {
            window,
            failure_rate,
            minimum_calls,
        } => {
            pairs.push((atoms::strategy(), atoms::rate().encode(env)));
            pairs.push((atoms::window(), window.encode(env)));
            pairs.push((atoms::failure_rate(), failure_rate.encode(env)));
            pairs.push((atoms::minimum_calls(), minimum_calls.encode(env)));
        }
    }
    pairs.push((atoms::timeout(), c.open_ms.encode(env)));
    pairs.push((
        atoms::half_open_successes(),
        c.half_open_successes.encode(env),
    ));
    pairs.push((atoms::half_open_probes(), c.half_open_probes.encode(env)));
    pairs.push((atoms::slow_call_ms(), opt(env, c.slow_call_ms)));
    pairs.push((atoms::probe_lease_ms(), c.probe_lease_ms.encode(env)));
    map(env, &pairs)
}

/// `%{name, state, config, failures, window_calls, window_failures,
/// retry_in_ms, opened_at, changed_at, probes_in_use, half_open_successes,
/// rejected_total, opened_total}` or `{:error, :not_found}`. Times are the
/// breaker clock's milliseconds.
#[rustler::nif(name = "breaker_info")]
fn info<'a>(env: Env<'a>, name: Term<'a>) -> Term<'a> {
    with_breaker(env, name, |res| {
        let i = res.core.info(res.now());
        let pairs = [
            (atoms::name(), name),
            (atoms::state(), state_atom(i.state).encode(env)),
            (atoms::config(), config_term(env, res.core.config())),
            (atoms::failures(), i.failures.encode(env)),
            (atoms::window_calls(), i.window_calls.encode(env)),
            (atoms::window_failures(), i.window_failures.encode(env)),
            (atoms::retry_in_ms(), opt(env, i.retry_in_ms)),
            (atoms::opened_at(), opt(env, i.opened_at)),
            (atoms::changed_at(), i.changed_at.encode(env)),
            (atoms::probes_in_use(), i.probes_in_use.encode(env)),
            (
                atoms::half_open_successes(),
                i.half_open_successes.encode(env),
            ),
            (atoms::rejected_total(), i.rejected.encode(env)),
            (atoms::opened_total(), i.opened.encode(env)),
        ];
        map(env, &pairs)
    })
}

/// Test hook: moves this breaker's clock `ms` forward.
#[rustler::nif(name = "breaker_advance")]
fn advance<'a>(env: Env<'a>, name: Term<'a>, ms: u64) -> Term<'a> {
    with_breaker(env, name, |res| {
        res.skew.fetch_add(ms, Ordering::Relaxed);
        atoms::ok().encode(env)
    })
}

fn budget(name: Term) -> Arc<RetryBudget> {
    let key = name_of(name);
    if let Some(b) = budgets().with(&key, Clone::clone) {
        return b;
    }
    let _serial = INSTALLS.lock();
    if let Some(b) = budgets().with(&key, Clone::clone) {
        return b;
    }
    let b = Arc::new(RetryBudget::default_budget());
    budgets().insert(key, b.clone());
    b
}

/// Creates or replaces a retry budget (its balance starts empty): `:ok` or
/// `{:error, {:invalid_argument, {key, value}}}`.
#[rustler::nif(name = "breaker_budget_configure")]
fn budget_configure<'a>(
    env: Env<'a>,
    name: Term<'a>,
    ratio: Term<'a>,
    min_per_second: Term<'a>,
    max_tokens: Term<'a>,
) -> Term<'a> {
    let Ok(r) = ratio.decode::<f64>() else {
        return invalid(env, "ratio", ratio);
    };
    let Ok(m) = min_per_second.decode::<u32>() else {
        return invalid(env, "min_per_second", min_per_second);
    };
    let Ok(t) = max_tokens.decode::<u32>() else {
        return invalid(env, "max_tokens", max_tokens);
    };
    match RetryBudget::new(r, m, t) {
        Ok(b) => {
            let _serial = INSTALLS.lock();
            budgets().insert(name_of(name), Arc::new(b));
            atoms::ok().encode(env)
        }
        Err(e) => error(env, &e),
    }
}

/// A logical call under this budget (created with the defaults if new).
#[rustler::nif(name = "breaker_budget_deposit")]
fn budget_deposit(name: Term) -> Atom {
    budget(name).deposit();
    atoms::ok()
}

/// May a retry go ahead? `true` takes a token (or this second's reserve).
#[rustler::nif(name = "breaker_budget_withdraw")]
fn budget_withdraw(name: Term) -> bool {
    budget(name).withdraw(now_ms())
}

/// `%{ratio, min_per_second, max_tokens, balance, allowed, denied}`.
#[rustler::nif(name = "breaker_budget_info")]
fn budget_info<'a>(env: Env<'a>, name: Term<'a>) -> Term<'a> {
    match budgets().with(&name_of(name), Clone::clone) {
        None => not_found(env),
        Some(b) => {
            let i = b.info();
            let pairs = [
                (atoms::ratio(), b.ratio.encode(env)),
                (atoms::min_per_second(), b.min_per_second.encode(env)),
                (atoms::max_tokens(), b.max_tokens.encode(env)),
                (atoms::balance(), i.balance.encode(env)),
                (atoms::allowed(), i.allowed.encode(env)),
                (atoms::denied(), i.denied.encode(env)),
            ];
            map(env, &pairs)
        }
    }
}
