defmodule DSPex.Bridge.Native do
  @moduledoc false
  # NIF stubs, replaced when native/dspex_nif loads. Nothing else belongs here;
  # public modules never expose it.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:dspex_bridge), ~c"native/libdspex_nif")
    :erlang.load_nif(path, 0)
  end

  # store
  def store_init(_limits), do: err()
  def store_limits, do: err()
  def store_memory, do: err()
  # test-only: panics inside the NIF
  def debug_panic, do: err()
  # the engine's commands as [{name, writes?}], and its vocabulary as atoms
  def command_catalog, do: err()
  def vocabulary, do: err()

  # sessions
  def session_create(_sid, _opts), do: err()
  def session_info(_sid), do: err()
  def session_memory(_sid), do: err()
  def session_delete(_sid), do: err()
  def session_list(), do: err()
  def session_sweep(), do: err()
  def session_export(_sid), do: err()
  def session_import(_snapshot, _new_id), do: err()

  # replicated sessions (native/dspex_nif/src/replicated.rs)
  def replica_execute(_frame, _now_us), do: err()
  def replica_execute_dirty(_frame, _now_us), do: err()

  # variables
  def var_register(_sid, _name, _type, _initial, _opts, _principal), do: err()
  def var_get(_sid, _ident, _principal), do: err()
  def var_get_value(_sid, _ident, _principal), do: err()
  def var_exists(_sid, _ident, _principal), do: err()
  def var_set(_sid, _ident, _value, _metadata, _expected, _principal), do: err()
  def var_set_many(_sid, _updates, _atomic, _principal), do: err()
  def var_history(_sid, _ident, _limit, _principal), do: err()
  def var_rollback(_sid, _ident, _version, _principal), do: err()
  def var_delete(_sid, _ident, _principal), do: err()
  def var_list(_sid, _pattern, _principal), do: err()
  def var_names(_sid, _pattern, _principal), do: err()

  # optimizer locks
  def lock_table_init(_lease_ms, _preempt_after), do: err()
  def lock_listen(_pid), do: err()

  def lock_acquire(_key, _optimizer, _pid, _conflict, _wait_ms, _lease_ms, _fence),
    do: err()

  def lock_release(_key, _optimizer), do: err()
  def lock_release_any(_key), do: err()
  def lock_cancel(_key, _waiter), do: err()
  def lock_renew(_key, _optimizer, _lease_ms), do: err()
  def lock_progress(_optimizer, _iteration, _value, _metrics), do: err()
  def lock_info(_key), do: err()
  def lock_status(_optimizer), do: err()
  def lock_active, do: err()
  def lock_expire, do: err()
  # access control
  def acl_validate(_rules), do: err()
  def acl_check_map(_variable, _principal, _permission, _context), do: err()
  def acl_set_rules(_sid, _ident, _rules, _principal), do: err()
  def acl_check(_sid, _ident, _principal, _permission), do: err()
  def acl_authorize(_sid, _ident, _principal, _permission), do: err()
  def acl_authorize_session(_sid, _principal, _permission), do: err()
  def acl_audit_log(_sid, _limit), do: err()

  # analytics metrics and log forwarding (issue 7)
  def metrics_new(_bucket_us, _retention_us), do: err()
  def metrics_reserve(_metrics, _names), do: err()
  def metrics_record(_metrics, _name, _value), do: err()
  def metrics_record_at(_metrics, _name, _value, _t_us), do: err()
  def metrics_query(_metrics, _names, _from_us, _to_us, _aggregations), do: err()
  def metrics_buckets(_metrics, _names, _from_us, _to_us), do: err()
  def metrics_maintain(_metrics, _now_us), do: err()
  def metrics_reset(_metrics), do: err()
  def metrics_stats(_metrics), do: err()
  def metrics_prometheus(_metrics, _prefix, _now_us, _window_us), do: err()
  def log_subscribe(_pid), do: err()
  def log_dropped, do: err()
  def log_emit(_level, _message), do: err()
  # dependency graph
  def graph_add_edge(_sid, _from, _to, _type, _principal), do: err()
  def graph_add_edge_dirty(_sid, _from, _to, _type, _principal), do: err()
  def graph_remove_edge(_sid, _from, _to, _principal), do: err()
  def graph_clear(_sid, _var, _principal), do: err()
  def graph_dependencies(_sid, _var, _transitive, _principal), do: err()
  def graph_dependents(_sid, _var, _transitive, _principal), do: err()
  def graph_update_order(_sid, _changed, _principal), do: err()
  def graph_update_order_dirty(_sid, _changed, _principal), do: err()
  def graph_render(_sid, _format, _principal), do: err()
  def graph_info(_sid, _principal), do: err()

  # circuit breakers and retry budgets
  def breaker_install(_name, _opts), do: err()
  def breaker_ask(_name), do: err()
  def breaker_record(_name, _outcome, _duration_ms), do: err()
  def breaker_state(_name), do: err()
  def breaker_set(_name, _state), do: err()
  def breaker_remove(_name), do: err()
  def breaker_list, do: err()
  def breaker_info(_name), do: err()
  def breaker_advance(_name, _ms), do: err()
  def breaker_budget_configure(_name, _ratio, _min_per_second, _max_tokens), do: err()
  def breaker_budget_deposit(_name), do: err()
  def breaker_budget_withdraw(_name), do: err()
  def breaker_budget_info(_name), do: err()

  defp err, do: :erlang.nif_error(:nif_not_loaded)
end
