# Writes in sessions with a derived variable, beside the same writes in
# plain sessions, in one run: 1,000 sessions of each kind (ten integer
# variables x0..x9; the derived sessions also have `d = x0 + x1`), 100
# callers flat out, each over its ten sessions, for `--seconds` a case,
# every case `--rounds` times in turn (the best round is kept: the machine
# is shared).
#
#   ELIXIR_ERL_OPTIONS="+sbwt none +sbwtdcpu none +sbwtdio none" \
#     MIX_ENV=prod mix run bench/propagation_writes_bench.exs [--seconds 2] [--rounds 3]
#
# Each line: operations per second, and the CPU time the VM used per
# operation (`:erlang.statistics(:runtime)`, all its threads; the worker's
# passes and the computations included: a round waits for every session's
# propagation before it reads the clock). Without busy waiting (the options
# above), the CPU time is what the operations cost, whatever else the
# machine runs. The ratios are what to compare across machines: a write to
# x5 (an input of nothing) in a derived session should cost what the plain
# write costs.
alias DSPex.Bridge.{DependencyManager, SessionStore}

{opts, _, _} =
  OptionParser.parse(System.argv(),
    strict: [seconds: :float, sessions: :integer, rounds: :integer]
  )

seconds = Keyword.get(opts, :seconds, 2.0)
rounds = Keyword.get(opts, :rounds, 3)
n = Keyword.get(opts, :sessions, 1000)
{:ok, _} = Application.ensure_all_started(:dspex_bridge)

make = fn prefix, derived? ->
  for i <- 1..n do
    sid = "#{prefix}#{i}_#{System.unique_integer([:positive])}"
    {:ok, _} = SessionStore.create_session(sid, [])

    for v <- ~w(x0 x1 x2 x3 x4 x5 x6 x7 x8 x9)a,
        do: {:ok, _} = SessionStore.register_variable(sid, v, :integer, 0)

    if derived?,
      do:
        {:ok, _} =
          DependencyManager.defderived(sid, :d, :integer, [:x0, :x1], fn %{x0: a, x1: b} ->
            a + b
          end)

    sid
  end
end

plain = make.("pw_plain", false)
derived = make.("pw_derived", true)
schedulers = :erlang.system_info(:schedulers)

# {ops/s, µs of CPU per op}
measure = fn sessions, op ->
  parent = self()
  groups = Enum.chunk_every(sessions, 10)
  {cpu0, _} = :erlang.statistics(:runtime)
  w0 = System.monotonic_time(:microsecond)
  deadline = System.monotonic_time(:millisecond) + round(seconds * 1000)

  for g <- groups do
    spawn(fn ->
      t = List.to_tuple(g)
      size = tuple_size(t)

      loop = fn loop, k ->
        if rem(k, 64) == 0 and System.monotonic_time(:millisecond) >= deadline do
          k
        else
          op.(elem(t, rem(k, size)), k)
          loop.(loop, k + 1)
        end
      end

      send(parent, {:done, loop.(loop, 0)})
    end)
  end

  total = Enum.reduce(groups, 0, fn _, acc -> receive(do: ({:done, k} -> acc + k)) end)
  w1 = System.monotonic_time(:microsecond)
  for s <- sessions, do: :ok = DependencyManager.await_propagation(s, 60_000)
  {cpu1, _} = :erlang.statistics(:runtime)
  {total / ((w1 - w0) / 1.0e6), (cpu1 - cpu0) * 1000 / total}
end

write = fn var -> fn s, k -> :ok = SessionStore.update_variable(s, var, k) end end

batch = fn s, k ->
  :ok = SessionStore.update_variables(s, [x2: k, x3: k, x4: k, x5: k, x6: k], atomic: true)
end

batch_input = fn s, k ->
  :ok = SessionStore.update_variables(s, [x0: k, x1: k, x2: k, x3: k, x4: k], atomic: true)
end

cases = [
  {"write x5, plain session", plain, write.(:x5)},
  {"write x5 (feeds nothing), derived session", derived, write.(:x5)},
  {"write x0 (feeds d), derived session", derived, write.(:x0)},
  {"atomic batch of 5 non-inputs, plain session", plain, batch},
  {"atomic batch of 5 non-inputs, derived session", derived, batch},
  {"atomic batch of 5 incl. x0 x1, plain session", plain, batch_input},
  {"atomic batch of 5 incl. x0 x1, derived session", derived, batch_input}
]

load1 =
  case File.read("/proc/loadavg") do
    {:ok, text} -> text |> String.split() |> hd()
    _ -> "unknown"
  end

IO.puts(
  "propagation writes: #{n} + #{n} sessions, 100 callers, #{seconds} s a case, " <>
    "#{rounds} rounds, #{schedulers} schedulers, load average #{load1}\n"
)

all =
  for _round <- 1..rounds, {name, sessions, op} <- cases do
    {ips, us} = measure.(sessions, op)
    {name, ips, us}
  end

results =
  for {name, _, _} <- cases do
    rows = for {^name, ips, us} <- all, do: {ips, us}
    ips = rows |> Enum.map(&elem(&1, 0)) |> Enum.max()
    us = rows |> Enum.map(&elem(&1, 1)) |> Enum.min()
    :io.format("~-50s ~12s ops/s ~8.2f us CPU/op~n", [name, "#{round(ips)}", us])
    {name, ips, us}
  end

by_name = Map.new(results, fn {name, ips, us} -> {name, {ips, us}} end)

ratio = fn a, b ->
  {ia, ua} = by_name[a]
  {ib, ub} = by_name[b]

  :io.format("~-50s throughput x~.2f, CPU/op x~.2f~n", [
    "#{b} / #{a}",
    ib / ia,
    ub / ua
  ])
end

IO.puts("\nratios (derived session against plain session):")
ratio.("write x5, plain session", "write x5 (feeds nothing), derived session")
ratio.("write x5, plain session", "write x0 (feeds d), derived session")

ratio.(
  "atomic batch of 5 non-inputs, plain session",
  "atomic batch of 5 non-inputs, derived session"
)

ratio.(
  "atomic batch of 5 incl. x0 x1, plain session",
  "atomic batch of 5 incl. x0 x1, derived session"
)
