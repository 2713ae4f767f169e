# What a crashing telemetry handler costs the callers that emit its event
# (the chaos run's telemetry_crash fault, in isolation), in one run:
#
# 1. a burst: 64 processes emit one event together while its handler
#    raises, against the same 64 with a healthy handler (the baseline);
# 2. steady callers: 16 processes with large heaps emitting an event every
#    millisecond, among 1,500 idle processes with heaps of their own (as in
#    the full chaos run); the slowest emit in the second after a handler of
#    the event crashes, against the slowest in a second with none crashing.
#
# Rounds alternate the two sides; medians of the rounds.
#
#   MIX_ENV=test mix run --no-start bench/chaos/handler_crash_bench.exs
#
# Before the fix, every caller failing in the handler queued for the
# handler table's lock (whose retries sleep up to 125 ms, then 250 ms, ...)
# to detach it again: case 1 p50 159 ms, max 0.64 s. Case 2 shows what is
# left: any change of the handler table (attach or detach) rewrites
# persistent terms, and the callers holding the old ones pay a major
# collection of their heaps.

Logger.configure(level: :critical)
{:ok, _} = Application.ensure_all_started(:dspex_bridge)

alias DSPex.Bridge.Telemetry

median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end

# Until the table no longer holds `id` (no event tells it).
await_detached = fn event, id ->
  Stream.repeatedly(fn ->
    gone = not Enum.any?(Telemetry.handlers(event), &(elem(&1, 0) == id))
    gone || (Process.sleep(5) && false)
  end)
  |> Enum.find(& &1)
end

# Loads the failure path's code once (a release preloads it).
:ok = Telemetry.attach(:warm, [:chaos, :warm], fn _, _, _, _ -> raise "warm" end, nil)
Telemetry.execute([:chaos, :warm], %{}, %{})
await_detached.([:chaos, :warm], :warm)

## 1. A burst of 64 callers

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
  await_detached.(event, id)
  Enum.sort(times)
end

results =
  for _ <- 1..rounds do
    healthy = burst.(fn _, _, _, _ -> :ok end)
    crashing = burst.(fn _, _, _, _ -> raise "chaos: handler crashed" end)
    {healthy, crashing}
  end

stat = fn pick, f -> results |> Enum.map(fn r -> f.(pick.(r)) end) |> median.() end
p50 = fn xs -> Enum.at(xs, div(length(xs), 2)) end

IO.puts("""
1. #{n} callers emitting one event at once, median of #{rounds} rounds:
| handler  | p50 per emit | slowest emit |
| -------- | ------------ | ------------ |
| healthy  | #{stat.(&elem(&1, 0), p50)} us | #{stat.(&elem(&1, 0), &List.last/1)} us |
| crashing | #{stat.(&elem(&1, 1), p50)} us | #{stat.(&elem(&1, 1), &List.last/1)} us |
""")

## 2. Steady callers among many processes

event = [:chaos, :steady]
:ok = Telemetry.attach(:steady_counter, event, fn _, _, _, _ -> :ok end, nil)

idle =
  for _ <- 1..1_500 do
    spawn(fn ->
      data = Map.new(1..3_000, &{&1, &1})

      receive do
        :stop -> data
      end
    end)
  end

parent = self()

callers =
  for i <- 1..16 do
    spawn(fn ->
      heap = Map.new(1..20_000, &{&1, {&1, i}})

      loop = fn loop, worst ->
        receive do
          :report ->
            send(parent, {:worst, worst, map_size(heap)})
            loop.(loop, 0)

          :stop ->
            :ok
        after
          0 ->
            t0 = System.monotonic_time(:microsecond)
            Telemetry.execute(event, %{}, %{})
            took = System.monotonic_time(:microsecond) - t0
            Process.sleep(1)
            loop.(loop, max(worst, took))
        end
      end

      loop.(loop, 0)
    end)
  end

# The slowest emit of any caller since the last report.
worst = fn ->
  Enum.each(callers, &send(&1, :report))

  for _ <- callers, reduce: 0 do
    acc ->
      receive do
        {:worst, w, _} -> max(acc, w)
      end
  end
end

Process.sleep(1_000)
worst.()
steady_rounds = 10

pairs =
  for r <- 1..steady_rounds do
    Process.sleep(1_000)
    quiet = worst.()
    # A healthy handler attached and detached: what any change of the
    # handler table costs the callers.
    id = {:steady_healthy, r}
    :ok = Telemetry.attach(id, event, fn _, _, _, _ -> :ok end, nil)
    :ok = Telemetry.detach(id)
    Process.sleep(1_000)
    churn = worst.()
    id = {:steady_crash, r}
    :ok = Telemetry.attach(id, event, fn _, _, _, _ -> raise "chaos: handler crashed" end, nil)
    await_detached.(event, id)
    Process.sleep(1_000)
    {quiet, churn, worst.()}
  end

Enum.each(callers ++ idle, &send(&1, :stop))
quiet = Enum.map(pairs, &elem(&1, 0))
churn = Enum.map(pairs, &elem(&1, 1))
crashed = Enum.map(pairs, &elem(&1, 2))

IO.puts("""
2. 16 steady callers among 1,500 processes, slowest emit per second, #{steady_rounds} rounds:
| second              | median   | worst    |
| ------------------- | -------- | -------- |
| nothing happening   | #{median.(quiet)} us | #{Enum.max(quiet)} us |
| a handler attached and detached | #{median.(churn)} us | #{Enum.max(churn)} us |
| a handler crashed (attached, detached by its failure) | #{median.(crashed)} us | #{Enum.max(crashed)} us |
""")
