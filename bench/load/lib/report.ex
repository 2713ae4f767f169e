defmodule DSPexLoad.Report do
  @moduledoc false
  # Turning counters into figures: per-interval lines, the summary, memory
  # flatness, and the run's own checks.

  alias DSPexLoad.Hist

  @qs [50, 95, 99, 99.9]

  ## Figures of one op's stats over `seconds`

  def figures(s, seconds) do
    ok = if s.ok, do: Enum.sum(s.ok), else: 0
    refused = if s.refused, do: Enum.sum(s.refused), else: 0

    %{
      ok: ok,
      refused: refused,
      errors: s.errors,
      unanswered: s.unanswered,
      ok_per_s: rate(ok, seconds),
      refused_per_s: rate(refused, seconds),
      latency_us: lat(s.ok, ok, s.ok_sum, s.ok_max),
      refused_latency_us: lat(s.refused, refused, s.ref_sum, s.ref_max),
      refused_service_us: service(s[:ref_service])
    }
  end

  defp service(nil), do: nil

  defp service(counts) do
    n = Enum.sum(counts)

    if n > 0,
      do: for(q <- [50, 99], into: %{}, do: {"p#{q}", us(Hist.percentile(counts, n, q))}),
      else: nil
  end

  defp rate(n, seconds) when seconds > 0, do: Float.round(n / seconds, 1)
  defp rate(_, _), do: 0.0

  defp lat(_counts, 0, _sum, _max), do: nil

  defp lat(counts, n, sum, max) do
    # A bucket's upper bound, never above the largest value seen.
    ps =
      for q <- @qs, into: %{} do
        {"p#{q}", us(min(Hist.percentile(counts, n, q), max))}
      end

    Map.merge(ps, %{"mean" => us(sum / n), "max" => us(max)})
  end

  defp us(nil), do: nil
  defp us(ns), do: Float.round(ns / 1000, 1)

  def all(per_op) do
    Enum.reduce(Map.values(per_op), DSPexLoad.Stats.empty(), &DSPexLoad.Stats.merge/2)
  end

  ## Printing

  def line(label, per_op, seconds, offered) do
    total = figures(all(per_op), seconds)
    done = total.ok + total.refused + total.errors

    head =
      "[#{label}] #{fmt_rate(done / max(seconds, 0.001))} ops/s (offered #{fmt_rate(offered)}): " <>
        "ok #{total.ok} refused #{total.refused} errors #{total.errors} unanswered #{total.unanswered}" <>
        " | all p50 #{p(total.latency_us, "p50")} p95 #{p(total.latency_us, "p95")}" <>
        " p99 #{p(total.latency_us, "p99")} max #{p(total.latency_us, "max")}"

    ops =
      for {op, s} <- Enum.sort(per_op),
          f = figures(s, seconds),
          f.ok + f.refused + f.errors > 0 do
        "    #{String.pad_trailing(to_string(op), 11)} #{String.pad_leading(fmt_rate(f.ok_per_s), 8)}/s" <>
          " p50 #{p(f.latency_us, "p50")} p95 #{p(f.latency_us, "p95")} p99 #{p(f.latency_us, "p99")}" <>
          " max #{p(f.latency_us, "max")}" <>
          if(f.refused > 0,
            do: " | refused #{f.refused} (p99 #{p(f.refused_latency_us, "p99")})",
            else: ""
          ) <>
          if(f.errors > 0, do: " | errors #{f.errors}", else: "") <>
          if(f.unanswered > 0, do: " | unanswered #{f.unanswered}", else: "")
      end

    Enum.join([head | ops], "\n")
  end

  defp fmt_rate(r) when r >= 10_000, do: "#{Float.round(r / 1000, 1)}k"
  defp fmt_rate(r), do: "#{round(r)}"

  defp p(nil, _), do: "-"

  defp p(lat, key) do
    case lat[key] do
      nil -> "-"
      v when v >= 1000 -> "#{Float.round(v / 1000, 2)}ms"
      v -> "#{v}us"
    end
  end

  ## Memory: flat within `tol` after the warm-up?

  # `samples` in time order; `key` a numeric field. After dropping the
  # samples before `warmup_ms` from the first: growth = median of the last
  # quarter / median of the first quarter - 1 (robust to a GC's noise), the
  # least-squares slope projected over the window, and band = max/min - 1
  # (the noise). Flat when growth and trend are both within `tol`: the
  # level memory settles at after the warm-up is the level it ends at.
  def flatness(samples, key, warmup_ms, tol) do
    t_first = samples |> List.first() |> Map.get(:t_ms)

    post =
      for s <- samples,
          s.t_ms - t_first >= warmup_ms,
          v = Map.get(s, key),
          is_number(v),
          do: {(s.t_ms - t_first) / 60_000, v}

    if length(post) < 3 do
      %{key: key, samples: length(post), flat: nil, note: "too few samples after warm-up"}
    else
      vs = Enum.map(post, &elem(&1, 1))
      {min, max} = Enum.min_max(vs)
      q = max(div(length(vs), 4), 1)
      first = median(Enum.take(vs, q))
      last = median(Enum.take(vs, -q))
      {slope, _} = fit(post)
      span = elem(List.last(post), 0) - elem(hd(post), 0)
      mean = Enum.sum(vs) / length(vs)
      band = if min > 0, do: max / min - 1, else: 0.0

      %{
        key: key,
        samples: length(vs),
        min: min,
        max: max,
        band: Float.round(band, 4),
        growth: Float.round(last / max(first, 1) - 1, 4),
        trend_over_window: Float.round(slope * span / max(mean, 1), 4),
        flat: abs(last / max(first, 1) - 1) <= tol and abs(slope * span / max(mean, 1)) <= tol,
        tolerance: tol
      }
    end
  end

  defp median(vs), do: vs |> Enum.sort() |> Enum.at(div(length(vs), 2))

  defp fit(points) do
    n = length(points)
    {sx, sy} = Enum.reduce(points, {0, 0}, fn {x, y}, {a, b} -> {a + x, b + y} end)
    mx = sx / n
    my = sy / n

    {num, den} =
      Enum.reduce(points, {0, 0}, fn {x, y}, {a, b} ->
        {a + (x - mx) * (y - my), b + (x - mx) * (x - mx)}
      end)

    slope = if den > 0, do: num / den, else: 0.0
    {slope, my - slope * mx}
  end

  ## Machine

  def machine do
    %{
      nproc: cmd("nproc", []),
      cpu: cpu(),
      schedulers: System.schedulers_online(),
      otp: System.otp_release(),
      elixir: System.version(),
      loadavg: DSPexLoad.Sampler.loadavg(),
      uname: cmd("uname", ["-srm"]),
      top: top()
    }
  end

  defp cpu do
    case File.read("/proc/cpuinfo") do
      {:ok, text} ->
        case Regex.run(~r/model name\s*:\s*(.+)/, text) do
          [_, m] -> m
          _ -> nil
        end

      _ ->
        nil
    end
  end

  # The busiest processes of the machine (other work running meanwhile).
  def top do
    case System.cmd("ps", ["-eo", "pcpu,rss,comm", "--sort=-pcpu"], stderr_to_stdout: true) do
      {out, 0} -> out |> String.split("\n", trim: true) |> Enum.take(9)
      _ -> []
    end
  rescue
    _ -> []
  end

  defp cmd(c, args) do
    case System.cmd(c, args, stderr_to_stdout: true) do
      {out, 0} -> String.trim(out)
      _ -> nil
    end
  rescue
    _ -> nil
  end
end
