//! The core's hand-written pieces beside the crates that could replace them
//! (issue 12, item 6). Run with
//!
//! ```text
//! cargo bench -p dspex_core --bench compare
//! ```
//!
//! A plain `main` (no bench framework): every figure is the median of
//! `ROUNDS` rounds, measured in this run, and printed as Markdown tables.
//! Four questions:
//!
//! 1. Prometheus: the core recorder (`prometheus.rs`) and its histogram
//!    (`histogram.rs`) against `metrics-exporter-prometheus` (its recorder
//!    and `render()`, no HTTP listener), `metrics-util`'s summary (what that
//!    exporter keeps per histogram) and `hdrhistogram`: cost per recorded
//!    sample (1 and 2 threads), cost of one render for N series, memory per
//!    histogram, and quantile error.
//! 2. Globs: `glob.rs` against `wildmatch`, `globset` and `glob` on the
//!    core's anchored semantics (`*`, `?`, everything else literal), first
//!    checked for agreement on a generated corpus, then timed.
//! 3. The token bucket: `ratelimit.rs` against `governor`, per check (1 and
//!    2 threads), and whether the two decide alike on the same schedule.
//!
//! Memory is counted by a global allocator that keeps the live byte count
//! (one relaxed atomic add per allocation, paid by every contender alike).
//! The machine is shared: read the ratios, not the absolute figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use dspex_core::glob::{self as core_glob, Glob};
use dspex_core::histogram::Histogram as CoreHistogram;
use dspex_core::prometheus::{PromRecorder, PromText, QUANTILES};
use dspex_core::ratelimit::{RateLimit, TokenBucket};
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

// ---- measuring --------------------------------------------------------------

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counter is
// only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes `make` leaves live (what it returns is kept until measured).
fn retained<T>(make: impl FnOnce() -> T) -> (usize, T) {
    let before = live_bytes();
    let value = make();
    ((live_bytes() - before).max(0) as usize, value)
}

const ROUNDS: usize = 15;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Nanoseconds per operation of `run(iters)`, median of [`ROUNDS`] rounds,
/// each round after `setup()` (not timed).
fn ns_per_op(iters: u64, mut setup: impl FnMut(), mut run: impl FnMut(u64)) -> f64 {
    setup();
    run(iters / 10 + 1);
    median(
        (0..ROUNDS)
            .map(|_| {
                setup();
                let t = Instant::now();
                run(iters);
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .collect(),
    )
}

/// Nanoseconds per operation and thread when `threads` threads each run
/// `run(thread, iters)` at once (the slowest thread counts), median of
/// [`ROUNDS`] rounds, each after `setup()`.
fn ns_per_op_threads(
    threads: usize,
    iters: u64,
    mut setup: impl FnMut(),
    run: impl Fn(usize, u64) + Sync,
) -> f64 {
    let round = |iters: u64| -> Duration {
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (start, run) = (&start, &run);
                    s.spawn(move || {
                        start.wait();
                        let t0 = Instant::now();
                        run(t, iters);
                        t0.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .max()
                .unwrap_or_default()
        })
    };
    setup();
    round(iters / 10 + 1);
    median(
        (0..ROUNDS)
            .map(|_| {
                setup();
                round(iters).as_nanos() as f64 / iters as f64
            })
            .collect(),
    )
}

/// A small deterministic generator (xorshift64*): the same corpus and
/// samples every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Latency-like samples: log-uniform over [1, 10^6) (microseconds, say),
/// fractional.
fn samples(n: usize) -> Vec<f64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..n).map(|_| (rng.unit() * 1e6f64.ln()).exp()).collect()
}

fn ratio(ours: f64, theirs: f64) -> String {
    format!("{:.2}x", theirs / ours)
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

// ---- 1. Prometheus and the histogram ---------------------------------------

static META: Metadata<'static> = Metadata::new("bench", Level::INFO, None);

fn exporter() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_quantiles(&QUANTILES)
        .expect("quantiles")
        .build_recorder()
}

fn key(name: &'static str, series: usize) -> Key {
    Key::from_parts(name, vec![Label::new("series", series.to_string())])
}

