//! Access control NIFs: setting rules, asking questions, the audit log and
//! rate limits. Enforcement itself happens inside every variable NIF (the
//! core checks the caller); these are the management side.

use std::borrow::Cow;

use crate::reply;
use dspex_core::acl::{self, Actual, PatternRef, RuleView, MAX_RULES_BYTES};
use dspex_core::command::reply::audit_fields;
use dspex_core::time::now_us;
use dspex_core::{Error, PermSet, Permission, Value};
use rustler::{Atom, Binary, Encoder, Env, Term};

use crate::atoms;
use crate::error::{error, unit_or};
use crate::store::store;
use crate::term::{decode_principal, decode_sid, decode_value, existing_atom, ident_text};
use crate::variable::with_session;

/// Rules as a value; oversized input is an invalid rule list, not a value error.
fn decode_rules(term: Term) -> Result<Value, Error> {
    decode_value(term, MAX_RULES_BYTES).map_err(|e| match e {
        Error::TooLarge(n) => Error::InvalidRules(Value::tagged("too_large", Value::Int(n as i64))),
        Error::InvalidValue(d) => Error::InvalidRules(Value::tagged("unsupported_term", d)),
        other => other,
    })
}

fn decode_permission(term: Term) -> Result<Permission, Error> {
    term.atom_to_string()
        .ok()
        .and_then(|name| Permission::parse(&name).ok())
        .ok_or_else(|| Error::invalid_arg("unknown_permission"))
}

/// `:ok` or `{:error, {:invalid_rules, detail}}`.
#[rustler::nif(name = "acl_validate")]
fn validate<'a>(env: Env<'a>, rules: Term<'a>) -> Term<'a> {
    unit_or(env, decode_rules(rules).and_then(|r| acl::validate(&r)))
}

/// Replaces a variable's rules; only its owner may.
#[rustler::nif(name = "acl_set_rules")]
fn set_rules<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    rules: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let rules = decode_rules(rules)?;
        s.set_access_rules(&ident_text(ident)?, &rules, caller)
    });
    unit_or(env, r)
}

/// A question: may `principal` do `permission`? No token, no audit entry.
#[rustler::nif(name = "acl_check")]
fn check<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let perm = decode_permission(permission)?;
        s.check_access(&ident_text(ident)?, caller, perm)
    });
    unit_or(env, r)
}

/// The guard of an operation made outside the variable NIFs (optimizer
/// locks, observers): rate limit, then the ACL, refusals audited.
#[rustler::nif(name = "acl_authorize")]
fn authorize<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let perm = decode_permission(permission)?;
        s.authorize(&ident_text(ident)?, caller, perm)
    });
    unit_or(env, r)
}

/// The guard of a session-level operation (information, diagnostics,
/// export, audit log, deletion): `:ok` for the session itself, else
/// `{:error, :access_denied}`, audited.
#[rustler::nif(name = "acl_authorize_session")]
fn authorize_session<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
) -> Term<'a> {
    let r = (|| {
        let perm = decode_permission(permission)?;
        let principal = decode_principal(principal)?;
        let now = now_us();
        store().with_session(decode_sid(sid)?, now, |s| {
            s.authorize_session(principal, perm, now)
        })?
    })();
    unit_or(env, r)
}

/// `check_permission/4` on a plain variable map: `:ok` or
/// `{:error, :access_denied}`. The map's terms are read in place (nothing
/// is converted or copied but a rule's conditions) and the decision is the
/// engine's own, [`acl::grants`]: a malformed rule (a bad pattern, an
/// unknown permission, more than `MAX_CONDITIONS` conditions) grants
/// nothing, and a list of more than `MAX_RULES` rules grants nothing past
/// them, so a call is bounded whatever the map holds. The caller has
/// checked the argument types.
#[rustler::nif(name = "acl_check_map")]
fn check_map<'a>(
    env: Env<'a>,
    variable: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
    context: Term<'a>,
) -> Term<'a> {
    let allowed = (|| {
        let principal = text(principal)?;
        let perm = permission_of(permission)?;
        let owner = owner_of(variable);
        let rules = field(variable, atoms::access_rules(), "access_rules")
            .and_then(|rules| rules.into_list_iterator().ok());
        Some(acl::grants(
            owner.as_deref(),
            &principal,
            perm,
            rules
                .into_iter()
                .flatten()
                .map(|rule| TermRule { env, rule }),
            |key| context_value(env, context, key),
        ))
    })()
    .unwrap_or(false);
    if allowed {
        atoms::ok().encode(env)
    } else {
        (atoms::error(), atoms::access_denied()).encode(env)
    }
}

