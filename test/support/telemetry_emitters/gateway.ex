defmodule DSPex.TelemetryEmitters.Gateway do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{Gateway, SessionStore}

  # The gateway is started for the emitter (port 0) and stopped after it, so
  # no other test runs with its handlers attached.
  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :gateway, :started] => fn -> with_gateway(fn -> :ok end) end,
      [:dspex, :bridge, :gateway, :exited] => fn -> with_gateway(&kill_and_wait/0) end,
      [:dspex, :bridge, :variable, :deleted] => &delete_variable/0
    }
  end

  defp delete_variable do
    sid = DSPex.TelemetryEmitters.sid("emit-delete")
    {:ok, _} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :gone, :integer, 1)
    :ok = SessionStore.delete_variable(sid, :gone)
  end

  @doc false
  def with_gateway(fun, opts \\ [port: 0, ip: {127, 0, 0, 1}]) do
    {:ok, sup} = Gateway.Supervisor.start_link(opts)
    Process.unlink(sup)

    try do
      {:ok, _port} = Gateway.port()
      fun.()
    after
      ref = Process.monitor(sup)
      Process.exit(sup, :shutdown)

      receive do
        {:DOWN, ^ref, _, _, _} -> :ok
      end
    end
  end

  defp kill_and_wait do
    old = Gateway.os_pid()
    {_, 0} = System.cmd("kill", ["-9", to_string(old)])
    wait_for_new(old, 200)
  end

  defp wait_for_new(_old, 0), do: raise("the gateway did not come back")

  defp wait_for_new(old, tries) do
    case Gateway.os_pid() do
      pid when is_integer(pid) and pid != old -> {:ok, _} = Gateway.port()
      _ -> Process.sleep(25) && wait_for_new(old, tries - 1)
    end
  end
end
