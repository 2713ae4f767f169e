//! The lock table: one holder and a FIFO queue of waiters per key, leases,
//! preemption and the optimization registry, each operation in one critical
//! section (see the invariants in [the module docs](super)).
//!
//! Lock order: the table's mutex, then (through [`Fence`]) a variable's.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use smallvec::SmallVec;

use super::*;
use crate::time::now_us;

struct Holder<H> {
    optimizer: OptimizerId,
    owner: H,
    token: u64,
    /// Monotonic milliseconds, like every internal time.
    acquired_at: u64,
    lease_until: u64,
    fence: Option<Arc<dyn Fence>>,
    /// The waiter id this grant answered (0 when granted at once).
    waiter: u64,
}

struct Waiter<H> {
    id: u64,
    optimizer: OptimizerId,
    owner: H,
    notify: H,
    deadline: u64,
    lease_ms: u64,
    fence: Option<Arc<dyn Fence>>,
    /// Asked for `:preempt`: takes the lock as soon as the policy allows.
    preempts: bool,
}

/// A grant about to be installed.
struct Pending<H> {
    optimizer: OptimizerId,
    owner: H,
    lease_ms: u64,
    fence: Option<Arc<dyn Fence>>,
    /// The waiter id this grant answers (0 when granted at once).
    waiter: u64,
}

impl<H> Pending<H> {
    fn at_once(req: Request<H>, lease_ms: u64) -> Self {
        Pending {
            optimizer: req.optimizer,
            owner: req.owner,
            lease_ms,
            fence: req.fence,
            waiter: 0,
        }
    }
}

struct Slot<H> {
    holder: Option<Holder<H>>,
    queue: VecDeque<Waiter<H>>,
}

struct Optimization<K, H> {
    owner: H,
    keys: Keys<K>,
    iteration: u64,
    reports: u64,
    best: Option<Best>,
    started_at: u64,
    last_update: u64,
}

/// Hash maps seeded per table: fast, and not predictable from outside.
type Map<K, V> = HashMap<K, V, RandomState>;
/// The keys of one owner or optimization: usually one, without allocating.
type Keys<K> = SmallVec<[K; 2]>;

struct Inner<K, H> {
    slots: Map<K, Slot<H>>,
    optimizations: Map<OptimizerId, Optimization<K, H>>,
    next_token: u64,
    next_waiter: u64,
}

/// The lock table. All operations are atomic; see the module docs.
pub struct LockTable<K, H> {
    inner: Mutex<Inner<K, H>>,
    config: LockConfig,
}

