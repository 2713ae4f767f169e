//! The replica engine: a second [`Store`] in the VM holding the sessions that
//! a Raft group replicates (`DSPex.Bridge.Backend.Raft`). Its sessions are
//! changed only by the group's state machine applying log entries, so a
//! session id the ordinary NIF path uses never reaches a replicated copy and
//! a replicated copy is never written around the log.
//!
//! A log entry carries one core [`Command`] as the MessagePack the port
//! program accepts (`{"var_set": {...}}`) and the time the leader stamped on
//! it; [`execute`] decodes it, stamps it with that time and runs
//! [`Store::execute`], the deterministic entry point every transport shares,
//! so every member applying the entry computes the same result.
//!
//! # Invariants
//! - Never panics on any frame: bytes that are not a command are
//!   `{:error, {:bad_request, text}}`.
//! - The replica engine has the limits of the VM's engine (created from them
//!   on first use).

use std::sync::OnceLock;

use dspex_core::{Command, Error, Store};
use rustler::{Binary, Env, Term};
use serde::Deserialize;

use crate::error::error;
use crate::store::store;
use crate::term::encode_value;

/// Deepest MessagePack nesting a command may have (as the port program).
const MAX_DECODE_DEPTH: usize = 96;

static REPLICA: OnceLock<Store> = OnceLock::new();

fn replica() -> &'static Store {
    REPLICA.get_or_init(|| Store::with_limits(store().limits().clone()))
}

fn decode(frame: &[u8]) -> Result<Command, Error> {
    let mut rd = frame;
    let mut de = rmp_serde::Deserializer::new(&mut rd);
    de.set_max_depth(MAX_DECODE_DEPTH);
    let command = Command::deserialize(&mut de).map_err(|e| Error::BadRequest(e.to_string()))?;
    drop(de);
    if !rd.is_empty() {
        return Err(Error::BadRequest("trailing bytes after the command".into()));
    }
    Ok(command)
}

fn run<'a>(env: Env<'a>, frame: Binary<'a>, now_us: i64) -> Term<'a> {
    match decode(frame.as_slice()).and_then(|c| replica().execute(c.stamped(now_us))) {
        Ok(answer) => encode_value(env, &answer.into_term()),
        Err(e) => error(env, &e),
    }
}

/// Runs one command frame, stamped `now_us` (microseconds since the epoch),
/// on the replica engine: `:ok`, `{:ok, value}` or
/// `{:error, reason}`, as the port program would answer it.
#[rustler::nif(name = "replica_execute")]
fn execute<'a>(env: Env<'a>, frame: Binary<'a>, now_us: i64) -> Term<'a> {
    run(env, frame, now_us)
}

/// As `replica_execute`, on a dirty scheduler, for commands whose cost grows
/// with the session (exports, imports, listings).
#[rustler::nif(name = "replica_execute_dirty", schedule = "DirtyCpu")]
fn execute_dirty<'a>(env: Env<'a>, frame: Binary<'a>, now_us: i64) -> Term<'a> {
    run(env, frame, now_us)
}
