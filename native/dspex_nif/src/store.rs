//! The VM's engine and the session-level NIFs.

use std::sync::OnceLock;

use dspex_core::command::reply::session_fields;
use dspex_core::command::{Operation, SessionCreate};
use dspex_core::limits::Limits;
use dspex_core::time::now_us;
use dspex_core::{Error, Store, Value};
use rustler::{Binary, Encoder, Env, Term};

use crate::atoms;
use crate::error::{answer, error, ok_or, unit_or};
use crate::reply;
use crate::term::{bytes, decode_sid, decode_value, is_nil};

/// One engine per VM, like an ETS table with a registered name: every NIF
/// reaches it without a resource argument, so the hot paths pay neither a
/// `:persistent_term` lookup in Elixir nor a resource-type lookup and a
/// reference-count round trip here.
static STORE: OnceLock<Store> = OnceLock::new();

/// The engine, created with the default limits if `store_init/1` has not
/// run yet.
pub fn store() -> &'static Store {
    STORE.get_or_init(Store::new)
}

/// Creates the engine with `limits` (`%{max_value_bytes: n, ...}` or `nil`
/// for the defaults). `:ok` when it is created, or already exists with the
/// same limits; `{:error, {:invalid_argument, {:store_exists, limits}}}`
/// when it exists with others (limits are fixed for the VM's lifetime).
#[rustler::nif(name = "store_init")]
fn init<'a>(env: Env<'a>, limits: Term<'a>) -> Term<'a> {
    let r = decode_limits(limits).and_then(|limits| {
        let existing = STORE.get_or_init(|| Store::with_limits(limits.clone()));
        if existing.limits() == &limits {
            Ok(())
        } else {
            Err(Error::InvalidArgument(Value::tagged(
                "store_exists",
                limits_value(existing.limits()),
            )))
        }
    });
    unit_or(env, r)
}

fn limits_value(l: &Limits) -> Value {
    let int = |n: usize| Value::Int(n as i64);
    let pairs = [
        ("max_value_bytes", l.max_value_bytes),
        ("max_name_bytes", l.max_name_bytes),
        ("max_variables", l.max_variables),
        ("max_history", l.max_history),
        ("max_snapshot_bytes", l.max_snapshot_bytes),
    ];
    Value::Map(pairs.map(|(k, n)| (Value::atom(k), int(n))).into())
}

fn decode_limits(term: Term) -> Result<Limits, Error> {
    let mut limits = Limits::default();
    let map = decode_value(term, 4096)?;
    match map {
        Value::Nil => return Ok(limits),
        Value::Map(_) => {}
        _ => return Err(Error::invalid_arg("limits_must_be_a_map")),
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
fn limits(env: Env) -> Term {
    let l = store().limits();
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

/// opts: `%{ttl_ms: nil | n, max_history: n, metadata: map,
/// rate_limit: nil | {ops_per_sec, burst}, audit_capacity: nil | n}`,
/// checked by the core's `SessionCreate`.
#[rustler::nif(name = "session_create")]
fn session_create<'a>(env: Env<'a>, id: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let now = now_us();
    let r = (|| {
        let id = decode_sid(id)?;
        let opts = decode_value(opts, store().limits().max_value_bytes)?;
        SessionCreate::from_opts(id, &opts)?.apply(store(), now)
    })();
    answer(env, r)
}

#[rustler::nif(name = "session_info")]
fn session_info<'a>(env: Env<'a>, id: Term<'a>) -> Term<'a> {
    let now = now_us();
    let r = decode_sid(id).and_then(|id| store().session(id, now));
    match r {
        Ok(s) => (
            atoms::ok(),
            reply::SESSION.encode(env, &session_fields(&s, now)),
        )
            .encode(env),
        Err(e) => error(env, &e),
    }
}

/// Heap bytes of a session's variables; walks every variable.
#[rustler::nif(name = "session_memory", schedule = "DirtyCpu")]
fn session_memory<'a>(env: Env<'a>, id: Term<'a>) -> Term<'a> {
    let r = decode_sid(id).and_then(|id| store().session(id, now_us()).map(|s| s.heap_size()));
    ok_or(env, r)
}

#[rustler::nif(name = "session_delete")]
fn session_delete<'a>(env: Env<'a>, id: Term<'a>) -> Term<'a> {
    unit_or(
        env,
        decode_sid(id).and_then(|id| store().delete_session(id)),
    )
}

#[rustler::nif(name = "session_list")]
fn session_list() -> Vec<String> {
    store()
        .session_ids(now_us())
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Removes expired sessions; returns their ids.
#[rustler::nif(name = "session_sweep", schedule = "DirtyCpu")]
fn session_sweep() -> Vec<String> {
    store()
        .sweep_expired(now_us())
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[rustler::nif(name = "session_export", schedule = "DirtyCpu")]
fn session_export<'a>(env: Env<'a>, id: Term<'a>) -> Term<'a> {
    match decode_sid(id).and_then(|id| store().export_session(id, now_us())) {
        Ok(b) => (atoms::ok(), bytes(env, &b)).encode(env),
        Err(e) => error(env, &e),
    }
}

/// On a dirty I/O thread: imports take turns (see `Store::import_session`),
/// and one waiting for its turn must not hold a dirty CPU scheduler, nor a
/// big one keep every dirty CPU scheduler from other work.
#[rustler::nif(name = "session_import", schedule = "DirtyIo")]
fn session_import<'a>(env: Env<'a>, snapshot: Term<'a>, new_id: Term<'a>) -> Term<'a> {
    let r = (|| {
        let bin = Binary::from_term(snapshot)
            .map_err(|_| Error::InvalidSnapshot("expected a binary".into()))?;
        let new_id = if is_nil(new_id) {
            None
        } else {
            Some(decode_sid(new_id)?)
        };
        store()
            .import_session(bin.as_slice(), new_id, now_us())
            .map(|id| id.to_string())
    })();
    ok_or(env, r)
}

/// Test-only: panics, so a test can show that a panic in a NIF is an
/// exception in the caller and that the VM and the store live on.
#[rustler::nif(name = "debug_panic")]
fn debug_panic() -> rustler::Atom {
    panic!("debug_panic: a test of the NIF boundary")
}
