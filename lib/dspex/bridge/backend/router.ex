defmodule DSPex.Bridge.Backend.Router do
  @moduledoc """
  The backend `DSPex.Bridge.SessionStore` talks to: it serves every session
  from the backend that holds it, `DSPex.Bridge.Backend.Native` (the NIF) or
  `DSPex.Bridge.Backend.Port` (the port program), or
  `DSPex.Bridge.Backend.Raft` (a replicated session, `replicas:`).

  Which backend a new session goes to: `create_session(id, backend: :port)`
  (or `:nif`), else `config :dspex_bridge, backend: :nif | :port` (default
  `:nif`). Everything after creation has the same API and return shapes.

  ## Routing without a lookup on the NIF path

  A session-scoped call goes to the NIF first. If the NIF store has the
  session, that is the answer: no table, no message, nothing added to the
  hot path. Only when the NIF answers `{:error, :session_not_found}` does the
  router check, with one `:ets` lookup (`Backend.Port.owns?/1`), whether the
  port (or, with one more lookup, the Raft backend) holds the session, and
  if so asks it. A session lives in exactly one
  backend: each create (or import) publishes the new id in its own backend
  first and then checks the other, so of two racing creates of one id at
  least one sees the other and gives up with `{:error, :already_exists}`.
  """
  @behaviour DSPex.Bridge.Backend

  alias DSPex.Bridge.Backend.{Native, Port, Raft}

  @typedoc "Where a session lives."
  @type kind :: :nif | :port | :raft

  @doc "The backend new sessions go to unless told otherwise."
  @spec default_kind() :: kind
  def default_kind, do: Application.get_env(:dspex_bridge, :backend, :nif)

  @doc "The backend holding `sid`, or `nil` if neither does."
  @spec kind_of(String.t()) :: kind | nil
  def kind_of(sid) do
    cond do
      match?({:ok, _}, Native.session_info(sid)) -> :nif
      is_binary(sid) and Port.owns?(sid) -> :port
      is_binary(sid) and Raft.owns?(sid) -> :raft
      true -> nil
    end
  end

  @doc """
  The fence argument of `lock_acquire` for a session variable: the variable
  itself for a NIF session (the lock table moves its fence in the same
  critical section), or `{:port, server, sid, var_id}` for a port session
  (the table sends each move to the port server, which applies it in the
  program as a `var_fence` command). `nil` when no backend holds `sid`.
  """
  @spec fence(String.t(), String.t(), term) :: tuple | nil
  def fence(sid, var_id, principal) do
    case kind_of(sid) do
      :nif -> {sid, var_id, principal}
      :port -> with pid when is_pid(pid) <- Process.whereis(Port), do: {:port, pid, sid, var_id}
      # Replicated sessions fence in their state machine (Backend.Raft.fenced/5).
      :raft -> nil
      nil -> nil
    end
  end

  @doc false
  def module(:nif), do: Native
  def module(:port), do: Port
  def module(:raft), do: Raft

  @doc """
  Creates a session in backend `kind` (`nil` for the default).
  `{:error, {:invalid_argument, {:backend, other}}}` for an unknown kind.
  """
  @spec create_session(String.t(), map, kind | nil) :: :ok | {:error, term}
  def create_session(sid, opts, kind) do
    case kind || default_kind() do
      :nif -> exclusive(Native, [Port, Raft], sid, &Native.create_session(&1, opts))
      :port -> exclusive(Port, [Native, Raft], sid, &Port.create_session(&1, opts))
      :raft -> exclusive(Raft, [Native, Port], sid, &Raft.create_session(&1, opts))
      other -> {:error, {:invalid_argument, {:backend, other}}}
    end
  end

  @doc "Imports a snapshot into backend `kind` (`nil` for the default)."
  @spec import_session(binary, String.t() | nil, kind | nil) :: {:ok, String.t()} | {:error, term}
  def import_session(snapshot, new_id, kind) do
    case kind || default_kind() do
      :nif -> exclusive_import(Native, [Port, Raft], snapshot, new_id)
      :port -> exclusive_import(Port, [Native, Raft], snapshot, new_id)
      other -> {:error, {:invalid_argument, {:backend, other}}}
    end
  end

  # Publish in `mine`, then look in `others`: undo if one has it too.
  defp exclusive(mine, others, sid, create) do
    with :ok <- create.(sid) do
      if Enum.any?(others, &held_by?(&1, sid)) do
        mine.delete_session(sid)
        {:error, :already_exists}
      else
        :ok
      end
    end
  end

  defp exclusive_import(mine, others, snapshot, new_id) do
    with {:ok, sid} <- mine.import_session(snapshot, new_id) do
      if Enum.any?(others, &held_by?(&1, sid)) do
        mine.delete_session(sid)
        {:error, :already_exists}
      else
        {:ok, sid}
      end
    end
  end

  defp held_by?(Native, sid), do: match?({:ok, _}, Native.session_info(sid))
  defp held_by?(Port, sid), do: Port.owns?(sid)
  defp held_by?(Raft, sid), do: Raft.owns?(sid)

  # The backend, other than the NIF, holding a session the NIF store does
  # not have: `call.(module)`, or `miss` when none does.
  defp elsewhere(miss, sid, call) do
    cond do
      not is_binary(sid) -> miss
      Port.owns?(sid) -> call.(Port)
      Raft.owns?(sid) -> call.(Raft)
      true -> miss
    end
  end

  # A session-scoped call (the session id first): served by the NIF, or by
  # the port when the NIF does not have the session and the port does.
  # `get_value/3` and `set_value/6` spell this out to keep `apply/3` off the
  # hot path.
  defp routed(fun, [sid | _] = args) do
    case apply(Native, fun, args) do
      {:error, :session_not_found} = miss -> elsewhere(miss, sid, &apply(&1, fun, args))
      result -> result
    end
  end

  @impl true
  def create_session(sid, opts) do
    {kind, opts} = Map.pop(opts, :backend)
    create_session(sid, opts, kind)
  end

  @impl true
  def import_session(snapshot, new_id), do: import_session(snapshot, new_id, nil)

  @doc """
  Ids of every live session, sorted. The port is asked only when it holds
  sessions. If it holds some and does not answer, the result is
  `{:error, {:partial, %{sessions: nif_ids, missing: :port, reason: reason}}}`
  (`reason` `:timeout` or `:backend_unavailable`): the NIF's sessions, and
  an explicit note that the port's are left out.
  """
  @impl true
  @spec list_sessions() :: [String.t()] | {:error, {:partial, map}}
  def list_sessions do
    nif = Native.list_sessions() ++ if(Raft.owns_any?(), do: Raft.list_sessions(), else: [])

    if Port.owns_any?() do
      case Port.list_sessions() do
        ids when is_list(ids) ->
          Enum.sort(nif ++ ids)

        {:error, reason} ->
          {:error, {:partial, %{sessions: Enum.sort(nif), missing: :port, reason: reason}}}
      end
    else
      Enum.sort(nif)
    end
  end

  @impl true
  def sweep_expired, do: Native.sweep_expired() ++ Port.sweep_expired() ++ Raft.sweep_expired()

  @impl true
  def session_info(sid), do: routed(:session_info, [sid])

  @doc "Heap bytes held by one session's variables, in whichever backend."
  @spec session_memory(String.t()) :: {:ok, non_neg_integer} | {:error, term}
  def session_memory(sid), do: routed(:session_memory, [sid])

  @impl true
  def delete_session(sid), do: routed(:delete_session, [sid])

  @impl true
  def export_session(sid), do: routed(:export_session, [sid])

  @impl true
  def register_variable(sid, name, type, initial, opts, principal),
    do: routed(:register_variable, [sid, name, type, initial, opts, principal])

  @impl true
  def get_variable(sid, ident, principal), do: routed(:get_variable, [sid, ident, principal])

  @impl true
  def variable_exists(sid, ident, principal),
    do: routed(:variable_exists, [sid, ident, principal])

  @impl true
  def get_value(sid, ident, principal) do
    case Native.get_value(sid, ident, principal) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, & &1.get_value(sid, ident, principal))

      result ->
        result
    end
  end

  @impl true
  def set_value(sid, ident, value, metadata, expected, principal) do
    case Native.set_value(sid, ident, value, metadata, expected, principal) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, & &1.set_value(sid, ident, value, metadata, expected, principal))

      result ->
        result
    end
  end

  @impl true
  def set_values(sid, updates, atomic, principal),
    do: routed(:set_values, [sid, updates, atomic, principal])

  @impl true
  def history(sid, ident, limit, principal), do: routed(:history, [sid, ident, limit, principal])

  @impl true
  def rollback(sid, ident, version, principal),
    do: routed(:rollback, [sid, ident, version, principal])

  @impl true
  def delete_variable(sid, ident, principal),
    do: routed(:delete_variable, [sid, ident, principal])

  @impl true
  def list_variables(sid, pattern, principal),
    do: routed(:list_variables, [sid, pattern, principal])

  @impl true
  def variable_names(sid, pattern, principal),
    do: routed(:variable_names, [sid, pattern, principal])

  @impl true
  def set_access_rules(sid, ident, rules, principal),
    do: routed(:set_access_rules, [sid, ident, rules, principal])

  @impl true
  def check_access(sid, ident, principal, permission),
    do: routed(:check_access, [sid, ident, principal, permission])

  @impl true
  def authorize(sid, ident, principal, permission),
    do: routed(:authorize, [sid, ident, principal, permission])

  @impl true
  def audit_log(sid, limit), do: routed(:audit_log, [sid, limit])

  @doc """
  The guard of a session-level operation (see
  `DSPex.Bridge.AccessControl.authorize_session/3`), made by the engine
  holding the session: `:ok`, or `{:error, :access_denied}` (audited) for a
  principal other than the session.
  """
  @spec authorize_session(String.t(), String.t() | nil, atom) :: :ok | {:error, term}
  def authorize_session(sid, principal, permission) do
    case Native.authorize_session(sid, principal, permission) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, fn
          Port ->
            Port.request("acl_authorize_session",
              session: sid,
              permission: permission,
              principal: principal
            )

          Raft ->
            Raft.authorize_session(sid, principal, permission)
        end)

      result ->
        result
    end
  end

  @impl true
  def graph_add_edge(sid, from, to, type, principal),
    do: routed(:graph_add_edge, [sid, from, to, type, principal])

  @impl true
  def graph_remove_edge(sid, from, to, principal),
    do: routed(:graph_remove_edge, [sid, from, to, principal])

  @impl true
  def graph_clear(sid, var, principal), do: routed(:graph_clear, [sid, var, principal])

  @impl true
  def graph_dependencies(sid, var, transitive, principal),
    do: routed(:graph_dependencies, [sid, var, transitive, principal])

  @impl true
  def graph_dependents(sid, var, transitive, principal),
    do: routed(:graph_dependents, [sid, var, transitive, principal])

  @impl true
  def graph_update_order(sid, changed, principal),
    do: routed(:graph_update_order, [sid, changed, principal])

  @impl true
  def graph_render(sid, format, principal), do: routed(:graph_render, [sid, format, principal])

  @impl true
  def graph_info(sid, principal), do: routed(:graph_info, [sid, principal])
end
