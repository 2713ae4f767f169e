//! Who a call is made for. Every session operation takes a [`Caller`] and
//! checks it against the variable before touching it.

use crate::error::{Error, Result};
use crate::locks::LockClaim;
use crate::value::Value;
use crate::variable::Variable;

/// What a caller wants to do with a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    Read,
    Write,
    Observe,
    Optimize,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Write,
        Permission::Observe,
        Permission::Optimize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Observe => "observe",
            Permission::Optimize => "optimize",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(Value::tagged("unknown_permission", Value::str(name)))
            })
    }
}

/// The principal a call is made on behalf of, and the context its access
/// rules are evaluated in.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    /// The calling session's id; `None` means the session itself.
    pub principal: Option<&'a str>,
    /// Compared against rule conditions.
    pub context: Option<&'a Value>,
    /// The optimizer lock a write claims to hold (checked on writes).
    pub lock: LockClaim<'a>,
}

impl<'a> Caller<'a> {
    /// The session acting on its own variables.
    pub const OWNER: Caller<'static> = Caller {
        principal: None,
        context: None,
        lock: LockClaim {
            token: None,
            optimizer: None,
        },
    };

    pub fn principal(principal: &'a str) -> Self {
        Caller {
            principal: Some(principal),
            context: None,
            lock: LockClaim::default(),
        }
    }

    /// May this caller, in session `session_id`, do `perm` on `var`?
    /// A session has every permission on its own variables; any other
    /// principal is denied (sessions are isolated).
    pub fn authorize(&self, session_id: &str, _var: &Variable, _perm: Permission) -> Result<()> {
        match self.principal {
            None => Ok(()),
            Some(p) if p == session_id => Ok(()),
            Some(_) => Err(Error::AccessDenied),
        }
    }
}
