//! Time-bucketed metric storage: what `DSPex.Bridge.Analytics` records into.
//!
//! A metric is a named stream of `f64` samples. Samples are not kept: each
//! lands in the bucket of its time (width `bucket_us`), which holds an exact
//! [`Summary`] (count, sum, min, max) and a log-linear histogram
//! ([`crate::histogram`]). A query over `[from, to]` merges the buckets that
//! overlap the range and answers avg, sum, min, max, count and any quantile.
//! Memory depends on the number of metrics and the retention, never on the
//! event rate.
//!
//! Layout, from hot to cold:
//! - **shards**: each recording thread is pinned to one of a few
//!   cache-padded shards, each holding the *open* bucket of every metric the
//!   thread records into (a dense histogram: recording is a mutex nobody else
//!   usually holds, a hash lookup and two increments);
//! - **fine ring**: when a shard's open bucket falls behind the clock it is
//!   closed (its cells made sparse) and merged into the metric's fine ring,
//!   sorted by time;
//! - **coarse ring**: fine buckets older than `fine_window_us` are merged into
//!   buckets of `coarse_bucket_us`, and anything older than `retention_us` is
//!   dropped. So a day of retention at 1 s resolution for the last minutes
//!   costs about `fine_window / bucket + retention / coarse_bucket` buckets.
//!
//! Invariants (checked by the tests in `tests.rs`):
//! - no sample is lost or counted twice: counts and sums over any range that
//!   covers whole buckets are exact, whichever threads recorded and whenever
//!   buckets were closed or compacted;
//! - quantiles are within [`RELATIVE_ERROR`] of the sorted reference;
//! - every bucket kept overlaps `[now - retention_us, +inf)`; samples older
//!   than that are dropped on arrival and counted in `late_samples`;
//! - buckets in a ring are sorted by start and have distinct starts;
//! - the number of metrics is bounded: at most `max_metrics` names besides
//!   the reserved ones ([`Metrics::reserve`]), which are always accepted, so
//!   names of a caller's own can never crowd out the built-in ones; bad
//!   names and non-finite values are errors, never panics.
//!
//! Lock order: a shard, then a series. Queries take every shard (in index
//! order) before the series, so a bucket moving from a shard to the ring is
//! seen exactly once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

pub use crate::histogram::RELATIVE_ERROR;
use crate::histogram::{cell_of, DenseCells, SparseCells, Summary};

use crate::error::{Error, Result};
use crate::value::Value;

/// Sizes and horizons of a [`Metrics`] store, all in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    /// Width of a fine bucket: the time resolution of recent queries.
    pub bucket_us: i64,
    /// How long samples are kept.
    pub retention_us: i64,
    /// How long buckets keep their fine resolution before being compacted.
    pub fine_window_us: i64,
    /// Width of a compacted bucket (a multiple of `bucket_us`).
    pub coarse_bucket_us: i64,
    /// How many distinct metric names may exist besides the reserved ones.
    pub max_metrics: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig::new(1_000_000, 86_400_000_000)
    }
}

const MAX_NAME_BYTES: usize = 255;

impl MetricsConfig {
    /// A configuration with fine buckets of `bucket_us` kept for
    /// `retention_us`; fine resolution lasts 15 minutes (at least 60 buckets),
    /// then buckets are compacted to a minute (at least 60 fine buckets).
    pub fn new(bucket_us: i64, retention_us: i64) -> Self {
        let bucket_us = bucket_us.max(1);
        MetricsConfig {
            bucket_us,
            retention_us: retention_us.max(bucket_us),
            fine_window_us: (15 * 60 * 1_000_000i64).max(bucket_us.saturating_mul(60)),
            coarse_bucket_us: bucket_us.saturating_mul((60_000_000 / bucket_us).max(60)),
            max_metrics: 1024,
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = self.bucket_us > 0
            && self.retention_us >= self.bucket_us
            && self.fine_window_us >= self.bucket_us
            && self.coarse_bucket_us >= self.bucket_us
            && self.coarse_bucket_us % self.bucket_us == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid_arg("bad_metrics_config"))
        }
    }
}