impl<K, H> LockTable<K, H>
where
    K: Eq + Hash + Clone,
    H: Eq + Hash + Clone,
{
    pub fn new(config: LockConfig) -> Self {
        LockTable {
            inner: Mutex::new(Inner {
                slots: Map::default(),
                optimizations: Map::default(),
                next_token: 1,
                next_waiter: 1,
            }),
            config,
        }
    }

    pub fn config(&self) -> &LockConfig {
        &self.config
    }

    /// Acquires `key` for `req.optimizer`, resolving a conflict as asked.
    pub fn acquire(&self, key: &K, req: Request<H>, now: u64) -> Outcome<Acquired, K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        let result = inner.acquire(key, req, now, &self.config, &mut effects);
        Outcome { result, effects }
    }

    /// Releases `key` if `optimizer` holds it and grants it to the first live
    /// waiter.
    pub fn release(&self, key: &K, optimizer: &str, now: u64) -> Outcome<Released, K, H> {
        self.release_if(key, now, Error::NotLockOwner, |h| {
            &*h.optimizer == optimizer
        })
    }

    /// Releases `key` whoever holds it (an administrative stop).
    pub fn release_any(&self, key: &K, now: u64) -> Outcome<Released, K, H> {
        self.release_if(key, now, Error::NotOptimizing, |_| true)
    }

    fn release_if(
        &self,
        key: &K,
        now: u64,
        otherwise: Error,
        allowed: impl FnOnce(&Holder<H>) -> bool,
    ) -> Outcome<Released, K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        if inner.holder_of(key).is_some_and(|h| h.lease_until <= now) {
            inner.expire_key(key, now, &mut effects);
        }
        let result = match inner.holder_of(key) {
            Some(h) if allowed(h) => inner
                .end_holder(key, EndReason::Released, now, &mut effects)
                .map(|e| Released {
                    optimizer: e.optimizer,
                    token: e.token,
                    finished: e.finished,
                })
                .ok_or(otherwise),
            _ => Err(otherwise),
        };
        Outcome { result, effects }
    }

    /// Extends the lease of `optimizer`'s lock on `key`; returns the token.
    pub fn renew(
        &self,
        key: &K,
        optimizer: &str,
        lease_ms: Option<u64>,
        now: u64,
    ) -> Outcome<u64, K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        inner.expire_key(key, now, &mut effects);
        let lease = lease_ms.unwrap_or(self.config.lease_ms);
        let result = match inner.slots.get_mut(key).and_then(|s| s.holder.as_mut()) {
            Some(h) if &*h.optimizer == optimizer => {
                h.lease_until = now.saturating_add(lease);
                Ok(h.token)
            }
            _ => Err(Error::NotLockOwner),
        };
        Outcome { result, effects }
    }

    /// Takes a queued request out of the queue (its caller gave up waiting).
    pub fn cancel(&self, key: &K, waiter: u64) -> Cancelled<H> {
        let mut inner = self.inner.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return Cancelled::Gone;
        };
        let queued = slot.queue.iter().position(|w| w.id == waiter);
        if let Some(w) = queued.and_then(|i| slot.queue.remove(i)) {
            inner.drop_if_idle(key);
            return Cancelled::Removed(w.owner);
        }
        match &slot.holder {
            Some(h) if h.waiter == waiter => Cancelled::Granted { token: h.token },
            _ => Cancelled::Gone,
        }
    }

    /// `owner` is gone: its locks pass to their next live waiters and its
    /// queued requests leave.
    pub fn owner_down(&self, owner: &H, now: u64) -> Effects<K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        // A scan, not an index: deaths are rare next to acquires, and an
        // index would cost every acquire and release two more map updates.
        let keys: Vec<K> = inner
            .slots
            .iter()
            .filter(|(_, s)| {
                s.holder.as_ref().is_some_and(|h| h.owner == *owner)
                    || s.queue.iter().any(|w| w.owner == *owner)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            let Some(slot) = inner.slots.get_mut(key) else {
                continue;
            };
            let before = slot.queue.len();
            slot.queue.retain(|w| w.owner != *owner);
            for _ in slot.queue.len()..before {
                effects.dropped.push(owner.clone());
            }
            if slot.holder.as_ref().is_some_and(|h| h.owner == *owner) {
                let ended = inner.end_holder(key, EndReason::OwnerDown, now, &mut effects);
                effects.ended.extend(ended);
            } else {
                inner.drop_if_idle(key);
            }
        }
        effects
    }

    /// Ends every lease that passed and drops waiters whose deadline passed.
    pub fn expire(&self, now: u64) -> Effects<K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        let keys: Vec<K> = inner
            .slots
            .iter()
            .filter(|(_, s)| {
                s.holder.as_ref().is_some_and(|h| h.lease_until <= now)
                    || s.queue.iter().any(|w| w.deadline <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            inner.expire_key(key, now, &mut effects);
            inner.drop_expired_waiters(key, now, &mut effects);
            inner.drop_if_idle(key);
        }
        effects
    }

    /// The earliest lease or wait deadline, for scheduling [`Self::expire`].
    pub fn next_deadline(&self) -> Option<u64> {
        let inner = self.inner.lock();
        inner
            .slots
            .values()
            .flat_map(|s| {
                s.holder
                    .iter()
                    .map(|h| h.lease_until)
                    .chain(s.queue.iter().map(|w| w.deadline))
            })
            .min()
    }

    /// Records an optimizer's progress and renews the leases of its locks.
    /// Returns whether this report is the best so far (lowest score).
    ///
    /// Once the iteration reaches the preemption threshold, on each key the
    /// optimizer holds the first live waiter that asked for `:preempt` takes
    /// the lock (ahead of plain waiters, as a new `:preempt` request would).
    pub fn report_progress(
        &self,
        optimizer: &str,
        iteration: u64,
        value: Value,
        metrics: Value,
        now: u64,
    ) -> Outcome<bool, K, H> {
        let mut effects = Effects::default();
        let mut inner = self.inner.lock();
        let result = inner.report_progress(optimizer, iteration, value, metrics, now, &self.config);
        if result.is_ok() && iteration >= self.config.preempt_after {
            let keys = inner
                .optimizations
                .get(optimizer)
                .map(|o| o.keys.clone())
                .unwrap_or_default();
            for key in &keys {
                inner.preempt_for_waiter(key, now, &mut effects);
            }
        }
        Outcome { result, effects }
    }

    pub fn info(&self, key: &K, now: u64) -> Option<LockInfo<H>> {
        let inner = self.inner.lock();
        let slot = inner.slots.get(key)?;
        let h = slot.holder.as_ref()?;
        Some(LockInfo {
            optimizer: h.optimizer.clone(),
            owner: h.owner.clone(),
            token: h.token,
            acquired_at: wall_clock(h.acquired_at, now),
            lease_left_ms: h.lease_until.saturating_sub(now),
            iteration: inner.iteration_of(&h.optimizer),
            waiters: slot.queue.iter().filter(|w| w.deadline > now).count(),
        })
    }

    pub fn status(&self, optimizer: &str, now: u64) -> Option<Status<K, H>> {
        let inner = self.inner.lock();
        inner
            .optimizations
            .get_key_value(optimizer)
            .map(|(id, o)| o.status(id, now))
    }

    /// Every active optimization, sorted by optimizer id.
    pub fn active(&self, now: u64) -> Vec<Status<K, H>> {
        let inner = self.inner.lock();
        let mut all: Vec<_> = inner
            .optimizations
            .iter()
            .map(|(id, o)| o.status(id, now))
            .collect();
        all.sort_by(|a, b| a.optimizer.cmp(&b.optimizer));
        all
    }

    /// Number of keys with a holder or a waiter.
    pub fn len(&self) -> usize {
        self.inner.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks invariants 1, 4 (at `now`) and 5; for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self, now: u64) -> std::result::Result<(), String> {
        let inner = self.inner.lock();
        let mut held: HashMap<OptimizerId, usize> = HashMap::new();
        for slot in inner.slots.values() {
            if slot.holder.is_none() && slot.queue.is_empty() {
                return Err("idle slot kept".into());
            }
            if let Some(h) = &slot.holder {
                if slot.queue.iter().any(|w| w.id == h.waiter) {
                    return Err("holder also queued".into());
                }
                *held.entry(h.optimizer.clone()).or_default() += 1;
            } else if slot.queue.iter().any(|w| w.deadline > now) {
                return Err("free key with a live waiter".into());
            }
        }
        if held.len() != inner.optimizations.len() {
            return Err("registry disagrees with holders".into());
        }
        for (id, n) in held {
            match inner.optimizations.get(&id) {
                Some(o) if o.keys.len() == n => {}
                _ => return Err(format!("registry keys of {id} disagree")),
            }
        }
        Ok(())
    }
}

