defmodule DSPex.Bridge.Health do
  @moduledoc """
  Liveness and readiness of the library, as served on `/health/live` and
  `/health/ready` by `DSPex.Bridge.Analytics.Endpoint`.

  - *live*: the VM answers; `live/0` is always `:ok`.
  - *ready*: the NIF is loaded, the store is up (its resource answers and
    the `DSPex.Bridge.SessionStore` server runs), and, when the port program
    is the default backend (`config :dspex_bridge, backend: :port`), it
    answers within `:timeout` ms (default 1000). Otherwise the port is
    `:not_configured` and does not count: it may die and restart without
    making a NIF node unready.
  - *raft*: `:not_configured` while this node holds no replicated-session
    member; else `:ok` when ra runs and every group with a member here has
    a leader, `{:error, {:raft_no_leader, session_ids}}` otherwise (the
    group cannot take writes: a majority of its members is down or cut off),
    and `{:error, :ra_unavailable}` when `ra_data_dir` is configured and ra
    could not start on this node.

      {:ok, %{nif: :ok, store: :ok, port: :not_configured}} = DSPex.Bridge.Health.ready()
  """

  alias DSPex.Bridge.{Backend, Native, SessionStore}

  @type check :: :ok | :not_configured | {:error, term}
  @type checks :: %{nif: check, store: check, port: check, raft: check}

  @doc "Always `:ok`: if this runs, the VM is alive."
  @spec live() :: :ok
  def live, do: :ok

  @doc "`{:ok, checks}` when every check passes, else `{:error, checks}`."
  @spec ready(keyword) :: {:ok, checks} | {:error, checks}
  def ready(opts \\ []) do
    timeout = Keyword.get(opts, :timeout, 1_000)
    nif = check_nif()
    store = if nif == :ok, do: check_store(), else: {:error, :nif_not_loaded}

    checks = %{
      nif: nif,
      store: store,
      port: check_port(timeout),
      raft: DSPex.Bridge.HAManager.health()
    }

    if Enum.all?(Map.values(checks), &(&1 in [:ok, :not_configured])),
      do: {:ok, checks},
      else: {:error, checks}
  end

  defp check_nif do
    # Any NIF answers once the library is loaded; the stubs raise otherwise.
    _ = Native.log_dropped()
    :ok
  rescue
    _ -> {:error, :nif_not_loaded}
  end

  defp check_store do
    cond do
      not is_map(Native.store_limits()) -> {:error, :store_not_answering}
      Process.whereis(SessionStore) == nil -> {:error, :session_store_not_running}
      true -> :ok
    end
  rescue
    _ -> {:error, :store_not_initialized}
  end

  # The port program is checked when it is the default backend: it is allowed
  # to die and be restarted, which must not make a NIF-only node unready.
  defp check_port(timeout) do
    if Backend.Router.default_kind() == :port do
      ask_port(timeout)
    else
      :not_configured
    end
  end

  defp ask_port(timeout) do
    # A monitored process, so a crashing or hanging port becomes a failed
    # check rather than an exit in the caller.
    {pid, ref} =
      spawn_monitor(fn -> exit({:answer, Backend.Port.request("session_list", [], timeout)}) end)

    receive do
      {:DOWN, ^ref, :process, _, {:answer, {:ok, ids}}} when is_list(ids) -> :ok
      {:DOWN, ^ref, :process, _, {:answer, other}} -> {:error, {:port_error, other}}
      {:DOWN, ^ref, :process, _, reason} -> {:error, {:port_down, reason}}
    after
      timeout + 100 ->
        Process.demonitor(ref, [:flush])
        Process.exit(pid, :kill)
        {:error, :port_timeout}
    end
  end
end