/// What a query computes over the merged buckets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregation {
    Avg,
    Sum,
    Min,
    Max,
    Count,
    /// The nearest-rank quantile, `0 < q <= 1` (`p95` is `Quantile(0.95)`).
    Quantile(f64),
}

/// The merge of every bucket overlapping a range.
#[derive(Clone, Debug, Default)]
pub struct Merged {
    pub summary: Summary,
    pub cells: DenseCells,
}

impl Merged {
    /// The aggregate; `None` when no sample fell in the range (a count is 0).
    pub fn get(&self, agg: Aggregation) -> Option<f64> {
        let s = &self.summary;
        match agg {
            Aggregation::Count => Some(s.count as f64),
            _ if s.count == 0 => None,
            Aggregation::Avg => s.avg(),
            Aggregation::Sum => Some(s.sum),
            Aggregation::Min => Some(s.min),
            Aggregation::Max => Some(s.max),
            Aggregation::Quantile(q) => self.cells.quantile(q, s),
        }
    }

    fn add_open(&mut self, b: &OpenBucket) {
        self.summary.merge(&b.summary);
        self.cells.merge_dense(&b.cells);
    }

    fn add_closed(&mut self, b: &ClosedBucket) {
        self.summary.merge(&b.summary);
        self.cells.merge_sparse(&b.cells);
    }
}

/// One bucket of a time series, as returned by [`Metrics::buckets`].
#[derive(Clone, Debug, PartialEq)]
pub struct BucketView {
    pub start_us: i64,
    pub width_us: i64,
    pub summary: Summary,
}

/// Counters describing the store itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsStats {
    pub metrics: usize,
    pub buckets: usize,
    pub bytes: usize,
    pub late_samples: u64,
}

#[derive(Clone, Debug)]
struct OpenBucket {
    start: i64,
    summary: Summary,
    cells: DenseCells,
}

impl OpenBucket {
    fn new(start: i64) -> Self {
        OpenBucket {
            start,
            summary: Summary::default(),
            cells: DenseCells::default(),
        }
    }

    #[inline]
    fn record(&mut self, v: f64) {
        self.summary.record(v);
        self.cells.record(cell_of(v));
    }

    fn close(&self, width: i64) -> ClosedBucket {
        ClosedBucket {
            start: self.start,
            width,
            summary: self.summary,
            cells: self.cells.to_sparse(),
        }
    }
}

#[derive(Clone, Debug)]
struct ClosedBucket {
    start: i64,
    width: i64,
    summary: Summary,
    cells: SparseCells,
}

impl ClosedBucket {
    fn merge(&mut self, other: &ClosedBucket) {
        self.summary.merge(&other.summary);
        self.cells = self.cells.merge(&other.cells);
    }

    fn end(&self) -> i64 {
        self.start.saturating_add(self.width)
    }

    fn overlaps(&self, from: i64, to: i64) -> bool {
        self.start <= to && self.end() > from
    }
}

/// The closed buckets of one metric, plus its lifetime totals.
#[derive(Default)]
struct Series {
    fine: VecDeque<ClosedBucket>,
    coarse: VecDeque<ClosedBucket>,
    /// Every sample ever closed into this series (for Prometheus counters).
    total: Summary,
}

impl Series {
    /// Inserts a closed bucket at its place, merging with an equal start.
    fn insert(ring: &mut VecDeque<ClosedBucket>, bucket: ClosedBucket) {
        match ring.binary_search_by_key(&bucket.start, |b| b.start) {
            Ok(at) => ring[at].merge(&bucket),
            Err(at) => ring.insert(at, bucket),
        }
    }

    fn push(&mut self, bucket: ClosedBucket, cfg: &MetricsConfig, now: i64) {
        self.total.merge(&bucket.summary);
        Self::insert(&mut self.fine, bucket);
        self.maintain(cfg, now);
    }

