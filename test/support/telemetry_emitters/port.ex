defmodule DSPex.TelemetryEmitters.Port do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{Admission, SessionStore}
  alias DSPex.Bridge.Backend.Port

  # Killing the port program makes it exit (`:exited`) and its supervisor
  # start a fresh one (`:started`); both wait until the new one answers, so
  # later tests find a working port.
  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :port, :exited] => &kill_and_wait/0,
      [:dspex, :bridge, :port, :started] => &kill_and_wait/0,
      [:dspex, :bridge, :admission, :refused] => &refuse/0
    }
  end

  # With `max_in_flight: 1` and the program stopped, one read holds the
  # only place and the next is refused; the program resumed answers the
  # first, which gives the place back.
  defp refuse do
    env = Application.fetch_env(:dspex_bridge, :port)
    port_env = Application.get_env(:dspex_bridge, :port, [])
    sid = DSPex.TelemetryEmitters.sid("emit-refused")
    {:ok, _} = SessionStore.create_session(sid, backend: :port)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
    os_pid = Port.os_pid()
    Application.put_env(:dspex_bridge, :port, Keyword.put(port_env, :max_in_flight, 1))
    {_, 0} = System.cmd("kill", ["-STOP", to_string(os_pid)])

    try do
      holder = Task.async(fn -> SessionStore.get_variable(sid, :x) end)

      try do
        true = DSPex.Wait.until(fn -> Admission.in_flight(:dspex_port) >= 1 end)
        {:error, :overloaded} = SessionStore.get_variable(sid, :x)
      after
        System.cmd("kill", ["-CONT", to_string(os_pid)])
        Task.await(holder, 10_000)
      end
    after
      System.cmd("kill", ["-CONT", to_string(os_pid)])

      case env do
        {:ok, value} -> Application.put_env(:dspex_bridge, :port, value)
        :error -> Application.delete_env(:dspex_bridge, :port)
      end

      SessionStore.delete_session(sid)
    end
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
