# Circuit breakers: CircuitBreaker.ask/1 on a closed breaker against a
# fuse-style ETS ask and seed 002's struct kept in a GenServer, in one run;
# then the ask from 2 processes (2 schedulers) against 1.
#
#   MIX_ENV=prod mix run bench/breaker_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule BreakerBench.Fuse do
  @moduledoc """
  fuse's ask (jlouis/fuse, `fuse:ask/2` with `async_dirty`): a lookup of the
  fuse's state row in a public ETS table, then a bump of its shared stats
  counter with `:ets.update_counter/3`.
  """
  @table __MODULE__

  def install(name) do
    :ets.new(@table, [:named_table, :public, read_concurrency: true, write_concurrency: true])
    :ets.insert(@table, [{{:state, name}, :ok}, {{:stats, name}, 0}])
  end

  def ask(name) do
    [{_, state}] = :ets.lookup(@table, {:state, name})
    :ets.update_counter(@table, {:stats, name}, 1)
    state
  end
end

defmodule BreakerBench.SeedServer do
  @moduledoc "Seed 002's functional breaker kept in a GenServer: an ask is a call."
  use GenServer
  alias DSPex.Bridge.CircuitBreaker

  def start_link, do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)
  def ask, do: GenServer.call(__MODULE__, :ask)

  @impl true
  def init(nil), do: {:ok, CircuitBreaker.new()}

  @impl true
  def handle_call(:ask, _from, b) do
    {:reply, if(CircuitBreaker.should_attempt?(b), do: :ok, else: {:error, :circuit_open}), b}
  end
end

alias DSPex.Bridge.CircuitBreaker

:ok = CircuitBreaker.install(:bench_breaker)
BreakerBench.Fuse.install(:bench_breaker)
{:ok, _} = BreakerBench.SeedServer.start_link()

# Ten asks per call of the job, so the harness's own per-call cost weighs
# less; figures are divided back to one ask below.
ask10 = fn ->
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
  CircuitBreaker.ask(:bench_breaker)
end

fuse10 = fn ->
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
  BreakerBench.Fuse.ask(:bench_breaker)
end

seed10 = fn -> for _ <- 1..10, do: BreakerBench.SeedServer.ask() end

opts = [time: 3, warmup: 0.5, rounds: 3]

one =
  DSPex.Bench.run(
    %{
      "CircuitBreaker.ask x10" => ask10,
      "fuse-style ETS ask x10" => fuse10,
      "seed struct in a GenServer x10" => seed10
    },
    [title: "ask on a closed breaker, one process (10 asks per call)"] ++ opts
  )

par =
  DSPex.Bench.run(
    %{
      "CircuitBreaker.ask x10, 1 process" => ask10,
      "CircuitBreaker.ask x10, 2 processes" => {ask10, parallel: 2},
      "fuse-style ETS ask x10, 1 process" => fuse10,
      "fuse-style ETS ask x10, 2 processes" => {fuse10, parallel: 2}
    },
    [title: "ask from 2 schedulers against 1"] ++ opts
  )

IO.puts("\n## ratios\n")
vs_fuse = DSPex.Bench.ratio(one, "CircuitBreaker.ask x10", "fuse-style ETS ask x10")
vs_seed = DSPex.Bench.ratio(one, "CircuitBreaker.ask x10", "seed struct in a GenServer x10")

scale =
  DSPex.Bench.ratio(
    par,
    "CircuitBreaker.ask x10, 2 processes",
    "CircuitBreaker.ask x10, 1 process"
  )

fuse_scale =
  DSPex.Bench.ratio(
    par,
    "fuse-style ETS ask x10, 2 processes",
    "fuse-style ETS ask x10, 1 process"
  )

ns = fn name -> Float.round(one[name].p50_ns / 10, 1) end
loadavg = File.read!("/proc/loadavg") |> String.split() |> hd()

IO.puts("""

| case | CircuitBreaker.ask | baseline | ratio | target |
| --- | --- | --- | --- | --- |
| closed breaker, p50 per ask | #{ns.("CircuitBreaker.ask x10")} ns | | | <= 100 ns |
| vs fuse-style ETS ask (lookup + update_counter), p50 #{ns.("fuse-style ETS ask x10")} ns | | | #{Float.round(vs_fuse, 2)}x | >= 3x |
| vs seed 002's struct in a GenServer, p50 #{ns.("seed struct in a GenServer x10")} ns | | | #{Float.round(vs_seed, 1)}x | >= 20x |
| 2 processes vs 1, throughput | | | #{Float.round(scale, 2)}x (fuse-style: #{Float.round(fuse_scale, 2)}x) | >= 1.8x |

(load average during the run: #{loadavg}, #{System.schedulers_online()} schedulers)
""")
