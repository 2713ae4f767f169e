//! Argument checks shared by several operations, so each rule is written
//! once whichever transport decoded the argument.

use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::locks::LockClaim;
use crate::permission::Permission;
use crate::value::Value;

/// Who a command acts for: `principal` (nil: the session itself), the
/// `context` its access rules are evaluated in, and, on writes, the
/// optimizer lock it claims to hold.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Actor {
    pub principal: Option<String>,
    pub context: Option<Value>,
    pub lock_token: Option<u64>,
    pub optimizer_id: Option<String>,
}

impl Actor {
    /// The owned form of a caller (for a command built from terms).
    pub fn of(caller: &Caller) -> Actor {
        Actor {
            principal: caller.principal.map(Into::into),
            context: caller.context.cloned(),
            lock_token: caller.lock.token,
            optimizer_id: caller.lock.optimizer.map(Into::into),
        }
    }

    /// The core's view of the actor at `now_us`.
    pub fn caller(&self, now_us: i64) -> Caller<'_> {
        Caller {
            principal: self.principal.as_deref(),
            context: self.context.as_ref(),
            lock: LockClaim {
                token: self.lock_token,
                optimizer: self.optimizer_id.as_deref(),
            },
            now_us,
        }
    }
}

/// A permission named by an atom or a string.
pub fn permission_of(v: &Value) -> Result<Permission> {
    v.as_text()
        .and_then(|name| Permission::parse(name).ok())
        .ok_or_else(|| Error::invalid_arg("unknown_permission"))
}

/// The lookup text of a name or id. A binary that is not UTF-8 cannot name
/// anything; anything but an atom or a binary is a caller's mistake.
pub fn ident_text(v: &Value) -> Result<&str> {
    match v {
        Value::Atom(s) | Value::Str(s) => Ok(s),
        Value::Bytes(_) => Err(Error::NotFound),
        _ => Err(Error::invalid_arg("name_must_be_atom_or_string")),
    }
}

/// Metadata is a map; `nil` means none.
pub fn metadata_map(v: Value) -> Result<Value> {
    match v {
        Value::Nil => Ok(Value::empty_map()),
        m @ Value::Map(_) => Ok(m),
        _ => Err(Error::invalid_arg("metadata_must_be_a_map")),
    }
}

/// A history or audit limit: none is everything.
pub fn limit_of(limit: Option<u64>) -> usize {
    limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Does `name` match the optional anchored glob?
pub fn name_matches(glob: &Option<Glob>, name: &Value) -> bool {
    match (glob, name.as_text()) {
        (None, _) => true,
        (Some(g), Some(text)) => g.matches(text),
        (Some(_), None) => false,
    }
}