/// The relative errors of `estimate` at [`QUANTILES`] against the exact
/// nearest-rank quantiles of `sorted`, as `a% / b% / c%`.
fn errors(sorted: &[f64], estimate: &dyn Fn(f64) -> f64) -> String {
    QUANTILES
        .iter()
        .map(|&q| {
            let want = exact_quantile(sorted, q);
            format!("{:.2}%", (estimate(q) - want).abs() / want * 100.0)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The value of the `quantile="q"` line of family `name` in a text
/// exposition.
fn rendered_quantile(text: &str, name: &str, q: f64) -> f64 {
    let label = format!("quantile=\"{q}\"");
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The exact nearest-rank quantile of `sorted`.
fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn histograms() {
    let values = samples(1 << 16);
    let mask = values.len() - 1;
    let ints: Vec<u64> = values.iter().map(|v| v.round().max(1.0) as u64).collect();
    const N: u64 = 2_000_000;

    println!("\n## Histogram: one sample recorded, single thread, `&mut` (ns/sample)\n");
    println!("| histogram | ns/sample | vs core |");
    println!("|---|---:|---:|");
    let mut core = CoreHistogram::default();
    let ours = ns_per_op(
        N,
        || {},
        |n| {
            for i in 0..n as usize {
                core.record(values[i & mask]);
            }
        },
    );
    black_box(&core);
    println!("| core `histogram::Histogram` (1/128 relative error) | {ours:.1} | 1.00x |");
    for sigfig in [2u8, 3] {
        let mut h = hdrhistogram::Histogram::<u64>::new(sigfig).expect("hdr");
        let t = ns_per_op(
            N,
            || {},
            |n| {
                for i in 0..n as usize {
                    h.record(ints[i & mask]).expect("hdr record");
                }
            },
        );
        black_box(&h);
        println!(
            "| `hdrhistogram` {sigfig} significant digits (u64 samples) | {t:.1} | {} |",
            ratio(ours, t)
        );
    }
    let mut summary = metrics_util::storage::Summary::with_defaults();
    let t = ns_per_op(
        N,
        || {},
        |n| {
            for i in 0..n as usize {
                summary.add(values[i & mask]);
            }
        },
    );
    black_box(&summary);
    println!(
        "| `metrics-util` `Summary::with_defaults()` (DDSketch, the exporter's) | {t:.1} | {} |",
        ratio(ours, t)
    );

    println!("\n## Histogram: memory and quantile error after S samples\n");
    println!("| histogram | S | heap | relative error of p50 / p90 / p99 |");
    println!("|---|---:|---:|---:|");
    for s in [1_000usize, 100_000] {
        let xs = &values[..s.min(values.len())];
        let xs: Vec<f64> = xs.iter().cycle().take(s).copied().collect();
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        let worst = |estimate: &dyn Fn(f64) -> f64| errors(&sorted, estimate);
        let (bytes, h) = retained(|| {
            let mut h = CoreHistogram::default();
            xs.iter().for_each(|&v| h.record(v));
            h
        });
        let err = worst(&|q| h.quantile(q).unwrap_or(f64::NAN));
        println!("| core | {s} | {} | {err} |", kib(bytes));
        for sigfig in [2u8, 3] {
            let (bytes, h) = retained(|| {
                let mut h = hdrhistogram::Histogram::<u64>::new(sigfig).expect("hdr");
                xs.iter()
                    .for_each(|&v| h.record(v.round().max(1.0) as u64).expect("hdr record"));
                h
            });
            let err = worst(&|q| h.value_at_quantile(q) as f64);
            println!(
                "| `hdrhistogram` {sigfig} digits | {s} | {} | {err} |",
                kib(bytes)
            );
        }
        let (bytes, h) = retained(|| {
            let mut h = metrics_util::storage::Summary::with_defaults();
            xs.iter().for_each(|&v| h.add(v));
            h
        });
        let err = worst(&|q| h.quantile(q).unwrap_or(f64::NAN));
        println!("| `metrics-util` Summary | {s} | {} | {err} |", kib(bytes));
    }
}

fn recorders() {
    let values = samples(1 << 12);
    let mask = values.len() - 1;
    const N: u64 = 1_000_000;

    println!(
        "\n## Recorder: one sample through a registered `metrics` handle (ns/sample per thread)\n"
    );
    println!("The exporter buffers raw samples and folds them into its summary at");
    println!("`run_upkeep()`/`render()`; \"+ upkeep\" times the recording and that fold together.");
    println!("Two threads record into the same series.\n");
    println!("| operation | threads | core | exporter | exporter + upkeep | exporter/core |");
    println!("|---|---:|---:|---:|---:|---:|");
    for threads in [1usize, 2] {
        let ours = PromRecorder::default();
        let h = ours.register_histogram(&key("latency", 0), &META);
        let core = ns_per_op_threads(
            threads,
            N,
            || {},
            |_, n| {
                for i in 0..n as usize {
                    h.record(values[i & mask]);
                }
            },
        );
        let theirs = exporter();
        let handle = theirs.handle();
        let h = theirs.register_histogram(&key("latency", 0), &META);
        let exp = ns_per_op_threads(
            threads,
            N,
            || handle.run_upkeep(),
            |_, n| {
                for i in 0..n as usize {
                    h.record(values[i & mask]);
                }
            },
        );
        let exp_upkeep = ns_per_op_threads(
            threads,
            N,
            || handle.run_upkeep(),
            |t, n| {
                for i in 0..n as usize {
                    h.record(values[i & mask]);
                }
                if t == 0 {
                    handle.run_upkeep();
                }
            },
        );
        println!(
            "| histogram record | {threads} | {core:.1} | {exp:.1} | {exp_upkeep:.1} | {} |",
            ratio(core, exp_upkeep)
        );
    }
    for threads in [1usize, 2] {
        let ours = PromRecorder::default();
        let c = ours.register_counter(&key("jobs_total", 0), &META);
        let core = ns_per_op_threads(
            threads,
            N * 5,
            || {},
            |_, n| (0..n).for_each(|_| c.increment(1)),
        );
        let theirs = exporter();
        let c = theirs.register_counter(&key("jobs_total", 0), &META);
        let exp = ns_per_op_threads(
            threads,
            N * 5,
            || {},
            |_, n| (0..n).for_each(|_| c.increment(1)),
        );
        println!(
            "| counter increment | {threads} | {core:.1} | {exp:.1} | - | {} |",
            ratio(core, exp)
        );
    }
    // The macro path: the recorder is asked for the handle on every call.
    let ours = PromRecorder::default();
    let core = ns_per_op(
        N,
        || {},
        |n| {
            metrics::with_local_recorder(&ours, || {
                for i in 0..n as usize {
                    metrics::histogram!("latency", "op" => "read").record(values[i & mask]);
                }
            })
        },
    );
    let theirs = exporter();
    let handle = theirs.handle();
    let exp = ns_per_op(
        N,
        || handle.run_upkeep(),
        |n| {
            metrics::with_local_recorder(&theirs, || {
                for i in 0..n as usize {
                    metrics::histogram!("latency", "op" => "read").record(values[i & mask]);
                }
            })
        },
    );
    println!(
        "| `histogram!(..).record` (lookup per call) | 1 | {core:.1} | {exp:.1} | - | {} |",
        ratio(core, exp)
    );

    println!("\n## Recorder: one render of N histogram series + N counters (µs per render)\n");
    println!("Before each render, 10 new samples per series (not timed).\n");
    println!("| N | core | exporter | exporter/core | core bytes | exporter bytes |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [10usize, 100, 1000] {
        let ours = PromRecorder::default();
        let theirs = exporter();
        let handle = theirs.handle();
        let ours_h: Vec<_> = (0..n)
            .map(|i| ours.register_histogram(&key("latency_us", i), &META))
            .collect();
        let theirs_h: Vec<_> = (0..n)
            .map(|i| theirs.register_histogram(&key("latency_us", i), &META))
            .collect();
        for i in 0..n {
            ours.register_counter(&key("jobs_total", i), &META)
                .increment(i as u64);
            theirs
                .register_counter(&key("jobs_total", i), &META)
                .increment(i as u64);
        }
        let feed = |hs: &[metrics::Histogram], round: &mut usize| {
            for h in hs {
                for _ in 0..10 {
                    h.record(values[*round & mask]);
                    *round += 1;
                }
            }
        };
        for _ in 0..10 {
            feed(&ours_h, &mut 0);
            feed(&theirs_h, &mut 0);
        }
        let (mut r1, mut r2) = (0usize, 0usize);
        let mut ours_bytes = 0;
        let core = ns_per_op(
            1,
            || feed(&ours_h, &mut r1),
            |_| {
                let mut out = PromText::new();
                ours.render(&mut out);
                ours_bytes = black_box(out.finish()).len();
            },
        ) / 1e3;
        let mut theirs_bytes = 0;
        let exp = ns_per_op(
            1,
            || feed(&theirs_h, &mut r2),
            |_| theirs_bytes = black_box(handle.render()).len(),
        ) / 1e3;
        println!(
            "| {n} | {core:.1} | {exp:.1} | {} | {ours_bytes} | {theirs_bytes} |",
            ratio(core, exp)
        );
    }

    println!("\n## Recorder: memory per histogram series (100 series, S samples each)\n");
    println!("| recorder | S | per series, after recording | per series, after upkeep |");
    println!("|---|---:|---:|---:|");
    for s in [1_000usize, 10_000] {
        let (bytes, (rec, hs)) = retained(|| {
            let rec = PromRecorder::default();
            let hs: Vec<_> = (0..100)
                .map(|i| rec.register_histogram(&key("latency_us", i), &META))
                .collect();
            for h in &hs {
                (0..s).for_each(|j| h.record(values[j & mask]));
            }
            (rec, hs)
        });
        println!("| core | {s} | {} | (none needed) |", kib(bytes / 100));
        drop((hs, rec));
        let before = live_bytes();
        let rec = exporter();
        let handle = rec.handle();
        let hs: Vec<_> = (0..100)
            .map(|i| rec.register_histogram(&key("latency_us", i), &META))
            .collect();
        for h in &hs {
            (0..s).for_each(|j| h.record(values[j & mask]));
        }
        let buffered = (live_bytes() - before).max(0) as usize;
        handle.run_upkeep();
        let folded = (live_bytes() - before).max(0) as usize;
        println!(
            "| exporter | {s} | {} | {} |",
            kib(buffered / 100),
            kib(folded / 100)
        );
        drop((hs, handle, rec));
    }

    println!("\n## Recorder: quantiles as rendered (one series, S samples over 6 decades)\n");
    println!("| recorder | S | relative error of p50 / p90 / p99 in the text |");
    println!("|---|---:|---|");
    let many = samples(1 << 16);
    for s in [10_000usize, 100_000] {
        let xs: Vec<f64> = many.iter().cycle().take(s).copied().collect();
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        let ours = PromRecorder::default();
        let h = ours.register_histogram(&key("latency_us", 0), &META);
        xs.iter().for_each(|&v| h.record(v));
        let mut out = PromText::new();
        ours.render(&mut out);
        let text = out.finish();
        let err = errors(&sorted, &|q| rendered_quantile(&text, "latency_us", q));
        println!("| core | {s} | {err} |");
        let theirs = exporter();
        let h = theirs.register_histogram(&key("latency_us", 0), &META);
        xs.iter().for_each(|&v| h.record(v));
        let text = theirs.handle().render();
        let err = errors(&sorted, &|q| rendered_quantile(&text, "latency_us", q));
        println!("| exporter | {s} | {err} |");
    }
}

// ---- 2. Globs ---------------------------------------------------------------

/// Our pattern in globset's syntax: metacharacters other than `*` and `?`
/// escaped, runs of stars collapsed (one star means the same to us, and
/// `**` means something else to globset).
fn for_globset(p: &str) -> String {
    let mut s = String::new();
    for c in collapse_stars(p).chars() {
        if matches!(c, '[' | ']' | '{' | '}' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// Our pattern in the `glob` crate's syntax (no backslash escapes there:
/// brackets go in a one-character class).
fn for_glob(p: &str) -> String {
    let mut s = String::new();
    for c in collapse_stars(p).chars() {
        match c {
            '[' => s.push_str("[[]"),
            ']' => s.push_str("[]]"),
            c => s.push(c),
        }
    }
    s
}

fn collapse_stars(p: &str) -> String {
    let mut s = String::new();
    for c in p.chars() {
        if !(c == '*' && s.ends_with('*')) {
            s.push(c);
        }
    }
    s
}

fn globset_matcher(p: &str) -> Option<globset::GlobMatcher> {
    globset::GlobBuilder::new(&for_globset(p))
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

const GLOB_OPTS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

fn glob_corpus() -> Vec<(String, String)> {
    let fixed = [
        ("admin_*", "admin_1"),
        ("admin_*", "not_admin_1"),
        ("a?c", "abc"),
        ("a?c", "ac"),
        ("a.b*", "a.bc"),
        ("a.b*", "axbc"),
        ("x+y", "x+y"),
        ("x+y", "xxy"),
        ("*", ""),
        ("", ""),
        ("", "a"),
        ("*_admin", "x_admin"),
        ("é?", "éé"),
        ("é?", "é"),
        ("a*b*c", "aXbYc"),
        ("a[b]c", "a[b]c"),
        ("a[b]c", "abc"),
        ("{a,b}", "{a,b}"),
        ("{a,b}", "a"),
        ("a\\*b", "a\\xyzb"),
        ("a\\*b", "a*b"),
        ("a/*", "a/b/c"),
        ("a/**/b", "a/b"),
        ("a**b", "ab"),
        ("[!a]", "[!a]"),
        ("?", "/"),
        (".*", ".hidden"),
    ];
    let mut corpus: Vec<(String, String)> = fixed
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    let alphabet = [
        'a', 'b', '.', '[', ']', '{', '}', '\\', '/', ',', '!', '-', '^', 'é',
    ];
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..20_000 {
        let len = rng.below(8);
        let pattern: String = (0..len)
            .map(|_| match rng.below(6) {
                0 => '*',
                1 => '?',
                _ => alphabet[rng.below(alphabet.len())],
            })
            .collect();
        // Half the texts are made to match (stars filled, `?` replaced),
        // then perhaps mutated; the other half are random.
        let text: String = if rng.below(2) == 0 {
            let mut t: String = pattern
                .chars()
                .flat_map(|c| match c {
                    '*' => (0..rng.below(3))
                        .map(|_| alphabet[rng.below(alphabet.len())])
                        .collect::<Vec<_>>(),
                    '?' => vec![alphabet[rng.below(alphabet.len())]],
                    c => vec![c],
                })
                .collect();
            if rng.below(4) == 0 {
                t.push(alphabet[rng.below(alphabet.len())]);
            }
            t
        } else {
            (0..rng.below(10))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect()
        };
        corpus.push((pattern, text));
    }
    corpus
}

fn globs() {
    let corpus = glob_corpus();
    println!(
        "\n## Glob: agreement with the core's semantics ({} pattern/text pairs)\n",
        corpus.len()
    );
    println!(
        "| crate (pattern translated) | agree | first disagreements (pattern, text: core, crate) |"
    );
    println!("|---|---:|---|");
    type Contender = (&'static str, Box<dyn Fn(&str, &str) -> Option<bool>>);
    let contenders: Vec<Contender> = vec![
        (
            "`wildmatch` (as is)",
            Box::new(|p, t| Some(wildmatch::WildMatch::new(p).matches(t))),
        ),
        (
            "`globset` (escaped, stars collapsed)",
            Box::new(|p, t| globset_matcher(p).map(|m| m.is_match(t))),
        ),
        (
            "`glob` (escaped, stars collapsed)",
            Box::new(|p, t| {
                glob::Pattern::new(&for_glob(p))
                    .ok()
                    .map(|g| g.matches_with(t, GLOB_OPTS))
            }),
        ),
    ];
    for (name, matcher) in &contenders {
        let mut agree = 0;
        let mut differ = Vec::new();
        for (p, t) in &corpus {
            let want = Glob::new(p).matches(t);
            assert_eq!(want, core_glob::matches(p, t), "core disagrees with itself");
            let got = matcher(p, t);
            if got == Some(want) {
                agree += 1;
            } else if differ.len() < 3 {
                let got = got.map_or("error".to_string(), |b| b.to_string());
                differ.push(format!("`{p:?}`, `{t:?}`: {want}, {got}"));
            }
        }
        println!(
            "| {name} | {agree}/{} | {} |",
            corpus.len(),
            if differ.is_empty() {
                "-".to_string()
            } else {
                differ.join("; ")
            }
        );
    }

    let patterns = [
        ("literal", "session_42"),
        ("prefix", "admin_*"),
        ("suffix", "*_bot"),
        ("general", "team_*_r?"),
    ];
    let texts = [
        "admin_1",
        "not_admin_1",
        "team_blue_r1",
        "team_blue_rx2",
        "deploy_bot",
        "session_42",
        "session_43",
        "a_fairly_long_principal_name_that_matches_nothing",
    ];
    const N: u64 = 200_000;
    println!(
        "\n## Glob: cost (ns; match = one text of 8 principals, half matching some pattern)\n"
    );
    println!("| pattern | core compile | core match | core uncompiled | `wildmatch` compile / match | `globset` compile / match | `glob` compile / match |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (shape, p) in patterns {
        let compile_core = ns_per_op(
            N,
            || {},
            |n| {
                (0..n).for_each(|_| {
                    black_box(Glob::new(black_box(p)));
                })
            },
        );
        let compile_wild = ns_per_op(
            N,
            || {},
            |n| {
                (0..n).for_each(|_| {
                    black_box(wildmatch::WildMatch::new(black_box(p)));
                })
            },
        );
        let compile_set = ns_per_op(
            N / 100,
            || {},
            |n| {
                (0..n).for_each(|_| {
                    black_box(globset_matcher(black_box(p)));
                })
            },
        );
        let compile_glob = ns_per_op(
            N / 10,
            || {},
            |n| {
                (0..n).for_each(|_| {
                    let _ = black_box(glob::Pattern::new(black_box(&for_glob(p))));
                })
            },
        );
        let per_text = |f: &dyn Fn(&str) -> bool| {
            ns_per_op(
                N,
                || {},
                |n| {
                    for i in 0..n as usize {
                        black_box(f(black_box(texts[i % texts.len()])));
                    }
                },
            )
        };
        let core = Glob::new(p);
        let m_core = per_text(&|t| core.matches(t));
        let m_raw = per_text(&|t| core_glob::matches(p, t));
        let wild = wildmatch::WildMatch::new(p);
        let m_wild = per_text(&|t| wild.matches(t));
        let set = globset_matcher(p).expect("globset pattern");
        let m_set = per_text(&|t| set.is_match(t));
        let g = glob::Pattern::new(&for_glob(p)).expect("glob pattern");
        let m_glob = per_text(&|t| g.matches_with(t, GLOB_OPTS));
        println!(
            "| {shape} `{p}` | {compile_core:.0} | {m_core:.1} | {m_raw:.1} | {compile_wild:.0} / {m_wild:.1} | {compile_set:.0} / {m_set:.1} | {compile_glob:.0} / {m_glob:.1} |"
        );
    }
}

// ---- 3. The token bucket ----------------------------------------------------

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

const SEC: u64 = 1_000_000_000;

fn buckets() {
    // Agreement: the same schedule of (pause, cost) through both, governor
    // on a fake clock moved by the same pauses. Costs stay within the burst
    // here; past it the two differ by design (counted below).
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (mut agree, mut total) = (0u64, 0u64);
    for _ in 0..200 {
        let rate = 1 + rng.below(1000) as u32;
        let burst = 1 + rng.below(50) as u32;
        let ours = TokenBucket::new(RateLimit::new(rate as u64, burst as u64).expect("limit"));
        let clock = governor::clock::FakeRelativeClock::default();
        let theirs = governor::RateLimiter::direct_with_clock(
            governor::Quota::per_second(nz(rate)).allow_burst(nz(burst)),
            clock.clone(),
        );
        let mut now = 1_000 * SEC;
        for _ in 0..200 {
            let dt = rng.below((SEC / 20) as usize) as u64;
            let cost = 1 + rng.below(burst as usize) as u32;
            now += dt;
            clock.advance(Duration::from_nanos(dt));
            let a = ours.try_acquire_at(now, cost as u64);
            let b = theirs.check_n(nz(cost)).expect("cost within the burst");
            total += 1;
            agree += u64::from(a == b.is_ok());
        }
    }
    // A cost above the burst from a full bucket: the core caps it at the
    // burst (a large batch empties the bucket rather than never passing),
    // governor refuses it for good.
    let ours = TokenBucket::new(RateLimit::new(10, 5).expect("limit"));
    let theirs = governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(nz(10)).allow_burst(nz(5)),
        governor::clock::FakeRelativeClock::default(),
    );
    let core_big = ours.try_acquire_at(1_000 * SEC, 8);
    let gov_big = match theirs.check_n(nz(8)) {
        Ok(r) => format!("{}", r.is_ok()),
        Err(e) => format!("`{e:?}`"),
    };
    println!("\n## Token bucket: same decisions on the same schedule\n");
    println!(
        "200 random limits (1..1000/s, burst 1..50) x 200 calls (pause < 50 ms, cost 1..burst);"
    );
    println!("governor on a `FakeRelativeClock` advanced by the same pauses.\n");
    println!("| same decision | cost 8 > burst 5, full bucket: core | governor |");
    println!("|---:|---|---|");
    println!("| {agree}/{total} | {core_big} | {gov_big} |");

    const N: u64 = 2_000_000;
    println!(
        "\n## Token bucket: one check (ns per check and thread; the threads share one bucket)\n"
    );
    println!("| case | threads | core (stamp given) | core + `time::now_us()` | `governor` (quanta clock) | `governor` (fake clock) | governor(quanta)/core+clock |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (case, rate, burst) in [
        ("admitted", 1_000_000_000u32, 1_000_000u32),
        ("refused", 1, 1),
    ] {
        for threads in [1usize, 2] {
            let limit = RateLimit::new(rate as u64, burst as u64).expect("limit");
            let ours = TokenBucket::new(limit);
            let t0 = 1_000 * SEC;
            let core = ns_per_op_threads(
                threads,
                N,
                || {},
                |_, n| {
                    for i in 0..n {
                        black_box(ours.try_acquire_at(t0 + i, 1));
                    }
                },
            );
            let ours = TokenBucket::new(limit);
            let core_clock = ns_per_op_threads(
                threads,
                N,
                || {},
                |_, n| {
                    for _ in 0..n {
                        black_box(ours.try_acquire(1, dspex_core::time::now_us()));
                    }
                },
            );
            let quota = governor::Quota::per_second(nz(rate)).allow_burst(nz(burst));
            let theirs = governor::RateLimiter::direct(quota);
            let gov = ns_per_op_threads(
                threads,
                N,
                || {},
                |_, n| {
                    (0..n).for_each(|_| {
                        let _ = black_box(theirs.check());
                    })
                },
            );
            let clock = governor::clock::FakeRelativeClock::default();
            let theirs = governor::RateLimiter::direct_with_clock(quota, clock.clone());
            let gov_fake = ns_per_op_threads(
                threads,
                N,
                || clock.advance(Duration::from_millis(1)),
                |_, n| {
                    (0..n).for_each(|_| {
                        let _ = black_box(theirs.check());
                    })
                },
            );
            println!(
                "| {case} | {threads} | {core:.1} | {core_clock:.1} | {gov:.1} | {gov_fake:.1} | {} |",
                ratio(core_clock, gov)
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter picks sections.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    println!("# dspex_core: hand-written pieces beside crates (median of {ROUNDS} rounds)");
    if wanted("histogram") {
        histograms();
    }
    if wanted("recorder") {
        recorders();
    }
    if wanted("glob") {
        globs();
    }
    if wanted("bucket") {
        buckets();
    }
}
