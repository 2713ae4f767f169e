# Analytics: recording cost and memory of the Rust time-bucketed store
# (DSPex.Bridge.Analytics) against the seed's ETS row per event
# (../shared/seeds/002, section 4), in one run; and what Analytics costs the
# store's hot read path.
#
#   MIX_ENV=prod mix run bench/analytics_bench.exs            # full run, 10M events
#   EVENTS=1000000 MIX_ENV=prod mix run bench/analytics_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule AnalyticsBench.SeedAnalytics do
  @moduledoc """
  The seed's storage, verbatim: one ETS `:set` row per sample under
  `{type, System.monotonic_time(:microsecond)}` holding a map of type, value,
  metadata and timestamp. Two samples of a type in one microsecond overwrite
  each other; the bench counts how many are lost.
  """
  def new do
    :ets.new(:seed_analytics, [
      :set,
      :public,
      {:write_concurrency, true},
      {:read_concurrency, true}
    ])
  end

  def record_metric(table, metric_type, value, metadata) do
    timestamp = System.monotonic_time(:microsecond)
    metric = %{type: metric_type, value: value, metadata: metadata, timestamp: timestamp}
    :ets.insert(table, {{metric_type, timestamp}, metric})
  end

  # The seed's handler: a read event is two rows (count and latency).
  def handle_event(_event, measurements, metadata, table) do
    record_metric(table, :variable_read, 1, metadata)
    record_metric(table, :read_latency, measurements.duration_us, metadata)
  end

  def memory_bytes(table), do: :ets.info(table, :memory) * :erlang.system_info(:wordsize)
end