/// The value under an atom key, else under the same key as a string.
fn field<'a>(map: Term<'a>, key: Atom, name: &str) -> Option<Term<'a>> {
    map.map_get(key).or_else(|_| map.map_get(name)).ok()
}

/// The text of a binary or a (non-boolean, non-nil) atom.
fn text(term: Term<'_>) -> Option<Cow<'_, str>> {
    if let Ok(bin) = Binary::from_term(term) {
        return std::str::from_utf8(bin.as_slice()).ok().map(Cow::Borrowed);
    }
    if term.is_atom() && term.decode::<bool>().is_err() && !crate::term::is_nil(term) {
        return term.atom_to_string().ok().map(Cow::Owned);
    }
    None
}

/// `metadata.owner_session`, else `metadata.created_by`, as in the engine.
fn owner_of(variable: Term<'_>) -> Option<Cow<'_, str>> {
    let metadata = field(variable, atoms::metadata(), "metadata")?;
    [
        (atoms::owner_session(), "owner_session"),
        (atoms::created_by(), "created_by"),
    ]
    .into_iter()
    .find_map(|(key, name)| {
        field(metadata, key, name)
            .and_then(text)
            .filter(|s| !s.is_empty())
    })
}

/// A permission named by an atom (compared as atoms, no text made) or,
/// in a rule, by a string.
fn permission_of(term: Term) -> Option<Permission> {
    if let Ok(a) = term.decode::<Atom>() {
        return [
            (atoms::read(), Permission::Read),
            (atoms::write(), Permission::Write),
            (atoms::observe(), Permission::Observe),
            (atoms::optimize(), Permission::Optimize),
        ]
        .into_iter()
        .find(|(known, _)| *known == a)
        .map(|(_, p)| p);
    }
    let bin = Binary::from_term(term).ok()?;
    Permission::parse(std::str::from_utf8(bin.as_slice()).ok()?).ok()
}

/// One rule of the map, read in place for [`acl::rule_grants`].
struct TermRule<'a> {
    env: Env<'a>,
    rule: Term<'a>,
}

impl<'a> RuleView<'a> for TermRule<'a> {
    fn pattern(&self) -> Option<PatternRef<'a>> {
        let pattern = field(self.rule, atoms::session_pattern(), "session_pattern")?;
        match Binary::from_term(pattern) {
            Ok(bin) => std::str::from_utf8(bin.as_slice())
                .ok()
                .map(PatternRef::Text),
            Err(_) => (pattern == atoms::any().to_term(self.env)).then_some(PatternRef::Any),
        }
    }

    fn permissions(&self) -> Option<PermSet> {
        let names = field(self.rule, atoms::permissions(), "permissions")?;
        acl::permissions_of(names.into_list_iterator().ok()?, |&t| permission_of(t)).ok()
    }

    fn conditions(&self) -> Option<Cow<'a, [(Value, Value)]>> {
        let Some(conditions) = field(self.rule, atoms::conditions(), "conditions") else {
            return Some(Cow::Borrowed(&[]));
        };
        // The common empty map without decoding it.
        if conditions.map_size().ok() == Some(0) {
            return Some(Cow::Borrowed(&[]));
        }
        let value = decode_value(conditions, MAX_RULES_BYTES).ok()?;
        acl::conditions_of(&value).map(|c| Cow::Owned(c.into_vec()))
    }
}

/// The context's value under `key`, as an atom key or a string key.
fn context_value(env: Env, context: Term, key: &str) -> Actual<Value> {
    let found = existing_atom(env, key)
        .and_then(|atom| context.map_get(atom).ok())
        .or_else(|| context.map_get(key).ok());
    match found {
        None => Actual::Missing,
        Some(term) => match decode_value(term, MAX_RULES_BYTES) {
            Ok(v) => Actual::Value(v),
            Err(_) => Actual::Opaque,
        },
    }
}

/// `{:ok, [entry]}`, newest first, at most `limit`.
#[rustler::nif(name = "acl_audit_log")]
fn audit_log<'a>(env: Env<'a>, sid: Term<'a>, limit: Term<'a>) -> Term<'a> {
    let r = (|| {
        let limit = match limit.decode::<i64>() {
            Ok(n) if n >= 0 => n as usize,
            _ => return Err(Error::invalid_arg("bad_limit")),
        };
        store().with_session(decode_sid(sid)?, now_us(), |s| s.audit_log(limit))
    })();
    match r {
        Ok(entries) => {
            let terms: Vec<Term> = entries
                .iter()
                .map(|e| reply::AUDIT.encode(env, &audit_fields(e)))
                .collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}
