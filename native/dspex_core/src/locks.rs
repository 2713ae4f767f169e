//! Optimizer locks: who may optimize what, who is next, and which writes are
//! still allowed once the lock has moved on.
//!
//! A [`LockTable`] maps any key (the NIF uses the external term format of an
//! Erlang term, so strings, atoms and tuples all work)
//! to at most one holder and a FIFO queue of waiters. Every grant carries a
//! *fencing token*. Optimizers report progress, which the table keeps per
//! optimizer along with its best result; the iteration count drives the
//! preemption policy.
//!
//! The table knows nothing of processes: an owner is an opaque handle `H`
//! (the NIF uses a pid with its hash), and time is a monotonic millisecond
//! count passed in by the caller, so every transition is deterministic and
//! testable. Each operation runs in one critical section and returns the
//! [`Effects`] the caller must act on outside it: waiters to notify of their
//! grant, holders that lost the lock and why, waiters that gave up.
//!
//! A grant on a key bound to a [`Fence`] (a session variable) updates the
//! variable's [`VarLock`] inside the same critical section, so the variable
//! sees grants and releases in token order. Lock order: the table's mutex,
//! then a variable's; the write path takes only the variable's, so they
//! cannot deadlock.
//!
//! Invariants (checked after every step of the property tests below):
//! 1. A key has at most one holder, and a holder is never queued on its key.
//! 2. Tokens come from one counter per table and are never reused, so every
//!    grant on a key carries a larger token than all grants before it.
//! 3. Waiters are granted in the order they queued. A waiter leaves the queue
//!    only by being granted, cancelling, its owner dying, or its deadline
//!    passing; an expired waiter is never granted.
//! 4. At rest a key without a holder has no waiter that is still live: every
//!    operation that frees a lock grants it to the first live waiter in the
//!    same critical section.
//! 5. The optimization registry lists exactly the optimizers that hold at
//!    least one lock, with those keys.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use foldhash::fast::RandomState;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::time::now_us;
use crate::value::Value;
use crate::variable::Variable;

/// An optimizer's id, shared between the lock entries and the registry.
pub type OptimizerId = Arc<str>;

/// Longest optimizer id, in bytes.
pub const MAX_OPTIMIZER_ID_BYTES: usize = 255;

/// An optimizer's id is 1 to [`MAX_OPTIMIZER_ID_BYTES`] bytes of text: the
/// one rule, for the lock table and for writes that name their optimizer.
pub fn check_optimizer_id(id: &str) -> Result<&str> {
    if (1..=MAX_OPTIMIZER_ID_BYTES).contains(&id.len()) {
        Ok(id)
    } else {
        Err(Error::invalid_arg("bad_optimizer_id"))
    }
}

/// What an acquire does when the key is held by another optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Queue FIFO until granted or the wait deadline passes.
    Wait,
    /// Fail at once with [`Error::LockHeldBy`].
    Abort,
    /// Take the lock at once if the policy allows it, otherwise wait.
    Preempt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockConfig {
    /// Lease of a grant unless the request names its own; renewals extend it.
    pub lease_ms: u64,
    /// A holder may be preempted once its optimizer reported at least this
    /// many iterations (seed 002: 10). `u64::MAX` never preempts.
    pub preempt_after: u64,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            lease_ms: 300_000,
            preempt_after: 10,
        }
    }
}

/// Something that must follow a key's grants: the locked variable.
pub trait Fence: Send + Sync {
    /// `optimizer` now holds the lock with `token`; `preempted` lost it to it.
    fn granted(&self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>);
    /// The grant with `token` ended.
    fn released(&self, token: u64);
}

/// An acquire request.
pub struct Request<H> {
    pub optimizer: OptimizerId,
    /// The process that will hold the lock (watched for death).
    pub owner: H,
    /// The process told of a grant after waiting (usually the owner).
    pub notify: H,
    pub conflict: Conflict,
    /// How long a queued request may wait.
    pub wait_ms: u64,
    /// Lease of this grant; `None` takes the table's default.
    pub lease_ms: Option<u64>,
    pub fence: Option<Arc<dyn Fence>>,
}