defmodule AnalyticsBench do
  alias DSPex.Bench
  alias DSPex.Bridge.{Analytics, Native, SessionStore, Telemetry}
  alias AnalyticsBench.SeedAnalytics, as: Seed

  @read [:dspex, :bridge, :variable, :read]
  @meta %{session_id: "bench", variable_id: "var1"}

  def run do
    events = String.to_integer(System.get_env("EVENTS", "10000000"))
    IO.puts("# Analytics bench (#{System.schedulers_online()} schedulers)")
    recording()
    end_to_end()
    hot_path()
    memory(events)
  end

  defp latency, do: rem(System.monotonic_time(), 4_999) + 1

  # The seed keeps every row for the retention period (24 h by default), so in
  # steady state its table is large; the bench gives it a million rows first.
  defp seed_table do
    table = Seed.new()
    times(1_000_000, fn -> Seed.record_metric(table, :warmup, 1, @meta) end)
    table
  end

  # The machine is shared, so each comparison runs in rounds, the two cases
  # back to back, and the median ratio is reported.
  defp rounds(title, ours, theirs, opts \\ []) do
    ratios =
      for round <- 1..3 do
        results =
          Bench.run(
            %{
              ("ours: " <> elem(ours, 0)) => elem(ours, 1),
              ("seed: " <> elem(theirs, 0)) => elem(theirs, 1)
            },
            title: "#{title} (round #{round})",
            time: Keyword.get(opts, :time, 1.5)
          )

        a = results["ours: " <> elem(ours, 0)]
        b = results["seed: " <> elem(theirs, 0)]
        {a.ips / b.ips, b.p50_ns / a.p50_ns}
      end

    {by_ips, by_p50} = Enum.unzip(ratios)
    median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) |> Float.round(2) end

    IO.puts(
      "=> #{title}: ours #{median.(by_ips)}x the seed's throughput " <>
        "(median of 3 rounds; by p50 latency #{median.(by_p50)}x)"
    )
  end

  defp recording do
    {:ok, _} = Analytics.start_link()
    seed = seed_table()

    rounds(
      "recording one sample",
      {"Analytics.record_metric (Rust buckets)",
       fn -> Analytics.record_metric(:read_latency, latency()) end},
      {"ETS row per event", fn -> Seed.record_metric(seed, :read_latency, latency(), @meta) end}
    )

    rounds(
      "recording one sample, 2 processes",
      {"Analytics.record_metric (Rust buckets)",
       {fn -> Analytics.record_metric(:read_latency, latency()) end, parallel: 2}},
      {"ETS row per event",
       {fn -> Seed.record_metric(seed, :read_latency, latency(), @meta) end, parallel: 2}}
    )

    :ets.delete(seed)
    GenServer.stop(Analytics)
  end

  # A read event through the dispatcher into each storage, handler included.
  # Both handlers are attached at once, each to its own event name, so the
  # dispatch cost is the same.
  defp end_to_end do
    {:ok, _} = Analytics.start_link()
    seed = seed_table()
    seed_event = [:bench, :seed, :read]
    :ok = Telemetry.attach("seed-analytics", seed_event, &Seed.handle_event/4, seed)

    rounds(
      "one read event, dispatch and handler",
      {"Analytics handler", fn -> Telemetry.execute(@read, %{duration_us: latency()}, @meta) end},
      {"seed handler (2 ETS rows)",
       fn -> Telemetry.execute(seed_event, %{duration_us: latency()}, @meta) end}
    )

    Telemetry.detach("seed-analytics")
    :ets.delete(seed)
    GenServer.stop(Analytics)
  end

  # What Analytics costs SessionStore.get_variable_value/2: off, a no-op
  # handler (the price of being observed at all: clock reads, event metadata,
  # dispatch), and Analytics, in alternating rounds.
  defp hot_path do
    {:ok, sid} = SessionStore.create_session("analytics-bench")
    {:ok, _} = SessionStore.register_variable(sid, :x, :float, 0.5)
    read = fn -> SessionStore.get_variable_value(sid, :x) end
    p50 = fn name -> Bench.run(%{name => read}, title: "hot read", time: 1.5)[name].p50_ns end

    samples =
      for _round <- 1..3 do
        off = p50.("read, nothing attached")
        :ok = Telemetry.attach("noop", @read, fn _, _, _, _ -> :ok end, nil)
        noop = p50.("read, no-op handler attached")
        Telemetry.detach("noop")
        {:ok, _} = Analytics.start_link()
        on = p50.("read, Analytics attached")
        GenServer.stop(Analytics)
        {off, noop, on}
      end

    SessionStore.delete_session(sid)
    {off, noop, on} = samples |> Enum.sort_by(fn {off, _, on} -> on - off end) |> Enum.at(1)

    IO.puts(
      "=> read at p50: #{Float.round(off, 1)} ns with nothing attached, " <>
        "#{Float.round(noop, 1)} ns with a no-op handler, #{Float.round(on, 1)} ns with Analytics " <>
        "(Analytics' own share #{Float.round(on - noop, 1)} ns; median of 3 rounds)"
    )
  end

  defp memory(events) do
    IO.puts("\n## memory after #{events} events\n")
    checkpoints = Enum.uniq([div(events, 10), div(events, 2), events])

    # Ours, a burst: every sample now (few buckets, the histogram cells fill).
    {:ok, _} = Analytics.start_link()
    native0 = Native.store_memory()

    ours =
      fill(
        checkpoints,
        fn n -> times(n, fn -> Analytics.record_metric(:read_latency, latency()) end) end,
        fn ->
          {:ok, s} = Analytics.stats()
          {s.bytes, Native.store_memory() - native0, s.buckets}
        end
      )

    GenServer.stop(Analytics)

    # Ours, the same number of events spread over 24 hours of timestamps (1 s
    # buckets, 24 h retention): the most buckets the retention allows. A fresh
    # store per row, so each row covers the whole day.
    spread =
      for n <- checkpoints do
        {:ok, m} = Native.metrics_new(1_000_000, 86_400_000_000)
        now = System.os_time(:microsecond)
        t0 = now - 86_400_000_000
        :erlang.garbage_collect()
        native1 = Native.store_memory()

        Enum.each(0..(n - 1), fn i ->
          Native.metrics_record_at(m, :read_latency, latency(), t0 + div(i * 86_400_000_000, n))
        end)

        Native.metrics_maintain(m, now)
        s = Native.metrics_stats(m)
        # Keep each store alive so no free lands in the next row's allocator delta.
        Process.put(:stores, [m | Process.get(:stores, [])])
        {n, {s.bytes, Native.store_memory() - native1, s.buckets}}
      end

    # The seed, a burst.
    seed = Seed.new()

    theirs =
      fill(
        checkpoints,
        fn n -> times(n, fn -> Seed.record_metric(seed, :read_latency, latency(), @meta) end) end,
        fn ->
          {Seed.memory_bytes(seed), :ets.info(seed, :size)}
        end
      )

    :ets.delete(seed)

    IO.puts(
      String.pad_trailing("events", 12) <>
        pad("ours burst") <>
        pad("ours 24 h") <> pad("buckets") <> pad("seed ETS") <> pad("seed rows")
    )

    for {{n, {b1, _a1, _k1}}, {{_, {b2, _a2, k2}}, {_, {b3, rows}}}} <-
          Enum.zip(ours, Enum.zip(spread, theirs)) do
      IO.puts(
        String.pad_trailing(Integer.to_string(n), 12) <>
          pad(Bench.fmt_bytes(b1)) <>
          pad(Bench.fmt_bytes(b2)) <>
          pad(Integer.to_string(k2)) <>
          pad(Bench.fmt_bytes(b3)) <> pad("#{rows} (#{events_lost(n, rows)} lost)")
      )
    end

    {_, {_, alloc_burst, _}} = List.last(ours)
    {_, {_, alloc_spread, _}} = List.last(spread)

    IO.puts(
      "engine allocator delta after #{events} events (cross-check of the estimates above): " <>
        "burst #{Bench.fmt_bytes(alloc_burst)}, 24 h spread #{Bench.fmt_bytes(alloc_spread)}"
    )
  end

  defp events_lost(n, rows), do: n - rows

  defp times(0, _fun), do: :ok

  defp times(n, fun) do
    fun.()
    times(n - 1, fun)
  end

  # Records up to each checkpoint, probing after each: [{events, probe}].
  defp fill(checkpoints, record, probe) do
    {out, _} =
      Enum.map_reduce(checkpoints, 0, fn target, done ->
        n = target - done

        cond do
          is_function(record, 1) -> record.(n)
          is_function(record, 2) -> record.(n, done)
        end

        {{target, probe.()}, target}
      end)

    out
  end

  defp pad(s), do: String.pad_leading(s, 16)
end

AnalyticsBench.run()
