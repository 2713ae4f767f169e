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
    {_, 0} = System.cmd("kill", ["-9", to_string(old)])
    wait_for_new(old, 100)
  end

  defp wait_for_new(_old, 0), do: raise("the port program did not come back")

  defp wait_for_new(old, tries) do
    case Port.os_pid() do
      pid when is_integer(pid) and pid != old -> :ok
      _ -> Process.sleep(50) && wait_for_new(old, tries - 1)
    end
  end
end
