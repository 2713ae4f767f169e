//! Tests of the time-bucketed store against a sorted reference.

use super::*;
use proptest::prelude::*;

const SEC: i64 = 1_000_000;

fn store(bucket: i64, retention: i64) -> Metrics {
    Metrics::new(MetricsConfig::new(bucket, retention)).unwrap()
}

#[test]
fn the_dashboard_case_averages_exactly() {
    let m = store(SEC, 3600 * SEC);
    let t = 1_700_000_000 * SEC;
    m.record_at("read_latency", 150.0, t).unwrap();
    m.record_at("write_latency", 500.0, t).unwrap();
    let last_minute = (t - 60 * SEC, t);
    assert_eq!(
        m.aggregate(
            "read_latency",
            last_minute.0,
            last_minute.1,
            Aggregation::Avg
        ),
        Some(150.0)
    );
    assert_eq!(
        m.aggregate(
            "write_latency",
            last_minute.0,
            last_minute.1,
            Aggregation::Count
        ),
        Some(1.0)
    );
    assert_eq!(
        m.aggregate("cache_hit", 0, t, Aggregation::Count),
        Some(0.0)
    );
    assert_eq!(m.aggregate("cache_hit", 0, t, Aggregation::Avg), None);
}

#[test]
fn every_aggregation_over_closed_and_open_buckets() {
    let m = store(SEC, 3600 * SEC);
    let t0 = 1000 * SEC;
    for (i, v) in [5.0, 1.0, 9.0, 3.0].into_iter().enumerate() {
        m.record_at("x", v, t0 + i as i64 * SEC).unwrap();
    }
    let q = |agg| m.aggregate("x", t0, t0 + 10 * SEC, agg);
    assert_eq!(q(Aggregation::Count), Some(4.0));
    assert_eq!(q(Aggregation::Sum), Some(18.0));
    assert_eq!(q(Aggregation::Avg), Some(4.5));
    assert_eq!(q(Aggregation::Min), Some(1.0));
    assert_eq!(q(Aggregation::Max), Some(9.0));
    assert_eq!(q(Aggregation::Quantile(1.0)), Some(9.0));
    // Only the buckets overlapping the range count.
    assert_eq!(
        m.aggregate("x", t0 + SEC, t0 + 2 * SEC - 1, Aggregation::Sum),
        Some(1.0)
    );
}

#[test]
fn retention_drops_old_buckets() {
    let m = store(SEC, 10 * SEC);
    let t0 = 5000 * SEC;
    m.record_at("x", 1.0, t0).unwrap();
    m.record_at("x", 2.0, t0 + SEC).unwrap();
    assert_eq!(m.aggregate("x", 0, i64::MAX, Aggregation::Count), Some(2.0));
    // Time passes beyond the retention of the first two buckets.
    m.record_at("x", 3.0, t0 + 12 * SEC).unwrap();
    m.maintain(t0 + 12 * SEC);
    assert_eq!(m.aggregate("x", 0, i64::MAX, Aggregation::Count), Some(1.0));
    assert_eq!(m.aggregate("x", 0, i64::MAX, Aggregation::Sum), Some(3.0));
    // Lifetime totals keep counting.
    assert_eq!(m.totals("x").count, 3);
    // An idle metric ages through maintain alone.
    m.maintain(t0 + 30 * SEC);
    assert_eq!(m.aggregate("x", 0, i64::MAX, Aggregation::Count), Some(0.0));
    assert_eq!(m.stats().buckets, 0);
}

#[test]
fn late_samples_beyond_retention_are_dropped_and_counted() {
    let m = store(SEC, 10 * SEC);
    let t0 = 5000 * SEC;
    m.record_at("x", 1.0, t0).unwrap();
    m.record_at("x", 2.0, t0 - 20 * SEC).unwrap();
    m.record_at("x", 4.0, t0 - 2 * SEC).unwrap();
    assert_eq!(m.stats().late_samples, 1);
    assert_eq!(m.aggregate("x", 0, i64::MAX, Aggregation::Sum), Some(5.0));
}

#[test]
fn old_fine_buckets_are_compacted_not_lost() {
    let cfg = MetricsConfig {
        bucket_us: SEC,
        retention_us: 3600 * SEC,
        fine_window_us: 60 * SEC,
        coarse_bucket_us: 60 * SEC,
        max_metrics: 8,
    };
    let m = Metrics::new(cfg).unwrap();
    let t0 = 6000 * SEC;
    for s in 0..600 {
        m.record_at("x", s as f64, t0 + s * SEC).unwrap();
    }
    m.maintain(t0 + 600 * SEC);
    let stats = m.stats();
    // 10 minutes: about 9 coarse buckets plus 60 fine ones, not 600.
    assert!(stats.buckets <= 75, "{stats:?}");
    assert_eq!(
        m.aggregate("x", 0, i64::MAX, Aggregation::Count),
        Some(600.0)
    );
    assert_eq!(
        m.aggregate("x", 0, i64::MAX, Aggregation::Sum),
        Some((0..600).sum::<i64>() as f64)
    );
    let views = m.buckets(&["x"], 0, i64::MAX);
    assert!(views.windows(2).all(|w| w[0].start_us < w[1].start_us));
    assert_eq!(views.iter().map(|b| b.summary.count).sum::<u64>(), 600);
    // Two series merge bucket by bucket.
    m.record_at("y", 1.0, t0 + 599 * SEC).unwrap();
    let both = m.buckets(&["x", "y"], t0 + 599 * SEC, t0 + 599 * SEC);
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].summary.count, 2);
}

