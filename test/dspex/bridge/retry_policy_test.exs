defmodule DSPex.Bridge.RetryPolicyTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.CircuitBreaker, as: CB
  alias DSPex.Bridge.RetryPolicy, as: RP

  doctest RP

  @attempt [:dspex, :bridge, :retry, :attempt]
  @exhausted [:dspex, :bridge, :retry, :exhausted]

  setup do
    ref = DSPex.TelemetryHelper.attach([@attempt, @exhausted])
    uniq = System.unique_integer([:positive])
    breaker = {__MODULE__, :breaker, uniq}
    on_exit(fn -> CB.remove(breaker) end)
    # The injected clock and sleep: time passes only when the policy sleeps.
    Process.put(:now, 0)
    Process.put(:slept, [])

    fake = [
      clock: fn -> Process.get(:now) end,
      sleep: fn ms ->
        Process.put(:now, Process.get(:now) + ms)
        Process.put(:slept, Process.get(:slept) ++ [ms])
      end
    ]

    %{ref: ref, breaker: breaker, budget: {__MODULE__, :budget, uniq}, fake: fake}
  end

  # A fun answering from a script, one answer per call, counting calls.
  defp script(answers) do
    Process.put(:script, answers)

    fn ->
      [a | rest] = Process.get(:script)
      Process.put(:script, rest)
      Process.put(:calls, Process.get(:calls, 0) + 1)
      a
    end
  end

  defp calls, do: Process.get(:calls, 0)

  describe "new/1" do
    test "defaults and bad options" do
      assert %RP{
               max_attempts: 5,
               initial_delay: 1_000,
               max_delay: 32_000,
               multiplier: 2.0,
               jitter: :full
             } = RP.new()

      bad = &{:error, {:invalid_argument, &1}}
      assert RP.new(max_attempts: 0) == bad.({:max_attempts, 0})
      assert RP.new(max_attempts: 101) == bad.({:max_attempts, 101})
      assert RP.new(initial_delay: -1) == bad.({:initial_delay, -1})
      assert RP.new(multiplier: 0.5) == bad.({:multiplier, 0.5})
      assert RP.new(jitter: :some) == bad.({:jitter, :some})
      assert RP.new(retry_on: :timeout) == bad.({:retry_on, :timeout})
      assert RP.new(initial_delay: 10, max_delay: 5) == bad.({:max_delay, 5})
      assert RP.new(tries: 3) == bad.({:unknown_options, [:tries]})
      assert RP.new(:x) == bad.({:bad_options, :x})

      assert RP.new(max_attempts: 2, max_attempts: 3) ==
               bad.({:duplicate_options, [:max_attempts]})
    end
  end

  describe "delays/1" do
    test "exponential, capped, one fewer than the attempts" do
      assert RP.delays(RP.new(jitter: :none)) == [1_000, 2_000, 4_000, 8_000]

      assert RP.delays(RP.new(jitter: :none, max_attempts: 8, max_delay: 10_000)) ==
               [1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]

      assert RP.delays(RP.new(jitter: :none, multiplier: 3, initial_delay: 10)) == [
               10,
               30,
               90,
               270
             ]
    end

    test "property: every jittered delay is within its bounds" do
      prop =
        :proper.forall(policy_gen(), fn p ->
          base = RP.base_delays(p)
          delays = RP.delays(p)

          length(delays) == p.max_attempts - 1 and
            base == Enum.sort(base) and
            Enum.all?(base, &(&1 <= p.max_delay)) and
            Enum.all?(Enum.zip(delays, base), fn {d, b} ->
              case p.jitter do
                :none -> d == b
                :full -> d in 0..b
                :equal -> d in div(b, 2)..b
              end
            end)
        end)

      assert :proper.quickcheck(prop, [:quiet, numtests: 300]) == true
    end

    test "full jitter spreads the waits" do
      draws = for _ <- 1..200, do: hd(RP.delays(RP.new(initial_delay: 1_000)))
      assert length(Enum.uniq(draws)) > 50
    end
  end

  defp policy_gen do
    :proper_types.bind(
      {:proper_types.integer(1, 12), :proper_types.integer(0, 5_000),
       :proper_types.integer(0, 50_000), :proper_types.float(1.0, 4.0),
       :proper_types.elements([:full, :equal, :none])},
      fn {n, i, extra, m, j} ->
        RP.new(max_attempts: n, initial_delay: i, max_delay: i + extra, multiplier: m, jitter: j)
      end,
      false
    )
  end

  describe "run/3" do
    test "retries transient errors with the schedule's waits, counting the first call",
         %{fake: fake, ref: ref} do
      fun = script([{:error, :timeout}, {:error, {:backend_unavailable, :x}}, {:ok, 3}])
      assert RP.run(RP.new(jitter: :none), fun, fake) == {:ok, 3}
      assert calls() == 3
      assert Process.get(:slept) == [1_000, 2_000]
      assert_received {@attempt, ^ref, %{attempt: 2, delay_ms: 1_000}, %{reason: :timeout}}

      assert_received {@attempt, ^ref, %{attempt: 3, delay_ms: 2_000},
                       %{reason: {:backend_unavailable, :x}}}
    end

    test "gives up after max_attempts", %{fake: fake, ref: ref} do
      fun = script(List.duplicate({:error, :timeout}, 10))
      assert RP.run([max_attempts: 3, jitter: :none], fun, fake) == {:error, :timeout}
      assert calls() == 3

      assert_received {@exhausted, ^ref, %{attempts: 3, elapsed_ms: 3_000},
                       %{reason: :timeout, why: :max_attempts, breaker: nil, budget: nil}}
    end

    test "permanent errors return at once, whatever retry_on says", %{fake: fake} do
      for reason <- [:invalid_value, {:version_mismatch, 3}, :access_denied, :something_else] do
        Process.put(:calls, 0)
        fun = script([{:error, reason}, {:ok, :late}])
        assert RP.run(RP.new(retry_on: [:access_denied]), fun, fake) == {:error, reason}
        assert calls() == 1
      end
    end

    test "retry_on adds reasons, as a list or a function", %{fake: fake} do
      fun = script([{:error, {:busy, 1}}, :ok])
      assert RP.run(RP.new(retry_on: [:busy]), fun, fake) == :ok
      fun = script([{:error, :flaky}, :ok])
      assert RP.run(RP.new(retry_on: &(&1 == :flaky)), fun, fake) == :ok
      assert calls() == 4
    end

    test "a deadline across all attempts", %{fake: fake, ref: ref} do
      fun = script(List.duplicate({:error, :timeout}, 10))
      assert RP.run(RP.new(jitter: :none), fun, [deadline: 2_500] ++ fake) == {:error, :timeout}
      # Attempts at 0 and 1 000; waiting 2 000 more would pass 2 500.
      assert calls() == 2
      assert_received {@exhausted, ^ref, %{attempts: 2}, %{why: :deadline}}
    end

    test "the attempt number is passed to a fun of arity 1", %{fake: fake} do
      assert RP.run(RP.new(), fn n -> if n < 3, do: {:error, :timeout}, else: {:ok, n} end, fake) ==
               {:ok, 3}
    end

    test "raises are not retried and propagate", %{fake: fake} do
      assert_raise RuntimeError, fn -> RP.run(RP.new(), fn -> raise "boom" end, fake) end
    end

    test "bad input", %{fake: fake, breaker: breaker} do
      f2 = fn _, _ -> :ok end
      assert RP.run(RP.new(), f2) == {:error, {:invalid_argument, {:fun, f2}}}
      assert RP.run(:nope, fn -> :ok end) == {:error, {:invalid_argument, {:policy, :nope}}}

      assert RP.run(RP.new(), fn -> :ok end, :x) ==
               {:error, {:invalid_argument, {:bad_options, :x}}}

      assert RP.run(RP.new(), fn -> :ok end, deadline: -5) ==
               {:error, {:invalid_argument, {:deadline, -5}}}

      assert RP.run(RP.new(), fn -> :ok end, sleep: 5) ==
               {:error, {:invalid_argument, {:sleep, 5}}}

      assert RP.run([max_attempts: 0], fn -> :ok end) ==
               {:error, {:invalid_argument, {:max_attempts, 0}}}

      assert RP.run(RP.new(), script([:ok]), [breaker: breaker] ++ fake) == {:error, :not_found}
      assert calls() == 0
    end
  end

  describe "run/3 with a breaker" do
    test "the breaker counts one failure per logical call", %{fake: fake, breaker: breaker} do
      :ok = CB.install(breaker, threshold: 2)
      fun = script(List.duplicate({:error, :timeout}, 10))

      assert RP.run(RP.new(max_attempts: 3), fun, [breaker: breaker] ++ fake) ==
               {:error, :timeout}

      assert calls() == 3
      assert %{state: :closed, failures: 1} = CB.info(breaker)

      assert RP.run(RP.new(max_attempts: 3), fun, [breaker: breaker] ++ fake) ==
               {:error, :timeout}

      assert CB.state(breaker) == :open
    end

    test "an open breaker stops it at once without a deadline", %{fake: fake, breaker: breaker} do
      :ok = CB.install(breaker)
      :ok = CB.force_open(breaker)

      assert RP.run(RP.new(), script([:ok]), [breaker: breaker] ++ fake) ==
               {:error, :circuit_open}

      assert calls() == 0
    end

    test ":circuit_open is retried while a deadline remains", %{breaker: breaker, fake: fake} do
      :ok = CB.install(breaker)
      :ok = CB.force_open(breaker)
      # The dependency recovers while the policy waits.
      sleep = fn ms ->
        fake[:sleep].(ms)
        CB.reset(breaker)
      end

      opts = [breaker: breaker, deadline: 10_000, sleep: sleep, clock: fake[:clock]]
      assert RP.run(RP.new(jitter: :none), script([{:ok, 1}]), opts) == {:ok, 1}
      assert calls() == 1
    end

    test "a half-open probe keeps its permit across retries and reports once",
         %{breaker: breaker, fake: fake} do
      :ok = CB.install(breaker, threshold: 1)
      :ok = CB.record(breaker, :error)
      CB.__advance_clock__(breaker, 60_000)
      fun = script([{:error, :timeout}, {:error, :timeout}, {:ok, :back}])
      assert RP.run(RP.new(), fun, [breaker: breaker] ++ fake) == {:ok, :back}
      assert %{state: :half_open, half_open_successes: 1, probes_in_use: 0} = CB.info(breaker)
    end
  end

  describe "run/3 with a budget" do
    test "an empty budget with no reserve allows no retry", %{
      fake: fake,
      budget: budget,
      ref: ref
    } do
      :ok = RP.configure_budget(budget, ratio: 0.0, min_per_second: 0)
      fun = script(List.duplicate({:error, :timeout}, 10))
      assert RP.run(RP.new(), fun, [budget: budget] ++ fake) == {:error, :timeout}
      assert calls() == 1
      assert_received {@exhausted, ^ref, %{attempts: 1}, %{why: :budget, budget: ^budget}}
      assert %{allowed: 0, denied: 1} = RP.budget_info(budget)
    end

    test "retries are a fraction of calls", %{fake: fake, budget: budget} do
      :ok = RP.configure_budget(budget, ratio: 0.5, min_per_second: 0)
      for _ <- 1..4, do: RP.run(RP.new(), fn -> :ok end, [budget: budget] ++ fake)
      fun = script(List.duplicate({:error, :timeout}, 10))
      assert RP.run(RP.new(max_attempts: 10), fun, [budget: budget] ++ fake) == {:error, :timeout}
      # Five calls deposited 2.5 tokens: two retries.
      assert calls() == 3
    end

    test "bad budget options", %{budget: budget} do
      assert RP.configure_budget(budget, ratio: 2.0) ==
               {:error, {:invalid_argument, {:ratio, 2.0}}}

      assert RP.configure_budget(budget, ratio: :x) == {:error, {:invalid_argument, {:ratio, :x}}}

      assert RP.configure_budget(budget, size: 1) ==
               {:error, {:invalid_argument, {:unknown_options, [:size]}}}

      assert RP.budget_info(budget) == {:error, :not_found}
    end
  end
end