    /// Compacts fine buckets past the fine window and drops expired ones.
    fn maintain(&mut self, cfg: &MetricsConfig, now: i64) {
        let fine_cutoff = now.saturating_sub(cfg.fine_window_us);
        let keep_from = now.saturating_sub(cfg.retention_us);
        while self.fine.front().is_some_and(|b| b.end() <= fine_cutoff) {
            let Some(b) = self.fine.pop_front() else {
                break;
            };
            if b.end() <= keep_from {
                continue;
            }
            let start = b
                .start
                .div_euclid(cfg.coarse_bucket_us)
                .saturating_mul(cfg.coarse_bucket_us);
            let coarse = ClosedBucket {
                start,
                width: cfg.coarse_bucket_us,
                ..b
            };
            Self::insert(&mut self.coarse, coarse);
        }
        while self.coarse.front().is_some_and(|b| b.end() <= keep_from) {
            self.coarse.pop_front();
        }
        while self.fine.front().is_some_and(|b| b.end() <= keep_from) {
            self.fine.pop_front();
        }
    }

    fn buckets(&self) -> impl Iterator<Item = &ClosedBucket> {
        self.coarse.iter().chain(self.fine.iter())
    }
}

type SeriesCell = Arc<Mutex<Series>>;

/// A shard's view of one metric: its series and the bucket being written.
struct ShardEntry {
    series: SeriesCell,
    open: Option<OpenBucket>,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Box<str>, ShardEntry, ahash::RandomState>,
}

/// Every series by name, and what bounds their number.
#[derive(Default)]
struct Registry {
    series: HashMap<Box<str>, SeriesCell>,
    /// Names always accepted, outside the `max_metrics` count.
    reserved: HashSet<Box<str>>,
    /// Series whose name is not reserved: what `max_metrics` bounds.
    counted: usize,
}

/// The store: every metric's buckets. Shared by all threads (`Sync`).
pub struct Metrics {
    config: MetricsConfig,
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    registry: Mutex<Registry>,
    late_samples: AtomicU64,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Assigned round-robin on a thread's first record, so the schedulers of
    /// a VM spread over distinct shards.
    static THREAD_SLOT: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn new(config: MetricsConfig) -> Result<Self> {
        config.validate()?;
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(4)
            .clamp(4, 64)
            .next_power_of_two();
        Ok(Metrics {
            config,
            shards: (0..n).map(|_| CachePadded::new(Mutex::default())).collect(),
            registry: Mutex::default(),
            late_samples: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    fn bucket_start(&self, t: i64) -> i64 {
        t.div_euclid(self.config.bucket_us)
            .saturating_mul(self.config.bucket_us)
    }

    fn check_name(name: &str) -> Result<()> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid_arg("bad_metric_name"));
        }
        Ok(())
    }

    /// Records a sample taken now.
    pub fn record(&self, name: &str, value: f64) -> Result<()> {
        self.record_at(name, value, crate::time::now_us())
    }

