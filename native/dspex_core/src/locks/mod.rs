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
//! Invariants (checked after every step of the property test in `tests.rs`):
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
//!
//! Layout: [`table`] holds the lock table (grants, queues, leases, the
//! optimization registry); [`fence`] the variable's side of a lock, which
//! the table keeps in step ([`Fence`], [`VarLock`]); the types both share
//! live here.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::value::Value;

pub mod fence;
pub mod table;
#[cfg(test)]
mod tests;

pub use fence::{Fence, FenceChange, LockClaim, VarLock};
pub use table::LockTable;

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
