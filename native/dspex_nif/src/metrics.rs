//! The metrics resource behind `DSPex.Bridge.Analytics`: time-bucketed
//! counters and histograms of `dspex_core::timeseries`, and the Prometheus text
//! of both the analytics series and the engine's own `metrics` recorder.
//!
//! Recording is one short critical section on a per-thread shard, so it runs
//! on the calling scheduler. Queries, bucket listings, maintenance and
//! rendering walk many buckets and run on dirty CPU schedulers.

use dspex_core::prometheus::{render_metrics, PromRecorder, PromText};
use dspex_core::timeseries::{Aggregation, Merged, Metrics, MetricsConfig};
use dspex_core::{Error, Value};
use rustler::{Atom, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::error::{error, ok_or, unit_or};
use crate::term::ident_text;

pub struct MetricsRef {
    pub metrics: Metrics,
}

#[rustler::resource_impl]
impl rustler::Resource for MetricsRef {}

/// A new store with fine buckets of `bucket_us` kept for `retention_us`.
#[rustler::nif(name = "metrics_new")]
fn new(env: Env, bucket_us: i64, retention_us: i64) -> Term {
    let r = if bucket_us <= 0 || retention_us < bucket_us {
        Err(Error::invalid_arg("bad_metrics_config"))
    } else {
        Metrics::new(MetricsConfig::new(bucket_us, retention_us))
            .map(|metrics| ResourceArc::new(MetricsRef { metrics }))
    };
    // The engine's own recorder is installed with the first store, so the
    // `metrics::counter!` calls of the core have somewhere to go.
    PromRecorder::global();
    ok_or(env, r)
}

fn number(term: Term) -> Result<f64, Error> {
    if let Ok(i) = term.decode::<i64>() {
        return Ok(i as f64);
    }
    term.decode::<f64>()
        .map_err(|_| Error::invalid_arg("value_must_be_a_number"))
}

fn record_one(m: &MetricsRef, name: Term, value: Term) -> Result<(), Error> {
    let value = number(value)?;
    m.metrics.record(&ident_text(name)?, value)
}

/// Records `value` (a number) under `name` (an atom or a string), now.
#[rustler::nif(name = "metrics_record")]
fn record<'a>(
    env: Env<'a>,
    m: ResourceArc<MetricsRef>,
    name: Term<'a>,
    value: Term<'a>,
) -> Term<'a> {
    unit_or(env, record_one(&m, name, value))
}

/// Records `value` under `name` at `t_us` (µs since the Unix epoch).
#[rustler::nif(name = "metrics_record_at")]
fn record_at<'a>(
    env: Env<'a>,
    m: ResourceArc<MetricsRef>,
    name: Term<'a>,
    value: Term<'a>,
    t_us: i64,
) -> Term<'a> {
    let r = ident_text(name).and_then(|n| m.metrics.record_at(&n, number(value)?, t_us));
    unit_or(env, r)
}

/// Reserves `names` (atoms or strings): always accepted, outside the cap on
/// distinct names. Analytics reserves its built-in types with it.
#[rustler::nif(name = "metrics_reserve")]
fn reserve<'a>(env: Env<'a>, m: ResourceArc<MetricsRef>, names: Vec<Term<'a>>) -> Term<'a> {
    let r = names
        .into_iter()
        .map(ident_text)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|names| {
            let names: Vec<&str> = names.iter().map(|n| &**n).collect();
            m.metrics.reserve(&names)
        });
    unit_or(env, r)
}

/// Decodes `:avg | :sum | :min | :max | :count | :p50 | :p95 | :p99 |
/// {:quantile, q}`.
fn aggregation(term: Term) -> Result<Aggregation, Error> {
    if let Ok(a) = term.decode::<Atom>() {
        let agg = if a == atoms::avg() {
            Aggregation::Avg
        } else if a == atoms::sum() {
            Aggregation::Sum
        } else if a == atoms::min() {
            Aggregation::Min
        } else if a == atoms::max() {
            Aggregation::Max
        } else if a == atoms::count() {
            Aggregation::Count
        } else if a == atoms::p50() {
            Aggregation::Quantile(0.5)
        } else if a == atoms::p95() {
            Aggregation::Quantile(0.95)
        } else if a == atoms::p99() {
            Aggregation::Quantile(0.99)
        } else {
            return Err(bad_aggregation());
        };
        return Ok(agg);
    }
    match term.decode::<(Atom, f64)>() {
        Ok((tag, q)) if tag == atoms::quantile() && q > 0.0 && q <= 1.0 => {
            Ok(Aggregation::Quantile(q))
        }
        _ => Err(bad_aggregation()),
    }
}

