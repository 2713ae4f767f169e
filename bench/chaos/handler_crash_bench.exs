# What a crashing telemetry handler costs the callers that hit it at once
# (the chaos run's telemetry_crash fault, concentrated): 64 processes emit
# one event together while its handler raises, against the same 64 with a
# healthy handler (the baseline), 5 rounds each, in one run.
#
#   MIX_ENV=test mix run --no-start bench/chaos/handler_crash_bench.exs
#
# Before the fix every failing caller queued for the handler table's lock
# (whose retries sleep up to 125 ms, then 250 ms, ...) to detach it again:
# p50 157 ms, max 0.7-1.0 s on the 2-core machine.

Logger.configure(level: :critical)
{:ok, _} = Application.ensure_all_started(:dspex_bridge)

alias DSPex.Bridge.Telemetry

n = 64
rounds = 5

burst = fn handler ->
  event = [:chaos, :bench, System.unique_integer([:positive])]
  id = {:chaos_bench, event}
  :ok = Telemetry.attach(id, event, handler, nil)
  parent = self()

  pids =
    for _ <- 1..n do
      spawn(fn ->
        receive do
          :go -> :ok
        end

        t0 = System.monotonic_time(:microsecond)
        Telemetry.execute(event, %{}, %{})
        send(parent, {:took, System.monotonic_time(:microsecond) - t0})
      end)
    end

  Enum.each(pids, &send(&1, :go))

  times =
    for _ <- 1..n do
      receive do
        {:took, us} -> us
      end
    end

  Telemetry.detach(id)
  Enum.sort(times)
end

median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end

results =
  for _ <- 1..rounds do
    healthy = burst.(fn _, _, _, _ -> :ok end)
    crashing = burst.(fn _, _, _, _ -> raise "chaos: handler crashed" end)
    {healthy, crashing}
  end

stat = fn pick, f -> results |> Enum.map(fn r -> f.(pick.(r)) end) |> median.() end
p50 = fn xs -> Enum.at(xs, div(length(xs), 2)) end

h50 = stat.(&elem(&1, 0), p50)
c50 = stat.(&elem(&1, 1), p50)
hmax = stat.(&elem(&1, 0), &List.last/1)
cmax = stat.(&elem(&1, 1), &List.last/1)

IO.puts("""
#{n} callers emitting one event at once, median of #{rounds} rounds:
| handler  | p50 per emit | slowest emit |
| -------- | ------------ | ------------ |
| healthy  | #{h50} us | #{hmax} us |
| crashing | #{c50} us | #{cmax} us |
slowest emit, crashing vs healthy: #{Float.round(cmax / max(hmax, 1), 1)}x
""")
