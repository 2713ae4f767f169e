defmodule DSPex.Bridge.CircuitBreakerTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.CircuitBreaker, as: CB

  doctest CB

  @change [:dspex, :bridge, :circuit_breaker, :state_change]
  @rejected [:dspex, :bridge, :circuit_breaker, :rejected]

  setup do
    name = {__MODULE__, System.unique_integer([:positive])}
    on_exit(fn -> CB.remove(name) end)
    ref = DSPex.TelemetryHelper.attach([@change, @rejected])
    %{name: name, ref: ref}
  end

  defp fail(name, n), do: for(_ <- 1..n, do: :ok = CB.record(name, :error))

  # `DSPex.Wait.until/2` waits for conditions the engine reaches on another
  # thread (a dead process's monitor callback), with no event to wait for.

  # A process that asks, tells us the answer, then does what it is told.
  defp prober(name) do
    test = self()

    pid =
      spawn(fn ->
        send(test, {:asked, self(), CB.ask(name)})

        receive do
          {:record, outcome} -> send(test, {:recorded, CB.record(name, outcome)})
          :exit -> :ok
        end
      end)

    assert_receive {:asked, ^pid, answer}
    {pid, answer}
  end

  describe "seed 002's struct" do
    test "kept as written" do
      b = CB.new()
      assert %CB{state: :closed, threshold: 5, timeout: 60_000, failure_count: 0} = b
      b = Enum.reduce(1..4, b, fn _, b -> CB.record_failure(b) end)
      assert b.state == :closed and CB.should_attempt?(b)
      b = CB.record_failure(b)
      assert b.state == :open and not CB.should_attempt?(b)
      assert CB.record_success(%{b | state: :half_open}).success_count == 1
      b = %{b | state: :half_open, success_count: 2} |> CB.record_success()
      assert {b.state, b.failure_count} == {:closed, 0}

      assert CB.should_attempt?(%{
               CB.new(1, 10)
               | state: :open,
                 last_failure: System.monotonic_time(:millisecond) - 1_000
             })
    end
  end

  describe "install/2" do
    test "defaults of both strategies", %{name: name} do
      :ok = CB.install(name)

      assert %{state: :closed, config: %{strategy: :consecutive, threshold: 5, timeout: 60_000}} =
               CB.info(name)

      assert %{half_open_successes: 3, half_open_probes: 1, slow_call_ms: nil} =
               CB.info(name).config

      :ok = CB.install(name, strategy: :rate)

      assert %{strategy: :rate, window: 10, failure_rate: 0.5, minimum_calls: 10, timeout: 30_000} =
               CB.info(name).config
    end

    test "bad options are named", %{name: name} do
      bad = &{:error, {:invalid_argument, &1}}
      assert CB.install(name, threshold: 0) == bad.({:threshold, 0})
      assert CB.install(name, threshold: -1) == bad.({:threshold, -1})
      assert CB.install(name, threshold: 1.5) == bad.({:threshold, 1.5})
      assert CB.install(name, strategy: :sometimes) == bad.({:strategy, :sometimes})
      assert CB.install(name, window: 5) == bad.({:window, 5})
      assert CB.install(name, strategy: :rate, threshold: 5) == bad.({:threshold, 5})
      assert CB.install(name, strategy: :rate, window: 57) == bad.({:window, 57})
      assert CB.install(name, strategy: :rate, failure_rate: 1.5) == bad.({:failure_rate, 1.5})
      assert CB.install(name, strategy: :rate, minimum_calls: 11) == bad.({:minimum_calls, 11})
      assert CB.install(name, half_open_probes: 0) == bad.({:half_open_probes, 0})
      assert CB.install(name, timeout: :soon) == bad.({:timeout, :soon})
      assert CB.install(name, slow_call_ms: 0) == bad.({:slow_call_ms, 0})
      assert CB.install(name, colour: :red) == bad.({:unknown_options, [:colour]})
      assert CB.install(name, [:threshold]) == bad.({:bad_options, [:threshold]})
      assert CB.install(name, %{threshold: 1}) == bad.({:bad_options, %{threshold: 1}})
      assert CB.state(name) == {:error, :not_found}
    end

    test "again with the same options is a no-op; with others it keeps the state", %{name: name} do
      :ok = CB.install(name, threshold: 2)
      fail(name, 2)
      :ok = CB.install(name, threshold: 2)
      assert CB.state(name) == :open
      :ok = CB.install(name, threshold: 3, timeout: 1_000)
      assert %{state: :open, config: %{threshold: 3}} = CB.info(name)
    end
  end

  describe "the consecutive strategy" do
    test "opens on the fifth failure in a row; telemetry only on changes and rejections",
         %{name: name, ref: ref} do
      :ok = CB.install(name)
      for _ <- 1..10, do: assert(CB.ask(name) == :ok)
      fail(name, 4)
      :ok = CB.record(name, :ok)
      fail(name, 4)
      assert CB.state(name) == :closed
      refute_received {_, ^ref, _, %{name: ^name}}
      fail(name, 1)

      assert_received {@change, ^ref, %{system_time: _},
                       %{name: ^name, from: :closed, to: :open, reason: :failures}}

      assert CB.ask(name) == {:error, :circuit_open}
      assert_received {@rejected, ^ref, %{system_time: _}, %{name: ^name, state: :open}}
      assert %{retry_in_ms: ms, opened_total: 1, rejected_total: 1} = CB.info(name)
      assert ms > 59_000
    end

    test "probes after the open time; three probe successes close it", %{name: name, ref: ref} do
      :ok = CB.install(name)
      fail(name, 5)
      CB.__advance_clock__(name, 60_000)
      assert CB.state(name) == :half_open

      for i <- 1..3 do
        {pid, :ok} = prober(name)
        if i == 1, do: assert_received({@change, ^ref, _, %{name: ^name, to: :half_open}})
        # One probe at a time: others are refused meanwhile.
        assert CB.ask(name) == {:error, :circuit_open}
        assert_received {@rejected, ^ref, _, %{name: ^name, state: :half_open}}
        send(pid, {:record, :ok})
        assert_receive {:recorded, :ok}
      end

      assert_received {@change, ^ref, _,
                       %{name: ^name, from: :half_open, to: :closed, reason: :probes_succeeded}}

      assert CB.ask(name) == :ok
    end

    test "a probe failure reopens it", %{name: name, ref: ref} do
      :ok = CB.install(name, threshold: 1, timeout: 1_000)
      fail(name, 1)
      CB.__advance_clock__(name, 1_000)
      assert CB.ask(name) == :ok
      :ok = CB.record(name, :error)

      assert_received {@change, ^ref, _,
                       %{name: ^name, from: :half_open, to: :open, reason: :probe_failed}}

      assert CB.state(name) == :open
    end

    test "half_open_probes bounds the probes at once", %{name: name} do
      :ok = CB.install(name, threshold: 1, half_open_probes: 2)
      fail(name, 1)
      CB.__advance_clock__(name, 60_000)
      {_, :ok} = prober(name)
      {_, :ok} = prober(name)
      {_, {:error, :circuit_open}} = prober(name)
      assert CB.info(name).probes_in_use == 2
    end

    test "a prober that dies gives its permit back", %{name: name} do
      :ok = CB.install(name, threshold: 1)
      fail(name, 1)
      CB.__advance_clock__(name, 60_000)
      {pid, :ok} = prober(name)
      assert CB.ask(name) == {:error, :circuit_open}
      Process.exit(pid, :kill)
      assert DSPex.Wait.until(fn -> CB.info(name).probes_in_use == 0 end)
      assert CB.ask(name) == :ok
    end

    test "a prober that overstays its lease loses its permit; its late report is ignored",
         %{name: name} do
      :ok = CB.install(name, threshold: 1, probe_lease_ms: 5_000, half_open_successes: 1)
      fail(name, 1)
      CB.__advance_clock__(name, 60_000)
      {pid, :ok} = prober(name)
      CB.__advance_clock__(name, 5_000)
      {other, :ok} = prober(name)
      send(pid, {:record, :ok})
      assert_receive {:recorded, :ok}
      assert CB.state(name) == :half_open
      send(other, {:record, :ok})
      assert_receive {:recorded, :ok}
      assert CB.state(name) == :closed
    end
  end

  describe "the rate strategy" do
    test "opens at half of the last ten failed, once ten are in", %{name: name} do
      :ok = CB.install(name, strategy: :rate)
      fail(name, 4)
      for _ <- 1..5, do: :ok = CB.record(name, :ok)
      assert %{state: :closed, window_calls: 9, window_failures: 4} = CB.info(name)
      fail(name, 1)
      assert CB.state(name) == :open
    end

    test "minimum_calls lets it decide sooner", %{name: name} do
      :ok = CB.install(name, strategy: :rate, minimum_calls: 2)
      :ok = CB.record(name, :ok)
      fail(name, 1)
      assert CB.state(name) == :open
    end
  end

  test "slow_call_ms counts a slow success as a failure", %{name: name} do
    :ok = CB.install(name, threshold: 2, slow_call_ms: 100)
    :ok = CB.record(name, :ok, duration_ms: 99)
    :ok = CB.record(name, :ok, duration_ms: 100)
    :ok = CB.record(name, :ok, duration_ms: 250)
    assert CB.state(name) == :open
  end

  describe "call/3" do
    test "returns the fun's result; errors, raises, throws and exits count", %{name: name} do
      :ok = CB.install(name, threshold: 5)
      assert CB.call(name, fn -> {:ok, 1} end) == {:ok, 1}
      assert CB.call(name, fn -> {:error, :nope} end) == {:error, :nope}
      assert_raise RuntimeError, fn -> CB.call(name, fn -> raise "boom" end) end
      assert catch_throw(CB.call(name, fn -> throw(:ball) end)) == :ball
      assert catch_exit(CB.call(name, fn -> exit(:bye) end)) == :bye
      assert CB.info(name).failures == 4
      assert CB.call(name, fn -> :fine end, timeout: 1_000) == :fine
      assert CB.info(name).failures == 0
    end

    test "timeout: kills the fun and counts a failure", %{name: name} do
      :ok = CB.install(name, threshold: 1)
      test = self()

      fun = fn ->
        send(test, {:running, self()})
        Process.sleep(:infinity)
      end

      assert CB.call(name, fun, timeout: 20) == {:error, :timeout}
      assert_received {:running, pid}
      refute Process.alive?(pid)
      assert CB.state(name) == :open
      assert CB.call(name, fn -> :never end) == {:error, :circuit_open}
      :ok = CB.reset(name)

      assert_raise ArgumentError, fn ->
        CB.call(name, fn -> :erlang.error(:badarg) end, timeout: 100)
      end
    end

    test "bad input", %{name: name} do
      :ok = CB.install(name)
      f = fn _ -> :ok end
      assert CB.call(name, f) == {:error, {:invalid_argument, {:fun, f}}}

      assert CB.call(name, fn -> :ok end, timeout: -1) ==
               {:error, {:invalid_argument, {:timeout, -1}}}

      assert CB.call(name, fn -> :ok end, :x) == {:error, {:invalid_argument, {:bad_options, :x}}}
      assert CB.call({:nope, name}, fn -> :ok end) == {:error, :not_found}
    end
  end

  describe "manual states" do
    test "force_open, disable, reset, remove", %{name: name, ref: ref} do
      :ok = CB.install(name, threshold: 1)
      :ok = CB.force_open(name)
      assert_received {@change, ^ref, _, %{name: ^name, to: :forced_open, reason: :manual}}
      CB.__advance_clock__(name, 10_000_000)
      assert {CB.state(name), CB.ask(name)} == {:forced_open, {:error, :circuit_open}}
      :ok = CB.disable(name)
      fail(name, 3)
      assert {CB.state(name), CB.ask(name)} == {:disabled, :ok}
      :ok = CB.reset(name)
      assert CB.state(name) == :closed
      assert name in CB.list()
      :ok = CB.remove(name)
      refute name in CB.list()
      assert CB.remove(name) == {:error, :not_found}
    end

    test "unknown names", %{name: name} do
      for f <- [&CB.ask/1, &CB.state/1, &CB.reset/1, &CB.force_open/1, &CB.disable/1, &CB.info/1] do
        assert f.(name) == {:error, :not_found}
      end

      assert CB.record(name, :ok) == {:error, :not_found}
    end

    test "bad reports", %{name: name} do
      :ok = CB.install(name)
      assert CB.record(name, :maybe) == {:error, {:invalid_argument, {:outcome, :maybe}}}

      assert CB.record(name, :ok, duration_ms: -1) ==
               {:error, {:invalid_argument, {:duration_ms, -1}}}

      assert CB.record(name, :ok, :x) == {:error, {:invalid_argument, {:bad_options, :x}}}
    end
  end

  test "many processes ask one breaker", %{name: name} do
    :ok = CB.install(name)

    results =
      1..8
      |> Task.async_stream(fn _ -> Enum.map(1..1_000, fn _ -> CB.ask(name) end) |> Enum.uniq() end)
      |> Enum.flat_map(fn {:ok, r} -> r end)
      |> Enum.uniq()

    assert results == [:ok]
  end
end
