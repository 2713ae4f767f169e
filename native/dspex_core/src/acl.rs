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
//! Session-level operations (the session's information, diagnostics,
//! snapshot and audit log, its deletion) have no variable and so no rules:
//! [`authorize_session`] reserves them to the session itself and audits a
//! refusal without a variable, as a refused registration is.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::audit::AuditEvent;
use crate::caller::Permission;
use crate::error::{Error, Result};
use crate::glob::Glob;
use crate::session::Session;
use crate::value::Value;

/// Rules on one variable.
pub const MAX_RULES: usize = 64;
/// Conditions in one rule.
pub const MAX_CONDITIONS: usize = 16;
/// Bytes of one session pattern.
pub const MAX_PATTERN_BYTES: usize = 255;
/// Bytes of a principal (a session id).
pub const MAX_PRINCIPAL_BYTES: usize = 255;
/// Heap bytes of a whole rule list as given.
pub const MAX_RULES_BYTES: usize = 64 * 1024;
/// Principals whose decisions one variable remembers; the cache starts over
/// when full, so it stays bounded whatever callers do.
const CACHE_CAPACITY: usize = 64;

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

impl Rule {
    fn conditions_hold(&self, context: Option<&Value>) -> bool {
        self.conditions.iter().all(|(key, expected)| {
            let actual = context
                .zip(key.as_text())
                .and_then(|(c, key)| c.get(key))
                .unwrap_or(&Value::Nil);
            loose_eq(actual, expected)
        })
    }
}

/// Elixir's `==` on the values a condition compares: `1 == 1.0`.
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(i), Value::Float(f)) | (Value::Float(f), Value::Int(i)) => *i as f64 == *f,
        _ => a == b,
    }
}

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
        self.conditional.iter().any(|r| {
            r.permissions.contains(perm)
                && r.pattern.matches(principal)
                && r.conditions_hold(context)
        })
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

/// The check of a session-level operation: `Ok` for no principal (the
/// session itself) or the session naming itself; anyone else is refused
/// with `AccessDenied`, audited with `perm` and no variable. A principal that
/// is empty or longer than [`MAX_PRINCIPAL_BYTES`] is `bad_principal`.
pub fn authorize_session(
    session: &Session,
    principal: Option<&str>,
    perm: Permission,
    now_us: i64,
) -> Result<()> {
    match principal {
        None => Ok(()),
        Some(p) if p.is_empty() || p.len() > MAX_PRINCIPAL_BYTES => {
            Err(Error::invalid_arg("bad_principal"))
        }
        Some(p) if p == &*session.id => Ok(()),
        Some(p) => {
            session
                .audit_ring()
                .record(now_us, AuditEvent::Denied, Some(p), None, Some(perm));
            Err(Error::AccessDenied)
        }
    }
}

/// Checks `rules` without keeping them: `Ok` or the reason they are invalid.
pub fn validate(rules: &Value) -> Result<()> {
    compile(rules).map(drop)
}

fn owner_of(metadata: &Value) -> Option<Box<str>> {
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

fn compile(rules: &Value) -> Result<Vec<Rule>> {
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
        Value::Str(s) if !s.is_empty() && s.len() <= MAX_PATTERN_BYTES => Ok(Pattern::new(s)),
        _ => Err(Value::tagged("invalid_session_pattern", v.clone())),
    }
}

