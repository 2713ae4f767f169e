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

  @doc "Heap bytes held by one session's variables."
  @spec session_memory(String.t()) :: {:ok, non_neg_integer} | {:error, term}
  def session_memory(sid), do: Native.session_memory(sid)

  @impl true
  def create_session(sid, opts), do: Native.session_create(sid, opts)
  @impl true
  def session_info(sid), do: Native.session_info(sid)
  @impl true
  def delete_session(sid), do: Native.session_delete(sid)
  @impl true
  def list_sessions, do: Native.session_list()
  @impl true
  def sweep_expired, do: Native.session_sweep()
  @impl true
  def export_session(sid), do: Native.session_export(sid)
  @impl true
  def import_session(bin, new_id), do: Native.session_import(bin, new_id)

  @impl true
  def register_variable(sid, name, type, initial, opts, principal),
    do: Native.var_register(sid, name, type, initial, opts, principal)

  @impl true
  def get_variable(sid, ident, principal), do: Native.var_get(sid, ident, principal)
  @impl true
  def get_value(sid, ident, principal), do: Native.var_value(sid, ident, principal)
  @impl true
  def variable_exists(sid, ident, principal), do: Native.var_exists(sid, ident, principal)

  @impl true
  def set_value(sid, ident, value, metadata, expected, principal),
    do: Native.var_set(sid, ident, value, metadata, expected, principal)

  @impl true
  def set_values(sid, updates, atomic, principal),
    do: Native.var_set_many(sid, updates, atomic, principal)

  @impl true
  def history(sid, ident, limit, principal),
    do: Native.var_history(sid, ident, limit, principal)

  @impl true
  def rollback(sid, ident, version, principal),
    do: Native.var_rollback(sid, ident, version, principal)

  @impl true
  def delete_variable(sid, ident, principal),
    do: Native.var_delete(sid, ident, principal)

  @impl true
  def list_variables(sid, pattern, principal),
    do: Native.var_list(sid, pattern, principal)

  @impl true
  def variable_names(sid, pattern, principal),
    do: Native.var_names(sid, pattern, principal)

  @impl true
  def set_access_rules(sid, ident, rules, principal),
    do: Native.acl_set_rules(sid, ident, rules, principal)

  @impl true
  def check_access(sid, ident, principal, permission),
    do: Native.acl_check(sid, ident, principal, permission)

  @impl true
  def authorize(sid, ident, principal, permission),
    do: Native.acl_authorize(sid, ident, principal, permission)

  @impl true
  def audit_log(sid, limit), do: Native.acl_audit_log(sid, limit)

  @doc """
  The guard of a session-level operation: `:ok` for the session itself (no
  principal, or the session's id), else `{:error, :access_denied}`, audited.
  """
  @spec authorize_session(String.t(), String.t() | nil, atom) :: :ok | {:error, term}
  def authorize_session(sid, principal, permission),
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

  @impl true
  def graph_update_order(sid, changed, principal),
    do: Native.graph_update_order(sid, changed, principal)

  @impl true
  def graph_render(sid, format, principal),
    do: Native.graph_render(sid, format, principal)

  @impl true
  def graph_info(sid, principal), do: Native.graph_info(sid, principal)
end
