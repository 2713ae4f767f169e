//! Evaluating access rules: the one semantics of "does this rule grant
//! `perm` to `principal` in this context", whether the rule was compiled
//! ([`Rule`]) or is read where it lies through a [`RuleView`] (the NIF walks
//! `AccessControl.check_permission/4`'s map in place).
//!
//! Dependencies point one way: [`super`] (the compiled [`super::Acl`])
//! and the NIF use this module; it uses [`super::rules`],
//! [`crate::permission`], [`crate::glob`] and [`crate::value`] only.

use std::borrow::{Borrow, Cow};

use super::rules::{valid_pattern, Pattern, Rule, MAX_RULES};
use crate::permission::{PermSet, Permission};
use crate::value::Value;

/// A session pattern as a rule holds it: compiled, or text not compiled
/// beforehand.
#[derive(Clone, Copy, Debug)]
pub enum PatternRef<'a> {
    Any,
    Compiled(&'a Pattern),
    /// A string pattern; one that is empty or longer than
    /// [`MAX_PATTERN_BYTES`](super::MAX_PATTERN_BYTES) is malformed and matches no one.
    Text(&'a str),
}

impl PatternRef<'_> {
    pub fn matches(self, principal: &str) -> bool {
        match self {
            PatternRef::Any => true,
            PatternRef::Compiled(p) => p.matches(principal),
            PatternRef::Text(p) => valid_pattern(p) && crate::glob::matches(p, principal),
        }
    }
}

/// What a condition finds under its key in the caller's context.
#[derive(Clone, Debug)]
pub enum Actual<V> {
    /// No such key (or no context): compared as `nil`.
    Missing,
    Value(V),
    /// A value that cannot be read as a [`Value`] (a pid, say): equal to
    /// no condition.
    Opaque,
}

/// A rule read where it lies, each part when [`rule_grants`] asks for it
/// (pattern, then permissions, then conditions). `None` is a part that is
/// missing or malformed: such a rule grants nothing.
pub trait RuleView<'a> {
    fn pattern(&self) -> Option<PatternRef<'a>>;
    fn permissions(&self) -> Option<PermSet>;
    /// The `(key, expected)` pairs, empty when the rule has none; see
    /// [`conditions_of`](super::conditions_of).
    fn conditions(&self) -> Option<Cow<'a, [(Value, Value)]>>;
}

impl<'a> RuleView<'a> for &'a Rule {
    fn pattern(&self) -> Option<PatternRef<'a>> {
        Some(match &self.pattern {
            Pattern::Any => PatternRef::Any,
            p => PatternRef::Compiled(p),
        })
    }
    fn permissions(&self) -> Option<PermSet> {
        Some(self.permissions)
    }
    fn conditions(&self) -> Option<Cow<'a, [(Value, Value)]>> {
        Some(Cow::Borrowed(&self.conditions))
    }
}

/// The rule semantics: `rule` grants `perm` to `principal` when its
/// pattern matches, it lists `perm`, and every condition holds against
/// `context` (a key's value by the key's text, see [`conditions_hold`]).
pub fn rule_grants<'a, V: Borrow<Value>>(
    rule: &impl RuleView<'a>,
    principal: &str,
    perm: Permission,
    context: &mut impl FnMut(&str) -> Actual<V>,
) -> bool {
    rule.pattern().is_some_and(|p| p.matches(principal))
        && rule.permissions().is_some_and(|ps| ps.contains(perm))
        && rule
            .conditions()
            .is_some_and(|cs| conditions_hold(&cs, context))
}

/// The decision on rules that are not compiled: `principal` is the owner,
/// or one of the first [`MAX_RULES`] rules grants `perm`
/// ([`rule_grants`]). The hosting session's own access is the caller's
/// business ([`authorize`](super::authorize)).
pub fn grants<'a, R: RuleView<'a>, V: Borrow<Value>>(
    owner: Option<&str>,
    principal: &str,
    perm: Permission,
    rules: impl IntoIterator<Item = R>,
    mut context: impl FnMut(&str) -> Actual<V>,
) -> bool {
    owner == Some(principal)
        || rules
            .into_iter()
            .take(MAX_RULES)
            .any(|r| rule_grants(&r, principal, perm, &mut context))
}

/// Every condition equals (Elixir's `==`, see [`loose_eq`]) what `context`
/// finds under its key's text; a missing key is `nil`.
pub fn conditions_hold<V: Borrow<Value>>(
    conditions: &[(Value, Value)],
    context: &mut impl FnMut(&str) -> Actual<V>,
) -> bool {
    conditions.iter().all(|(key, expected)| {
        match key.as_text().map_or(Actual::Missing, &mut *context) {
            Actual::Missing => loose_eq(&Value::Nil, expected),
            Actual::Value(actual) => loose_eq(actual.borrow(), expected),
            Actual::Opaque => false,
        }
    })
}

/// `context`'s value under `key` (an atom or a string key), for
/// [`conditions_hold`].
pub(super) fn lookup<'c>(context: Option<&'c Value>, key: &str) -> Actual<&'c Value> {
    context
        .and_then(|c| c.get(key))
        .map_or(Actual::Missing, Actual::Value)
}

/// Elixir's `==`: numbers compare by value (`1 == 1.0`), also inside lists,
/// tuples and map values; map keys compare exactly.
pub fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(i), Value::Float(f)) | (Value::Float(f), Value::Int(i)) => *i as f64 == *f,
        (Value::List(xs), Value::List(ys)) | (Value::Tuple(xs), Value::Tuple(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys.iter()).all(|(x, y)| loose_eq(x, y))
        }
        (Value::Map(xs), Value::Map(ys)) => {
            xs.len() == ys.len()
                && xs.iter().all(|(k, x)| {
                    ys.iter()
                        .find(|(k2, _)| k2 == k)
                        .is_some_and(|(_, y)| loose_eq(x, y))
                })
        }
        _ => a == b,
    }
}
