defmodule DSPex.Bridge.SessionStore.Sweeper do
  @moduledoc false
  # The store's one process: it sweeps expired sessions (reads and writes
  # never pass through it). Registered as `DSPex.Bridge.SessionStore`.
  use GenServer

  alias DSPex.Bridge.Telemetry
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator

  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

  @doc false
  def start_link(opts \\ []),
    do: GenServer.start_link(__MODULE__, opts, name: DSPex.Bridge.SessionStore)

  @impl true
  def init(opts) do
    interval = Keyword.get(opts, :sweep_interval, 1_000)
    {:ok, %{interval: interval, timer: Process.send_after(self(), :sweep, interval)}}
  end

  @impl true
  def handle_info(:sweep, state) do
    for sid <- @backend.sweep_expired() do
      Propagator.session_closed(sid)

      Telemetry.execute(
        [:dspex, :bridge, :session, :expired],
        %{system_time: System.system_time()},
        %{session_id: sid}
      )
    end

    # A `:sweep` sent from outside (a test asking now) replaces the
    # planned one: one timer, however many are asked for.
    Process.cancel_timer(state.timer)
    {:noreply, %{state | timer: Process.send_after(self(), :sweep, state.interval)}}
  end
end
