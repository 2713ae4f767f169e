//! Variable NIFs: one call from the caller's process per read or write.
//! Every function takes the principal last: `nil` (the session itself), a
//! session id, or `{session_id, context}` when access rules have conditions.

use dspex_core::glob::Glob;
use dspex_core::{Caller, Error, HistoryEntry, Session, Update, Value, Variable, WriteMeta};
use rustler::types::tuple::get_tuple;
use rustler::{Encoder, Env, Term};

use crate::atoms;
use crate::error::{answer, error, ok_or, reason, unit_or};
use crate::reply;
use crate::store::store;
use crate::term::{
    decode_caller, decode_name, decode_opt_u64, decode_sid, decode_value, encode_value, ident_text,
    is_nil,
};
use dspex_core::command::reply as reply_shape;
use dspex_core::command::{args::Actor, Operation, VarRegister};
use dspex_core::time::{now_us, CLOCK};

/// Runs `f` on the session with the decoded caller.
pub(crate) fn with_session<'a, T>(
    sid: Term<'a>,
    principal: Term<'a>,
    f: impl FnOnce(&Session, &Caller) -> Result<T, Error>,
) -> Result<T, Error> {
    // Stamped lazily: the clock is read only if the call needs the time.
    let now = CLOCK;
    let sid = decode_sid(sid)?;
    let caller = decode_caller(principal)?;
    let caller = caller.caller(now);
    store().with_session(sid, now, |s| f(s, &caller))?
}

fn metadata_of(term: Term, budget: usize) -> Result<Value, Error> {
    match decode_value(term, budget)? {
        Value::Nil => Ok(Value::empty_map()),
        m @ Value::Map(_) => Ok(m),
        _ => Err(Error::invalid_arg("metadata_must_be_a_map")),
    }
}

pub fn encode_variable<'a>(env: Env<'a>, v: &Variable) -> Term<'a> {
    reply::VARIABLE.encode(env, &reply_shape::variable_fields(v))
}

fn encode_entry<'a>(env: Env<'a>, e: &HistoryEntry) -> Term<'a> {
    reply::HISTORY.encode(env, &reply_shape::history_fields(e))
}

/// opts: `%{constraints: map, metadata: map, description: binary | nil}`
#[rustler::nif(name = "var_register")]
#[allow(clippy::too_many_arguments)]
fn register<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    name: Term<'a>,
    var_type: Term<'a>,
    initial: Term<'a>,
    opts: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let now = now_us();
    let limits = store().limits();
    let r = (|| {
        let sid = decode_sid(sid)?;
        let actor = Actor::of(&decode_caller(principal)?.caller(now));
        let name = decode_name(name, limits.max_name_bytes)?;
        let var_type = match var_type.atom_to_string() {
            Ok(t) => Value::atom(&t),
            Err(_) => Value::Nil,
        };
        let initial = decode_value(initial, limits.max_value_bytes)?;
        let opts = decode_value(opts, limits.max_value_bytes)?;
        VarRegister::from_opts(sid, name, var_type, initial, &opts, actor)?.apply(store(), now)
    })();
    answer(env, r)
}

/// `{:ok, true | false}`: is there a variable the caller may read?
#[rustler::nif(name = "var_exists")]
fn exists<'a>(env: Env<'a>, sid: Term<'a>, ident: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| match ident_text(ident) {
        Err(Error::NotFound) => Ok(false),
        ident => s.exists(&ident?, caller),
    });
    ok_or(env, r)
}

#[rustler::nif(name = "var_get")]
fn get<'a>(env: Env<'a>, sid: Term<'a>, ident: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.get(&ident_text(ident)?, caller)
    });
    match r {
        Ok(v) => (atoms::ok(), encode_variable(env, &v)).encode(env),
        Err(e) => error(env, &e),
    }
}

/// The read hot path: `{:ok, value}` without building the variable map.
#[rustler::nif(name = "var_value")]
fn value<'a>(env: Env<'a>, sid: Term<'a>, ident: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.get_value(&ident_text(ident)?, caller)
    });
    match r {
        Ok(v) => (atoms::ok(), encode_value(env, &v)).encode(env),
        Err(e) => error(env, &e),
    }
}

/// The write hot path: `{:ok, new_version}`.
#[rustler::nif(name = "var_set")]
#[allow(clippy::too_many_arguments)]
fn set<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    value: Term<'a>,
    metadata: Term<'a>,
    expected_version: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let budget = store().limits().max_value_bytes;
    let r = with_session(sid, principal, |s, caller| {
        let meta = WriteMeta {
            metadata: metadata_of(metadata, budget)?,
            expected_version: decode_opt_u64(expected_version)?,
        };
        let value = decode_value(value, budget)?;
        s.update(&ident_text(ident)?, value, meta, caller)
    });
    ok_or(env, r)
}

