defmodule DSPex.Bridge.State.ChaosTest do
  @moduledoc """
  Real faults on the real port program, through `State.Bridged`: SIGSTOP
  (calls time out, the breaker opens, reads come from the cache), SIGCONT
  (a probe closes it), `kill -9` mid-write (writes are parked, then
  replayed; none acknowledged is lost), a prober killed in half-open.
  """
  # Stops and kills the shared port program: not async.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{CircuitBreaker, DeadLetterQueue, SessionStore}
  alias DSPex.Bridge.Backend.Port, as: PortBackend
  alias DSPex.Bridge.State.Bridged
  alias DSPex.TelemetryHelper

  @moduletag :tmp_dir
  @breaker {:dspex_backend, :port}
  @call_timeout 300

  setup ctx do
    timeout = Application.fetch_env(:dspex_bridge, :port_timeout)
    port_env = Application.fetch_env(:dspex_bridge, :port)
    Application.put_env(:dspex_bridge, :port_timeout, @call_timeout)

    dlq = :"chaos_dlq_#{System.unique_integer([:positive])}"
    {:ok, _} = start_supervised({DeadLetterQueue, name: dlq, dir: ctx.tmp_dir})

    on_exit(fn ->
      restore(:port_timeout, timeout)
      restore(:port, port_env)
      :ok = Bridged.install(:port)
      CircuitBreaker.reset(@breaker)
    end)

    os_pid = running_port()
    sid = "chaos_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid, dlq: dlq, os_pid: os_pid}
  end

  defp restore(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore(key, :error), do: Application.delete_env(:dspex_bridge, key)

  defp install(dlq, breaker, opts \\ []) do
    :ok =
      Bridged.install(
        :port,
        [breaker: breaker, deadline: @call_timeout, dlq: dlq] ++ opts
      )

    :ok = CircuitBreaker.reset(@breaker)
  end

  defp signal(os_pid, sig),
    do: System.cmd("kill", [sig, Integer.to_string(os_pid)], stderr_to_stdout: true)

  defp stop_program(os_pid) do
    {_, 0} = signal(os_pid, "-STOP")
    # Whatever happens, the program runs again after the test.
    on_exit(fn -> signal(os_pid, "-CONT") end)
  end

  # The running program's pid, waiting (5 s at most) for one.
  defp running_port(not_this \\ nil) do
    await(fn ->
      case PortBackend.os_pid() do
        pid when is_integer(pid) and pid != not_this -> pid
        _ -> nil
      end
    end)
  end

  # Polls `fun` until it returns a truthy value (10 s at most): for states
  # that have no event.
  defp await(fun, deadline \\ System.monotonic_time(:millisecond) + 10_000) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline, do: flunk("condition never held")
        Process.sleep(10)
        await(fun, deadline)
    end
  end

  test "SIGSTOP under traffic: timeouts open the breaker, reads come from the cache with their age; SIGCONT: a probe closes it",
       %{sid: sid, dlq: dlq, os_pid: os_pid} do
    # Open long enough that every read while stopped meets an open breaker,
    # however slow the machine; after SIGCONT its clock is moved on.
    install(dlq, threshold: 2, timeout: 60_000, half_open_successes: 1)

    ref =
      TelemetryHelper.attach([
        [:dspex, :bridge, :circuit_breaker, :state_change],
        [:dspex, :bridge, :cache, :hit]
      ])

    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 7)
    assert {:ok, %{value: 7}} = SessionStore.get_variable(sid, :x)

    stop_program(os_pid)

    # Traffic: four readers at once while the program is stopped.
    results =
      1..4
      |> Task.async_stream(fn _ -> SessionStore.get_variable(sid, :x) end, timeout: 10_000)
      |> Enum.map(fn {:ok, r} -> r end)

    # Each timed out, or (once the breaker opened) came from the cache.
    assert Enum.all?(results, &(match?({:error, :timeout}, &1) or match?({:ok, %{value: 7}}, &1)))
    assert {:error, :timeout} in results

    assert_receive {[_, _, :circuit_breaker, :state_change], ^ref, _,
                    %{name: @breaker, from: :closed, to: :open}},
                   5_000

    assert {:ok, %{value: 7}} = SessionStore.get_variable(sid, :x)
    assert_receive {[_, _, :cache, :hit], ^ref, %{age_ms: age}, %{age_ms: age}}
    assert is_integer(age) and age >= 0

    {_, 0} = signal(os_pid, "-CONT")
    CircuitBreaker.__advance_clock__(@breaker, 60_000)

    # Readers go on: once the open time is up, one of them is the probe.
    closed =
      await(fn ->
        SessionStore.get_variable(sid, :x)

        receive do
          {[_, _, :circuit_breaker, :state_change], ^ref, _, %{to: :closed, from: :half_open}} ->
            true
        after
          0 -> false
        end
      end)

    assert closed
    assert CircuitBreaker.state(@breaker) == :closed
    assert {:ok, %{value: 7}} = SessionStore.get_variable(sid, :x)
  end

  test "a prober killed in half-open gives its permit back", %{sid: sid, dlq: dlq, os_pid: os_pid} do
    # The probe must outlive the test's patience, not its call timeout.
    Application.put_env(:dspex_bridge, :port_timeout, 10_000)

    install(dlq, [threshold: 1, timeout: 200, half_open_successes: 1, probe_lease_ms: 60_000],
      deadline: 10_000
    )

    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    :ok = CircuitBreaker.record(@breaker, :error)
    assert CircuitBreaker.state(@breaker) == :open
    stop_program(os_pid)
    await(fn -> CircuitBreaker.state(@breaker) == :half_open end)

    prober = spawn(fn -> SessionStore.get_variable(sid, :x, principal: sid) end)
    await(fn -> CircuitBreaker.info(@breaker).probes_in_use == 1 end)
    # Its permit is out: nobody else gets through.
    assert {:error, :circuit_open} = CircuitBreaker.ask(@breaker)

    Process.exit(prober, :kill)
    await(fn -> CircuitBreaker.info(@breaker).probes_in_use == 0 end)

    {_, 0} = signal(os_pid, "-CONT")
    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
    assert CircuitBreaker.state(@breaker) == :closed
  end

  test "kill -9 mid-write: writes are parked, replayed after recovery; no acknowledged write is lost",
       %{sid: sid, dlq: dlq, os_pid: os_pid} do
    # The program stays down a while, so retries run out meanwhile.
    Application.put_env(:dspex_bridge, :port, min_restart_delay_ms: 400, max_restart_delay_ms: 400)

    install(dlq, [threshold: 3, timeout: 300, half_open_successes: 1],
      retry: [max_attempts: 3, initial_delay: 20, max_delay: 50]
    )

    ref = TelemetryHelper.attach([[:dspex, :bridge, :port, :started]])
    writers = 8
    for i <- 1..writers, do: {:ok, _} = SessionStore.register_variable(sid, :"w#{i}", :integer, 0)

    # Every write is in the pipe when the program dies: it is stopped first.
    stop_program(os_pid)

    tasks =
      for i <- 1..writers do
        Task.async(fn ->
          result =
            Bridged.with_options([park_writes: true], fn ->
              SessionStore.update_variable(sid, :"w#{i}", i)
            end)

          {i, result}
        end)
      end

    await(fn -> map_size(:sys.get_state(PortBackend).pending) >= writers end)
    {_, 0} = signal(os_pid, "-9")
    history = Task.await_many(tasks, 10_000)

    # Every write is acknowledged (applied or parked), or refused as never
    # applied: a retry that reached the new program found the session gone.
    for {_i, result} <- history do
      assert match?(:ok, result) or match?({:error, {:queued, _}}, result) or
               result == {:error, :session_not_found},
             inspect(result)
    end

    queued = for {i, {:error, {:queued, id}}} <- history, do: {i, id}
    assert queued != []

    for {_i, id} <- queued do
      assert {:ok, %{op: "var_set", attempts: [_ | _] = attempts}} =
               DeadLetterQueue.get(id, server: dlq)

      assert Enum.all?(attempts, &(&1.error in [:backend_unavailable, :circuit_open]))
    end

    # Recovery: the new program, and the session as the application had it.
    new_pid = running_port(os_pid)
    assert_receive {_, ^ref, _, %{os_pid: ^new_pid}}, 5_000

    await(fn -> SessionStore.create_session(sid, backend: :port) == {:ok, sid} end)
    for i <- 1..writers, do: {:ok, _} = SessionStore.register_variable(sid, :"w#{i}", :integer, 0)
    assert CircuitBreaker.state(@breaker) == :closed

    assert {:ok, %{replayed: replayed, failed: 0}} = DeadLetterQueue.replay(:all, server: dlq)
    assert replayed == length(queued)
    assert {:ok, []} = DeadLetterQueue.list(server: dlq)

    acknowledged = for {i, r} <- history, r == :ok or match?({:error, {:queued, _}}, r), do: i
    assert length(acknowledged) == length(queued) + Enum.count(history, &(elem(&1, 1) == :ok))

    for i <- acknowledged do
      assert SessionStore.get_variable_value(sid, :"w#{i}") == i, "write #{i} was lost"
    end
  end
end
