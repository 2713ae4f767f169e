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
# rounds. after/before > 1.10 is marked: more than 10% slower. A second
# table per bench has the ratios each run measures between its cases
# taking turns (DSPex.Bench.ratio/3: ours against the seed's or a raw
# floor), which the machine's drift affects much less than times: a time
# marked slower whose baseline moved as much is the machine, not the code.
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
  # DSPex.Bench.ratio/3: "A vs B: 5.15x (median of 5 rounds, 4.31x-6.22x)"
  @ratio ~r/^(.+ vs .+): ([0-9]+(?:\.[0-9]+)?)x(?: \(median|$)/

  # `{kind, case, value}` of one bench log: `:time` for DSPex.Bench rows
  # (their p50) and the times in the first value column of summary tables,
  # in ns; `:ratio` for the ratio lines (how many times faster A ran than B).
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
    cells =
      row |> String.trim() |> String.trim("|") |> String.split("|") |> Enum.map(&String.trim/1)

    cond do
      match?(["---" | _], cells) -> {title, :table, acc}
      mode != :table -> {title, :table_header, acc}
      true -> {title, :table, table_row(cells) ++ acc}
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
          ns -> {title, :harness, [{:time, "#{title}: #{Enum.join(name, "  ")} (p50)", ns} | acc]}
        end

      # The table has ended (a ratio line may follow it at once).
      _ ->
        line(row, {title, nil, acc})
    end
  end

  defp line(row, {title, _mode, acc}) do
    case Regex.run(@ratio, String.trim(row)) do
      [_, name, r] -> {title, nil, [{:ratio, name, elem(Float.parse(r), 0)} | acc]}
      nil -> {title, nil, acc}
    end
  end

  # A summary row: its first value column, when it holds times ("a" or
  # "a / b", a parenthesis after them ignored).
  defp table_row([name, value | _]) do
    title = "summary"
    parts = value |> String.split("(") |> hd() |> String.split(" / ")
    times = Enum.map(parts, &time/1)

    cond do
      Enum.any?(times, &is_nil/1) ->
        []

      length(times) == 1 ->
        [{:time, "#{title}: #{name}", hd(times)}]

      true ->
        sub_names(name, length(times))
        |> Enum.zip(times)
        |> Enum.map(fn {n, t} -> {:time, "#{title}: #{n}", t} end)
        |> Enum.reverse()
    end
  end

  defp table_row(_cells), do: []

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
      [_, num, unit] ->
        num |> String.replace(",", "") |> Float.parse() |> elem(0) |> Kernel.*(@unit[unit])

      nil ->
        nil
    end
  end
end

median = fn xs ->
  s = Enum.sort(xs)
  n = length(s)
  mid = div(n, 2)
  if rem(n, 2) == 1, do: Enum.at(s, mid), else: (Enum.at(s, mid - 1) + Enum.at(s, mid)) / 2
end

fmt = fn
  _kind, nil -> "-"
  :ratio, r -> "#{Float.round(r, 2)}x"
  :time, ns when ns >= 1.0e9 -> "#{Float.round(ns / 1.0e9, 2)} s"
  :time, ns when ns >= 1.0e6 -> "#{Float.round(ns / 1.0e6, 2)} ms"
  :time, ns when ns >= 1.0e3 -> "#{Float.round(ns / 1.0e3, 2)} us"
  :time, ns -> "#{Float.round(ns * 1.0, 1)} ns"
end

# `{[case], %{case => median}, runs}` of one kind of figure of one side.
side = fn runs, kind ->
  runs = Enum.map(runs, fn run -> for {^kind, c, v} <- run, do: {c, v} end)
  order = runs |> Enum.flat_map(fn r -> Enum.map(r, &elem(&1, 0)) end) |> Enum.uniq()
  # A case named twice in one run keeps its first value.
  firsts = Enum.map(runs, fn r -> r |> Enum.reverse() |> Map.new() end)
  {order, Map.new(order, fn c -> {c, firsts |> Enum.flat_map(&List.wrap(&1[c])) |> median.()} end)}
end

runs = fn bench, side ->
  Path.wildcard(Path.join(out, "#{bench}.#{side}.*.log"))
  |> Enum.map(&Parse.log/1)
  |> Enum.reject(&(&1 == []))
end

# One table; returns the cases marked.
table = fn kind, b_runs, a_runs, header, mark? ->
  {b_order, b} = side.(b_runs, kind)
  {a_order, a} = side.(a_runs, kind)
  cases = Enum.uniq(b_order ++ a_order)

  if cases != [] do
    IO.puts(header <> "\n")
    IO.puts("| case | before | after | after/before |")
    IO.puts("| --- | --- | --- | --- |")
  end

  for c <- cases, reduce: [] do
    marked ->
      {ratio, mark} =
        case {b[c], a[c]} do
          {nil, _} -> {"after only", nil}
          {_, nil} -> {"before only", nil}
          {x, y} when x > 0 -> {"#{:erlang.float_to_binary(y / x, decimals: 2)}x", mark?.(y / x)}
          _ -> {"-", nil}
        end

      IO.puts("| #{c} | #{fmt.(kind, b[c])} | #{fmt.(kind, a[c])} | #{ratio}#{mark && " **" <> mark <> "**"} |")
      if mark, do: [{c, ratio, mark} | marked], else: marked
  end
  |> Enum.reverse()
end

marked =
  for bench <- String.split(benches) do
    b_runs = runs.(bench, "before")
    a_runs = runs.(bench, "after")

    IO.puts(
      "\n### #{bench}_bench.exs (before #{before}: #{length(b_runs)} runs, after: " <>
        "#{length(a_runs)} runs; medians over the runs)\n"
    )

    slower =
      table.(:time, b_runs, a_runs, "times (p50 of DSPex.Bench rows; summary figures):", fn r ->
        if r > 1.10, do: ">10% slower"
      end)

    IO.puts("")

    moved =
      table.(
        :ratio,
        b_runs,
        a_runs,
        "ratios measured within each run (A vs B: how many times faster A ran than B " <>
          "in the same run):",
        fn r -> if r > 1.10 or r < 1 / 1.10, do: "moved >10%" end
      )

    {bench, slower, moved}
  end

IO.puts("\nload average (1, 5, 15 min) before each run:")
Path.join(out, "load.txt") |> File.read!() |> String.split("\n", trim: true) |> Enum.each(&IO.puts("  " <> &1))

case for({bench, slower, _} <- marked, {c, r, _} <- slower, do: {bench, c, r}) do
  [] ->
    IO.puts("\nno time more than 10% slower")

  list ->
    IO.puts("\ntimes more than 10% slower (compare the ratios: a baseline that moved as much is the machine):")
    for {bench, c, r} <- list, do: IO.puts("  #{bench}: #{c}: #{r}")
end
' "$out" "$benches" "$before" | tee "$out/tables.md"

echo
echo "tables: $out/tables.md"