fn decode_update(term: Term, budget: usize) -> Result<Update, Error> {
    let bad = || Error::invalid_arg("bad_update");
    let parts = get_tuple(term).map_err(|_| bad())?;
    let [ident, value, metadata, expected] = parts[..] else {
        return Err(bad());
    };
    Ok(Update {
        ident: (*ident_text(ident)?).into(),
        value: decode_value(value, budget)?,
        meta: WriteMeta {
            metadata: metadata_of(metadata, budget)?,
            expected_version: decode_opt_u64(expected)?,
        },
    })
}

/// updates: `[{ident, value, metadata, expected_version | nil}]`.
/// Atomic: `{:ok, [version]}` or `{:error, {:validation_failed, %{ident => reason}}}`.
/// Not atomic: `{:ok, [{:ok, version} | {:error, reason}]}` in input order.
#[rustler::nif(name = "var_set_many")]
fn set_many<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    updates: Term<'a>,
    atomic: bool,
    principal: Term<'a>,
) -> Term<'a> {
    let budget = store().limits().max_value_bytes;
    let decoded: Result<Vec<Update>, Error> = updates
        .list_length()
        .map_err(|_| Error::invalid_arg("updates_must_be_a_list"))
        .and_then(|_| {
            updates
                .into_list_iterator()
                .map_err(|_| Error::invalid_arg("updates_must_be_a_list"))?
                .map(|u| decode_update(u, budget))
                .collect()
        });
    let updates = match decoded {
        Ok(u) => u,
        Err(e) => return error(env, &e),
    };
    if atomic {
        let r = with_session(sid, principal, |s, caller| s.update_atomic(updates, caller));
        return ok_or(env, r);
    }
    let r = with_session(sid, principal, |s, caller| {
        Ok(s.update_each(updates, caller))
    });
    match r {
        Ok(results) => {
            let terms: Vec<Term> = results
                .iter()
                .map(|(_, r)| match r {
                    Ok(v) => (atoms::ok(), *v).encode(env),
                    Err(e) => (atoms::error(), reason(env, e)).encode(env),
                })
                .collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

#[rustler::nif(name = "var_history")]
fn history<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    limit: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let limit = match limit.decode::<i64>() {
            Ok(n) if n >= 0 => n as usize,
            _ => return Err(Error::invalid_arg("bad_limit")),
        };
        s.history(&ident_text(ident)?, limit, caller)
    });
    match r {
        Ok(entries) => {
            let terms: Vec<Term> = entries.iter().map(|e| encode_entry(env, e)).collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

#[rustler::nif(name = "var_rollback")]
fn rollback<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    ident: Term<'a>,
    version: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let version = version
            .decode::<u64>()
            .map_err(|_| Error::VersionNotFound)?;
        s.rollback(&ident_text(ident)?, version, Value::empty_map(), caller)
    });
    ok_or(env, r)
}

#[rustler::nif(name = "var_delete")]
fn delete<'a>(env: Env<'a>, sid: Term<'a>, ident: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.delete(&ident_text(ident)?, caller).map(|_| ())
    });
    unit_or(env, r)
}

fn decode_pattern(term: Term) -> Result<Option<Glob>, Error> {
    if is_nil(term) {
        return Ok(None);
    }
    match decode_value(term, 1024)? {
        Value::Str(p) => Ok(Some(Glob::new(&p))),
        _ => Err(Error::invalid_arg("pattern_must_be_a_string")),
    }
}

/// Variable maps the caller may read, sorted by name, optionally filtered
/// by a glob on the name.
#[rustler::nif(name = "var_list", schedule = "DirtyCpu")]
fn list<'a>(env: Env<'a>, sid: Term<'a>, pattern: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let glob = decode_pattern(pattern)?;
        let mut vars = s.variables(caller)?;
        if let Some(g) = glob {
            vars.retain(|v| v.name.as_text().is_some_and(|n| g.matches(n)));
        }
        Ok(vars)
    });
    match r {
        Ok(vars) => {
            let terms: Vec<Term> = vars.iter().map(|v| encode_variable(env, v)).collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

/// Names as registered (atoms stay atoms), sorted.
#[rustler::nif(name = "var_names", schedule = "DirtyCpu")]
fn names<'a>(env: Env<'a>, sid: Term<'a>, pattern: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let glob = decode_pattern(pattern)?;
        let mut names = s.names(caller)?;
        if let Some(g) = glob {
            names.retain(|(n, _)| n.as_text().is_some_and(|n| g.matches(n)));
        }
        Ok(names)
    });
    match r {
        Ok(names) => {
            let terms: Vec<Term> = names.iter().map(|(n, _)| encode_value(env, n)).collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}
