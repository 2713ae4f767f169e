defmodule DSPex.Bridge.Gateway.Supervisor do
  @moduledoc false
  # The gateway's processes: tokens, the registry of watch streams by token,
  # the optimizer-lock holders, and the server owning the program. Started
  # by the application when `config :dspex_bridge, grpc: [...]` is set (or by
  # `mix dspex.grpc`); the options are validated first (ArgumentError).
  use Supervisor

  def start_link(opts), do: Supervisor.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(opts) do
    _ = DSPex.Bridge.Gateway.config(opts)

    children = [
      DSPex.Bridge.Gateway.Tokens,
      {Registry, keys: :duplicate, name: DSPex.Bridge.Gateway.Streams},
      {Registry, keys: :unique, name: DSPex.Bridge.Gateway.HolderRegistry},
      {DynamicSupervisor, name: DSPex.Bridge.Gateway.HolderSupervisor, strategy: :one_for_one},
      {DSPex.Bridge.Gateway, opts}
    ]

    Supervisor.init(children, strategy: :one_for_one)
  end
end
