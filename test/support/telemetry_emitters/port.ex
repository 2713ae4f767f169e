defmodule DSPex.TelemetryEmitters.Port do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.Backend.Port

  # Killing the port program makes it exit (`:exited`) and its supervisor
  # start a fresh one (`:started`); both wait until the new one answers, so
  # later tests find a working port.
  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :port, :exited] => &kill_and_wait/0,
      [:dspex, :bridge, :port, :started] => &kill_and_wait/0
    }
  end

  defp kill_and_wait do
    old = Port.os_pid()
    # Its own handler, so the event the catalogue test awaits is not taken.
    id = {__MODULE__, make_ref()}
    test = self()
    forward = fn _, _, %{os_pid: pid}, _ -> send(test, {id, pid}) end
    :ok = DSPex.Bridge.Telemetry.attach(id, [:dspex, :bridge, :port, :started], forward, nil)

    try do
      {_, 0} = System.cmd("kill", ["-9", to_string(old)])

      receive do
        {^id, pid} when pid != old -> :ok
      after
        10_000 -> raise "the port program did not come back"
      end
    after
      DSPex.Bridge.Telemetry.detach(id)
    end
  end
end
