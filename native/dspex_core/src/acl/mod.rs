//! Access control for variables: rules compiled once, checked on every call.
//!
//! A rule, as Elixir writes it, is
//! `%{session_pattern: :any | "glob", permissions: [perm], conditions: %{key => value}}`
//! (`conditions` optional). A principal may do `perm` on a variable when it
//! is the hosting session, the variable's owner (`metadata.owner_session`,
//! else `metadata.created_by`), or when some rule matches: its pattern
//! matches the principal, it lists `perm`, and every condition equals the
//! value under the same key in the caller's context. Nothing else is allowed.
//!
//! Invariants (unit and property tests below):
//! - Default deny: no rule, no owner match, no permission.
//! - Patterns are anchored globs: `*` any run, `?` one character, every other
//!   character (regex metacharacters included) only itself. `"admin_*"` does
//!   not match `"not_admin_1"`.
//! - The decision cache never changes a decision: a cached answer equals a
//!   fresh evaluation of the rules (checked against a reference evaluator).
//!   Rules are immutable once compiled, so replacing a variable's rules
//!   replaces its cache: a rule change can never see a stale decision.
//! - The cache is bounded: at most 64 principals per variable, cleared
//!   when full, so hostile callers cannot grow it. (A cached decision over
//!   10 rules costs about 30 ns; matching the 10 patterns again, even simple
//!   `prefix*` ones, about 130 ns.)
//! - Compiling never panics and rejects anything that is not a list of
//!   well-formed rules with a matchable `{:invalid_rules, detail}` reason.
//!
//! One evaluation semantics: a rule grants `perm` to `principal` when
//! [`rule_grants`] says so, whether the rule was compiled ([`Rule`], inside
//! the store) or is read where it lies through a [`RuleView`] (the NIF
//! walks `AccessControl.check_permission/4`'s map in place). The compiled
//! [`Acl`] only adds its split and its cache, checked against a reference
//! evaluator and against [`grants`] over the same rules.
//!
//! Session-level operations (the session's information, diagnostics,
//! snapshot and audit log, its deletion) have no variable and so no rules:
//! [`Session::authorize_session`](crate::session::Session::authorize_session)
//! reserves them to the session itself and audits a refusal without a
//! variable, as a refused registration is. It lives on the session's side,
//! so nothing here knows a session.
//!
//! Layout; each arrow reads "is used by", and none points back, so there is
//! no cycle among acl, caller, session and variable:
//!
//! `permission` -> [`rules`] -> [`eval`] -> `acl` (this module) ->
//! `variable` -> `caller` -> `session`
//!
//! - [`crate::permission`]: `Permission` and `PermSet`, the leaf;
//! - [`rules`]: compiling and validating rules;
//! - [`eval`]: evaluating them, compiled or read in place;
//! - this module: the per-variable [`Acl`] with its decision cache, and the
//!   variable-level checks [`authorize`] and [`is_owner`], which know the
//!   `Acl` and a session's id, not the session.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::permission::{PermSet, Permission};
use crate::value::Value;

pub mod eval;
pub mod rules;
#[cfg(test)]
mod tests;

pub use eval::{conditions_hold, grants, loose_eq, rule_grants, Actual, PatternRef, RuleView};
pub use rules::{
    conditions_of, permissions_of, valid_pattern, validate, Conditions, Pattern, Rule,
    MAX_CONDITIONS, MAX_PATTERN_BYTES, MAX_RULES, MAX_RULES_BYTES,
};

use eval::lookup;
use rules::{compile, owner_of, rule_source};

/// Bytes of a principal (a session id).
pub const MAX_PRINCIPAL_BYTES: usize = 255;
/// Principals whose decisions one variable remembers; the cache starts over
/// when full, so it stays bounded whatever callers do.
const CACHE_CAPACITY: usize = 64;

