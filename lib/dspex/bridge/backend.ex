defmodule DSPex.Bridge.Backend do
  @moduledoc """
  The contract between `DSPex.Bridge.SessionStore` and an engine.

  Two implementations run the same Rust core: `DSPex.Bridge.Backend.Native`
  (a NIF, in the VM, fastest) and an out-of-process port program. Callbacks
  return raw engine shapes (timestamps as microseconds since the epoch);
  `SessionStore` turns them into the documented API. `principal` is the
  session a call is made on behalf of, or `nil` for the session itself.

  Each callback is one core command (`native/dspex_core/src/command/`):
  the port backend sends the command by name, the NIF backend calls the NIF
  that builds it or calls the typed function it dispatches to. See
  `docs/adding-an-operation.md`.

  Each callback carries its command's name (`Operation::NAME`), which is
  also the NIF's name (`DSPex.Bridge.Native`) and the port's wire name: one
  operation, one name, in every layer. The public API
  (`DSPex.Bridge.SessionStore`, ...) keeps its own documented names.
  """

  @type sid :: String.t()
  @type ident :: atom | String.t()
  @typedoc "A session id, or `{session_id, context}` when access rules have conditions."
  @type principal :: String.t() | {String.t(), map} | nil
  @type reason :: atom | {atom, term}
  @type update :: {ident, term, map, non_neg_integer | nil}

  @callback session_create(sid, opts :: map) :: :ok | {:error, reason}
  @callback session_info(sid) :: {:ok, map} | {:error, reason}
  @doc "Heap bytes held by one session's variables."
  @callback session_memory(sid) :: {:ok, non_neg_integer} | {:error, reason}
  @callback session_delete(sid) :: :ok | {:error, reason}
  @callback session_list() :: [sid]
  @callback session_sweep() :: [sid]
  @callback session_export(sid) :: {:ok, binary} | {:error, reason}
  @callback session_import(binary, new_id :: sid | nil) :: {:ok, sid} | {:error, reason}

  @callback var_register(sid, ident, atom, term, opts :: map, principal) ::
              {:ok, String.t()} | {:error, reason}
  @callback var_get(sid, ident, principal) :: {:ok, map} | {:error, reason}
  @callback var_get_value(sid, ident, principal) :: {:ok, term} | {:error, reason}
  @callback var_exists(sid, ident, principal) :: {:ok, boolean} | {:error, reason}
  @callback var_set(
              sid,
              ident,
              term,
              metadata :: map,
              expected :: non_neg_integer | nil,
              principal
            ) ::
              {:ok, pos_integer} | {:error, reason}
  @callback var_set_many(sid, [update], atomic :: boolean, principal) ::
              {:ok, [pos_integer | {:ok, pos_integer} | {:error, reason}]} | {:error, reason}
  @callback var_history(sid, ident, limit :: non_neg_integer, principal) ::
              {:ok, [map]} | {:error, reason}
  @callback var_rollback(sid, ident, version :: non_neg_integer, principal) ::
              {:ok, pos_integer} | {:error, reason}
  @callback var_delete(sid, ident, principal) :: :ok | {:error, reason}
  @callback var_list(sid, pattern :: String.t() | nil, principal) ::
              {:ok, [map]} | {:error, reason}
  @callback var_names(sid, pattern :: String.t() | nil, principal) ::
              {:ok, [ident]} | {:error, reason}

  # access control (see DSPex.Bridge.AccessControl)
  @callback acl_set_rules(sid, ident, rules :: list, principal) :: :ok | {:error, reason}
  @callback acl_check(sid, ident, principal, permission :: atom) :: :ok | {:error, reason}
  @callback acl_authorize(sid, ident, principal, permission :: atom) :: :ok | {:error, reason}
  @doc """
  The guard of a session-level operation (information, diagnostics, export,
  audit log, deletion): `:ok` for the session itself (no principal, or the
  session's id), else `{:error, :access_denied}`, audited.
  """
  @callback acl_authorize_session(sid, principal :: String.t() | nil, permission :: atom) ::
              :ok | {:error, reason}
  @callback acl_audit_log(sid, limit :: non_neg_integer) :: {:ok, [map]} | {:error, reason}
  # Dependency graph (DSPex.Bridge.DependencyManager)
  @callback graph_add_edge(sid, from :: ident, to :: ident, type :: atom, principal) ::
              {:ok, new? :: boolean} | {:error, reason}
  @callback graph_remove_edge(sid, from :: ident, to :: ident, principal) ::
              {:ok, removed? :: boolean} | {:error, reason}
  @callback graph_clear(sid, ident, principal) :: {:ok, non_neg_integer} | {:error, reason}
  @callback graph_dependencies(sid, ident, transitive :: boolean, principal) ::
              {:ok, [ident]} | {:error, reason}
  @callback graph_dependents(sid, ident, transitive :: boolean, principal) ::
              {:ok, [ident]} | {:error, reason}
  @callback graph_update_order(sid, [ident], principal) :: {:ok, [ident]} | {:error, reason}
  @callback graph_render(sid, format :: :dot | :mermaid, principal) ::
              {:ok, binary} | {:error, reason}
  @callback graph_info(sid, principal) :: {:ok, map} | {:error, reason}
end
