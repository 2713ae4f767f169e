//! Atoms the NIF names in code, and the engine's vocabulary created at load.

use rustler::{Atom, Env, Term};

rustler::atoms! {
    ok,
    error,
    nil,
    // variable map keys
    id,
    name,
    type_ = "type",
    value,
    version,
    constraints,
    metadata,
    description,
    created_at,
    updated_at,
    last_write,
    access_rules,
    // access control: audit entries, permissions, rate limits
    seq,
    at,
    event,
    principal,
    variable,
    permission,
    read,
    write,
    observe,
    optimize,
    rate_limit,
    audit_capacity,
    ops_per_sec,
    burst,
    available,
    any,
    session_pattern,
    permissions,
    conditions,
    owner_session,
    created_by,
    access_denied,
    // history entries
    // session info
    session_id,
    ttl_ms,
    max_history,
    last_access,
    variable_count,
    memory_bytes,
    // store limits
    max_value_bytes,
    max_name_bytes,
    max_variables,
    max_snapshot_bytes,
    // errors raised by decoding
    invalid_value,
    invalid_argument,
    unsupported_term,
    integer_out_of_range,
    improper_list,
    nested_too_deeply,
    too_large,
    // optimizer locks
    dspex_lock_granted,
    dspex_lock_ended,
    owner_down,
    expired,
    infinity,
    wait,
    abort,
    preempt,
    granted,
    released,
    dspex_fence,
    port,
    already_held,
    preempted,
    removed,
    gone,
    optimizer_id,
    pid,
    token,
    acquired_at,
    lease_left_ms,
    iteration,
    waiters,
    keys,
    reports,
    best_value,
    best_metrics,
    best_iteration,
    started_at,
    last_update,
    // metrics and log forwarding (issue 7)
    avg,
    sum,
    min,
    max,
    count,
    p50,
    p95,
    p99,
    quantile,
    metrics,
    buckets,
    bytes,
    late_samples,
    warning,
    info,
    debug,
    dspex_log,
    bad_level,
    not_registered,
    native_log = "Elixir.DSPex.Bridge.NativeLog",
    // graph
    over_budget,
}

/// Creates every atom of the engine's vocabulary
/// (`dspex_core::vocabulary`) once, so replies built from it come back as
/// atoms although encoding only looks atoms up.
pub fn load(env: Env, _info: Term) -> bool {
    dspex_core::vocabulary::atoms().all(|name| Atom::from_str(env, name).is_ok())
}

/// The engine's vocabulary as atoms (created by [`load`]), each once.
#[rustler::nif(name = "vocabulary")]
fn vocabulary(env: Env) -> Vec<Atom> {
    let mut names: Vec<&str> = dspex_core::vocabulary::atoms().collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| Atom::from_str(env, name).ok())
        .collect()
}
