//! What a caller may do with a variable: the four permissions and a set of
//! them. The leaf of the access-control modules.
//!
//! Dependencies point away from here: [`crate::acl`], [`crate::caller`],
//! [`crate::audit`] and [`crate::session`] use this module; it uses only
//! [`crate::error`] and [`crate::value`].

use crate::error::{Error, Result};
use crate::value::Value;

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

/// A set of permissions, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PermSet(u8);

impl PermSet {
    pub const EMPTY: PermSet = PermSet(0);
    pub const ALL: PermSet = PermSet(0b1111);

    fn bit(p: Permission) -> u8 {
        1 << p as u8
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & Self::bit(p) != 0
    }

    pub fn with(self, p: Permission) -> PermSet {
        PermSet(self.0 | Self::bit(p))
    }

    pub fn union(self, other: PermSet) -> PermSet {
        PermSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |&p| self.contains(p))
    }
}
