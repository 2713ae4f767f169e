defmodule DSPex.Bridge.NativeLog do
  @moduledoc """
  Forwards the Rust engine's `tracing` events at warn level and above to
  `Logger`, with `Logger` metadata `source: :dspex_native` and `target:` (the
  Rust module that logged).

  The engine queues records without touching the BEAM, and a thread of its
  own sends them here in batches, so logging from Rust never blocks a
  scheduler. Started by the application; when it restarts it subscribes
  again. Records that arrive while the queue (1024 records) is full are
  dropped and counted in the `dspex_native_log_dropped_total` metric.
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.Native

  @doc false
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc "Records dropped because the engine's queue was full."
  @spec dropped() :: non_neg_integer
  def dropped, do: Native.log_dropped()

  @impl true
  def init(_opts) do
    :ok = Native.log_subscribe(self())
    {:ok, %{}}
  end

  @impl true
  def handle_info({:dspex_log, records}, state) do
    for {level, target, message} <- records do
      Logger.log(level, message, source: :dspex_native, target: target)
    end

    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}
end
