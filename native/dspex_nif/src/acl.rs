//! Access control NIFs: setting rules, asking questions, the audit log and
//! rate limits. Enforcement itself happens inside every variable NIF (the
//! core checks the caller); these are the management side.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::reply;
use dspex_core::acl::{self, MAX_CONDITIONS, MAX_PATTERN_BYTES, MAX_RULES, MAX_RULES_BYTES};
use dspex_core::command::reply::audit_fields;
use dspex_core::glob;
use dspex_core::time::now_us;
use dspex_core::{Error, Permission, Value};
use rustler::{Atom, Binary, Encoder, Env, MapIterator, Term};

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
            acl::authorize_session(s, principal, perm, now)
        })?
    })();
    unit_or(env, r)
}

/// `check_permission/4` on a plain variable map: `:ok` or
/// `{:error, :access_denied}`. Walks the map's terms in place (nothing is
/// converted or copied) with the engine's rule semantics; a malformed rule
/// (including one with more than `MAX_CONDITIONS` conditions) grants
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
    let allowed = text(principal).is_some_and(|p| {
        owner_of(variable).is_some_and(|owner| owner == p)
            || rules_grant(env, variable, &p, permission, context)
    });
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

fn rules_grant<'a>(
    env: Env<'a>,
    variable: Term<'a>,
    principal: &str,
    perm: Term<'a>,
    context: Term<'a>,
) -> bool {
    let Some(rules) = field(variable, atoms::access_rules(), "access_rules") else {
        return false;
    };
    let Ok(rules) = rules.into_list_iterator() else {
        return false;
    };
    // Rules may name permissions as strings too.
    let perm_name = perm.decode::<Atom>().ok().and_then(|a| {
        [
            (atoms::read(), Permission::Read),
            (atoms::write(), Permission::Write),
            (atoms::observe(), Permission::Observe),
            (atoms::optimize(), Permission::Optimize),
        ]
        .into_iter()
        .find(|(known, _)| *known == a)
        .map(|(_, p)| p.name())
    });
    rules
        .take(MAX_RULES)
        .any(|rule| rule_grants(env, rule, principal, perm, perm_name, context))
}

fn rule_grants<'a>(
    env: Env<'a>,
    rule: Term<'a>,
    principal: &str,
    perm: Term<'a>,
    perm_name: Option<&str>,
    context: Term<'a>,
) -> bool {
    // The pattern first: most rules that do not apply fail on its first byte.
    field(rule, atoms::session_pattern(), "session_pattern")
        .is_some_and(|pattern| pattern_matches(pattern, principal))
        && field(rule, atoms::permissions(), "permissions")
            .is_some_and(|ps| listed(ps, perm, perm_name))
        && conditions_hold(env, rule, context)
}

/// Is `perm` in the list, as an atom or (second look) as a string?
fn listed<'a>(perms: Term<'a>, perm: Term<'a>, perm_name: Option<&str>) -> bool {
    let Ok(mut atoms) = perms.into_list_iterator() else {
        return false;
    };
    if atoms.any(|p| p == perm) {
        return true;
    }
    let (Ok(strings), Some(name)) = (perms.into_list_iterator(), perm_name) else {
        return false;
    };
    strings
        .filter_map(|p| Binary::from_term(p).ok())
        .any(|bin| bin.as_slice() == name.as_bytes())
}

fn pattern_matches(pattern: Term, principal: &str) -> bool {
    match Binary::from_term(pattern) {
        Ok(bin) => match std::str::from_utf8(bin.as_slice()) {
            Ok(p) if !p.is_empty() && p.len() <= MAX_PATTERN_BYTES => glob::matches(p, principal),
            _ => false,
        },
        Err(_) => pattern == atoms::any().to_term(pattern.get_env()),
    }
}

/// Every condition equals (Erlang `==`) the context's value under its key,
/// the key taken as an atom or a string; a missing key is `nil`.
fn conditions_hold<'a>(env: Env<'a>, rule: Term<'a>, context: Term<'a>) -> bool {
    let Some(conditions) = field(rule, atoms::conditions(), "conditions") else {
        return true;
    };
    match conditions.map_size() {
        Ok(0) => return true,
        Ok(n) if n > MAX_CONDITIONS => return false,
        Ok(_) => {}
        Err(_) => return crate::term::is_nil(conditions),
    }
    let Some(pairs) = MapIterator::new(conditions) else {
        return false;
    };
    let nil = atoms::nil().to_term(env);
    pairs.into_iter().all(|(key, expected)| {
        let actual = context_value(env, context, key).unwrap_or(nil);
        expected.cmp(&actual) == Ordering::Equal
    })
}

fn context_value<'a>(env: Env<'a>, context: Term<'a>, key: Term<'a>) -> Option<Term<'a>> {
    if let Ok(v) = context.map_get(key) {
        return Some(v);
    }
    if key.is_atom() {
        let name = key.atom_to_string().ok()?;
        return context.map_get(name.as_str()).ok();
    }
    let bin = Binary::from_term(key).ok()?;
    let name = std::str::from_utf8(bin.as_slice()).ok()?;
    context.map_get(existing_atom(env, name)?).ok()
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