fn compile_permissions(v: &Value) -> Checked<PermSet> {
    let Value::List(names) = v else {
        return Err(Value::tagged("permissions_not_a_list", v.clone()));
    };
    names.iter().try_fold(PermSet::EMPTY, |set, name| {
        name.as_text()
            .and_then(|n| Permission::parse(n).ok())
            .map(|p| set.with(p))
            .ok_or_else(|| Value::tagged("invalid_permission", name.clone()))
    })
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
fn rule_source(rule: &Rule) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Permission::*;

    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::atom(k), v))
                .collect(),
        )
    }

    fn perms(ps: &[Permission]) -> Value {
        Value::List(ps.iter().map(|p| Value::atom(p.name())).collect())
    }

    fn rule(pattern: Value, ps: &[Permission]) -> Value {
        map(vec![
            ("session_pattern", pattern),
            ("permissions", perms(ps)),
        ])
    }

    fn rule_if(pattern: Value, ps: &[Permission], conditions: Vec<(&str, Value)>) -> Value {
        map(vec![
            ("session_pattern", pattern),
            ("permissions", perms(ps)),
            ("conditions", map(conditions)),
        ])
    }

    #[test]
    fn session_operations_are_reserved_to_the_session() {
        use crate::audit::AuditEvent;
        use crate::limits::Limits;
        use crate::session::SessionOpts;

        let s = Session::new("s1".into(), SessionOpts::default(), Limits::default(), 0);
        assert_eq!(authorize_session(&s, None, Read, 0), Ok(()));
        assert_eq!(authorize_session(&s, Some("s1"), Read, 0), Ok(()));
        assert!(s.audit_log(10).is_empty());

        assert_eq!(
            authorize_session(&s, Some("s10"), Read, 0),
            Err(Error::AccessDenied)
        );
        let long = "x".repeat(MAX_PRINCIPAL_BYTES + 1);
        for bad in ["", long.as_str()] {
            assert_eq!(
                authorize_session(&s, Some(bad), Read, 0),
                Err(Error::invalid_arg("bad_principal"))
            );
        }
        let log = s.audit_log(10);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].event, AuditEvent::Denied);
        assert_eq!(log[0].principal.as_deref(), Some("s10"));
        assert_eq!(log[0].variable, None);
        assert_eq!(log[0].permission, Some(Read));
    }

    /// The seed's variable: owned by "owner_session", readable by anyone,
    /// writable and optimizable by "admin_*".
    fn seed_acl() -> Acl {
        let rules = Value::List(
            vec![
                rule(Value::atom("any"), &[Read]),
                rule(Value::str("admin_*"), &[Read, Write, Optimize]),
            ]
            .into(),
        );
        let metadata = map(vec![("owner_session", Value::str("owner_session"))]);
        Acl::build(&rules, &metadata).unwrap().unwrap()
    }

    fn check(acl: &Acl, who: &str, perm: Permission) -> Result<()> {
        authorize(Some(who), "host", Some(acl), perm, None)
    }

    #[test]
    fn seed_cases() {
        let acl = seed_acl();
        for p in Permission::ALL {
            assert_eq!(check(&acl, "owner_session", p), Ok(()));
            assert_eq!(authorize(None, "host", Some(&acl), p, None), Ok(()));
            assert_eq!(authorize(Some("host"), "host", None, p, None), Ok(()));
        }
        assert_eq!(check(&acl, "other_session", Read), Ok(()));
        assert_eq!(
            check(&acl, "other_session", Write),
            Err(Error::AccessDenied)
        );
        assert_eq!(check(&acl, "admin_user", Write), Ok(()));
        assert_eq!(check(&acl, "admin_user", Optimize), Ok(()));
        assert_eq!(check(&acl, "admin_user", Observe), Err(Error::AccessDenied));
        assert_eq!(check(&acl, "not_admin_1", Write), Err(Error::AccessDenied));
    }

    #[test]
    fn default_deny() {
        assert_eq!(
            authorize(Some("x"), "host", None, Read, None),
            Err(Error::AccessDenied)
        );
        let acl = Acl::build(&Value::List(Box::new([])), &map(vec![])).unwrap();
        assert!(acl.is_none());
    }

    #[test]
    fn owner_falls_back_to_created_by() {
        let meta = map(vec![("created_by", Value::str("maker"))]);
        let acl = Acl::build(&Value::Nil, &meta).unwrap().unwrap();
        assert_eq!(check(&acl, "maker", Write), Ok(()));
        assert_eq!(check(&acl, "other", Read), Err(Error::AccessDenied));
        assert!(is_owner(Some("maker"), "host", Some(&acl)));
        assert!(is_owner(Some("host"), "host", Some(&acl)));
        assert!(!is_owner(Some("other"), "host", Some(&acl)));
    }

    #[test]
    fn wildcards_are_anchored_and_literal_otherwise() {
        let rules = Value::List(
            vec![
                rule(Value::str("a.b*"), &[Read]),
                rule(Value::str("x+y"), &[Write]),
                rule(Value::str("u?"), &[Observe]),
            ]
            .into(),
        );
        let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
        assert_eq!(check(&acl, "a.bc", Read), Ok(()));
        assert_eq!(check(&acl, "axbc", Read), Err(Error::AccessDenied));
        assert_eq!(check(&acl, "x+y", Write), Ok(()));
        assert_eq!(check(&acl, "xxy", Write), Err(Error::AccessDenied));
        assert_eq!(check(&acl, "u1", Observe), Ok(()));
        assert_eq!(check(&acl, "u", Observe), Err(Error::AccessDenied));
        assert_eq!(check(&acl, "u12", Observe), Err(Error::AccessDenied));
    }

    #[test]
    fn conditions_must_all_equal_the_context() {
        let rules = Value::List(
            vec![rule_if(
                Value::atom("any"),
                &[Write],
                vec![("role", Value::str("editor")), ("level", Value::Int(2))],
            )]
            .into(),
        );
        let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
        let ok = map(vec![
            ("role", Value::str("editor")),
            ("level", Value::Float(2.0)),
        ]);
        let wrong = map(vec![
            ("role", Value::str("editor")),
            ("level", Value::Int(3)),
        ]);
        let partial = map(vec![("role", Value::str("editor"))]);
        let at = |ctx: Option<&Value>| authorize(Some("s"), "host", Some(&acl), Write, ctx);
        assert_eq!(at(Some(&ok)), Ok(()));
        assert_eq!(at(Some(&wrong)), Err(Error::AccessDenied));
        assert_eq!(at(Some(&partial)), Err(Error::AccessDenied));
        assert_eq!(at(None), Err(Error::AccessDenied));
    }

    #[test]
    fn invalid_rules_say_why() {
        let reason = |rules: Value| match compile(&rules) {
            Err(Error::InvalidRules(d)) => d,
            other => panic!("expected invalid rules, got {other:?}"),
        };
        let at0 = |r: Value| Value::Tuple(vec![Value::Int(0), r].into());
        assert_eq!(reason(Value::Int(1)), Value::atom("not_a_list"));
        assert_eq!(
            reason(Value::List(vec![Value::Int(1)].into())),
            at0(Value::atom("not_a_map"))
        );
        assert_eq!(
            reason(Value::List(
                vec![rule(Value::atom("any"), &[]), map(vec![])].into()
            )),
            Value::Tuple(vec![Value::Int(1), Value::atom("missing_session_pattern")].into())
        );
        let bad_perm = map(vec![
            ("session_pattern", Value::atom("any")),
            (
                "permissions",
                Value::List(vec![Value::atom("invalid_perm")].into()),
            ),
        ]);
        assert_eq!(
            reason(Value::List(vec![bad_perm].into())),
            at0(Value::tagged(
                "invalid_permission",
                Value::atom("invalid_perm")
            ))
        );
        let typo = map(vec![
            ("session_pattern", Value::atom("any")),
            ("permission", perms(&[Read])),
        ]);
        assert_eq!(
            reason(Value::List(vec![typo].into())),
            at0(Value::tagged("unknown_key", Value::atom("permission")))
        );
        for pattern in [Value::str(""), Value::Int(3), Value::atom("all")] {
            let r = rule(pattern.clone(), &[Read]);
            assert_eq!(
                reason(Value::List(vec![r].into())),
                at0(Value::tagged("invalid_session_pattern", pattern))
            );
        }
        let many = Value::List(vec![rule(Value::atom("any"), &[Read]); MAX_RULES + 1].into());
        assert_eq!(
            reason(many),
            Value::tagged("too_many_rules", Value::Int(MAX_RULES as i64))
        );
        assert_eq!(validate(&Value::Nil), Ok(()));
    }

    #[test]
    fn source_is_canonical() {
        let rules = Value::List(
            vec![map(vec![
                ("permissions", perms(&[Write, Read, Write])),
                ("session_pattern", Value::str("a*")),
            ])]
            .into(),
        );
        let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
        assert_eq!(
            acl.source(),
            &Value::List(vec![rule_if(Value::str("a*"), &[Read, Write], vec![])].into())
        );
        // The canonical form compiles to the same thing.
        let again = Acl::build(acl.source(), &Value::Nil).unwrap().unwrap();
        assert_eq!(again.source(), acl.source());
    }

    #[test]
    fn decisions_are_cached_and_the_cache_is_bounded() {
        let rules = Value::List(vec![rule(Value::str("p*x?"), &[Read])].into());
        let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
        for i in 0..(3 * CACHE_CAPACITY) {
            assert!(acl.permits(&format!("p{i}xy"), Read, None));
            assert!(!acl.permits(&format!("p{i}"), Read, None));
            assert!((1..=CACHE_CAPACITY).contains(&acl.cached_decisions()));
        }
    }

    #[test]
    fn one_entry_per_principal_covers_every_permission() {
        let rules = Value::List(
            vec![
                rule(Value::str("team_*"), &[Read]),
                rule(Value::str("*_bot"), &[Write]),
                rule(Value::str("alice"), &[Observe]),
            ]
            .into(),
        );
        let acl = Acl::build(&rules, &Value::Nil).unwrap().unwrap();
        assert!(acl.permits("team_1", Read, None));
        assert!(acl.permits("x_bot", Write, None));
        assert!(acl.permits("alice", Observe, None));
        assert!(!acl.permits("alice", Read, None));
        assert_eq!(acl.cached_decisions(), 3);
    }

    // ---- properties ------------------------------------------------------

    /// Reference glob: a plain recursive matcher, fine for short inputs.
    fn glob_ref(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| glob_ref(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && glob_ref(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && glob_ref(rest, &t[1..]),
        }
    }

    #[derive(Clone, Debug)]
    struct RefRule {
        pattern: Option<String>,
        perms: Vec<Permission>,
        conditions: Vec<(String, i64)>,
    }

    /// Reference evaluator: the rules read literally, no cache, no split.
    fn reference(
        rules: &[RefRule],
        owner: Option<&str>,
        who: &str,
        perm: Permission,
        ctx: &[(String, i64)],
    ) -> bool {
        owner == Some(who)
            || rules.iter().any(|r| {
                let who: Vec<char> = who.chars().collect();
                r.pattern
                    .as_ref()
                    .is_none_or(|p| glob_ref(&p.chars().collect::<Vec<_>>(), &who))
                    && r.perms.contains(&perm)
                    && r.conditions.iter().all(|(k, v)| {
                        ctx.iter().rev().find(|(ck, _)| ck == k).map(|(_, cv)| cv) == Some(v)
                    })
            })
    }

    fn to_value(r: &RefRule) -> Value {
        let pattern = r
            .pattern
            .as_deref()
            .map_or_else(|| Value::atom("any"), Value::str);
        let conds = r
            .conditions
            .iter()
            .map(|(k, v)| (k.as_str(), Value::Int(*v)))
            .collect();
        rule_if(pattern, &r.perms, conds)
    }

    fn ctx_value(ctx: &[(String, i64)]) -> Value {
        // Later keys win, as in the reference; keep each key once.
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        for (k, v) in ctx {
            pairs.retain(|(pk, _)| pk.as_text() != Some(k));
            pairs.push((Value::atom(k), Value::Int(*v)));
        }
        Value::Map(pairs.into())
    }

    fn perm_strategy() -> impl Strategy<Value = Permission> {
        prop::sample::select(Permission::ALL.to_vec())
    }

    fn rule_strategy() -> impl Strategy<Value = RefRule> {
        (
            prop::option::weighted(0.8, "[ab*?.+]{1,5}"),
            prop::collection::vec(perm_strategy(), 0..4),
            prop::collection::vec(("[kl]", 0..3i64), 0..2),
        )
            .prop_map(|(pattern, perms, mut conditions)| {
                conditions.dedup_by(|a, b| a.0 == b.0);
                RefRule {
                    pattern,
                    perms,
                    conditions,
                }
            })
    }

    proptest! {
        #[test]
        fn decisions_agree_with_reference(
            rules in prop::collection::vec(rule_strategy(), 0..10),
            owner in prop::option::of("[ab]{1,2}"),
            asks in prop::collection::vec(
                ("[ab.+]{0,5}", perm_strategy(), prop::collection::vec(("[kl]", 0..3i64), 0..3)),
                1..20,
            ),
        ) {
            let mut conditions = rules.clone();
            for r in &mut conditions {
                let mut seen = std::collections::HashSet::new();
                r.conditions.retain(|(k, _)| seen.insert(k.clone()));
            }
            let source = Value::List(conditions.iter().map(to_value).collect());
            let metadata = owner
                .as_deref()
                .map_or(Value::Nil, |o| map(vec![("owner_session", Value::str(o))]));
            let acl = Acl::build(&source, &metadata).unwrap();
            // Ask each question twice: the second answer comes from the cache.
            for _ in 0..2 {
                for (who, perm, ctx) in &asks {
                    let expected = reference(&conditions, owner.as_deref(), who, *perm, ctx);
                    let ctx = ctx_value(ctx);
                    let got = authorize(Some(who), "host!", acl.as_ref(), *perm, Some(&ctx));
                    prop_assert_eq!(got.is_ok(), expected, "{} {:?}", who, perm);
                }
            }
        }

        #[test]
        fn compiling_never_panics(v in value_strategy()) {
            let _ = Acl::build(&Value::List(vec![v.clone()].into()), &v);
            let _ = validate(&v);
        }
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<i64>().prop_map(Value::Int),
            "[a-z_*?]{0,6}".prop_map(|s| Value::str(&s)),
            prop::sample::select(vec![
                "any",
                "read",
                "write",
                "observe",
                "optimize",
                "session_pattern",
                "permissions",
                "conditions",
                "bogus",
            ])
            .prop_map(Value::atom),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| Value::List(v.into())),
                prop::collection::vec((inner.clone(), inner), 0..4)
                    .prop_map(|v| Value::Map(v.into())),
            ]
        })
    }
}
