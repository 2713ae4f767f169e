#!/usr/bin/env bash
# Bench figures before and after, from one session:
#
#   bench/before_after.sh [BEFORE]        (default a278733, the last commit before issue 12)
#
# Builds BEFORE in a scratch git worktree under /tmp (MIX_ENV=prod, its own
# _build and cargo target, the target warmed with a copy of this tree's
# target/release), builds this tree (uncommitted changes included) the same
# way, then runs each bench on both, the two trees taking turns (before,
# after, before, after: ROUNDS rounds, at least 2), each tree with its own
# bench files. Then prints one table per bench:
#
#   case | before | after | after/before
#
# A case is a row of a DSPex.Bench table (value: its p50) or a time in the
# first value column of a bench's summary table (random-DAG insert, chain
# build, handoff p50/p99, ...); cases are matched by name, and a case found
# in one tree only is listed as such. Each figure is the median over the
# rounds. after/before > 1.10 is marked: more than 10% slower.
#
# Environment: ROUNDS (default 2), BENCHES (default "variables locks acl
# graph"), SCRATCH (the scratch worktree, default /tmp/dspex_before_<sha>),
# OUT (logs, default a new /tmp/dspex_before_after.XXXXXX), KEEP=1 keeps the
# scratch worktree (a later run with the same SCRATCH reuses its build).
#
# The machine may be shared: figures from one run are only as good as its
# quietest minutes; the load average is recorded before every bench run and
# printed with the tables.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
before=${1:-a278733}
rounds=${ROUNDS:-2}
benches=${BENCHES:-"variables locks acl graph"}
export PATH="$HOME/.cargo/bin:$PATH"
export LC_ALL=${LC_ALL:-C.UTF-8}

if ((rounds < 2)); then
  echo "ROUNDS must be at least 2" >&2
  exit 2
fi

sha=$(git -C "$here" rev-parse --verify "$before^{commit}")
scratch=${SCRATCH:-/tmp/dspex_before_${sha:0:12}}
out=${OUT:-$(mktemp -d /tmp/dspex_before_after.XXXXXX)}
mkdir -p "$out"

cleanup() {
  if [[ "${KEEP:-0}" != 1 && -d "$scratch" ]]; then
    git -C "$here" worktree remove --force "$scratch" || true
  fi
}
trap cleanup EXIT

## Build both trees

if [[ -d "$scratch" ]]; then
  git -C "$scratch" checkout --quiet --detach "$sha"
else
  git -C "$here" worktree add --quiet --detach "$scratch" "$sha"
fi

if [[ ! -d "$scratch/target/release" && -d "$here/target/release" ]]; then
  echo "==> warming $scratch/target with a copy of $here/target/release"
  mkdir -p "$scratch/target"
  cp -a "$here/target/release" "$scratch/target/"
fi

build() {
  local tree=$1 target=$2 log=$3
  echo "==> MIX_ENV=prod mix compile in $tree (log: $log)"
  if ! (cd "$tree" && CARGO_TARGET_DIR="$target" MIX_ENV=prod mix compile >"$log" 2>&1); then
    tail -30 "$log" >&2
    exit 1
  fi
}

build "$scratch" "$scratch/target" "$out/build.before.log"
build "$here" "${CARGO_TARGET_DIR:-$here/target}" "$out/build.after.log"

## Run: each bench ABAB

echo "==> logs in $out"
for bench in $benches; do
  for round in $(seq 1 "$rounds"); do
    for side in before after; do
      tree=$here
      [[ $side == before ]] && tree=$scratch
      file="bench/${bench}_bench.exs"
      log="$out/$bench.$side.$round.log"

      if [[ ! -f "$tree/$file" ]]; then
        echo "(no $file in the $side tree)" >"$log"
        continue
      fi

      load=$(cut -d' ' -f1-3 /proc/loadavg)
      echo "==> $bench, round $round, $side (load average $load)"
      echo "$bench $round $side $load" >>"$out/load.txt"

      if ! (cd "$tree" && MIX_ENV=prod mix run "$file" >"$log" 2>&1); then
        echo "$file failed in the $side tree; see $log" >&2
        tail -20 "$log" >&2
        exit 1
      fi
    done
  done
done

## Tables

elixir -e '
[out, benches, before] = System.argv()