/// The compiled access rules and owner of one variable.
#[derive(Debug)]
pub struct Acl {
    /// `metadata.owner_session`, else `metadata.created_by`.
    owner: Option<Box<str>>,
    /// What unconditional `:any` rules grant everyone.
    everyone: PermSet,
    /// Unconditional rules with a real pattern (their decisions are cached).
    rules: Box<[Rule]>,
    /// Rules with conditions, evaluated against each call's context.
    conditional: Box<[Rule]>,
    /// The rules in canonical form, handed back to Elixir and exported.
    source: Value,
    /// Principal -> what the unconditional rules grant it.
    cache: Mutex<HashMap<Box<str>, PermSet, ahash::RandomState>>,
}

impl Acl {
    /// Compiles `rules` (a list of rule maps, or nil for none) for a variable
    /// with `metadata`. `None` when there is neither a rule nor an owner:
    /// only the hosting session may touch such a variable.
    pub fn build(rules: &Value, metadata: &Value) -> Result<Option<Acl>> {
        let compiled = compile(rules)?;
        let owner = owner_of(metadata);
        if compiled.is_empty() && owner.is_none() {
            return Ok(None);
        }
        let source = Value::List(compiled.iter().map(rule_source).collect());
        let mut everyone = PermSet::EMPTY;
        let (mut rules, mut conditional) = (Vec::new(), Vec::new());
        for rule in compiled {
            if !rule.conditions.is_empty() {
                conditional.push(rule);
            } else if rule.pattern.matches_everyone() {
                everyone = everyone.union(rule.permissions);
            } else if !rule.permissions.is_empty() {
                rules.push(rule);
            }
        }
        Ok(Some(Acl {
            owner,
            everyone,
            rules: rules.into(),
            conditional: conditional.into(),
            source,
            cache: Mutex::new(HashMap::default()),
        }))
    }

    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The rules in canonical form: a list of
    /// `%{session_pattern:, permissions:, conditions:}` maps with atom keys.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// May `principal` (not the hosting session) do `perm`?
    pub fn permits(&self, principal: &str, perm: Permission, context: Option<&Value>) -> bool {
        if self.owner.as_deref() == Some(principal) || self.everyone.contains(perm) {
            return true;
        }
        if self.rules.iter().any(|r| r.permissions.contains(perm))
            && self.granted(principal).contains(perm)
        {
            return true;
        }
        self.conditional
            .iter()
            .any(|r| rule_grants(&r, principal, perm, &mut |k| lookup(context, k)))
    }

    /// What the unconditional rules grant `principal`, from the cache when
    /// it has been asked before.
    fn granted(&self, principal: &str) -> PermSet {
        let mut cache = self.cache.lock();
        if let Some(&set) = cache.get(principal) {
            return set;
        }
        let set = self
            .rules
            .iter()
            .filter(|r| r.pattern.matches(principal))
            .fold(PermSet::EMPTY, |acc, r| acc.union(r.permissions));
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(principal.into(), set);
        set
    }

    /// Principals with a cached decision (for tests and diagnostics).
    pub fn cached_decisions(&self) -> usize {
        self.cache.lock().len()
    }
}

/// Does `principal` act as the owner: no principal (the session itself),
/// the hosting session, or the variable's owner?
pub fn is_owner(principal: Option<&str>, session_id: &str, acl: Option<&Acl>) -> bool {
    match principal {
        None => true,
        Some(p) => p == session_id || acl.and_then(Acl::owner) == Some(p),
    }
}

/// The check every operation makes: `Ok` or `AccessDenied`.
pub fn authorize(
    principal: Option<&str>,
    session_id: &str,
    acl: Option<&Acl>,
    perm: Permission,
    context: Option<&Value>,
) -> Result<()> {
    match principal {
        None => Ok(()),
        Some(p) if p == session_id => Ok(()),
        Some(p) => match acl {
            Some(acl) if acl.permits(p, perm, context) => Ok(()),
            _ => Err(Error::AccessDenied),
        },
    }
}
