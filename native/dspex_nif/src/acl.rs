//! Access control NIFs: setting rules, asking questions, the audit log and
//! rate limits. Enforcement itself happens inside every variable NIF (the
//! core checks the caller); these are the management side.

use dspex_core::acl::{self, MAX_RULES_BYTES};
use dspex_core::audit::AuditEntry;
use dspex_core::ratelimit::RateLimit;
use dspex_core::{Error, Permission, Session, Value};
use rustler::{Atom, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::error::{error, unit_or};
use crate::store::StoreRef;
use crate::term::{decode_sid, decode_value, ident_text};
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
    store: ResourceArc<StoreRef>,
    sid: Term<'a>,
    ident: Term<'a>,
    rules: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(&store, sid, principal, |s, caller| {
        let rules = decode_rules(rules)?;
        s.set_access_rules(&ident_text(ident)?, &rules, caller)
    });
    unit_or(env, r)
}

/// A question: may `principal` do `permission`? No token, no audit entry.
#[rustler::nif(name = "acl_check")]
fn check<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreRef>,
    sid: Term<'a>,
    ident: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
) -> Term<'a> {
    let r = with_session(&store, sid, principal, |s, caller| {
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
    store: ResourceArc<StoreRef>,
    sid: Term<'a>,
    ident: Term<'a>,
    principal: Term<'a>,
    permission: Term<'a>,
) -> Term<'a> {
    let r = with_session(&store, sid, principal, |s, caller| {
        let perm = decode_permission(permission)?;
        s.authorize(&ident_text(ident)?, caller, perm)
    });
    unit_or(env, r)
}

/// `{:ok, [entry]}`, newest first, at most `limit`.
#[rustler::nif(name = "acl_audit_log")]
fn audit_log<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreRef>,
    sid: Term<'a>,
    limit: Term<'a>,
) -> Term<'a> {
    let r = (|| {
        let limit = match limit.decode::<i64>() {
            Ok(n) if n >= 0 => n as usize,
            _ => return Err(Error::invalid_arg("bad_limit")),
        };
        store
            .store
            .with_session(decode_sid(sid)?, |s| s.audit_log(limit))
    })();
    match r {
        Ok(entries) => {
            let terms: Vec<Term> = entries.iter().map(|e| encode_entry(env, e)).collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

fn atom<'a>(env: Env<'a>, name: &str) -> Term<'a> {
    Atom::from_str(env, name)
        .map(|a| a.encode(env))
        .unwrap_or_else(|_| atoms::nil().encode(env))
}

fn encode_entry<'a>(env: Env<'a>, e: &AuditEntry) -> Term<'a> {
    let keys = [
        atoms::seq().encode(env),
        atoms::at().encode(env),
        atoms::event().encode(env),
        atoms::principal().encode(env),
        atoms::variable().encode(env),
        atoms::permission().encode(env),
    ];
    let vals = [
        e.seq.encode(env),
        e.at.encode(env),
        atom(env, e.event.name()),
        e.principal.as_deref().encode(env),
        e.variable.as_deref().encode(env),
        e.permission
            .map_or_else(|| atoms::nil().encode(env), |p| atom(env, p.name())),
    ];
    Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}

/// `nil` or `{ops_per_sec, burst}`, both positive integers.
pub fn decode_rate_limit(v: &Value) -> Result<Option<RateLimit>, Error> {
    match v {
        Value::Nil => Ok(None),
        Value::Tuple(parts) => match parts[..] {
            [Value::Int(rate), Value::Int(burst)] if rate > 0 && burst > 0 => {
                RateLimit::new(rate as u64, burst as u64).map(Some)
            }
            _ => Err(Error::InvalidArgument(Value::tagged(
                "rate_limit",
                v.clone(),
            ))),
        },
        _ => Err(Error::InvalidArgument(Value::tagged(
            "rate_limit",
            v.clone(),
        ))),
    }
}

/// `nil` or `%{ops_per_sec, burst, available}` for session info.
pub fn encode_rate_limit<'a>(env: Env<'a>, s: &Session) -> Term<'a> {
    match s.rate_limit() {
        None => atoms::nil().encode(env),
        Some((limit, available)) => {
            let keys = [
                atoms::ops_per_sec().encode(env),
                atoms::burst().encode(env),
                atoms::available().encode(env),
            ];
            let vals = [
                limit.ops_per_sec.encode(env),
                limit.burst.encode(env),
                available.encode(env),
            ];
            Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
        }
    }
}
