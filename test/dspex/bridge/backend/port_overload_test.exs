defmodule DSPex.Bridge.Backend.PortOverloadTest do
  # Admission to the port program's pipe: past `max_in_flight` requests a
  # call is refused at once instead of queueing. Stops and kills the shared
  # port program: must not overlap with other tests.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Port, as: PortBackend
  alias DSPex.Bridge.{CircuitBreaker, SessionStore}
  alias DSPex.Bridge.State.Bridged
  alias DSPex.TelemetryHelper

  @refused [:dspex, :bridge, :admission, :refused]

  setup do
    wait_for_port()
    port = Application.fetch_env(:dspex_bridge, :port)
    timeout = Application.fetch_env(:dspex_bridge, :port_timeout)
    Application.put_env(:dspex_bridge, :port_timeout, 300)

    Application.put_env(
      :dspex_bridge,
      :port,
      Keyword.put(Application.get_env(:dspex_bridge, :port, []), :max_in_flight, 4)
    )

    on_exit(fn ->
      restore_env(:port, port)
      restore_env(:port_timeout, timeout)
    end)

    :ok
  end

  describe "the raw backend" do
    setup do
      :ok = Bridged.uninstall(:port)
      on_exit(fn -> :ok = Bridged.install(:port) end)
    end

    test "past max_in_flight calls are refused with :overloaded; a stopped program keeps its places" do
      sid = session()
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
      os_pid = stop_program()
      refusals = DSPex.TelemetryHelper.attach_with_emitter([@refused])

      # Forty callers at once: four are admitted and wait for the stopped
      # program (until their timeout), the rest are refused without waiting.
      tasks =
        Enum.map(1..40, fn _ -> Task.async(fn -> SessionStore.get_variable(sid, :x) end) end)

      results = Task.await_many(tasks, 10_000)

      assert Enum.count(results, &(&1 == {:error, :timeout})) == 4
      assert Enum.count(results, &(&1 == {:error, :overloaded})) == 36

      # One event per refusal, naming the path, the limit and the session.
      events = DSPex.TelemetryHelper.emitted_by(refusals, Enum.map(tasks, & &1.pid))
      assert length(events) == 36
      assert Enum.uniq(events) == [{%{count: 1}, %{path: :port, limit: 4, session_id: sid}}]

      # The four requests timed out for their callers but still sit in the
      # pipe: until the program answers them, nothing more is admitted, and
      # a refused write was never sent.
      assert {:error, :overloaded} = SessionStore.update_variable(sid, :x, 1)
      assert {:error, :overloaded} = PortBackend.request("session_list", [])

      assert DSPex.TelemetryHelper.emitted_by(refusals, [self()]) == [
               {%{count: 1}, %{path: :port, limit: 4, session_id: sid}},
               {%{count: 1}, %{path: :port, limit: 4, session_id: nil}}
             ]

      # The program's death answers whatever it held: the places come back.
      ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])
      kill(os_pid, "-KILL")
      next_start(ref, os_pid)

      sid = session()
      {:ok, _} = SessionStore.register_variable(sid, :y, :integer, 7)

      results =
        1..4
        |> Enum.map(fn _ -> Task.async(fn -> SessionStore.get_variable_value(sid, :y) end) end)
        |> Task.await_many(10_000)

      assert results == [7, 7, 7, 7]
    end

    test "admitted callers wait for their answers; answered, they give their places back" do
      Application.put_env(:dspex_bridge, :port_timeout, 10_000)
      sid = session()
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
      os_pid = stop_program()

      tasks =
        Enum.map(1..8, fn i -> Task.async(fn -> SessionStore.update_variable(sid, :x, i) end) end)

      # Four are refused at once; the four admitted wait for the program.
      refused =
        for _ <- 1..4, do: receive(do: ({ref, result} when is_reference(ref) -> {ref, result}))

      assert Enum.all?(refused, &match?({_, {:error, :overloaded}}, &1))
      refused_refs = Enum.map(refused, &elem(&1, 0))
      admitted = Enum.reject(tasks, &(&1.ref in refused_refs))

      kill(os_pid, "-CONT")
      assert Task.await_many(admitted, 10_000) == [:ok, :ok, :ok, :ok]
      for t <- tasks, t.ref in refused_refs, do: Process.demonitor(t.ref, [:flush])

      # Their places are back: four more are admitted at once.
      results =
        1..4
        |> Enum.map(fn _ -> Task.async(fn -> SessionStore.get_variable(sid, :x) end) end)
        |> Task.await_many(10_000)

      assert [{:ok, %{version: 4}}] = Enum.uniq(results)
    end
  end

  test "through the breaker: a refusal is not retried and does not open it" do
    breaker = Bridged.breaker(:port)
    :ok = Bridged.install(:port, breaker: [threshold: 2, timeout: 60_000])

    # Later tests find the port's breaker as they would: closed, defaults.
    on_exit(fn ->
      :ok = Bridged.install(:port)
      :ok = CircuitBreaker.reset(breaker)
    end)

    :ok = CircuitBreaker.reset(breaker)
    sid = session()
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
    os_pid = stop_program()

    results =
      1..20
      |> Enum.map(fn _ -> Task.async(fn -> SessionStore.get_variable(sid, :x) end) end)
      |> Task.await_many(10_000)

    assert Enum.count(results, &(&1 == {:error, :overloaded})) == 16
    assert Enum.count(results, &(&1 == {:error, :timeout})) == 4
    # Four timeouts opened it (threshold 2): the refusals were not failures,
    # or it would have opened before any timeout came back; and the next
    # call is refused by the breaker, not by admission.
    assert CircuitBreaker.state(breaker) == :open
    assert {:error, :circuit_open} = SessionStore.update_variable(sid, :x, 1)

    ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])
    kill(os_pid, "-KILL")
    next_start(ref, os_pid)
  end

  ## Helpers

  defp session do
    sid = "port_overload_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  defp wait_for_port do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])

    case PortBackend.os_pid() do
      pid when is_integer(pid) ->
        pid

      _ ->
        assert_receive {[:dspex, :bridge, :port, :started], ^ref, _, %{os_pid: pid}}, 5_000
        pid
    end
  end

  defp stop_program do
    os_pid = PortBackend.os_pid()
    kill(os_pid, "-STOP")

    on_exit(fn ->
      System.cmd("kill", ["-CONT", Integer.to_string(os_pid)], stderr_to_stdout: true)
    end)

    os_pid
  end

  defp kill(os_pid, signal) when is_integer(os_pid) do
    {_, 0} = System.cmd("kill", [signal, Integer.to_string(os_pid)])
  end

  defp next_start(ref, old) do
    receive do
      {[:dspex, :bridge, :port, :started], ^ref, _, %{os_pid: pid}}
      when is_integer(pid) and pid != old ->
        pid
    after
      10_000 -> flunk("the port program did not restart")
    end
  end

  defp restore_env(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore_env(key, :error), do: Application.delete_env(:dspex_bridge, key)
end
