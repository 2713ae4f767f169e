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
    // graph
    over_budget,
}
