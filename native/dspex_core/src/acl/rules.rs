//! Compiling access rules: the shape Elixir writes, validated once, into
//! [`Rule`]s (a [`Pattern`], a [`PermSet`], [`Conditions`]), and back to
//! their canonical form.
//!
//! Dependencies point one way: [`super::eval`] and [`super`] (the
//! compiled [`super::Acl`]) use this module; it uses only
//! [`crate::permission`], [`crate::glob`], [`crate::value`] and
//! [`crate::error`], never a session, a caller or a variable.

use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::permission::{PermSet, Permission};
use crate::value::Value;

/// Rules on one variable.
pub const MAX_RULES: usize = 64;
/// Conditions in one rule.
pub const MAX_CONDITIONS: usize = 16;
/// Bytes of one session pattern.
pub const MAX_PATTERN_BYTES: usize = 255;
/// Heap bytes of a whole rule list as given.
pub const MAX_RULES_BYTES: usize = 64 * 1024;

/// Who a rule is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(Box<str>),
    Glob(Glob),
}

impl Pattern {
    pub fn new(pattern: &str) -> Pattern {
        let glob = Glob::new(pattern);
        if glob.is_literal() {
            Pattern::Exact(pattern.into())
        } else {
            Pattern::Glob(glob)
        }
    }

    /// `:any`, or a glob of stars only.
    pub fn matches_everyone(&self) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(_) => false,
            Pattern::Glob(g) => g.as_str().chars().all(|c| c == '*'),
        }
    }

    pub fn matches(&self, principal: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => **s == *principal,
            Pattern::Glob(g) => g.matches(principal),
        }
    }
}

/// `(key, expected)` pairs; each key a non-empty atom or string, kept in
/// the form it was given (a string key never becomes an atom: rules are
/// data, and atoms made from data would fill the VM's atom table).
pub type Conditions = Box<[(Value, Value)]>;

/// A rule's compilation result: the reason it is invalid on error.
type Checked<T> = std::result::Result<T, Value>;

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: Pattern,
    pub permissions: PermSet,
    pub conditions: Conditions,
}

/// A string session pattern's bounds: non-empty, at most
/// [`MAX_PATTERN_BYTES`].
pub fn valid_pattern(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PATTERN_BYTES
}

/// A rule's conditions as given (`nil` or a map of at most
/// [`MAX_CONDITIONS`] pairs with non-empty atom or string keys), or `None`
/// when malformed: what compiling accepts.
pub fn conditions_of(v: &Value) -> Option<Conditions> {
    compile_conditions(v).ok()
}

/// The permissions a rule lists, each name parsed by `parse` (`None` for
/// a name that is not a permission, which makes the list malformed).
pub fn permissions_of<T>(
    names: impl IntoIterator<Item = T>,
    parse: impl Fn(&T) -> Option<Permission>,
) -> std::result::Result<PermSet, T> {
    names
        .into_iter()
        .try_fold(PermSet::EMPTY, |set, name| match parse(&name) {
            Some(p) => Ok(set.with(p)),
            None => Err(name),
        })
}

/// Checks `rules` without keeping them: `Ok` or the reason they are invalid.
pub fn validate(rules: &Value) -> Result<()> {
    compile(rules).map(drop)
}

pub(super) fn owner_of(metadata: &Value) -> Option<Box<str>> {
    ["owner_session", "created_by"]
        .iter()
        .find_map(|k| metadata.get(k).and_then(Value::as_text))
        .filter(|s| !s.is_empty())
        .map(Into::into)
}

fn invalid(detail: Value) -> Error {
    Error::InvalidRules(detail)
}

/// `{:invalid_rules, {index, reason}}`.
fn invalid_at(index: usize, reason: Value) -> Error {
    invalid(Value::Tuple(vec![Value::Int(index as i64), reason].into()))
}

