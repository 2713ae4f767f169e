//! The variable's side of an optimizer lock: what a write claims
//! ([`LockClaim`]), the variable's view of its lock ([`VarLock`]), kept in
//! step by the lock table through [`Fence`] or, across processes, by
//! [`FenceChange`]s.
//!
//! The lock table calls a [`Fence`] inside its own critical section, so a
//! variable sees grants and releases in token order. Lock order: the
//! table's mutex, then the variable's; the write path takes only the
//! variable's.

use super::OptimizerId;
use crate::error::{Error, Result};

/// Something that must follow a key's grants: the locked variable.
pub trait Fence: Send + Sync {
    /// `optimizer` now holds the lock with `token`; `preempted` lost it to it.
    fn granted(&self, optimizer: &OptimizerId, token: u64, preempted: Option<&OptimizerId>);
    /// The grant with `token` ended.
    fn released(&self, token: u64);
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
    /// The largest token whose grant has ended. A key's grants follow one
    /// another, so every grant up to it has ended too: a grant reported
    /// after its own release (two [`FenceChange`]s sent by different
    /// threads may arrive in either order) is not taken for a live one.
    pub released: u64,
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

    pub(crate) fn grant(
        &mut self,
        optimizer: &OptimizerId,
        token: u64,
        preempted: Option<&OptimizerId>,
    ) {
        if token >= self.fence {
            self.fence = token;
            if token <= self.released {
                // Released already: only the fence moves.
                self.holder = None;
                return;
            }
            self.holder = Some((optimizer.clone(), token));
            match preempted {
                Some(p) => self.preempted = Some(p.clone()),
                None if self.preempted.as_ref() == Some(optimizer) => self.preempted = None,
                None => {}
            }
        }
    }

    /// The grant with `token` ended; so did any older one still held here
    /// (its release may be on its way).
    pub(crate) fn release(&mut self, token: u64) {
        self.released = self.released.max(token);
        if self.holder.as_ref().is_some_and(|(_, t)| *t <= token) {
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
    /// fence changes nothing, so changes may arrive more than once, and a
    /// grant's release may arrive before the grant itself.
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn granted(token: u64) -> FenceChange {
        FenceChange::Granted {
            optimizer: format!("opt-{token}"),
            token,
            preempted: None,
        }
    }

    /// A key's grants one after another (tokens increasing), each released
    /// but perhaps the last: what the lock table reports, in its order.
    fn history(grants: usize, last_held: bool) -> Vec<FenceChange> {
        let mut out = Vec::new();
        for i in 1..=grants as u64 {
            out.push(granted(i * 3));
            if i < grants as u64 || !last_held {
                out.push(FenceChange::Released { token: i * 3 });
            }
        }
        out
    }

    fn applied<'a>(changes: impl IntoIterator<Item = &'a FenceChange>) -> VarLock {
        let mut lock = VarLock::default();
        for c in changes {
            lock.apply(c);
        }
        lock
    }

    #[test]
    fn a_release_before_its_grant_leaves_the_variable_unlocked() {
        let lock = applied(&[FenceChange::Released { token: 7 }, granted(7)]);
        assert_eq!(lock.holder, None);
        assert_eq!(lock.fence, 7);
        // The fence still stops the older token.
        assert_eq!(
            lock.admit(&LockClaim {
                token: Some(6),
                optimizer: None
            }),
            Err(Error::StaleLockToken)
        );
        assert_eq!(lock.admit(&LockClaim::default()), Ok(()));
    }

    proptest! {
        /// Changes sent by different threads may arrive in any order; the
        /// variable ends as if they had come in the table's order.
        #[test]
        fn any_arrival_order_ends_as_the_table_order(
            grants in 1usize..6,
            last_held in any::<bool>(),
            order in prop::collection::vec(any::<u32>(), 12),
        ) {
            let changes = history(grants, last_held);
            let in_order = applied(&changes);
            let mut shuffled: Vec<(u32, &FenceChange)> =
                order.iter().copied().zip(changes.iter()).collect();
            shuffled.sort_by_key(|(k, _)| *k);
            let any_order = applied(shuffled.iter().map(|(_, c)| *c));
            prop_assert_eq!(&any_order.holder, &in_order.holder);
            prop_assert_eq!(any_order.fence, in_order.fence);
        }
    }
}