/// How an acquire went.
#[derive(Clone, Debug, PartialEq)]
pub enum Acquired {
    /// The key was free. `started`: this began the optimizer's optimization.
    Granted { token: u64, started: bool },
    /// The optimizer already held the key; its lease was renewed.
    AlreadyHeld { token: u64 },
    /// The holder was preempted; it is in [`Effects::ended`] too.
    Preempted {
        token: u64,
        previous: OptimizerId,
        started: bool,
    },
    /// Queued: wait for a [`Grant`] with this waiter id, or cancel.
    Queued { waiter: u64, position: usize },
}

/// A release that went through.
#[derive(Clone, Debug, PartialEq)]
pub struct Released {
    pub optimizer: OptimizerId,
    pub token: u64,
    /// The optimizer holds no other lock: its optimization is over.
    pub finished: bool,
}

/// A waiter that was given the lock.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant<K, H> {
    pub key: K,
    pub optimizer: OptimizerId,
    pub owner: H,
    pub notify: H,
    pub waiter: u64,
    pub token: u64,
    /// The grant started this optimizer's optimization.
    pub started: bool,
    /// The optimizer this waiter preempted (see [`LockTable::report_progress`]);
    /// its end is in [`Effects::ended`].
    pub preempted: Option<OptimizerId>,
}

/// Why a holder lost its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Released,
    OwnerDown,
    Expired,
    Preempted,
}

/// A holder that lost its lock.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended<K, H> {
    pub key: K,
    pub optimizer: OptimizerId,
    pub owner: H,
    pub token: u64,
    pub reason: EndReason,
    /// The optimizer holds no other lock: its optimization is over.
    pub finished: bool,
}

/// What the caller must do after an operation, outside the table's lock.
#[derive(Debug, PartialEq)]
pub struct Effects<K, H> {
    /// Notify each waiter of its grant.
    pub grants: Vec<Grant<K, H>>,
    /// Holders that lost a lock (telemetry; notify the preempted).
    pub ended: Vec<Ended<K, H>>,
    /// Owners of waiters that left without a grant (deadline passed or owner
    /// down), for callers that track who waits.
    pub dropped: Vec<H>,
}

impl<K, H> Default for Effects<K, H> {
    fn default() -> Self {
        Effects {
            grants: Vec::new(),
            ended: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

impl<K, H> Effects<K, H> {
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.ended.is_empty() && self.dropped.is_empty()
    }
}

/// An operation's result and its effects (effects happen even on error, e.g.
/// an abort that first found an expired holder).
#[derive(Debug, PartialEq)]
pub struct Outcome<T, K, H> {
    pub result: Result<T>,
    pub effects: Effects<K, H>,
}

/// How cancelling a queued request went.
#[derive(Clone, Debug, PartialEq)]
pub enum Cancelled<H> {
    /// Removed from the queue; carries the waiter's owner.
    Removed(H),
    /// Already granted: the grant message is on its way; the caller holds it.
    Granted { token: u64 },
    /// Not queued and not holding (deadline passed or owner down).
    Gone,
}

/// The best report of an optimization so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Best {
    pub iteration: u64,
    pub value: Value,
    pub metrics: Value,
    /// `:primary_metric`, else `:loss`, if a finite number.
    pub score: Option<f64>,
}

/// A snapshot of one key's lock.
#[derive(Clone, Debug, PartialEq)]
pub struct LockInfo<H> {
    pub optimizer: OptimizerId,
    pub owner: H,
    pub token: u64,
    /// Microseconds since the Unix epoch.
    pub acquired_at: i64,
    /// Milliseconds of lease left.
    pub lease_left_ms: u64,
    pub iteration: u64,
    pub waiters: usize,
}

/// A snapshot of one active optimization.
#[derive(Clone, Debug, PartialEq)]
pub struct Status<K, H> {
    pub optimizer: OptimizerId,
    pub owner: H,
    pub keys: Vec<K>,
    pub iteration: u64,
    pub reports: u64,
    pub best: Option<Best>,
    /// Microseconds since the Unix epoch.
    pub started_at: i64,
    pub last_update: i64,
}

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

/// What a write claims about the variable's optimizer lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockClaim<'a> {
    /// The fencing token of the grant the writer holds.
    pub token: Option<u64>,
    /// The optimizer the writer acts for.
    pub optimizer: Option<&'a str>,
}