pub(super) fn compile(rules: &Value) -> Result<Vec<Rule>> {
    let list = match rules {
        Value::Nil => return Ok(Vec::new()),
        Value::List(xs) => xs,
        _ => return Err(invalid(Value::atom("not_a_list"))),
    };
    if list.len() > MAX_RULES {
        return Err(invalid(Value::tagged(
            "too_many_rules",
            Value::Int(MAX_RULES as i64),
        )));
    }
    if rules.heap_size() > MAX_RULES_BYTES {
        return Err(invalid(Value::tagged(
            "too_large",
            Value::Int(MAX_RULES_BYTES as i64),
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(rule).map_err(|reason| invalid_at(i, reason)))
        .collect()
}

/// One rule, or the reason it is invalid.
fn compile_rule(rule: &Value) -> Checked<Rule> {
    let Value::Map(pairs) = rule else {
        return Err(Value::atom("not_a_map"));
    };
    let (mut pattern, mut permissions, mut conditions) = (None, None, None);
    for (key, value) in pairs.iter() {
        match key.as_text() {
            Some("session_pattern") => pattern = Some(compile_pattern(value)?),
            Some("permissions") => permissions = Some(compile_permissions(value)?),
            Some("conditions") => conditions = Some(compile_conditions(value)?),
            _ => return Err(Value::tagged("unknown_key", key.clone())),
        }
    }
    Ok(Rule {
        pattern: pattern.ok_or_else(|| Value::atom("missing_session_pattern"))?,
        permissions: permissions.ok_or_else(|| Value::atom("missing_permissions"))?,
        conditions: conditions.unwrap_or_default(),
    })
}

fn compile_pattern(v: &Value) -> Checked<Pattern> {
    match v {
        Value::Atom(a) if &**a == "any" => Ok(Pattern::Any),
        Value::Str(s) if valid_pattern(s) => Ok(Pattern::new(s)),
        _ => Err(Value::tagged("invalid_session_pattern", v.clone())),
    }
}

fn compile_permissions(v: &Value) -> Checked<PermSet> {
    let Value::List(names) = v else {
        return Err(Value::tagged("permissions_not_a_list", v.clone()));
    };
    permissions_of(names.iter(), |name| {
        name.as_text().and_then(|n| Permission::parse(n).ok())
    })
    .map_err(|name| Value::tagged("invalid_permission", name.clone()))
}

fn compile_conditions(v: &Value) -> Checked<Conditions> {
    let pairs = match v {
        Value::Nil => return Ok(Box::new([])),
        Value::Map(pairs) if pairs.len() <= MAX_CONDITIONS => pairs,
        Value::Map(_) => {
            return Err(Value::tagged(
                "too_many_conditions",
                Value::Int(MAX_CONDITIONS as i64),
            ))
        }
        _ => return Err(Value::tagged("conditions_not_a_map", v.clone())),
    };
    pairs
        .iter()
        .map(|(k, expected)| match k.as_text() {
            Some(key) if !key.is_empty() => Ok((k.clone(), expected.clone())),
            _ => Err(Value::tagged("invalid_condition_key", k.clone())),
        })
        .collect()
}

/// A rule in canonical form: atom keys, permissions in a fixed order,
/// condition keys as given (atoms stay atoms, strings stay strings).
pub(super) fn rule_source(rule: &Rule) -> Value {
    let pattern = match &rule.pattern {
        Pattern::Any => Value::atom("any"),
        Pattern::Exact(s) => Value::Str(s.clone()),
        Pattern::Glob(g) => Value::str(g.as_str()),
    };
    let permissions = rule
        .permissions
        .iter()
        .map(|p| Value::atom(p.name()))
        .collect();
    let conditions = rule
        .conditions
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Map(
        vec![
            (Value::atom("session_pattern"), pattern),
            (Value::atom("permissions"), Value::List(permissions)),
            (Value::atom("conditions"), Value::Map(conditions)),
        ]
        .into(),
    )
}
