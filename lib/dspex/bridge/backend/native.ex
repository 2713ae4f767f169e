defmodule DSPex.Bridge.Backend.Native do
  @moduledoc """
  The in-VM backend: the Rust core as a NIF. The engine is one per VM, held
  by the NIF library itself (as a named ETS table is held by the runtime),
  so every call is one NIF call from the caller's own process: no GenServer
  and no lookup of a handle sit on the path.
  """
  @behaviour DSPex.Bridge.Backend

  alias DSPex.Bridge.Native

  @doc """
  Creates the engine with optional limits: `max_value_bytes`,
  `max_name_bytes`, `max_variables`, `max_history`, `max_snapshot_bytes`.
  Limits are fixed for the VM's lifetime: a later call with the same limits
  is `:ok`, one with different limits
  `{:error, {:invalid_argument, {:store_exists, limits}}}`. A call into the
  engine before `init/1` creates it with the defaults.
  """
  @spec init(map) :: :ok | {:error, term}
  def init(limits \\ %{}), do: Native.store_init(limits)

  @doc "The limits the store enforces."
  @spec limits() :: map
  def limits, do: Native.store_limits()

  @doc "Bytes allocated by the native engine (all sessions)."
  @spec memory() :: non_neg_integer
  def memory, do: Native.store_memory()

  @impl true
  def session_memory(sid), do: Native.session_memory(sid)

  @impl true
  def session_create(sid, opts), do: Native.session_create(sid, opts)
  @impl true
  def session_info(sid), do: Native.session_info(sid)
  @impl true
  def session_delete(sid), do: Native.session_delete(sid)
  @impl true
  def session_list, do: Native.session_list()
  @impl true
  def session_sweep, do: Native.session_sweep()
  @impl true
  def session_export(sid), do: Native.session_export(sid)
  @impl true
  def session_import(bin, new_id), do: Native.session_import(bin, new_id)

  @impl true
  def var_register(sid, name, type, initial, opts, principal),
    do: Native.var_register(sid, name, type, initial, opts, principal)

  @impl true
  def var_get(sid, ident, principal), do: Native.var_get(sid, ident, principal)
  @impl true
  def var_get_value(sid, ident, principal), do: Native.var_get_value(sid, ident, principal)
  @impl true
  def var_exists(sid, ident, principal), do: Native.var_exists(sid, ident, principal)

  @impl true
  def var_set(sid, ident, value, metadata, expected, principal),
    do: Native.var_set(sid, ident, value, metadata, expected, principal)

  @impl true
  def var_set_many(sid, updates, atomic, principal),
    do: Native.var_set_many(sid, updates, atomic, principal)

  @impl true
  def var_history(sid, ident, limit, principal),
    do: Native.var_history(sid, ident, limit, principal)

  @impl true
  def var_rollback(sid, ident, version, principal),
    do: Native.var_rollback(sid, ident, version, principal)

  @impl true
  def var_delete(sid, ident, principal),
    do: Native.var_delete(sid, ident, principal)

  @impl true
  def var_list(sid, pattern, principal),
    do: Native.var_list(sid, pattern, principal)

  @impl true
  def var_names(sid, pattern, principal),
    do: Native.var_names(sid, pattern, principal)

  @impl true
  def acl_set_rules(sid, ident, rules, principal),
    do: Native.acl_set_rules(sid, ident, rules, principal)

  @impl true
  def acl_check(sid, ident, principal, permission),
    do: Native.acl_check(sid, ident, principal, permission)

  @impl true
  def acl_authorize(sid, ident, principal, permission),
    do: Native.acl_authorize(sid, ident, principal, permission)

  @impl true
  def acl_audit_log(sid, limit), do: Native.acl_audit_log(sid, limit)

  @impl true
  def acl_authorize_session(sid, principal, permission),
    do: Native.acl_authorize_session(sid, principal, permission)

  # Most inserts need a small search and run on the caller's scheduler; the
  # engine says when one does not, and it is redone on a dirty scheduler.
  @impl true
  def graph_add_edge(sid, from, to, type, principal) do
    case Native.graph_add_edge(sid, from, to, type, principal) do
      :over_budget -> Native.graph_add_edge_dirty(sid, from, to, type, principal)
      result -> result
    end
  end

  @impl true
  def graph_remove_edge(sid, from, to, principal),
    do: Native.graph_remove_edge(sid, from, to, principal)

  @impl true
  def graph_clear(sid, var, principal), do: Native.graph_clear(sid, var, principal)

  @impl true
  def graph_dependencies(sid, var, transitive, principal),
    do: Native.graph_dependencies(sid, var, transitive, principal)

  @impl true
  def graph_dependents(sid, var, transitive, principal),
    do: Native.graph_dependents(sid, var, transitive, principal)

  # The same for an update order: a small graph's is walked here (a
  # propagation pass asks for one), a large one's on a dirty scheduler.
  @impl true
  def graph_update_order(sid, changed, principal) do
    case Native.graph_update_order(sid, changed, principal) do
      :over_budget -> Native.graph_update_order_dirty(sid, changed, principal)
      result -> result
    end
  end

  @impl true
  def graph_render(sid, format, principal),
    do: Native.graph_render(sid, format, principal)

  @impl true
  def graph_info(sid, principal), do: Native.graph_info(sid, principal)
end