#[test]
fn bad_input_is_an_error() {
    let m = store(SEC, 10 * SEC);
    assert!(m.record("x", f64::NAN).is_err());
    assert!(m.record("x", f64::INFINITY).is_err());
    assert!(m.record("", 1.0).is_err());
    assert!(m.record(&"n".repeat(300), 1.0).is_err());
    assert!(Metrics::new(MetricsConfig {
        bucket_us: 0,
        ..MetricsConfig::default()
    })
    .is_err());
    let small = Metrics::new(MetricsConfig {
        max_metrics: 2,
        ..MetricsConfig::default()
    })
    .unwrap();
    small.record("a", 1.0).unwrap();
    small.record("b", 1.0).unwrap();
    assert_eq!(
        small.record("c", 1.0).unwrap_err().kind(),
        "invalid_argument"
    );
    small.record("a", 2.0).unwrap();
    // Extreme timestamps do not overflow.
    m.record_at("x", 1.0, i64::MIN).unwrap();
    m.record_at("x", 1.0, i64::MAX).unwrap();
    m.maintain(i64::MAX);
    let _ = m.aggregate("x", i64::MIN, i64::MAX, Aggregation::Quantile(0.5));
}

#[test]
fn reserved_names_stay_open_past_the_cap() {
    let m = Metrics::new(MetricsConfig {
        max_metrics: 2,
        ..MetricsConfig::default()
    })
    .unwrap();
    m.record("mine", 1.0).unwrap();
    m.reserve(&["builtin_a", "builtin_b", "mine"]).unwrap();
    // `mine` no longer counts: two names of the caller's own fit.
    m.record("x", 1.0).unwrap();
    m.record("y", 1.0).unwrap();
    let err = m.record("z", 1.0).unwrap_err();
    assert_eq!(err.kind(), "invalid_argument");
    // However full the cap, reserved names are recorded.
    m.record("builtin_a", 2.0).unwrap();
    m.record("builtin_b", 3.0).unwrap();
    assert_eq!(
        m.aggregate("builtin_b", 0, i64::MAX, Aggregation::Sum),
        Some(3.0)
    );
    assert_eq!(m.stats().metrics, 5);
    // A reset forgets the series, not the reservations.
    m.reset();
    m.record("p", 1.0).unwrap();
    m.record("q", 1.0).unwrap();
    assert!(m.record("r", 1.0).is_err());
    m.record("builtin_a", 1.0).unwrap();
    assert!(m.reserve(&[""]).is_err());
}

#[test]
fn concurrent_recording_loses_nothing() {
    let m = Arc::new(store(1000, 3600 * SEC));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..20_000i64 {
                    // Timestamps cross bucket edges and go backwards a
                    // little, as clock reads of racing threads do.
                    let at = 1_000_000 * SEC + i * 7 - (t * 13) % 50;
                    m.record_at("x", (i % 100) as f64, at).unwrap();
                    if i % 5000 == 0 {
                        let _ = m.aggregate("x", 0, i64::MAX, Aggregation::Count);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want_sum = 8.0 * (0..20_000i64).map(|i| (i % 100) as f64).sum::<f64>();
    assert_eq!(
        m.aggregate("x", 0, i64::MAX, Aggregation::Count),
        Some(160_000.0)
    );
    assert_eq!(
        m.aggregate("x", 0, i64::MAX, Aggregation::Sum),
        Some(want_sum)
    );
    m.maintain(2_000_000 * SEC);
    assert_eq!(m.totals("x").count, 160_000);
}

proptest! {
    #[test]
    fn range_queries_match_a_sorted_reference(
        samples in prop::collection::vec((0i64..120, 0.0..1e6f64), 1..1500),
        from in 0i64..120,
        len in 0i64..120,
        q in prop_oneof![Just(0.5), Just(0.95), Just(0.99), 0.001..=1.0f64],
    ) {
        let m = store(SEC, 3600 * SEC);
        let t0 = 10_000 * SEC;
        for &(s, v) in &samples {
            m.record_at("x", v, t0 + s * SEC).unwrap();
        }
        if from % 3 == 0 {
            m.maintain(t0 + 200 * SEC);
        }
        let to = from + len;
        let mut inside: Vec<f64> = samples
            .iter()
            .filter(|(s, _)| (from..=to).contains(s))
            .map(|&(_, v)| v)
            .collect();
        inside.sort_by(f64::total_cmp);
        let merged = m.query("x", t0 + from * SEC, t0 + to * SEC);
        prop_assert_eq!(merged.get(Aggregation::Count), Some(inside.len() as f64));
        if inside.is_empty() {
            prop_assert_eq!(merged.get(Aggregation::Quantile(q)), None);
        } else {
            let rank = ((q * inside.len() as f64).ceil() as usize).clamp(1, inside.len());
            let want = inside[rank - 1];
            let got = merged.get(Aggregation::Quantile(q)).unwrap();
            prop_assert!((got - want).abs() <= want * RELATIVE_ERROR + 1e-9,
                "q={} want={} got={}", q, want, got);
            prop_assert_eq!(merged.get(Aggregation::Min), Some(inside[0]));
            prop_assert_eq!(merged.get(Aggregation::Max), inside.last().copied());
            let sum: f64 = inside.iter().sum();
            let got_sum = merged.get(Aggregation::Sum).unwrap();
            prop_assert!((got_sum - sum).abs() <= sum * 1e-9);
        }
    }
}
