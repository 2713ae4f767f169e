defmodule DSPex.Bridge.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    limits = Application.get_env(:dspex_bridge, :limits, %{}) |> Map.new()

    case DSPex.Bridge.Backend.Native.init(limits) do
      {:ok, _store} -> :ok
      {:error, reason} -> raise ArgumentError, "invalid :limits config: #{inspect(reason)}"
    end

    children = [
      DSPex.Context.Registry,
      {Registry, keys: :unique, name: DSPex.Bridge.DependencyManager.Registry},
      {DynamicSupervisor,
       name: DSPex.Bridge.DependencyManager.Supervisor, strategy: :one_for_one},
      {DSPex.Bridge.SessionStore,
       sweep_interval: Application.get_env(:dspex_bridge, :sweep_interval, 1_000)}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPex.Bridge.Supervisor)
  end
end