impl<K, H> Inner<K, H>
where
    K: Eq + Hash + Clone,
    H: Eq + Hash + Clone,
{
    fn holder_of(&self, key: &K) -> Option<&Holder<H>> {
        self.slots.get(key).and_then(|s| s.holder.as_ref())
    }

    fn iteration_of(&self, optimizer: &str) -> u64 {
        self.optimizations.get(optimizer).map_or(0, |o| o.iteration)
    }

    fn acquire(
        &mut self,
        key: &K,
        req: Request<H>,
        now: u64,
        config: &LockConfig,
        effects: &mut Effects<K, H>,
    ) -> Result<Acquired> {
        let lease = req.lease_ms.unwrap_or(config.lease_ms);
        let current = match self.holder_of(key) {
            Some(h) if h.lease_until <= now => {
                self.expire_key(key, now, effects);
                self.holder_of(key)
            }
            current => current,
        };
        let holder = match current {
            Some(h) => h.optimizer.clone(),
            None => {
                let (token, started) = self.grant(key, Pending::at_once(req, lease), None, now);
                return Ok(Acquired::Granted { token, started });
            }
        };
        if holder == req.optimizer {
            let slot = self.slot_mut(key);
            let token = slot.holder.as_mut().map_or(0, |h| {
                h.lease_until = h.lease_until.max(now.saturating_add(lease));
                h.token
            });
            return Ok(Acquired::AlreadyHeld { token });
        }
        match req.conflict {
            Conflict::Abort => Err(Error::LockHeldBy(holder.to_string())),
            Conflict::Preempt if self.iteration_of(&holder) >= config.preempt_after => {
                if let Some(old) = self.slot_mut(key).holder.take() {
                    let ended = self.finish(key, old, EndReason::Preempted);
                    effects.ended.push(ended);
                }
                let pending = Pending::at_once(req, lease);
                let (token, started) = self.grant(key, pending, Some(&holder), now);
                Ok(Acquired::Preempted {
                    token,
                    previous: holder,
                    started,
                })
            }
            Conflict::Wait | Conflict::Preempt => {
                let id = self.next_waiter;
                self.next_waiter += 1;
                let slot = self.slot_mut(key);
                slot.queue.push_back(Waiter {
                    id,
                    optimizer: req.optimizer,
                    owner: req.owner,
                    notify: req.notify,
                    deadline: now.saturating_add(req.wait_ms),
                    lease_ms: lease,
                    fence: req.fence,
                    preempts: req.conflict == Conflict::Preempt,
                });
                let position = slot.queue.len();
                Ok(Acquired::Queued {
                    waiter: id,
                    position,
                })
            }
        }
    }

    fn report_progress(
        &mut self,
        optimizer: &str,
        iteration: u64,
        value: Value,
        metrics: Value,
        now: u64,
        config: &LockConfig,
    ) -> Result<bool> {
        let opt = self
            .optimizations
            .get_mut(optimizer)
            .ok_or(Error::NotOptimizing)?;
        opt.iteration = iteration;
        opt.reports += 1;
        opt.last_update = now;
        let score = score(&metrics);
        let better = match &opt.best {
            None => true,
            Some(best) => match (score, best.score) {
                (Some(new), Some(old)) => new < old,
                (Some(_), None) => true,
                (None, _) => false,
            },
        };
        if better {
            opt.best = Some(Best {
                iteration,
                value,
                metrics,
                score,
            });
        }
        let lease_until = now.saturating_add(config.lease_ms);
        for key in &opt.keys {
            if let Some(h) = self.slots.get_mut(key).and_then(|s| s.holder.as_mut()) {
                h.lease_until = h.lease_until.max(lease_until);
            }
        }
        Ok(better)
    }

    /// Hands `key` to its first live waiter that asked for `:preempt`.
    fn preempt_for_waiter(&mut self, key: &K, now: u64, effects: &mut Effects<K, H>) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let Some(i) = slot
            .queue
            .iter()
            .position(|w| w.preempts && w.deadline > now)
        else {
            return;
        };
        if slot.holder.is_none() {
            return;
        }
        let (Some(w), Some(old)) = (slot.queue.remove(i), slot.holder.take()) else {
            return;
        };
        let ended = self.finish(key, old, EndReason::Preempted);
        let previous = ended.optimizer.clone();
        effects.ended.push(ended);
        let pending = Pending {
            optimizer: w.optimizer.clone(),
            owner: w.owner.clone(),
            lease_ms: w.lease_ms,
            fence: w.fence,
            waiter: w.id,
        };
        let (token, started) = self.grant(key, pending, Some(&previous), now);
        effects.grants.push(Grant {
            key: key.clone(),
            optimizer: w.optimizer,
            owner: w.owner,
            notify: w.notify,
            waiter: w.id,
            token,
            started,
            preempted: Some(previous),
        });
    }

    /// The slot of `key`, created when missing. (Keys are cheap to clone:
    /// the NIF's are reference counted.)
    fn slot_mut(&mut self, key: &K) -> &mut Slot<H> {
        self.slots.entry(key.clone()).or_insert_with(|| Slot {
            holder: None,
            queue: VecDeque::new(),
        })
    }

    /// Installs a holder on `key`, whose holder slot must be empty.
    /// Returns the token, and whether this began the optimizer's optimization.
    fn grant(
        &mut self,
        key: &K,
        p: Pending<H>,
        preempted: Option<&OptimizerId>,
        now: u64,
    ) -> (u64, bool) {
        let token = self.next_token;
        self.next_token += 1;
        if let Some(f) = &p.fence {
            f.granted(&p.optimizer, token, preempted);
        }
        let started = match self.optimizations.entry(p.optimizer.clone()) {
            MapEntry::Occupied(mut o) => {
                let o = o.get_mut();
                o.keys.push(key.clone());
                o.owner = p.owner.clone();
                false
            }
            MapEntry::Vacant(v) => {
                v.insert(Optimization {
                    owner: p.owner.clone(),
                    keys: smallvec::smallvec![key.clone()],
                    iteration: 0,
                    reports: 0,
                    best: None,
                    started_at: now,
                    last_update: now,
                });
                true
            }
        };
        let slot = self.slot_mut(key);
        debug_assert!(slot.holder.is_none());
        slot.holder = Some(Holder {
            optimizer: p.optimizer,
            owner: p.owner,
            token,
            acquired_at: now,
            lease_until: now.saturating_add(p.lease_ms),
            fence: p.fence,
            waiter: p.waiter,
        });
        (token, started)
    }

    /// Ends the current holder of `key` and passes the lock on. The record
    /// of the end is returned, not added to `effects` (a release reports it
    /// as its result).
    fn end_holder(
        &mut self,
        key: &K,
        reason: EndReason,
        now: u64,
        effects: &mut Effects<K, H>,
    ) -> Option<Ended<K, H>> {
        let old = self.slots.get_mut(key).and_then(|s| s.holder.take())?;
        let ended = self.finish(key, old, reason);
        self.promote(key, now, effects);
        self.drop_if_idle(key);
        Some(ended)
    }

    /// Bookkeeping for a holder taken off `key`: fence and registry.
    fn finish(&mut self, key: &K, old: Holder<H>, reason: EndReason) -> Ended<K, H> {
        if let Some(f) = &old.fence {
            f.released(old.token);
        }
        let finished = match self.optimizations.entry(old.optimizer.clone()) {
            MapEntry::Occupied(mut o) => {
                let keys = &mut o.get_mut().keys;
                if let Some(i) = keys.iter().position(|k| k == key) {
                    keys.swap_remove(i);
                }
                let finished = keys.is_empty();
                if finished {
                    o.remove();
                }
                finished
            }
            MapEntry::Vacant(_) => true,
        };
        Ended {
            key: key.clone(),
            optimizer: old.optimizer,
            owner: old.owner,
            token: old.token,
            reason,
            finished,
        }
    }

    /// Grants a free `key` to its first waiter whose deadline has not passed.
    fn promote(&mut self, key: &K, now: u64, effects: &mut Effects<K, H>) {
        loop {
            let Some(slot) = self.slots.get_mut(key) else {
                return;
            };
            if slot.holder.is_some() {
                return;
            }
            let Some(w) = slot.queue.pop_front() else {
                return;
            };
            if w.deadline <= now {
                effects.dropped.push(w.owner);
                continue;
            }
            let pending = Pending {
                optimizer: w.optimizer.clone(),
                owner: w.owner.clone(),
                lease_ms: w.lease_ms,
                fence: w.fence,
                waiter: w.id,
            };
            let (token, started) = self.grant(key, pending, None, now);
            effects.grants.push(Grant {
                key: key.clone(),
                optimizer: w.optimizer,
                owner: w.owner,
                notify: w.notify,
                waiter: w.id,
                token,
                started,
                preempted: None,
            });
            return;
        }
    }

    /// Ends the holder of `key` if its lease has passed.
    fn expire_key(&mut self, key: &K, now: u64, effects: &mut Effects<K, H>) {
        if self.holder_of(key).is_some_and(|h| h.lease_until <= now) {
            let ended = self.end_holder(key, EndReason::Expired, now, effects);
            effects.ended.extend(ended);
        }
    }

    fn drop_expired_waiters(&mut self, key: &K, now: u64, effects: &mut Effects<K, H>) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        slot.queue.retain(|w| {
            let live = w.deadline > now;
            if !live {
                effects.dropped.push(w.owner.clone());
            }
            live
        });
    }

    fn drop_if_idle(&mut self, key: &K) {
        if let MapEntry::Occupied(e) = self.slots.entry(key.clone()) {
            if e.get().holder.is_none() && e.get().queue.is_empty() {
                e.remove();
            }
        }
    }
}

impl<K: Clone, H: Clone> Optimization<K, H> {
    fn status(&self, id: &OptimizerId, now: u64) -> Status<K, H> {
        Status {
            optimizer: id.clone(),
            owner: self.owner.clone(),
            keys: self.keys.to_vec(),
            iteration: self.iteration,
            reports: self.reports,
            best: self.best.clone(),
            started_at: wall_clock(self.started_at, now),
            last_update: wall_clock(self.last_update, now),
        }
    }
}

/// The wall-clock time (microseconds since the Unix epoch) of the monotonic
/// instant `at`, given that it is `now` on the same clock.
fn wall_clock(at: u64, now: u64) -> i64 {
    let ago_us = now.saturating_sub(at).saturating_mul(1000);
    now_us().saturating_sub(i64::try_from(ago_us).unwrap_or(i64::MAX))
}

/// `:primary_metric`, else `:loss`, when it is a finite number.
fn score(metrics: &Value) -> Option<f64> {
    ["primary_metric", "loss"]
        .iter()
        .find_map(|k| metrics.get(k).and_then(Value::as_f64))
        .filter(|s| s.is_finite())
}