/// A variable's view of its optimizer lock, kept in step by the lock table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VarLock {
    /// The optimizer holding the lock, and its token.
    pub holder: Option<(OptimizerId, u64)>,
    /// The largest token ever granted on the variable.
    pub fence: u64,
    /// The optimizer the current holder preempted.
    pub preempted: Option<OptimizerId>,
}

impl VarLock {
    /// May a write making `claim` go ahead?
    ///
    /// A token older than the fence is stale, locked or not. While locked,
    /// the holder's token or optimizer id is needed; the preempted
    /// optimizer's id is stale; anything else is `{:locked_by, holder}`.
    pub fn admit(&self, claim: &LockClaim) -> Result<()> {
        if claim.token.is_some_and(|t| t < self.fence) {
            return Err(Error::StaleLockToken);
        }
        let Some((holder, token)) = &self.holder else {
            return Ok(());
        };
        if claim.token == Some(*token) {
            return Ok(());
        }
        match claim.optimizer {
            Some(o) if claim.token.is_none() && o == &**holder => Ok(()),
            Some(o) if claim.token.is_none() && self.preempted.as_deref() == Some(o) => {
                Err(Error::StaleLockToken)
            }
            _ => Err(Error::LockedBy(holder.to_string())),
        }
    }

    fn grant(&mut self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>) {
        if token >= self.fence {
            self.fence = token;
            self.holder = Some((optimizer.clone(), token));
            match preempted {
                Some(p) => self.preempted = Some(p.clone()),
                None if self.preempted.as_ref() == Some(optimizer) => self.preempted = None,
                None => {}
            }
        }
    }

    fn release(&mut self, token: u64) {
        if self.holder.as_ref().is_some_and(|(_, t)| *t == token) {
            self.holder = None;
        }
    }
}

/// A change of a variable's fence, as the lock table reports it: the data
/// of [`Fence`]'s calls, so it can travel to an engine in another process
/// (the `var_fence` command) and be applied there as here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FenceChange {
    /// `optimizer` now holds the lock with `token`; `preempted` lost it.
    Granted {
        optimizer: String,
        token: u64,
        #[serde(default)]
        preempted: Option<String>,
    },
    /// The grant with `token` ended.
    Released { token: u64 },
}

impl VarLock {
    /// Applies a change the lock table reported; an older token than the
    /// fence changes nothing, so changes may arrive more than once.
    pub fn apply(&mut self, change: &FenceChange) {
        match change {
            FenceChange::Granted {
                optimizer,
                token,
                preempted,
            } => {
                let preempted = preempted.as_deref().map(OptimizerId::from);
                self.grant(
                    &OptimizerId::from(optimizer.as_str()),
                    *token,
                    preempted.as_ref(),
                )
            }
            FenceChange::Released { token } => self.release(*token),
        }
    }
}

/// The in-process fence: the lock table updates the variable inside its own
/// critical section.
impl Fence for Mutex<Variable> {
    fn granted(&self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>) {
        self.lock().lock.grant(optimizer, token, preempted);
    }

