defmodule DSPex.Bridge.State.BridgedTest do
  # Reconfigures the port's protection: not async.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{Analytics, CircuitBreaker, DeadLetterQueue, SessionStore}
  alias DSPex.Bridge.State.Bridged
  alias DSPex.TelemetryHelper

  @moduletag :tmp_dir
  @breaker {:dspex_backend, :port}

  setup ctx do
    dlq = :"bridged_test_dlq_#{System.unique_integer([:positive])}"
    {:ok, _} = start_supervised({DeadLetterQueue, name: dlq, dir: ctx.tmp_dir})
    :ok = Bridged.install(:port, breaker: [threshold: 2, timeout: 60_000], dlq: dlq)

    on_exit(fn ->
      :ok = Bridged.install(:port)
      CircuitBreaker.reset(@breaker)
    end)

    sid = "bridged_test_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    %{sid: sid, dlq: dlq}
  end

  test "errors of the caller's making never open the breaker", %{sid: sid} do
    for _ <- 1..10 do
      assert {:error, :not_found} = SessionStore.get_variable(sid, :missing)
      assert {:error, _} = SessionStore.update_variable(sid, :x, "not an integer")
    end

    assert CircuitBreaker.state(@breaker) == :closed
    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
  end

  test "while the breaker is open: reads from the cache with their age, writes refused", %{
    sid: sid
  } do
    ref =
      TelemetryHelper.attach([[:dspex, :bridge, :cache, :hit], [:dspex, :bridge, :cache, :miss]])

    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
    :ok = CircuitBreaker.force_open(@breaker)

    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
    assert_receive {[_, _, :cache, :hit], ^ref, %{age_ms: age}, %{age_ms: age, op: "var_get"}}
    assert is_integer(age) and age >= 0

    # Never read, so never cached.
    assert {:error, :circuit_open} = SessionStore.get_variable(sid, :x, principal: sid)
    assert_receive {[_, _, :cache, :miss], ^ref, _, %{reason: :not_cached}}

    assert {:error, :circuit_open} = SessionStore.update_variable(sid, :x, 2)
    assert CircuitBreaker.reset(@breaker) == :ok
    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
  end

  test "a write parked while open is in the queue with its history; replay applies it",
       %{sid: sid, dlq: dlq} do
    :ok = CircuitBreaker.force_open(@breaker)

    assert {:error, {:queued, id}} =
             Bridged.with_options([park_writes: true], fn ->
               SessionStore.update_variable(sid, :x, 2)
             end)

    assert {:ok, entry} = DeadLetterQueue.get(id, server: dlq)
    assert %{op: "var_set", backend: :port, breaker: @breaker, session_id: ^sid} = entry
    assert [%{error: :circuit_open, at: at}] = entry.attempts
    assert entry.first_failure_at == at

    # Not parked without opting in; never a session create.
    assert {:error, :circuit_open} = SessionStore.update_variable(sid, :x, 3)

    assert {:error, :circuit_open} =
             Bridged.with_options([park_writes: true], fn ->
               SessionStore.create_session("never_parked", backend: :port)
             end)

    assert {:error, :circuit_open} = DeadLetterQueue.replay(id, server: dlq)

    :ok = CircuitBreaker.reset(@breaker)
    assert {:ok, %{replayed: 1, failed: 0}} = DeadLetterQueue.replay(id, server: dlq)
    assert SessionStore.get_variable_value(sid, :x) == 2
    assert {:ok, []} = DeadLetterQueue.list(server: dlq)
  end

  test "a replay that fails again keeps the entry, with the attempt added", %{sid: sid, dlq: dlq} do
    :ok = CircuitBreaker.force_open(@breaker)

    {:error, {:queued, id}} =
      Bridged.with_options([park_writes: true], fn ->
        SessionStore.update_variable(sid, :x, 5)
      end)

    :ok = CircuitBreaker.reset(@breaker)
    :ok = SessionStore.delete_variable(sid, :x)
    assert {:ok, %{replayed: 0, failed: 1}} = DeadLetterQueue.replay(:all, server: dlq)

    assert {:ok, %{attempts: [%{error: :circuit_open}, %{error: :not_found}]}} =
             DeadLetterQueue.get(id, server: dlq)
  end

  test "a cached read is not served once a write to its session went through", %{sid: sid} do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :cache, :miss]])
    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
    :ok = SessionStore.update_variable(sid, :x, 9)
    :ok = CircuitBreaker.force_open(@breaker)
    assert {:error, :circuit_open} = SessionStore.get_variable(sid, :x)
    assert_receive {_, ^ref, _, %{reason: :written_since}}
  end

  test "a stale value past max_stale_ms is a miss", %{sid: sid, dlq: dlq} do
    :ok = Bridged.install(:port, cache: [max_stale_ms: 0], dlq: dlq)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :cache, :miss]])
    assert {:ok, _} = SessionStore.get_variable(sid, :x)
    # Staleness is time passing: let the value grow older than 0 ms.
    Process.sleep(3)
    :ok = CircuitBreaker.force_open(@breaker)
    assert {:error, :circuit_open} = SessionStore.get_variable(sid, :x)
    assert_receive {_, ^ref, _, %{reason: :too_stale}}
  end

  test "the dashboard's cache_hit_rate counts hits and misses", %{sid: sid} do
    start_supervised!({Analytics, []})
    assert {:ok, _} = SessionStore.get_variable(sid, :x)
    :ok = CircuitBreaker.force_open(@breaker)
    assert {:ok, _} = SessionStore.get_variable(sid, :x)
    assert {:error, :circuit_open} = SessionStore.get_variable(sid, :x, principal: sid)
    assert Analytics.get_dashboard().last_minute.cache_hit_rate == 0.5
  end

  test "an operator's removed breaker comes back, closed", %{sid: sid} do
    :ok = CircuitBreaker.remove(@breaker)
    assert {:ok, %{value: 1}} = SessionStore.get_variable(sid, :x)
    assert CircuitBreaker.state(@breaker) == :closed
  end

  test "bad input is a clear error" do
    assert {:error, {:invalid_argument, {:unknown_option, :colour}}} =
             Bridged.install(:port, colour: 1)

    assert {:error, {:invalid_argument, {:max_attempts, 0}}} =
             Bridged.install(:port, retry: [max_attempts: 0])

    assert {:error, {:invalid_argument, {:threshold, 0}}} =
             Bridged.install(:port, breaker: [threshold: 0])

    assert {:error, {:invalid_argument, {:cache, [size: 1]}}} =
             Bridged.install(:port, cache: [size: 1])

    assert {:error, {:invalid_argument, {:deadline, -1}}} = Bridged.install(:port, deadline: -1)
    assert {:error, {:invalid_argument, {:backend, "port"}}} = Bridged.install("port")
    assert {:error, {:invalid_argument, {:options, :x}}} = Bridged.install(:port, :x)

    assert {:error, {:invalid_argument, {:options, [park_writes: 1]}}} =
             Bridged.with_options([park_writes: 1], fn -> :ok end)

    assert {:error, {:invalid_argument, {:fun, :f}}} = Bridged.with_options([], :f)
    assert {:error, {:not_installed, :nowhere}} = Bridged.replay(:nowhere, "var_set", [])
    assert {:error, :not_found} = Bridged.info(:nowhere)
    assert {:error, :not_found} = Bridged.uninstall(:nowhere)
    assert {:ok, %{breaker: @breaker}} = Bridged.info(:port)
  end
end
