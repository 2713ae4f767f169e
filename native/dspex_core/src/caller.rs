//! Who a call is made for, and when. Every session operation takes a
//! [`Caller`] and checks it against the variable before touching it.
//!
//! The time of a call travels in the caller (`now_us`), stamped once by the
//! entry point (the NIF, the port's frame loop, a replicated log entry):
//! nothing below reads the clock, so applying the same calls with the same
//! stamps to two stores gives the same state.
//!
//! Dependencies point one way: a caller uses [`crate::acl`] (the
//! variable-level check), [`crate::permission`], [`crate::variable`] and
//! [`crate::locks`]; none of them uses a caller. [`crate::session`] uses
//! this module.

use crate::acl;
use crate::error::Result;
use crate::locks::LockClaim;
use crate::permission::Permission;
use crate::value::Value;
use crate::variable::Variable;

/// The principal a call is made on behalf of, the context its access
/// rules are evaluated in, and the time it was stamped with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    /// The calling session's id; `None` means the session itself.
    pub principal: Option<&'a str>,
    /// Compared against rule conditions.
    pub context: Option<&'a Value>,
    /// The optimizer lock a write claims to hold (checked on writes).
    pub lock: LockClaim<'a>,
    /// Microseconds since the epoch, stamped at the entry point: the time
    /// of every timestamp, rate-limit refill and expiry check of the call.
    pub now_us: i64,
}

impl<'a> Caller<'a> {
    /// The session acting on its own variables, at `now_us`.
    pub const fn owner(now_us: i64) -> Caller<'static> {
        Caller {
            principal: None,
            context: None,
            lock: LockClaim {
                token: None,
                optimizer: None,
            },
            now_us,
        }
    }

    /// Another session acting, at `now_us`.
    pub fn principal(principal: &'a str, now_us: i64) -> Self {
        Caller {
            principal: Some(principal),
            now_us,
            ..Caller::owner(now_us)
        }
    }

    /// May this caller, in session `session_id`, do `perm` on `var`?
    /// A session has every permission on its own variables, and so does the
    /// variable's owner; any other principal only what the variable's access
    /// rules grant it (see [`crate::acl`]). Sessions are isolated by default.
    pub fn authorize(&self, session_id: &str, var: &Variable, perm: Permission) -> Result<()> {
        acl::authorize(
            self.principal,
            session_id,
            var.acl.as_deref(),
            perm,
            self.context,
        )
    }

    /// Does this caller act as the variable's owner (who may change its rules)?
    pub fn is_owner(&self, session_id: &str, var: &Variable) -> bool {
        acl::is_owner(self.principal, session_id, var.acl.as_deref())
    }
}