fn bad_aggregation() -> Error {
    Error::InvalidArgument(Value::atom("bad_aggregation"))
}

fn encode_result<'a>(env: Env<'a>, v: Option<f64>, agg: Aggregation) -> Term<'a> {
    match (v, agg) {
        (Some(c), Aggregation::Count) => (c as u64).encode(env),
        (Some(v), _) => v.encode(env),
        (None, _) => atoms::nil().encode(env),
    }
}

/// The merge of the series `names` (a list of atoms or strings) over
/// `[from_us, to_us]`, answered for each of `aggregations`:
/// `{:ok, [value | nil]}` in the order asked. Counts are integers.
#[rustler::nif(name = "metrics_query", schedule = "DirtyCpu")]
fn query<'a>(
    env: Env<'a>,
    m: ResourceArc<MetricsRef>,
    names: Vec<Term<'a>>,
    from_us: i64,
    to_us: i64,
    aggregations: Vec<Term<'a>>,
) -> Term<'a> {
    let r = (|| {
        let aggs = aggregations
            .into_iter()
            .map(aggregation)
            .collect::<Result<Vec<_>, _>>()?;
        let mut merged = Merged::default();
        for name in names {
            let part = m.metrics.query(&ident_text(name)?, from_us, to_us);
            merged.summary.merge(&part.summary);
            merged.cells.merge_dense(&part.cells);
        }
        Ok((merged, aggs))
    })();
    match r {
        Ok((merged, aggs)) => {
            let values: Vec<Term> = aggs
                .iter()
                .map(|&a| encode_result(env, merged.get(a), a))
                .collect();
            (atoms::ok(), values).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

/// The buckets of the series `names` over `[from_us, to_us]`, oldest first,
/// same-time buckets of different series merged:
/// `{:ok, [{start_us, width_us, count, sum, min, max}]}`.
#[rustler::nif(name = "metrics_buckets", schedule = "DirtyCpu")]
fn buckets<'a>(
    env: Env<'a>,
    m: ResourceArc<MetricsRef>,
    names: Vec<Term<'a>>,
    from_us: i64,
    to_us: i64,
) -> Term<'a> {
    let r = names
        .into_iter()
        .map(ident_text)
        .collect::<Result<Vec<_>, _>>()
        .map(|names| {
            let names: Vec<&str> = names.iter().map(|n| &**n).collect();
            m.metrics
                .buckets(&names, from_us, to_us)
                .into_iter()
                .map(|b| {
                    let s = b.summary;
                    (b.start_us, b.width_us, s.count, s.sum, s.min, s.max)
                })
                .collect::<Vec<_>>()
        });
    ok_or(env, r)
}

/// Closes buckets behind the clock, compacts and drops expired ones.
#[rustler::nif(name = "metrics_maintain", schedule = "DirtyCpu")]
fn maintain(m: ResourceArc<MetricsRef>, now_us: i64) -> Atom {
    m.metrics.maintain(now_us);
    atoms::ok()
}

#[rustler::nif(name = "metrics_reset", schedule = "DirtyCpu")]
fn reset(m: ResourceArc<MetricsRef>) -> Atom {
    m.metrics.reset();
    atoms::ok()
}

/// `%{metrics: n, buckets: n, bytes: n, late_samples: n}`.
#[rustler::nif(name = "metrics_stats", schedule = "DirtyCpu")]
fn stats(env: Env, m: ResourceArc<MetricsRef>) -> Term {
    let s = m.metrics.stats();
    let keys = [
        atoms::metrics(),
        atoms::buckets(),
        atoms::bytes(),
        atoms::late_samples(),
    ];
    let vals = [
        s.metrics as u64,
        s.buckets as u64,
        s.bytes as u64,
        s.late_samples,
    ];
    Term::map_from_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}

/// The Prometheus text of the engine's recorder and, when a store is given
/// (not `nil`), of every analytics series named `prefix <> name`, quantiles
/// over the last `window_us`.
#[rustler::nif(name = "metrics_prometheus", schedule = "DirtyCpu")]
fn prometheus<'a>(
    env: Env<'a>,
    m: Term<'a>,
    prefix: String,
    now_us: i64,
    window_us: i64,
) -> Term<'a> {
    let mut out = PromText::new();
    PromRecorder::global().render(&mut out);
    if let Ok(m) = m.decode::<ResourceArc<MetricsRef>>() {
        render_metrics(&m.metrics, &prefix, now_us, window_us, &mut out);
    }
    out.finish().encode(env)
}
