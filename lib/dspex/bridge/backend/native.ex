defmodule DSPex.Bridge.Backend.Native do
  @moduledoc """
  The in-VM backend: the Rust core as a NIF. The store is a resource kept in
  `:persistent_term`, so every call is one NIF call from the caller's own
  process; no GenServer sits on the path.
  """
  @behaviour DSPex.Bridge.Backend

  alias DSPex.Bridge.Native

  @store_key {__MODULE__, :store}

  @doc """
  Creates the store once per VM (later calls return the existing one), with
  optional limits: `max_value_bytes`, `max_name_bytes`, `max_variables`,
  `max_history`, `max_snapshot_bytes`.
  """
  @spec init(map) :: {:ok, reference} | {:error, term}
  def init(limits \\ %{}) do
    case :persistent_term.get(@store_key, nil) do
      nil ->
        with {:ok, store} <- Native.store_new(limits) do
          :persistent_term.put(@store_key, store)
          {:ok, store}
        end

      store ->
        {:ok, store}
    end
  end

  @doc "The store resource."
  @spec store() :: reference
  def store, do: :persistent_term.get(@store_key)

  @doc "The limits the store enforces."
  @spec limits() :: map
  def limits, do: Native.store_limits(store())

  @doc "Bytes allocated by the native engine (all sessions)."
  @spec memory() :: non_neg_integer
  def memory, do: Native.store_memory()

  @doc "Heap bytes held by one session's variables."
  @spec session_memory(String.t()) :: {:ok, non_neg_integer} | {:error, term}
  def session_memory(sid), do: Native.session_memory(store(), sid)

  @impl true
  def create_session(sid, opts), do: Native.session_create(store(), sid, opts)
  @impl true
  def session_info(sid), do: Native.session_info(store(), sid)
  @impl true
  def delete_session(sid), do: Native.session_delete(store(), sid)
  @impl true
  def list_sessions, do: Native.session_list(store())
  @impl true
  def sweep_expired, do: Native.session_sweep(store())
  @impl true
  def export_session(sid), do: Native.session_export(store(), sid)
  @impl true
  def import_session(bin, new_id), do: Native.session_import(store(), bin, new_id)

  @impl true
  def register_variable(sid, name, type, initial, opts, principal),
    do: Native.var_register(store(), sid, name, type, initial, opts, principal)

  @impl true
  def get_variable(sid, ident, principal), do: Native.var_get(store(), sid, ident, principal)
  @impl true
  def get_value(sid, ident, principal), do: Native.var_value(store(), sid, ident, principal)

  @impl true
  def set_value(sid, ident, value, metadata, expected, principal),
    do: Native.var_set(store(), sid, ident, value, metadata, expected, principal)

  @impl true
  def set_values(sid, updates, atomic, principal),
    do: Native.var_set_many(store(), sid, updates, atomic, principal)

  @impl true
  def history(sid, ident, limit, principal),
    do: Native.var_history(store(), sid, ident, limit, principal)

  @impl true
  def rollback(sid, ident, version, principal),
    do: Native.var_rollback(store(), sid, ident, version, principal)

  @impl true
  def delete_variable(sid, ident, principal),
    do: Native.var_delete(store(), sid, ident, principal)

  @impl true
  def list_variables(sid, pattern, principal),
    do: Native.var_list(store(), sid, pattern, principal)

  @impl true
  def variable_names(sid, pattern, principal),
    do: Native.var_names(store(), sid, pattern, principal)

  @impl true
  def set_access_rules(sid, ident, rules, principal),
    do: Native.acl_set_rules(store(), sid, ident, rules, principal)

  @impl true
  def check_access(sid, ident, principal, permission),
    do: Native.acl_check(store(), sid, ident, principal, permission)

  @impl true
  def authorize(sid, ident, principal, permission),
    do: Native.acl_authorize(store(), sid, ident, principal, permission)

  @impl true
  def audit_log(sid, limit), do: Native.acl_audit_log(store(), sid, limit)
  # Most inserts need a small search and run on the caller's scheduler; the
  # engine says when one does not, and it is redone on a dirty scheduler.
  @impl true
  def graph_add_edge(sid, from, to, type, principal) do
    case Native.graph_add_edge(store(), sid, from, to, type, principal) do
      :over_budget -> Native.graph_add_edge_dirty(store(), sid, from, to, type, principal)
      result -> result
    end
  end

  @impl true
  def graph_remove_edge(sid, from, to, principal),
    do: Native.graph_remove_edge(store(), sid, from, to, principal)

  @impl true
  def graph_clear(sid, var, principal), do: Native.graph_clear(store(), sid, var, principal)

  @impl true
  def graph_dependencies(sid, var, transitive, principal),
    do: Native.graph_dependencies(store(), sid, var, transitive, principal)

  @impl true
  def graph_dependents(sid, var, transitive, principal),
    do: Native.graph_dependents(store(), sid, var, transitive, principal)

  @impl true
  def graph_update_order(sid, changed, principal),
    do: Native.graph_update_order(store(), sid, changed, principal)

  @impl true
  def graph_render(sid, format, principal),
    do: Native.graph_render(store(), sid, format, principal)

  @impl true
  def graph_info(sid, principal), do: Native.graph_info(store(), sid, principal)
end
