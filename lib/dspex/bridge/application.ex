defmodule DSPex.Bridge.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    limits = Application.get_env(:dspex_bridge, :limits, %{}) |> Map.new()

    case DSPex.Bridge.Backend.Native.init(limits) do
      :ok -> :ok
      {:error, reason} -> raise ArgumentError, "invalid :limits config: #{inspect(reason)}"
    end

    :ok = DSPex.Bridge.Telemetry.publish()

    children = [
      DSPex.Context.Registry,
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
      {Registry, keys: :unique, name: DSPex.Bridge.DependencyManager.Registry},
      {DynamicSupervisor,
       name: DSPex.Bridge.DependencyManager.Supervisor, strategy: :one_for_one},
      {DSPex.Bridge.SessionStore,
       sweep_interval: Application.get_env(:dspex_bridge, :sweep_interval, 1_000)},
      DSPex.Bridge.OptimizerCoordinator
      | observability_children()
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPex.Bridge.Supervisor)
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