defmodule Parse do
  @unit %{"ns" => 1.0, "us" => 1.0e3, "µs" => 1.0e3, "ms" => 1.0e6, "s" => 1.0e9}
  @time ~r/^\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*(ns|us|µs|ms|s)\b/u

  # `{case, ns}` of one bench log: DSPex.Bench rows (p50) and the times in
  # the first value column of markdown summary tables.
  def log(path) do
    path
    |> File.read!()
    |> String.split("\n")
    |> Enum.reduce({nil, nil, []}, &line/2)
    |> elem(2)
    |> Enum.reverse()
  end

  defp line("## " <> title, {_, _, acc}), do: {String.trim(title), nil, acc}

  defp line("Name" <> rest, {title, _, acc}) do
    if rest =~ "average", do: {title, :harness, acc}, else: {title, nil, acc}
  end

  defp line("| " <> _ = row, {title, mode, acc}) do
    cells = row |> String.trim() |> String.trim("|") |> String.split("|") |> Enum.map(&String.trim/1)

    cond do
      match?(["---" | _], cells) -> {title, :table, acc}
      mode != :table -> {title, :table_header, acc}
      true -> {title, :table, table_row(title, cells) ++ acc}
    end
  end

  # A row: the name, then ips, average, p50, p99 and memory, each column
  # right-aligned in 12 characters (so at least two spaces apart).
  defp line(row, {title, :harness, acc}) do
    case String.split(String.trim(row), ~r/\s{2,}/) do
      fields when length(fields) >= 6 ->
        {name, [_ips, _average, p50, _p99, _memory]} = Enum.split(fields, -5)

        case time(p50) do
          nil -> {title, :harness, acc}
          ns -> {title, :harness, [{"#{title}: #{Enum.join(name, "  ")} (p50)", ns} | acc]}
        end

      _ ->
        {title, nil, acc}
    end
  end

  defp line(_row, {title, mode, acc}) when mode in [:table, :table_header],
    do: {title, nil, acc}

  defp line(_row, state), do: state

  # A summary row: its first value column, when it holds times ("a" or
  # "a / b", a parenthesis after them ignored).
  defp table_row(title, [name, value | _]) do
    parts = value |> String.split("(") |> hd() |> String.split(" / ")
    times = Enum.map(parts, &time/1)

    cond do
      Enum.any?(times, &is_nil/1) ->
        []

      length(times) == 1 ->
        [{"#{title}: #{name}", hd(times)}]

      true ->
        names = sub_names(name, length(times))
        Enum.zip(names, times) |> Enum.map(fn {n, t} -> {"#{title}: #{n}", t} end) |> Enum.reverse()
    end
  end

  defp table_row(_title, _cells), do: []

  # "chain: build / reject closing edge" with two values: one case each.
  defp sub_names(name, n) do
    {prefix, rest} =
      case String.split(name, ": ", parts: 2) do
        [p, r] -> {p <> ": ", r}
        [r] -> {"", r}
      end

    case String.split(rest, " / ") do
      subs when length(subs) == n -> Enum.map(subs, &(prefix <> &1))
      _ -> for i <- 1..n, do: "#{name} [#{i}]"
    end
  end

  def time(nil), do: nil

  def time(text) do
    case Regex.run(@time, text) do
      [_, num, unit] -> String.replace(num, ",", "") |> Float.parse() |> elem(0) |> Kernel.*(@unit[unit])
      nil -> nil
    end
  end
end

median = fn xs ->
  s = Enum.sort(xs)
  n = length(s)
  if rem(n, 2) == 1, do: Enum.at(s, div(n, 2)), else: (Enum.at(s, div(n, 2) - 1) + Enum.at(s, div(n, 2))) / 2
end

fmt = fn
  nil -> "-"
  ns when ns >= 1.0e9 -> "#{Float.round(ns / 1.0e9, 2)} s"
  ns when ns >= 1.0e6 -> "#{Float.round(ns / 1.0e6, 2)} ms"
  ns when ns >= 1.0e3 -> "#{Float.round(ns / 1.0e3, 2)} us"
  ns -> "#{Float.round(ns * 1.0, 1)} ns"
end

# `%{case => median}` and the cases in the order first seen.
side = fn bench, side ->
  runs =
    Path.wildcard(Path.join(out, "#{bench}.#{side}.*.log"))
    |> Enum.map(&Parse.log/1)
    |> Enum.reject(&(&1 == []))

  order = runs |> Enum.flat_map(fn r -> Enum.map(r, &elem(&1, 0)) end) |> Enum.uniq()
  # A case named twice in one run (two tables with the same title) keeps its first value.
  firsts = Enum.map(runs, fn r -> r |> Enum.reverse() |> Map.new() end)

  medians =
    for c <- order, into: %{} do
      {c, firsts |> Enum.flat_map(&List.wrap(&1[c])) |> median.()}
    end

  {order, medians, length(runs)}
end

load = Path.join(out, "load.txt") |> File.read!() |> String.split("\n", trim: true)
slower = []

slower =
  for bench <- String.split(benches), reduce: slower do
    slower ->
      {b_order, b, b_runs} = side.(bench, "before")
      {a_order, a, a_runs} = side.(bench, "after")
      IO.puts("\n### #{bench}_bench.exs (before #{before}: #{b_runs} runs, after: #{a_runs} runs; medians)\n")
      IO.puts("| case | before | after | after/before |")
      IO.puts("| --- | --- | --- | --- |")
      cases = Enum.uniq(b_order ++ a_order)

      for c <- cases, reduce: slower do
        slower ->
          {ratio, mark} =
            case {b[c], a[c]} do
              {nil, _} -> {"after only", ""}
              {_, nil} -> {"before only", ""}
              {x, y} when x > 0 ->
                r = y / x
                {"#{:erlang.float_to_binary(r, decimals: 2)}x", if(r > 1.10, do: " **>10% slower**", else: "")}
              _ -> {"-", ""}
            end

          IO.puts("| #{c} | #{fmt.(b[c])} | #{fmt.(a[c])} | #{ratio}#{mark} |")
          if mark != "", do: [{bench, c, ratio} | slower], else: slower
      end
  end

IO.puts("\nload average (1, 5, 15 min) before each run:")
Enum.each(load, &IO.puts("  " <> &1))

case Enum.reverse(slower) do
  [] -> IO.puts("\nno case more than 10% slower")
  list ->
    IO.puts("\nmore than 10% slower:")
    for {bench, c, r} <- list, do: IO.puts("  #{bench}: #{c}: #{r}")
end
' "$out" "$benches" "$before" | tee "$out/tables.md"

echo
echo "tables: $out/tables.md"