    fn released(&self, token: u64) {
        self.lock().lock.release(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Table = LockTable<u8, u32>;

    fn table() -> Table {
        LockTable::new(LockConfig::default())
    }

    fn req(opt: &str, owner: u32, conflict: Conflict) -> Request<u32> {
        Request {
            optimizer: opt.into(),
            owner,
            notify: owner,
            conflict,
            wait_ms: 5_000,
            lease_ms: None,
            fence: None,
        }
    }

    fn token(a: &Outcome<Acquired, u8, u32>) -> u64 {
        match a.result {
            Ok(Acquired::Granted { token, .. })
            | Ok(Acquired::AlreadyHeld { token })
            | Ok(Acquired::Preempted { token, .. }) => token,
            ref other => panic!("not granted: {other:?}"),
        }
    }

    fn waiter(a: &Outcome<Acquired, u8, u32>) -> u64 {
        match a.result {
            Ok(Acquired::Queued { waiter, .. }) => waiter,
            ref other => panic!("not queued: {other:?}"),
        }
    }

    #[test]
    fn abort_reports_the_holder_and_release_frees() {
        let t = table();
        token(&t.acquire(&1, req("opt1", 1, Conflict::Wait), 0));
        let r = t.acquire(&1, req("opt2", 2, Conflict::Abort), 0);
        assert_eq!(r.result, Err(Error::LockHeldBy("opt1".into())));
        assert_eq!(t.release(&1, "opt2", 0).result, Err(Error::NotLockOwner));
        assert!(t.release(&1, "opt1", 0).result.is_ok());
        assert!(t.is_empty());
        token(&t.acquire(&1, req("opt2", 2, Conflict::Abort), 0));
        t.check_invariants(0).unwrap();
    }

    #[test]
    fn release_grants_waiters_in_fifo_order() {
        let t = table();
        let first = token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
        let ws: Vec<u64> = ["b", "c", "d"]
            .iter()
            .zip(2..)
            .map(|(o, p)| waiter(&t.acquire(&1, req(o, p, Conflict::Wait), 0)))
            .collect();
        let mut last = first;
        for (i, opt) in ["a", "b", "c"].iter().enumerate() {
            let out = t.release(&1, opt, 1);
            assert_eq!(out.effects.grants.len(), 1);
            let g = &out.effects.grants[0];
            assert_eq!(g.waiter, ws[i]);
            assert!(g.token > last);
            last = g.token;
            t.check_invariants(1).unwrap();
        }
    }

    #[test]
    fn an_expired_waiter_is_skipped() {
        let t = table();
        token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
        let mut short = req("b", 2, Conflict::Wait);
        short.wait_ms = 10;
        waiter(&t.acquire(&1, short, 0));
        let w3 = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
        let out = t.release(&1, "a", 50);
        assert_eq!(out.effects.dropped, vec![2]);
        assert_eq!(out.effects.grants[0].waiter, w3);
        t.check_invariants(50).unwrap();
    }

    #[test]
    fn cancel_tells_removed_from_granted() {
        let t = table();
        token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
        let w2 = waiter(&t.acquire(&1, req("b", 2, Conflict::Wait), 0));
        let w3 = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
        assert_eq!(t.cancel(&1, w2), Cancelled::Removed(2));
        let out = t.release(&1, "a", 1);
        assert_eq!(out.effects.grants[0].waiter, w3);
        assert!(matches!(t.cancel(&1, w3), Cancelled::Granted { .. }));
        assert_eq!(t.cancel(&1, w2), Cancelled::Gone);
        t.check_invariants(1).unwrap();
    }

    #[test]
    fn owner_down_passes_the_lock_and_drops_its_waits() {
        let t = table();
        token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
        token(&t.acquire(&2, req("b", 2, Conflict::Wait), 0));
        waiter(&t.acquire(&2, req("a2", 1, Conflict::Wait), 0));
        let w = waiter(&t.acquire(&1, req("c", 3, Conflict::Wait), 0));
        let fx = t.owner_down(&1, 1);
        assert_eq!(fx.grants.len(), 1);
        assert_eq!(fx.grants[0].waiter, w);
        assert_eq!(fx.ended[0].reason, EndReason::OwnerDown);
        assert!(fx.ended[0].finished);
        assert_eq!(fx.dropped, vec![1]);
        assert_eq!(t.release(&2, "b", 1).effects.grants, vec![]);
        t.check_invariants(1).unwrap();
    }

    #[test]
    fn preemption_needs_ten_iterations() {
        let t = table();
        token(&t.acquire(&1, req("old", 1, Conflict::Wait), 0));
        t.report_progress("old", 9, Value::Nil, Value::Nil, 0)
            .result
            .unwrap();
        let early = t.acquire(&1, req("new", 2, Conflict::Preempt), 0);
        let w = waiter(&early);
        assert_eq!(t.cancel(&1, w), Cancelled::Removed(2));
        t.report_progress("old", 10, Value::Nil, Value::Nil, 0)
            .result
            .unwrap();
        let late = t.acquire(&1, req("new", 2, Conflict::Preempt), 0);
        assert!(matches!(
            late.result,
            Ok(Acquired::Preempted { ref previous, .. }) if &**previous == "old"
        ));
        assert_eq!(late.effects.ended[0].reason, EndReason::Preempted);
        assert_eq!(late.effects.ended[0].owner, 1);
        assert!(t.status("old", 0).is_none());
        assert_eq!(t.info(&1, 0).unwrap().optimizer.as_ref(), "new");
        t.check_invariants(0).unwrap();
    }

    #[test]
    fn a_queued_preempter_takes_over_at_the_threshold() {
        let t = table();
        token(&t.acquire(&1, req("old", 1, Conflict::Wait), 0));
        let plain = waiter(&t.acquire(&1, req("plain", 2, Conflict::Wait), 0));
        let eager = waiter(&t.acquire(&1, req("eager", 3, Conflict::Preempt), 0));
        let p9 = t.report_progress("old", 9, Value::Nil, Value::Nil, 0);
        assert!(p9.effects.is_empty());
        let p10 = t.report_progress("old", 10, Value::Nil, Value::Nil, 0);
        assert_eq!(p10.effects.ended[0].reason, EndReason::Preempted);
        let g = &p10.effects.grants[0];
        assert_eq!((g.waiter, g.preempted.as_deref()), (eager, Some("old")));
        assert_eq!(t.info(&1, 0).unwrap().optimizer.as_ref(), "eager");
        let out = t.release(&1, "eager", 0);
        assert_eq!(out.effects.grants[0].waiter, plain);
        t.check_invariants(0).unwrap();
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let t = table();
        let mut r = req("a", 1, Conflict::Wait);
        r.lease_ms = Some(100);
        token(&t.acquire(&1, r, 0));
        let w = waiter(&t.acquire(&1, req("b", 2, Conflict::Wait), 0));
        assert_eq!(t.renew(&1, "a", Some(100), 90).result, Ok(1));
        assert!(t.expire(150).is_empty());
        assert_eq!(t.next_deadline(), Some(190));
        let fx = t.expire(190);
        assert_eq!(fx.ended[0].reason, EndReason::Expired);
        assert_eq!(fx.grants[0].waiter, w);
        assert_eq!(t.renew(&1, "a", None, 191).result, Err(Error::NotLockOwner));
        t.check_invariants(191).unwrap();
    }

    #[test]
    fn progress_keeps_the_lowest_score_and_renews() {
        let t = table();
        let mut r = req("a", 1, Conflict::Wait);
        r.lease_ms = Some(100);
        token(&t.acquire(&1, r, 0));
        let m = |k: &str, x: f64| Value::Map(vec![(Value::atom(k), Value::Float(x))].into());
        let p = |i, v: i64, metrics| t.report_progress("a", i, Value::Int(v), metrics, 50).result;
        assert_eq!(p(1, 10, m("loss", 0.5)), Ok(true));
        assert_eq!(p(2, 20, m("loss", 0.7)), Ok(false));
        assert_eq!(p(3, 30, m("primary_metric", 0.1)), Ok(true));
        assert_eq!(p(4, 40, Value::Nil), Ok(false));
        assert_eq!(p(5, 50, m("loss", f64::NAN)), Ok(false));
        let s = t.status("a", 50).unwrap();
        assert_eq!(s.iteration, 5);
        assert_eq!(s.best.unwrap().value, Value::Int(30));
        assert!(t.expire(120).is_empty(), "progress renewed the lease");
        assert_eq!(
            t.report_progress("zz", 1, Value::Nil, Value::Nil, 0).result,
            Err(Error::NotOptimizing)
        );
    }

    #[test]
    fn reacquire_by_the_holder_keeps_its_token() {
        let t = table();
        let a = token(&t.acquire(&1, req("a", 1, Conflict::Wait), 0));
        let b = t.acquire(&1, req("a", 1, Conflict::Abort), 0);
        assert_eq!(b.result, Ok(Acquired::AlreadyHeld { token: a }));
        t.check_invariants(0).unwrap();
    }

    fn var() -> Arc<Mutex<Variable>> {
        use crate::types::{Constraints, VarType};
        let v = Variable::new(
            "var_x_1".into(),
            Value::atom("x"),
            VarType::Integer,
            Constraints::default(),
            Value::Int(0),
            Value::empty_map(),
            None,
            10,
            0,
        )
        .unwrap();
        Arc::new(Mutex::new(v))
    }

    fn claim(token: Option<u64>, optimizer: Option<&str>) -> LockClaim<'_> {
        LockClaim { token, optimizer }
    }

    #[test]
    fn fencing_follows_grants_and_preemption() {
        let t = table();
        let cell = var();
        let fenced = |opt: &str, owner, c| {
            let mut r = req(opt, owner, c);
            r.fence = Some(cell.clone() as Arc<dyn Fence>);
            r
        };
        let t1 = token(&t.acquire(&1, fenced("old", 1, Conflict::Wait), 0));
        let admit = |c: LockClaim| cell.lock().lock.admit(&c);
        assert_eq!(admit(claim(None, None)), Err(Error::LockedBy("old".into())));
        assert_eq!(admit(claim(Some(t1), None)), Ok(()));
        assert_eq!(admit(claim(None, Some("old"))), Ok(()));
        assert_eq!(
            admit(claim(None, Some("other"))),
            Err(Error::LockedBy("old".into()))
        );
        t.report_progress("old", 10, Value::Nil, Value::Nil, 0)
            .result
            .unwrap();
        let t2 = token(&t.acquire(&1, fenced("new", 2, Conflict::Preempt), 0));
        assert!(t2 > t1);
        assert_eq!(admit(claim(Some(t1), None)), Err(Error::StaleLockToken));
        assert_eq!(admit(claim(None, Some("old"))), Err(Error::StaleLockToken));
        assert_eq!(admit(claim(Some(t2), None)), Ok(()));
        t.release(&1, "new", 0).result.unwrap();
        assert_eq!(admit(claim(None, None)), Ok(()));
        assert_eq!(admit(claim(Some(t1), None)), Err(Error::StaleLockToken));
        assert_eq!(admit(claim(Some(t2), None)), Ok(()));
    }

    #[test]
    fn session_writes_respect_the_lock() {
        use crate::caller::Caller;
        use crate::session::{Session, SessionOpts};
        use crate::types::VarType;
        use crate::variable::WriteMeta;

        let s = Session::new("s".into(), SessionOpts::default(), Default::default(), 0);
        s.register(
            Value::atom("x"),
            VarType::Integer,
            Value::Int(0),
            Default::default(),
            0,
        )
        .unwrap();
        let t = table();
        let mut r = req("opt1", 1, Conflict::Wait);
        r.fence = Some(s.cell("x").unwrap() as Arc<dyn Fence>);
        let tok = token(&t.acquire(&1, r, 0));
        let write = |c: LockClaim| {
            let caller = Caller {
                lock: c,
                ..Caller::owner(0)
            };
            s.update("x", Value::Int(1), WriteMeta::default(), &caller)
        };
        assert_eq!(
            write(claim(None, None)),
            Err(Error::LockedBy("opt1".into()))
        );
        assert_eq!(write(claim(Some(tok), None)), Ok(1));
        assert_eq!(write(claim(None, Some("opt1"))), Ok(2));
        let batch = s.update_atomic(
            vec![crate::session::Update {
                ident: "x".into(),
                value: Value::Int(3),
                meta: WriteMeta::default(),
            }],
            &Caller::owner(0),
        );
        assert!(matches!(batch, Err(Error::ValidationFailed(_))));
        t.release(&1, "opt1", 0).result.unwrap();
        assert_eq!(write(claim(None, None)), Ok(3));
    }

    #[test]
    fn threads_never_hold_a_key_together() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let t = Arc::new(table());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4u32)
            .map(|n| {
                let (t, inside) = (t.clone(), inside.clone());
                std::thread::spawn(move || {
                    let opt = format!("t{n}");
                    for _ in 0..2_000 {
                        let out = t.acquire(&7, req(&opt, n, Conflict::Abort), 0);
                        if out.result.is_ok() {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            inside.fetch_sub(1, Ordering::SeqCst);
                            t.release(&7, &opt, 0).result.unwrap();
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(t.is_empty());
        t.check_invariants(0).unwrap();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire {
            key: u8,
            owner: u32,
            conflict: u8,
            wait: u8,
        },
        Release {
            key: u8,
            owner: u32,
        },
        Cancel {
            key: u8,
            nth: u8,
        },
        Down {
            owner: u32,
        },
        Progress {
            owner: u32,
            iteration: u8,
        },
        Tick {
            ms: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, 0..6u32, 0..3u8, 0..40u8).prop_map(|(key, owner, conflict, wait)| {
                Op::Acquire { key, owner, conflict, wait }
            }),
            3 => (0..3u8, 0..6u32).prop_map(|(key, owner)| Op::Release { key, owner }),
            1 => (0..3u8, 0..8u8).prop_map(|(key, nth)| Op::Cancel { key, nth }),
            1 => (0..6u32).prop_map(|owner| Op::Down { owner }),
            1 => (0..6u32, 0..20u8).prop_map(|(owner, iteration)| Op::Progress { owner, iteration }),
            2 => (0..30u8).prop_map(|ms| Op::Tick { ms }),
        ]
    }

    /// One optimizer per owner keeps the model simple: optimizer `o{n}`.
    fn opt(owner: u32) -> String {
        format!("o{owner}")
    }

    /// What the table should look like, from the outside.
    #[derive(Default)]
    struct Model {
        now: u64,
        last_token: HashMap<u8, u64>,
        /// Per key, queued (waiter id, owner, deadline) in queue order.
        queued: HashMap<u8, Vec<(u64, u32, u64, bool)>>,
        holders: HashMap<u8, u32>,
    }

    impl Model {
        fn granted(&mut self, key: u8, owner: u32, token: u64) -> Result<(), TestCaseError> {
            let last = self.last_token.entry(key).or_insert(0);
            prop_assert!(token > *last, "token {} after {}", token, last);
            *last = token;
            prop_assert!(self.holders.insert(key, owner).is_none(), "two holders");
            Ok(())
        }

        fn apply(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
            self.apply_ended(fx)?;
            self.apply_grants(fx)
        }

        fn apply_ended(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
            for e in &fx.ended {
                prop_assert_eq!(self.holders.remove(&e.key), Some(e.owner));
            }
            Ok(())
        }

        fn apply_grants(&mut self, fx: &Effects<u8, u32>) -> Result<(), TestCaseError> {
            for g in &fx.grants {
                let q = self.queued.entry(g.key).or_default();
                let pos = q.iter().position(|w| w.0 == g.waiter);
                prop_assert!(pos.is_some(), "granted a waiter that is not queued");
                let pos = pos.unwrap_or_default();
                if g.preempted.is_some() {
                    // A preemption goes to the first live preempter.
                    prop_assert!(q[pos].3);
                    for w in &q[..pos] {
                        prop_assert!(!w.3 || w.2 <= self.now, "preempter {} skipped", w.0);
                    }
                    q.remove(pos);
                } else {
                    // FIFO: a waiter ahead of the granted one may only have
                    // been skipped because its deadline passed.
                    for w in &q[..pos] {
                        prop_assert!(w.2 <= self.now, "live waiter {} skipped", w.0);
                    }
                    q.drain(..=pos);
                }
                self.granted(g.key, g.owner, g.token)?;
            }
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 1..150)) {
            let t = LockTable::<u8, u32>::new(LockConfig { lease_ms: 60, preempt_after: 10 });
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Acquire { key, owner, conflict, wait } => {
                        let conflict = [Conflict::Wait, Conflict::Abort, Conflict::Preempt][conflict as usize];
                        let mut r = req(&opt(owner), owner, conflict);
                        r.wait_ms = wait as u64;
                        let out = t.acquire(&key, r, m.now);
                        m.apply(&out.effects)?;
                        match out.result {
                            Ok(Acquired::Granted { token, .. }) | Ok(Acquired::Preempted { token, .. }) => {
                                m.granted(key, owner, token)?;
                            }
                            Ok(Acquired::AlreadyHeld { .. }) => {
                                prop_assert_eq!(m.holders.get(&key), Some(&owner));
                            }
                            Ok(Acquired::Queued { waiter, .. }) => {
                                let deadline = m.now + wait as u64;
                                let preempts = conflict == Conflict::Preempt;
                                m.queued.entry(key).or_default().push((waiter, owner, deadline, preempts));
                            }
                            Err(Error::LockHeldBy(h)) => {
                                prop_assert_eq!(Some(h), m.holders.get(&key).map(|o| opt(*o)));
                            }
                            Err(e) => prop_assert!(false, "unexpected {:?}", e),
                        }
                    }
                    Op::Release { key, owner } => {
                        let out = t.release(&key, &opt(owner), m.now);
                        // A lease that passed ends first, then the release.
                        m.apply_ended(&out.effects)?;
                        let held = m.holders.get(&key) == Some(&owner);
                        prop_assert_eq!(out.result.is_ok(), held);
                        if let Ok(r) = &out.result {
                            prop_assert_eq!(&*r.optimizer, opt(owner));
                            prop_assert_eq!(Some(r.token), m.last_token.get(&key).copied());
                            m.holders.remove(&key);
                        }
                        m.apply_grants(&out.effects)?;
                    }
                    Op::Cancel { key, nth } => {
                        let q = m.queued.entry(key).or_default();
                        if !q.is_empty() {
                            let (id, owner, deadline, _) = q[nth as usize % q.len()];
                            match t.cancel(&key, id) {
                                Cancelled::Removed(o) => {
                                    prop_assert_eq!(o, owner);
                                    q.retain(|w| w.0 != id);
                                }
                                Cancelled::Granted { .. } => prop_assert!(false, "granted but still queued"),
                                Cancelled::Gone => prop_assert!(deadline <= m.now),
                            }
                        }
                    }
                    Op::Down { owner } => {
                        let fx = t.owner_down(&owner, m.now);
                        for q in m.queued.values_mut() {
                            q.retain(|w| w.1 != owner);
                        }
                        m.apply(&fx)?;
                        prop_assert!(m.holders.values().all(|o| *o != owner));
                    }
                    Op::Progress { owner, iteration } => {
                        let out = t.report_progress(&opt(owner), iteration as u64, Value::Nil, Value::Nil, m.now);
                        prop_assert_eq!(out.result.is_ok(), m.holders.values().any(|o| *o == owner));
                        m.apply(&out.effects)?;
                    }
                    Op::Tick { ms } => {
                        m.now += ms as u64;
                        let fx = t.expire(m.now);
                        m.apply(&fx)?;
                        let now = m.now;
                        for q in m.queued.values_mut() {
                            q.retain(|w| w.2 > now);
                        }
                    }
                }
                if let Err(e) = t.check_invariants(m.now) {
                    prop_assert!(false, "{}", e);
                }
                for (key, owner) in &m.holders {
                    prop_assert_eq!(t.info(key, m.now).map(|i| i.owner), Some(*owner));
                }
            }
        }
    }
}
