defmodule DSPex.Bridge.Health do
  @moduledoc """
  Liveness and readiness of the library, as served on `/health/live` and
  `/health/ready` by `DSPex.Bridge.Analytics.Endpoint`.

  - *live*: the VM answers; `live/0` is always `:ok`.
  - *ready*: the NIF is loaded, the store is up (its resource answers and
    the `DSPex.Bridge.SessionStore` server runs), and the configured
    backend answers when it is not the in-VM NIF (for example a port
    program), within `:timeout` ms (default 1000).

      {:ok, %{nif: :ok, store: :ok, backend: :ok}} = DSPex.Bridge.Health.ready()
  """

  alias DSPex.Bridge.{Backend, Native, SessionStore}

  @type check :: :ok | {:error, term}
  @type checks :: %{nif: check, store: check, backend: check}

  @doc "Always `:ok`: if this runs, the VM is alive."
  @spec live() :: :ok
  def live, do: :ok

  @doc "`{:ok, checks}` when every check passes, else `{:error, checks}`."
  @spec ready(keyword) :: {:ok, checks} | {:error, checks}
  def ready(opts \\ []) do
    timeout = Keyword.get(opts, :timeout, 1_000)
    nif = check_nif()
    store = if nif == :ok, do: check_store(), else: {:error, :nif_not_loaded}
    checks = %{nif: nif, store: store, backend: check_backend(timeout)}

    if Enum.all?(Map.values(checks), &(&1 == :ok)),
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
    store = Backend.Native.store()

    cond do
      not is_map(Native.store_limits(store)) -> {:error, :store_not_answering}
      Process.whereis(SessionStore) == nil -> {:error, :session_store_not_running}
      true -> :ok
    end
  rescue
    _ -> {:error, :store_not_initialized}
  end

  defp check_backend(timeout) do
    case SessionStore.backend() do
      Backend.Native ->
        :ok

      backend ->
        # A monitored process, so a crashing or hanging backend becomes a
        # failed check rather than an exit in the caller.
        {pid, ref} = spawn_monitor(fn -> exit({:answer, backend.list_sessions()}) end)

        receive do
          {:DOWN, ^ref, :process, _, {:answer, list}} when is_list(list) -> :ok
          {:DOWN, ^ref, :process, _, {:answer, other}} -> {:error, {:backend_error, other}}
          {:DOWN, ^ref, :process, _, reason} -> {:error, {:backend_down, reason}}
        after
          timeout ->
            Process.demonitor(ref, [:flush])
            Process.exit(pid, :kill)
            {:error, :backend_timeout}
        end
    end
  end
end