    /// Records a sample taken at `t_us` (µs since the Unix epoch).
    pub fn record_at(&self, name: &str, value: f64, t_us: i64) -> Result<()> {
        if !value.is_finite() {
            return Err(Error::InvalidArgument(Value::tagged(
                "not_a_finite_number",
                Value::Float(value),
            )));
        }
        let slot = THREAD_SLOT.with(|s| *s) & (self.shards.len() - 1);
        let mut shard = self.shards[slot].lock();
        let entry = match shard.entries.get_mut(name) {
            Some(e) => e,
            None => {
                let series = self.series_cell(name)?;
                shard
                    .entries
                    .entry(name.into())
                    .or_insert(ShardEntry { series, open: None })
            }
        };
        let start = self.bucket_start(t_us);
        match &mut entry.open {
            Some(open) if open.start == start => open.record(value),
            Some(open) if open.start > start => {
                // Older than the bucket this thread writes: rare (clock
                // readings raced), so it goes to the ring directly.
                if start.saturating_add(self.config.retention_us) <= open.start {
                    self.late_samples.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let mut b = OpenBucket::new(start);
                b.record(value);
                let closed = b.close(self.config.bucket_us);
                entry.series.lock().push(closed, &self.config, open.start);
            }
            slot => {
                let mut b = OpenBucket::new(start);
                b.record(value);
                if let Some(old) = slot.replace(b) {
                    let closed = old.close(self.config.bucket_us);
                    entry.series.lock().push(closed, &self.config, t_us);
                }
            }
        }
        Ok(())
    }

    /// Reserves `names`: they are always accepted and do not count against
    /// `max_metrics`, however many other names exist. For the names a
    /// library records into itself, which names of a caller's own must not
    /// crowd out. Reservations outlive [`Metrics::reset`].
    pub fn reserve(&self, names: &[&str]) -> Result<()> {
        for name in names {
            Self::check_name(name)?;
        }
        let mut registry = self.registry.lock();
        for &name in names {
            if registry.reserved.insert(name.into()) && registry.series.contains_key(name) {
                // It was counted when created; it no longer is.
                registry.counted -= 1;
            }
        }
        Ok(())
    }

    /// The series of `name`, created if the registry has room.
    fn series_cell(&self, name: &str) -> Result<SeriesCell> {
        Self::check_name(name)?;
        let mut registry = self.registry.lock();
        if let Some(s) = registry.series.get(name) {
            return Ok(s.clone());
        }
        let reserved = registry.reserved.contains(name);
        if !reserved {
            if registry.counted >= self.config.max_metrics {
                return Err(Error::InvalidArgument(Value::tagged(
                    "too_many_metrics",
                    Value::Int(self.config.max_metrics as i64),
                )));
            }
            registry.counted += 1;
        }
        let cell = SeriesCell::default();
        registry.series.insert(name.into(), cell.clone());
        Ok(cell)
    }

    fn series(&self, name: &str) -> Option<SeriesCell> {
        self.registry.lock().series.get(name).cloned()
    }

    fn lock_shards(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.lock()).collect()
    }

    /// The merge of every bucket of `name` overlapping `[from_us, to_us]`.
    /// An unknown metric merges to nothing (count 0).
    pub fn query(&self, name: &str, from_us: i64, to_us: i64) -> Merged {
        let mut merged = Merged::default();
        let Some(series) = self.series(name) else {
            return merged;
        };
        let width = self.config.bucket_us;
        let shards = self.lock_shards();
        for shard in &shards {
            if let Some(ShardEntry { open: Some(b), .. }) = shard.entries.get(name) {
                if b.start <= to_us && b.start.saturating_add(width) > from_us {
                    merged.add_open(b);
                }
            }
        }
        let series = series.lock();
        drop(shards);
        for b in series.buckets().filter(|b| b.overlaps(from_us, to_us)) {
            merged.add_closed(b);
        }
        merged
    }

    /// One aggregate of `name` over `[from_us, to_us]`.
    pub fn aggregate(&self, name: &str, from_us: i64, to_us: i64, agg: Aggregation) -> Option<f64> {
        self.query(name, from_us, to_us).get(agg)
    }

    /// The buckets of the series `names` overlapping `[from_us, to_us]`,
    /// oldest first; buckets of equal start and width (an open bucket and
    /// its closed twin, or the same second of two series) are merged.
    pub fn buckets(&self, names: &[&str], from_us: i64, to_us: i64) -> Vec<BucketView> {
        let mut out: Vec<BucketView> = names.iter().flat_map(|n| self.views(n)).collect();
        out.retain(|b| b.start_us <= to_us && b.start_us.saturating_add(b.width_us) > from_us);
        out.sort_by_key(|b| (b.start_us, std::cmp::Reverse(b.width_us)));
        let mut merged: Vec<BucketView> = Vec::with_capacity(out.len());
        for b in out {
            match merged.last_mut() {
                Some(last) if last.start_us == b.start_us && last.width_us == b.width_us => {
                    last.summary.merge(&b.summary)
                }
                _ => merged.push(b),
            }
        }
        merged
    }

