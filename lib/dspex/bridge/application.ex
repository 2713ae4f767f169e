defmodule DSPex.Bridge.Application do
  @moduledoc false
  use Application
  require Logger

  @impl true
  def start(_type, _args) do
    limits = Application.get_env(:dspex_bridge, :limits, %{}) |> Map.new()

    case DSPex.Bridge.Backend.Native.init(limits) do
      :ok -> :ok
      {:error, reason} -> raise ArgumentError, "invalid :limits config: #{inspect(reason)}"
    end

    # A host's `:telemetry` starts before anything attaches to it, whatever
    # the boot order of the release; then the dispatcher is chosen.
    :ok = start_telemetry()
    :ok = DSPex.Bridge.Telemetry.refresh()
    :ok = DSPex.Bridge.Admission.ensure_counters()

    children = [
      DSPex.Context.Registry,
      # Before the port: its calls are protected from the first one.
      DSPex.Bridge.DeadLetterQueue,
      DSPex.Bridge.State.Bridged,
      # Replicated sessions: ra's system, restarted members, the HA manager.
      DSPex.Bridge.Backend.Raft.System,
      DSPex.Bridge.HAManager,
      # The port program may die (that is what it is for): the Port server
      # restarts it with a backoff and never exits for it. Its supervisor only
      # sees the server's own crashes; should even those exhaust it, it stops
      # (`:transient`: not restarted, not counted) and the port backend answers
      # `{:error, :backend_unavailable}` while the rest of the application
      # runs on.
      %{
        id: DSPex.Bridge.Backend.Port.Supervisor,
        type: :supervisor,
        restart: :transient,
        start:
          {Supervisor, :start_link,
           [
             [{DSPex.Bridge.Backend.Port, limits: limits}],
             [
               strategy: :one_for_one,
               max_restarts: 20,
               max_seconds: 5,
               name: DSPex.Bridge.Backend.Port.Supervisor
             ]
           ]}
      },
      # Derived-variable definitions outlive the propagation workers, which
      # are restarted with them; a crash loop in one session must not use up
      # the restarts of every other session's worker.
      DSPex.Bridge.DependencyManager.Table,
      {Registry, keys: :unique, name: DSPex.Bridge.DependencyManager.Registry},
      {DynamicSupervisor,
       name: DSPex.Bridge.DependencyManager.Supervisor,
       strategy: :one_for_one,
       max_restarts: 100,
       max_seconds: 5},
      {DSPex.Bridge.SessionStore,
       sweep_interval: Application.get_env(:dspex_bridge, :sweep_interval, 1_000)},
      DSPex.Bridge.OptimizerCoordinator,
      DSPex.Bridge.SessionStore.Watch
      | gateway_children() ++ observability_children() ++ backup_children()
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPex.Bridge.Supervisor)
  end

  # `:telemetry` is not a dependency (Elixir 1.14's Mix has no optional
  # applications that a release would accept): started here when present.
  @doc false
  def start_telemetry do
    if Application.spec(:telemetry) != nil or
         :code.where_is_file(~c"telemetry.app") != :non_existing do
      case Application.ensure_all_started(:telemetry, :permanent) do
        {:ok, _} ->
          :ok

        {:error, reason} ->
          Logger.warning(
            "dspex_bridge: :telemetry is present but did not start (#{inspect(reason)}); " <>
              "using the built-in telemetry dispatcher"
          )
      end
    end

    :ok
  end

  # The gRPC gateway when configured: `config :dspex_bridge, grpc: [port: 50051, ...]`.
  defp gateway_children do
    case Application.get_env(:dspex_bridge, :grpc) do
      nil -> []
      false -> []
      opts -> [{DSPex.Bridge.Gateway.Supervisor, opts}]
    end
  end

  # Periodic backups when configured: `config :dspex_bridge, :backup, dir: ...`
  # (see `DSPex.Bridge.Backup`). Last: a round snapshots the sessions above.
  defp backup_children do
    case Application.get_env(:dspex_bridge, :backup) do
      opts when is_list(opts) and opts != [] -> [{DSPex.Bridge.Backup, opts}]
      _ -> []
    end
  end

  # Rust log forwarding always; Analytics and the HTTP endpoint when
  # configured (`config :dspex_bridge, analytics: true | [opts]` and
  # `config :dspex_bridge, :http_endpoint, port: 9568`).
  defp observability_children do
    analytics =
      case Application.get_env(:dspex_bridge, :analytics, false) do
        false -> []
        true -> [{DSPex.Bridge.Analytics, []}]
        opts when is_list(opts) -> [{DSPex.Bridge.Analytics, opts}]
      end

    endpoint =
      case Application.get_env(:dspex_bridge, :http_endpoint) do
        nil -> []
        opts -> [{DSPex.Bridge.Analytics.Endpoint, opts}]
      end

    [DSPex.Bridge.NativeLog | analytics ++ endpoint]
  end
end
