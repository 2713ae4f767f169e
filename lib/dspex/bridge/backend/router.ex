defmodule DSPex.Bridge.Backend.Router do
  @moduledoc """
  The backend `DSPex.Bridge.SessionStore` talks to: it serves every session
  from the backend that holds it, `DSPex.Bridge.Backend.Native` (the NIF) or
  `DSPex.Bridge.Backend.Port` (the port program), or
  `DSPex.Bridge.Backend.Raft` (a replicated session, `replicas:`).

  Which backend a new session goes to: `SessionStore.create_session(id, backend: :port)`
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
  program as a `var_fence` command). `nil` when no backend holds `sid`, and
  for a replicated session, whose locks are commands in its Raft log (see
  `DSPex.Bridge.Backend.Raft.var_lock/3`) that move the fence on every
  member.
  """
  @spec fence(String.t(), String.t(), term) :: tuple | nil
  def fence(sid, var_id, principal) do
    case kind_of(sid) do
      :nif -> {sid, var_id, principal}
      :port -> with pid when is_pid(pid) <- Process.whereis(Port), do: {:port, pid, sid, var_id}
      # Replicated sessions lock and fence in their state machine.
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
  @spec session_create(String.t(), map, kind | nil) :: :ok | {:error, term}
  def session_create(sid, opts, kind) do
    case kind || default_kind() do
      :nif -> exclusive(Native, [Port, Raft], sid, &Native.session_create(&1, opts))
      :port -> exclusive(Port, [Native, Raft], sid, &Port.session_create(&1, opts))
      :raft -> exclusive(Raft, [Native, Port], sid, &Raft.session_create(&1, opts))
      other -> {:error, {:invalid_argument, {:backend, other}}}
    end
  end

  @doc """
  Imports a snapshot into backend `kind` (`nil` for the default); `opts`
  are a replicated session's (`replicas:`, `consistency:`) for `:raft`.
  """
  @spec session_import(binary, String.t() | nil, kind | nil, map) ::
          {:ok, String.t()} | {:error, term}
  def session_import(snapshot, new_id, kind, opts \\ %{}) do
    case kind || default_kind() do
      :nif ->
        exclusive_import(Native, [Port, Raft], &Native.session_import(snapshot, &1), new_id)

      :port ->
        exclusive_import(Port, [Native, Raft], &Port.session_import(snapshot, &1), new_id)

      :raft ->
        exclusive_import(Raft, [Native, Port], &Raft.session_import(snapshot, &1, opts), new_id)

      other ->
        {:error, {:invalid_argument, {:backend, other}}}
    end
  end

  @doc """
  A read with an explicit consistency (`:consistent`, `:leader` or
  `:local`; see `DSPex.Bridge.Backend.Raft`): `fun` (a read callback) with
  `args`, the session id first. A session that is not replicated has one
  copy, read as usual.
  """
  @spec read(:consistent | :leader | :local, atom, list) :: term
  def read(consistency, fun, [sid | _] = args) do
    cond do
      consistency not in [:consistent, :leader, :local] ->
        {:error, {:invalid_argument, {:consistency, consistency}}}

      is_binary(sid) and Raft.owns?(sid) ->
        Raft.read(sid, fun, args, consistency)

      true ->
        apply(__MODULE__, fun, args)
    end
  end

  # Publish in `mine`, then look in `others`: undo if one has it too.
  defp exclusive(mine, others, sid, create) do
    with :ok <- create.(sid) do
      if Enum.any?(others, &held_by?(&1, sid)) do
        mine.session_delete(sid)
        {:error, :already_exists}
      else
        :ok
      end
    end
  end

  defp exclusive_import(mine, others, import, new_id) do
    with {:ok, sid} <- import.(new_id) do
      if Enum.any?(others, &held_by?(&1, sid)) do
        mine.session_delete(sid)
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
  # `var_get_value/3` and `var_set/6` spell this out to keep `apply/3` off the
  # hot path.
  defp routed(fun, [sid | _] = args) do
    case apply(Native, fun, args) do
      {:error, :session_not_found} = miss -> elsewhere(miss, sid, &apply(&1, fun, args))
      result -> result
    end
  end

  @impl true
  def session_create(sid, opts) do
    {kind, opts} = Map.pop(opts, :backend)
    session_create(sid, opts, kind)
  end

  @impl true
  def session_import(snapshot, new_id), do: session_import(snapshot, new_id, nil)

  @doc """
  Ids of every live session, sorted. The port is asked only when it holds
  sessions. If it holds some and does not answer, the result is
  `{:error, {:partial, %{sessions: nif_ids, missing: :port, reason: reason}}}`
  (`reason` `:timeout` or `:backend_unavailable`): the NIF's sessions, and
  an explicit note that the port's are left out.
  """
  @impl true
  @spec session_list() :: [String.t()] | {:error, {:partial, map}}
  def session_list do
    nif = Native.session_list() ++ if(Raft.owns_any?(), do: Raft.session_list(), else: [])

    if Port.owns_any?() do
      case Port.session_list() do
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
  def session_sweep, do: Native.session_sweep() ++ Port.session_sweep() ++ Raft.session_sweep()

  @impl true
  def session_info(sid), do: routed(:session_info, [sid])

  @impl true
  def session_memory(sid), do: routed(:session_memory, [sid])

  @impl true
  def session_delete(sid), do: routed(:session_delete, [sid])

  @impl true
  def session_export(sid), do: routed(:session_export, [sid])

  @impl true
  def var_register(sid, name, type, initial, opts, principal),
    do: routed(:var_register, [sid, name, type, initial, opts, principal])

  @impl true
  def var_get(sid, ident, principal), do: routed(:var_get, [sid, ident, principal])

  @impl true
  def var_exists(sid, ident, principal),
    do: routed(:var_exists, [sid, ident, principal])

  @impl true
  def var_get_value(sid, ident, principal) do
    case Native.var_get_value(sid, ident, principal) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, & &1.var_get_value(sid, ident, principal))

      result ->
        result
    end
  end

  @impl true
  def var_set(sid, ident, value, metadata, expected, principal) do
    case Native.var_set(sid, ident, value, metadata, expected, principal) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, & &1.var_set(sid, ident, value, metadata, expected, principal))

      result ->
        result
    end
  end

  @impl true
  def var_set_many(sid, updates, atomic, principal),
    do: routed(:var_set_many, [sid, updates, atomic, principal])

  @impl true
  def var_history(sid, ident, limit, principal),
    do: routed(:var_history, [sid, ident, limit, principal])

  @impl true
  def var_rollback(sid, ident, version, principal),
    do: routed(:var_rollback, [sid, ident, version, principal])

  @impl true
  def var_delete(sid, ident, principal),
    do: routed(:var_delete, [sid, ident, principal])

  @impl true
  def var_list(sid, pattern, principal),
    do: routed(:var_list, [sid, pattern, principal])

  @impl true
  def var_names(sid, pattern, principal),
    do: routed(:var_names, [sid, pattern, principal])

  @impl true
  def acl_set_rules(sid, ident, rules, principal),
    do: routed(:acl_set_rules, [sid, ident, rules, principal])

  @impl true
  def acl_check(sid, ident, principal, permission),
    do: routed(:acl_check, [sid, ident, principal, permission])

  @impl true
  def acl_authorize(sid, ident, principal, permission),
    do: routed(:acl_authorize, [sid, ident, principal, permission])

  @impl true
  def acl_audit_log(sid, limit), do: routed(:acl_audit_log, [sid, limit])

  @impl true
  def acl_authorize_session(sid, principal, permission) do
    case Native.acl_authorize_session(sid, principal, permission) do
      {:error, :session_not_found} = miss ->
        elsewhere(miss, sid, fn
          Port ->
            Port.acl_authorize_session(sid, principal, permission)

          Raft ->
            Raft.acl_authorize_session(sid, principal, permission)
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
