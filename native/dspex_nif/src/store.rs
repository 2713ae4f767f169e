//! The store resource and the session-level NIFs.

use std::sync::Arc;

use dspex_core::limits::Limits;
use dspex_core::{Error, SessionOpts, Store, Value};
use rustler::{Binary, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::error::{error, ok_or, unit_or};
use crate::term::{bytes, decode_sid, decode_value, encode_value, is_nil};

/// The engine, shared by every process that holds the resource. The Elixir
/// side keeps one in `:persistent_term`.
pub struct StoreRef {
    pub store: Arc<Store>,
}

#[rustler::resource_impl]
impl rustler::Resource for StoreRef {}

/// `%{max_value_bytes: n, ...}` or `nil` for the defaults.
#[rustler::nif(name = "store_new")]
fn new<'a>(env: Env<'a>, limits: Term<'a>) -> Term<'a> {
    let r = decode_limits(limits).map(|limits| {
        ResourceArc::new(StoreRef {
            store: Arc::new(Store::with_limits(limits)),
        })
    });
    ok_or(env, r)
}

fn decode_limits(term: Term) -> Result<Limits, Error> {
    let mut limits = Limits::default();
    let map = decode_value(term, 4096)?;
    if map.is_nil() {
        return Ok(limits);
    }
    let get = |key: &str, into: &mut usize| -> Result<(), Error> {
        match map.get(key) {
            None | Some(Value::Nil) => Ok(()),
            Some(Value::Int(n)) if *n > 0 => {
                *into = *n as usize;
                Ok(())
            }
            Some(_) => Err(Error::InvalidArgument(Value::tagged(
                "bad_limit",
                Value::atom(key),
            ))),
        }
    };
    get("max_value_bytes", &mut limits.max_value_bytes)?;
    get("max_name_bytes", &mut limits.max_name_bytes)?;
    get("max_variables", &mut limits.max_variables)?;
    get("max_history", &mut limits.max_history)?;
    get("max_snapshot_bytes", &mut limits.max_snapshot_bytes)?;
    Ok(limits)
}

#[rustler::nif(name = "store_limits")]
fn limits(env: Env, store: ResourceArc<StoreRef>) -> Term {
    let l = store.store.limits();
    let keys = [
        atoms::max_value_bytes(),
        atoms::max_name_bytes(),
        atoms::max_variables(),
        atoms::max_history(),
        atoms::max_snapshot_bytes(),
    ];
    let vals = [
        l.max_value_bytes,
        l.max_name_bytes,
        l.max_variables,
        l.max_history,
        l.max_snapshot_bytes,
    ];
    Term::map_from_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
}

/// opts: `%{ttl_ms: nil | n, max_history: n, metadata: map}`
#[rustler::nif(name = "session_create")]
fn session_create<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreRef>,
    id: Term<'a>,
    opts: Term<'a>,
) -> Term<'a> {
    let r = (|| {
        let id = decode_sid(id)?;
        let limits = store.store.limits();
        let opts = decode_value(opts, limits.max_value_bytes)?;
        let mut session_opts = SessionOpts::default();
        match opts.get("ttl_ms") {
            None | Some(Value::Nil) => {}
            Some(Value::Int(ms)) if *ms > 0 => session_opts.ttl_ms = Some(*ms as u64),
            Some(_) => return Err(Error::invalid_arg("bad_ttl")),
        }
        match opts.get("max_history") {
            None | Some(Value::Nil) => {}
            Some(Value::Int(n)) => session_opts.max_history = limits.check_history(*n)?,
            Some(_) => return Err(Error::invalid_arg("bad_max_history")),
        }
        match opts.get("metadata") {
            None | Some(Value::Nil) => {}
            Some(m @ Value::Map(_)) => session_opts.metadata = m.clone(),
            Some(_) => return Err(Error::invalid_arg("metadata_must_be_a_map")),
        }
        store.store.create_session(id, session_opts).map(|_| ())
    })();
    unit_or(env, r)
}

#[rustler::nif(name = "session_info")]
fn session_info<'a>(env: Env<'a>, store: ResourceArc<StoreRef>, id: Term<'a>) -> Term<'a> {
    let r = decode_sid(id).and_then(|id| store.store.session(id));
    match r {
        Ok(s) => {
            let keys = [
                atoms::session_id().encode(env),
                atoms::created_at().encode(env),
                atoms::last_access().encode(env),
                atoms::ttl_ms().encode(env),
                atoms::max_history().encode(env),
                atoms::variable_count().encode(env),
                atoms::metadata().encode(env),
            ];
            let vals = [
                (*s.id).encode(env),
                s.created_at.encode(env),
                s.last_access().encode(env),
                s.opts.ttl_ms.encode(env),
                s.opts.max_history.encode(env),
                s.len().encode(env),
                encode_value(env, &s.opts.metadata),
            ];
            let map = Term::map_from_term_arrays(env, &keys, &vals)
                .unwrap_or_else(|_| Term::map_new(env));
            (atoms::ok(), map).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

/// Heap bytes of a session's variables; walks every variable.
#[rustler::nif(name = "session_memory", schedule = "DirtyCpu")]
fn session_memory<'a>(env: Env<'a>, store: ResourceArc<StoreRef>, id: Term<'a>) -> Term<'a> {
    let r = decode_sid(id).and_then(|id| store.store.session(id).map(|s| s.heap_size()));
    ok_or(env, r)
}

#[rustler::nif(name = "session_delete")]
fn session_delete<'a>(env: Env<'a>, store: ResourceArc<StoreRef>, id: Term<'a>) -> Term<'a> {
    unit_or(
        env,
        decode_sid(id).and_then(|id| store.store.delete_session(id)),
    )
}

#[rustler::nif(name = "session_list")]
fn session_list(store: ResourceArc<StoreRef>) -> Vec<String> {
    store
        .store
        .session_ids()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Removes expired sessions; returns their ids.
#[rustler::nif(name = "session_sweep", schedule = "DirtyCpu")]
fn session_sweep(store: ResourceArc<StoreRef>) -> Vec<String> {
    store
        .store
        .sweep_expired()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[rustler::nif(name = "session_export", schedule = "DirtyCpu")]
fn session_export<'a>(env: Env<'a>, store: ResourceArc<StoreRef>, id: Term<'a>) -> Term<'a> {
    match decode_sid(id).and_then(|id| store.store.export_session(id)) {
        Ok(b) => (atoms::ok(), bytes(env, &b)).encode(env),
        Err(e) => error(env, &e),
    }
}

#[rustler::nif(name = "session_import", schedule = "DirtyCpu")]
fn session_import<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreRef>,
    snapshot: Term<'a>,
    new_id: Term<'a>,
) -> Term<'a> {
    let r = (|| {
        let bin = Binary::from_term(snapshot)
            .map_err(|_| Error::InvalidSnapshot("expected a binary".into()))?;
        let new_id = if is_nil(new_id) {
            None
        } else {
            Some(decode_sid(new_id)?)
        };
        store
            .store
            .import_session(bin.as_slice(), new_id)
            .map(|id| id.to_string())
    })();
    ok_or(env, r)
}
