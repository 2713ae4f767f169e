defmodule DSPex.Chaos.Report do
  @moduledoc """
  The checker's result as tables for a terminal and as JSON (a small
  encoder: the project has no JSON dependency).
  """

  @doc "The result as text: faults, paths, checks, verdict."
  @spec table(map, map) :: String.t()
  def table(result, config) do
    faults =
      for f <- result.faults do
        [
          to_string(f.name),
          Enum.join(f.paths, ","),
          fmt(f.healed_ms),
          Integer.to_string(f.affected_sessions),
          Integer.to_string(f.errors),
          fmt(f.first_error_ms),
          fmt(f.recovery_ms),
          fmt(f.sessions_recovered_ms_max),
          fmt(f.last_error_ms),
          Integer.to_string(f.unrecovered_in_window),
          fmt(f.slowest_call_ms),
          top(f.errors_by_reason, 3),
          if(f.collateral_errors == %{}, do: "0", else: top(f.collateral_errors, 2))
        ]
      end

    paths =
      for {p, s} <- Enum.sort(result.paths) do
        [
          Atom.to_string(p),
          Integer.to_string(s.ops),
          fmt(s.ops_per_s),
          Integer.to_string(s.ok),
          Integer.to_string(s.refused),
          Integer.to_string(s.failed),
          Integer.to_string(s.unknown),
          Integer.to_string(s.from_cache),
          us(s.p50_us),
          us(s.p99_us),
          us(s.max_us),
          top(s.errors_by_reason, 4)
        ]
      end

    v = result.violations

    checks = [
      ["acknowledged writes lost", length(v.lost)],
      ["values never written (phantom)", length(v.phantom)],
      ["variables unreadable after healing", length(v.unreadable)],
      ["calls answered after their timeout", length(v.late)],
      ["calls that never answered", length(v.hung)],
      ["stale reads", length(v.stale)],
      ["sessions not recovered at the end", length(v.unrecovered)],
      ["replicas disagreeing after healing", length(v.replicas)],
      ["derived variables disagreeing with inputs", length(v.derived)],
      ["faults that did not do what they are for", length(v.faults)]
    ]

    """

    chaos run (#{config.profile}): #{result.ops} operations, #{result.acked_writes} acknowledged writes \
    (#{result.unknown_writes} of unknown outcome) on #{result.variables} variables
    #{config_line(config)}

    #{render(["fault", "paths", "healed ms", "sessions hit", "errors", "first err ms", "recovery ms", "all sessions ms", "last err ms", "unrecovered", "slowest call ms", "errors by reason", "collateral"], faults)}
    slowest call before the first fault (ms): #{top(result.baseline_slowest_ms, 4)}

    #{render(["path", "ops", "ops/s", "ok", "refused", "failed", "unknown", "from cache", "p50", "p99", "max", "errors by reason"], paths)}
    #{render(["check", "count"], Enum.map(checks, fn [a, b] -> [a, Integer.to_string(b)] end))}
    acknowledged writes that ended with a port session the kill destroyed (by design): \
    #{result.ended_with_session.acked_writes} on #{result.ended_with_session.variables} variables
    verdict: #{if result.ok, do: "PASS", else: "FAIL"}
    """
  end

  defp config_line(c) do
    "sessions: nif #{c.nif_sessions}, port #{c.port_sessions}, raft #{c.raft_sessions}, grpc #{c.grpc_sessions}; " <>
      "timeouts: port #{c.port_timeout} ms, raft #{c.raft_timeout} ms, grpc #{c.grpc_timeout} ms; " <>
      "#{c.cores} cores"
  end

  defp top(map, _n) when map == %{}, do: "-"

  defp top(map, n) do
    map
    |> Enum.sort_by(fn {_, c} -> -c end)
    |> Enum.take(n)
    |> Enum.map_join(" ", fn {k, c} -> "#{k}=#{c}" end)
  end

  defp fmt(nil), do: "-"
  defp fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 1)
  defp fmt(x), do: to_string(x)

  defp us(nil), do: "-"
  defp us(x) when x >= 10_000, do: "#{Float.round(x / 1_000, 1)}ms"
  defp us(x), do: "#{x}us"

  defp render(header, rows) do
    all = [header | rows]

    widths =
      Enum.reduce(all, List.duplicate(0, length(header)), fn row, ws ->
        Enum.zip_with(row, ws, fn cell, w -> max(w, String.length(cell)) end)
      end)

    line = fn row ->
      "| " <>
        (row
         |> Enum.zip(widths)
         |> Enum.map_join(" | ", fn {c, w} -> String.pad_trailing(c, w) end)) <>
        " |"
    end

    sep = "| " <> Enum.map_join(widths, " | ", &String.duplicate("-", &1)) <> " |"
    Enum.join([line.(header), sep | Enum.map(rows, line)], "\n") <> "\n"
  end

  ## JSON

  @doc "`term` as JSON: maps, lists, strings, numbers, booleans, nil; atoms and tuples as strings/lists."
  @spec json(term) :: iodata
  def json(term), do: encode(term)

  defp encode(nil), do: "null"
  defp encode(true), do: "true"
  defp encode(false), do: "false"
  defp encode(a) when is_atom(a), do: string(Atom.to_string(a))
  defp encode(n) when is_integer(n), do: Integer.to_string(n)
  defp encode(f) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  defp encode(s) when is_binary(s), do: string(s)
  defp encode(t) when is_tuple(t), do: encode(Tuple.to_list(t))

  defp encode(l) when is_list(l), do: ["[", Enum.map_intersperse(l, ",", &encode/1), "]"]

  defp encode(m) when is_map(m) do
    pairs = Enum.map(m, fn {k, v} -> [string(key(k)), ":", encode(v)] end)
    ["{", Enum.intersperse(pairs, ","), "}"]
  end

  defp encode(other), do: string(inspect(other))

  defp key(k) when is_binary(k), do: k
  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k), do: inspect(k)

  defp string(s) do
    s = if String.valid?(s), do: s, else: inspect(s)
    ["\"", escape(s), "\""]
  end

  defp escape(s) do
    for <<c::utf8 <- s>>, into: "" do
      case c do
        ?" -> "\\\""
        ?\\ -> "\\\\"
        ?\n -> "\\n"
        ?\r -> "\\r"
        ?\t -> "\\t"
        c when c < 0x20 -> "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
        c -> <<c::utf8>>
      end
    end
  end
end