    /// Every bucket of one series, open and closed, unmerged.
    fn views(&self, name: &str) -> Vec<BucketView> {
        let Some(series) = self.series(name) else {
            return Vec::new();
        };
        let width = self.config.bucket_us;
        let mut out: Vec<BucketView> = Vec::new();
        let shards = self.lock_shards();
        for shard in &shards {
            if let Some(ShardEntry { open: Some(b), .. }) = shard.entries.get(name) {
                out.push(BucketView {
                    start_us: b.start,
                    width_us: width,
                    summary: b.summary,
                });
            }
        }
        let series = series.lock();
        drop(shards);
        out.extend(series.buckets().map(|b| BucketView {
            start_us: b.start,
            width_us: b.width,
            summary: b.summary,
        }));
        out
    }

    /// Lifetime count and sum of `name` (every sample recorded, including
    /// expired ones), for Prometheus counters.
    pub fn totals(&self, name: &str) -> Summary {
        let Some(series) = self.series(name) else {
            return Summary::default();
        };
        let shards = self.lock_shards();
        let mut total = Summary::default();
        for shard in &shards {
            if let Some(ShardEntry { open: Some(b), .. }) = shard.entries.get(name) {
                total.merge(&b.summary);
            }
        }
        total.merge(&series.lock().total);
        total
    }

    /// The names of every metric, sorted.
    pub fn names(&self) -> Vec<Box<str>> {
        let mut names: Vec<Box<str>> = self.registry.lock().series.keys().cloned().collect();
        names.sort();
        names
    }

    /// Closes open buckets that have fallen behind `now_us`, compacts and
    /// drops expired buckets. Recording does this lazily for the metrics it
    /// touches; call it periodically so idle metrics age too.
    pub fn maintain(&self, now_us: i64) {
        let current = self.bucket_start(now_us);
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for entry in shard.entries.values_mut() {
                if entry.open.as_ref().is_some_and(|b| b.start < current) {
                    if let Some(b) = entry.open.take() {
                        let closed = b.close(self.config.bucket_us);
                        entry.series.lock().push(closed, &self.config, now_us);
                    }
                }
            }
        }
        let series: Vec<SeriesCell> = self.registry.lock().series.values().cloned().collect();
        for s in series {
            s.lock().maintain(&self.config, now_us);
        }
    }

    /// Forgets every metric (reservations stay).
    pub fn reset(&self) {
        let mut shards = self.lock_shards();
        let mut registry = self.registry.lock();
        for shard in shards.iter_mut() {
            shard.entries.clear();
        }
        registry.series.clear();
        registry.counted = 0;
        self.late_samples.store(0, Ordering::Relaxed);
    }

    /// Size of the store: metrics, buckets, approximate heap bytes.
    pub fn stats(&self) -> MetricsStats {
        let mut stats = MetricsStats {
            late_samples: self.late_samples.load(Ordering::Relaxed),
            ..MetricsStats::default()
        };
        let shards = self.lock_shards();
        for shard in &shards {
            for (name, e) in shard.entries.iter() {
                stats.bytes += name.len() + std::mem::size_of::<ShardEntry>();
                if let Some(b) = &e.open {
                    stats.buckets += 1;
                    stats.bytes += std::mem::size_of::<OpenBucket>() + b.cells.heap_bytes();
                }
            }
        }
        drop(shards);
        let registry = self.registry.lock();
        stats.metrics = registry.series.len();
        for s in registry.series.values() {
            let s = s.lock();
            stats.buckets += s.fine.len() + s.coarse.len();
            stats.bytes += std::mem::size_of::<Series>()
                + (s.fine.capacity() + s.coarse.capacity()) * std::mem::size_of::<ClosedBucket>()
                + s.buckets().map(|b| b.cells.heap_bytes()).sum::<usize>();
        }
        stats
    }
}

#[cfg(test)]
mod tests;
