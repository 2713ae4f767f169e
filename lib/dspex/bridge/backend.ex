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

  The guard of session-level operations is not a callback yet:
  `DSPex.Bridge.Backend.Router.authorize_session/3` calls
  `DSPex.Bridge.Backend.Native.authorize_session/3` or the port program's
  `acl_authorize_session` command.
  """

  @type sid :: String.t()
  @type ident :: atom | String.t()
  @typedoc "A session id, or `{session_id, context}` when access rules have conditions."
  @type principal :: String.t() | {String.t(), map} | nil
  @type reason :: atom | {atom, term}
  @type update :: {ident, term, map, non_neg_integer | nil}

  @callback create_session(sid, opts :: map) :: :ok | {:error, reason}
  @callback session_info(sid) :: {:ok, map} | {:error, reason}
  @callback delete_session(sid) :: :ok | {:error, reason}
  @callback list_sessions() :: [sid]
  @callback sweep_expired() :: [sid]
  @callback export_session(sid) :: {:ok, binary} | {:error, reason}
  @callback import_session(binary, new_id :: sid | nil) :: {:ok, sid} | {:error, reason}

  @callback register_variable(sid, ident, atom, term, opts :: map, principal) ::
              {:ok, String.t()} | {:error, reason}
  @callback get_variable(sid, ident, principal) :: {:ok, map} | {:error, reason}
  @callback get_value(sid, ident, principal) :: {:ok, term} | {:error, reason}
  @callback variable_exists(sid, ident, principal) :: {:ok, boolean} | {:error, reason}
  @callback set_value(
              sid,
              ident,
              term,
              metadata :: map,
              expected :: non_neg_integer | nil,
              principal
            ) ::
              {:ok, pos_integer} | {:error, reason}
  @callback set_values(sid, [update], atomic :: boolean, principal) ::
              {:ok, [pos_integer | {:ok, pos_integer} | {:error, reason}]} | {:error, reason}
  @callback history(sid, ident, limit :: non_neg_integer, principal) ::
              {:ok, [map]} | {:error, reason}
  @callback rollback(sid, ident, version :: non_neg_integer, principal) ::
              {:ok, pos_integer} | {:error, reason}
  @callback delete_variable(sid, ident, principal) :: :ok | {:error, reason}
  @callback list_variables(sid, pattern :: String.t() | nil, principal) ::
              {:ok, [map]} | {:error, reason}
  @callback variable_names(sid, pattern :: String.t() | nil, principal) ::
              {:ok, [ident]} | {:error, reason}

  # access control (see DSPex.Bridge.AccessControl)
  @callback set_access_rules(sid, ident, rules :: list, principal) :: :ok | {:error, reason}
  @callback check_access(sid, ident, principal, permission :: atom) :: :ok | {:error, reason}
  @callback authorize(sid, ident, principal, permission :: atom) :: :ok | {:error, reason}
  @callback audit_log(sid, limit :: non_neg_integer) :: {:ok, [map]} | {:error, reason}
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
