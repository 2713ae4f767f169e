defmodule DSPex.Bench do
  @moduledoc """
  A small benchmark harness with Benchee-like output: each case is warmed up,
  then timed per call for `time` seconds; reported are ips, average, p50,
  p99, and memory (bytes allocated by the calling process per call, or a
  custom probe). Cases in one `run/2` share the machine's conditions, so
  compare them by ratio.

      DSPex.Bench.run(%{"ets lookup" => fn -> :ets.lookup(t, :k) end},
        title: "reads", time: 2, warmup: 0.5)

  A job may also be `{fun, parallel: n}` to run `n` processes at once; ips is
  then the total throughput across them.

  On a shared machine the speed of the whole machine drifts while a run
  lasts, so a case measured a few seconds after its baseline may see another
  machine. With `rounds: n` every job is measured `n` times, the jobs taking
  turns, each for `time / n` seconds: the table pools all samples, and
  `ratio/3` reports the median of the per-round ratios.
  """

  @doc "Runs the jobs and prints a table; returns `%{name => stats}`."
  def run(jobs, opts \\ []) do
    time = Keyword.get(opts, :time, 2.0)
    warmup = Keyword.get(opts, :warmup, 0.5)
    title = Keyword.get(opts, :title, "benchmark")
    batch = Keyword.get(opts, :batch, 100)

    rounds = Keyword.get(opts, :rounds, 1)

    IO.puts("\n## #{title}\n")

    jobs =
      for {name, job} <- Enum.sort_by(jobs, &elem(&1, 0)) do
        case job do
          {fun, job_opts} -> {name, fun, Keyword.get(job_opts, :parallel, 1)}
          fun -> {name, fun, 1}
        end
      end

    for {_name, fun, parallel} <- jobs, do: measure_parallel(fun, parallel, warmup, batch)

    per_round =
      for _round <- 1..rounds do
        for {name, fun, parallel} <- jobs,
            do: {name, measure_parallel(fun, parallel, time / rounds, batch)}
      end

    results =
      for {name, _fun, _parallel} <- jobs do
        stats = Enum.map(per_round, &List.keyfind!(&1, name, 0)) |> Enum.map(&elem(&1, 1))
        {name, pool(stats)}
      end

    print(results)
    if rounds > 1, do: IO.puts("(#{rounds} rounds, the jobs taking turns)")
    Map.new(results)
  end

  @doc """
  Ratio line: how many times faster `a` is than `b` by ips; with rounds, the
  median of the per-round ratios.
  """
  def ratio(results, a, b) do
    ratios =
      Enum.zip_with(results[a].round_ips, results[b].round_ips, fn x, y -> x / y end)
      |> Enum.sort()

    r = Enum.at(ratios, div(length(ratios), 2))

    spread =
      if length(ratios) > 1,
        do:
          " (median of #{length(ratios)} rounds, #{fmt_x(hd(ratios))}-#{fmt_x(List.last(ratios))})",
        else: ""

    IO.puts("#{a} vs #{b}: #{fmt_x(r)}#{spread}")
    r
  end

  defp fmt_x(r), do: "#{Float.round(r, 2)}x"

  # One summary from the rounds of a job: samples pooled, ips over the whole
  # measured time, and each round's ips kept for `ratio/3`.
  defp pool(stats) do
    samples = Enum.flat_map(stats, & &1.samples)
    ips = Enum.map(stats, & &1.ips)
    calls = Enum.sum(Enum.map(stats, & &1.calls))
    seconds = Enum.sum(Enum.map(stats, &(&1.calls / &1.ips)))

    %{summarize(samples, calls, seconds) | memory: hd(stats).memory}
    |> Map.put(:round_ips, ips)
  end

  defp measure_parallel(fun, 1, seconds, batch), do: measure(fun, seconds, batch)

  defp measure_parallel(fun, n, seconds, batch) do
    parent = self()

    pids =
      for _ <- 1..n do
        spawn_link(fn ->
          receive do
            :go -> send(parent, {self(), measure(fun, seconds, batch)})
          end
        end)
      end

    Enum.each(pids, &send(&1, :go))
    stats = Enum.map(pids, fn pid -> receive do: ({^pid, s} -> s) end)
    samples = Enum.flat_map(stats, & &1.samples)

    %{
      summarize(samples, Enum.sum(Enum.map(stats, & &1.calls)), seconds)
      | memory: hd(stats).memory
    }
    |> Map.put(:ips, Enum.sum(Enum.map(stats, & &1.ips)))
  end

  # Times batches of `batch` calls (so the clock's cost is amortised) and
  # keeps the per-call time of each batch as a sample.
  defp measure(fun, seconds, batch) do
    memory = memory_per_call(fun)

    deadline =
      System.monotonic_time() +
        System.convert_time_unit(round(seconds * 1000), :millisecond, :native)

    {samples, calls} = loop(fun, batch, deadline, [], 0)
    elapsed = seconds
    %{summarize(samples, calls, elapsed) | memory: memory}
  end

  defp loop(fun, batch, deadline, samples, calls) do
    t0 = System.monotonic_time()
    repeat(fun, batch)
    t1 = System.monotonic_time()
    samples = [(t1 - t0) / batch | samples]

    if t1 < deadline,
      do: loop(fun, batch, deadline, samples, calls + batch),
      else: {samples, calls + batch}
  end

  defp repeat(_fun, 0), do: :ok

  defp repeat(fun, n) do
    fun.()
    repeat(fun, n - 1)
  end

  defp summarize(samples, calls, seconds) do
    ns =
      samples
      |> Enum.map(&System.convert_time_unit(round(&1 * 1000), :native, :nanosecond))
      |> Enum.map(&(&1 / 1000))
      |> Enum.sort()

    n = length(ns)
    avg = Enum.sum(ns) / max(n, 1)

    %{
      ips: calls / seconds,
      average_ns: avg,
      p50_ns: pct(ns, n, 0.50),
      p99_ns: pct(ns, n, 0.99),
      calls: calls,
      samples: samples,
      memory: nil
    }
  end

  defp pct([], _n, _q), do: 0.0
  defp pct(sorted, n, q), do: Enum.at(sorted, min(n - 1, round(q * (n - 1))))

  # Heap bytes one call allocates in the calling process, measured as
  # Benchee does: trace the garbage collections of a fresh process that runs
  # the call between two forced collections, and add up what each collection
  # found on the heap beyond what the previous one left.
  defp memory_per_call(fun) do
    parent = self()

    pid =
      spawn(fn ->
        receive do: (:go -> :ok)
        :erlang.garbage_collect()
        send(parent, {:baseline, self()})
        fun.()
        :erlang.garbage_collect()
        send(parent, {:done, self()})
      end)

    :erlang.trace(pid, true, [:garbage_collection, tracer: self()])
    send(pid, :go)
    words = collect_gc(pid, nil, 0, false)
    words && words * :erlang.system_info(:wordsize)
  end

  defp collect_gc(pid, last_end, acc, counting) do
    receive do
      {:baseline, ^pid} ->
        collect_gc(pid, last_end, 0, true)

      {:done, ^pid} ->
        acc

      {:trace, ^pid, start, info} when start in [:gc_minor_start, :gc_major_start] ->
        total = info[:heap_size] + info[:old_heap_size]
        acc = if counting and last_end, do: acc + max(total - last_end, 0), else: acc
        collect_gc(pid, last_end, acc, counting)

      {:trace, ^pid, stop, info} when stop in [:gc_minor_end, :gc_major_end] ->
        collect_gc(pid, info[:heap_size] + info[:old_heap_size], acc, counting)
    after
      5_000 -> nil
    end
  end

  defp print(results) do
    header =
      String.pad_trailing("Name", 44) <>
        pad("ips") <> pad("average") <> pad("p50") <> pad("p99") <> pad("memory")

    IO.puts(header)

    for {name, s} <- results do
      IO.puts(
        String.pad_trailing(name, 44) <>
          pad(fmt_ips(s.ips)) <>
          pad(fmt_ns(s.average_ns)) <>
          pad(fmt_ns(s.p50_ns)) <> pad(fmt_ns(s.p99_ns)) <> pad(fmt_bytes(s.memory))
      )
    end
  end

  defp pad(s), do: String.pad_leading(s, 12)

  def fmt_ips(ips) when ips >= 1.0e6, do: "#{Float.round(ips / 1.0e6, 2)} M"
  def fmt_ips(ips) when ips >= 1.0e3, do: "#{Float.round(ips / 1.0e3, 2)} K"
  def fmt_ips(ips), do: "#{Float.round(ips * 1.0, 2)}"

  def fmt_ns(ns) when ns >= 1.0e6, do: "#{Float.round(ns / 1.0e6, 2)} ms"
  def fmt_ns(ns) when ns >= 1.0e3, do: "#{Float.round(ns / 1.0e3, 2)} us"
  def fmt_ns(ns), do: "#{Float.round(ns * 1.0, 1)} ns"

  def fmt_bytes(nil), do: "-"
  def fmt_bytes(b) when b >= 1024 * 1024, do: "#{Float.round(b / 1_048_576, 2)} MB"
  def fmt_bytes(b) when b >= 1024, do: "#{Float.round(b / 1024, 2)} KB"
  def fmt_bytes(b), do: "#{b} B"
end
