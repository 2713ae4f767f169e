# Replicated sessions on 3 local nodes (`:peer`, loopback): the cases of
# issue 15's table side by side, each with its baseline measured in the
# same run.
#
#   replicated write   one writer, SessionStore.update_variable/3, vs a
#                      minimal ra key-value machine (the floor); target <= 1.3x
#   16 writers         batched (group commit, the default path) vs one log
#                      entry per write (the path before batching) vs the
#                      floor machine with 16 writers; target >= 10k writes/s
#   failover           first acknowledged write after kill -9 of the leader;
#                      p50 target <= 1 s
#   migration          a 10,000-variable session to a new member; <= 2 s
#   non-replicated     SessionStore read/write of a NIF session vs the NIF
#                      backend called directly (the router adds nothing)
#
# The machine may be shared: the load average is printed before and after.
# Run: MIX_ENV=prod mix run bench/ha_bench.exs (needs scripts/setup.sh's ra).
Code.require_file("../test/support/ha_cluster.ex", __DIR__)

alias DSPex.Test.HACluster, as: C
alias DSPex.Bridge.Backend.Raft

# The workloads run on the peers: compiled here, loaded there.
work = """
defmodule HABench.Floor do
  # The floor: a ra machine keeping one value, nothing else.
  def init(_), do: nil
  def apply(_meta, {:put, v}, _state), do: {v, :ok}
end

defmodule HABench.Work do
  alias DSPex.Bridge.SessionStore
  alias DSPex.Bridge.Backend.{Native, Raft}

  def floor(ids, n), do: timed(fn -> for i <- 1..n, do: {:ok, :ok, _} = :ra.process_command(ids, {:put, i}) end)
  def writes(sid, n), do: timed(fn -> for i <- 1..n, do: :ok = SessionStore.update_variable(sid, :x, i) end)

  def floor_writers(ids, k, n), do: concurrently(k, fn -> for i <- 1..n, do: {:ok, :ok, _} = :ra.process_command(ids, {:put, i}) end)

  # Batched: the SessionStore path.
  def writers(sid, k, n),
    do: concurrently(k, fn -> for i <- 1..n, do: :ok = SessionStore.update_variable(sid, :x, i) end)

  # One log entry per write (process_command per call: the path before batching).
  def unbatched_writers(sid, k, n) do
    concurrently(k, fn ->
      for i <- 1..n, do: {:ok, {:ok, _}, _} = Raft.write_with_position(sid, :var_set, [sid, :x, i, %{}, nil, nil])
    end)
  end

  def until_write(sid, t0) do
    case SessionStore.update_variable(sid, :x, 1) do
      :ok -> :os.system_time(:microsecond) - t0
      _ -> until_write(sid, t0)
    end
  end

  def fill(sid, n) do
    for i <- 1..n, do: {:ok, _} = SessionStore.register_variable(sid, "v" <> Integer.to_string(i), :integer, i)
    :ok
  end

  # A NIF session, through SessionStore and through the NIF backend itself.
  def local(n) do
    sid = "local-#{System.unique_integer([:positive])}"
    {:ok, _} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
    store_w = timed(fn -> for i <- 1..n, do: :ok = SessionStore.update_variable(sid, :x, i) end)
    nif_w = timed(fn -> for i <- 1..n, do: {:ok, _} = Native.var_set(sid, :x, i, %{}, nil, nil) end)
    store_r = timed(fn -> for _ <- 1..n, do: SessionStore.get_variable_value(sid, :x) end)
    nif_r = timed(fn -> for _ <- 1..n, do: {:ok, _} = Native.var_get_value(sid, :x, nil) end)
    {store_w, nif_w, store_r, nif_r}
  end

  defp concurrently(k, fun) do
    timed(fn -> 1..k |> Enum.map(fn _ -> Task.async(fun) end) |> Task.await_many(600_000) end)
  end

  defp timed(fun) do
    {us, _} = :timer.tc(fun)
    us
  end
end
"""

modules = Code.compile_string(work)

load_avg = fn ->
  File.read!("/proc/loadavg") |> String.split() |> Enum.take(3) |> Enum.join(" ")
end

IO.puts("load average before: #{load_avg.()} (#{System.schedulers_online()} schedulers)")

unless Raft.System.available?(), do: raise("ra is not on the code path: run scripts/setup.sh")
:ok = C.ensure_epmd()
dir = Path.join(System.tmp_dir!(), "dspex_ha_bench_#{System.unique_integer([:positive])}")
id = System.unique_integer([:positive])

load = fn p ->
  for {m, bin} <- modules, do: {:module, _} = C.call(p, :code, :load_binary, [m, ~c"nofile", bin])
end

peers = C.start(for(x <- ~w(a b c), do: :"bench#{id}#{x}"), dir)
Enum.each(peers, load)
[a | _] = peers
median = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end
rate = fn writes, us -> round(writes / (us / 1_000_000)) end
n = 2_000

floor_ids = for p <- peers, do: {:bench_floor, p.node}

{:ok, _, _} =
  C.call(a, :ra, :start_cluster, [:dspex, :bench_floor, {:module, HABench.Floor, %{}}, floor_ids])

{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :create_session, ["bench", [replicas: 3]])
{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :register_variable, ["bench", :x, :integer, 0])

# Both leaders on the calling node, so that the two cases differ only in
# the machine (a remote leader costs a round trip more).
lead_here = fn server_ids ->
  target = Enum.find(server_ids, fn {_, n} -> n == a.node end)

  Enum.reduce_while(1..100, nil, fn _, _ ->
    case C.call(a, :ra, :members, [target]) do
      {:ok, _, ^target} ->
        {:halt, :ok}

      {:ok, _, leader} ->
        _ = C.call(a, :ra, :transfer_leadership, [leader, target])
        Process.sleep(50)
        {:cont, nil}
    end
  end)
end

{:ok, %{members: bench_ids}} = C.call(a, Raft, :members, ["bench"])
:ok = lead_here.(floor_ids)
:ok = lead_here.(bench_ids)

# Warm-up, then the floor and the replicated write interleaved (3 rounds
# each), so a change of the machine's load hits both.
_ = C.call(a, HABench.Work, :floor, [floor_ids, 200], 120_000)
_ = C.call(a, HABench.Work, :writes, ["bench", 200], 120_000)

{floors, writes} =
  Enum.map(1..3, fn _ ->
    {C.call(a, HABench.Work, :floor, [floor_ids, n], 120_000),
     C.call(a, HABench.Work, :writes, ["bench", n], 120_000)}
  end)
  |> Enum.unzip()

{floor_us, write_us} = {median.(floors), median.(writes)}

IO.puts(
  "replicated write: #{Float.round(write_us / n, 1)} us/write; floor #{Float.round(floor_us / n, 1)} us/write; " <>
    "ratio #{Float.round(write_us / floor_us, 2)} (target <= 1.3)"
)

k = 16
per_writer = 625

# 3 rounds, the three paths interleaved in each, medians reported.
{batched, unbatched, floor16} =
  Enum.map(1..3, fn _ ->
    {C.call(a, HABench.Work, :writers, ["bench", k, per_writer], 600_000),
     C.call(a, HABench.Work, :unbatched_writers, ["bench", k, div(per_writer, 4)], 600_000),
     C.call(a, HABench.Work, :floor_writers, [floor_ids, k, per_writer], 600_000)}
  end)
  |> Enum.reduce({[], [], []}, fn {b, u, f}, {bs, us, fs} -> {[b | bs], [u | us], [f | fs]} end)

IO.puts(
  "16 writers (medians of 3): batched #{rate.(k * per_writer, median.(batched))} writes/s (target >= 10k); " <>
    "one entry per write #{rate.(k * div(per_writer, 4), median.(unbatched))}/s; " <>
    "floor machine #{rate.(k * per_writer, median.(floor16))}/s"
)

# Migration: a 10,000-variable session (2 members) to the node that is
# not a member, 3 times (each round moves it on).
{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :create_session, ["big", [replicas: 2]])
:ok = C.call(a, HABench.Work, :fill, ["big", 10_000], 600_000)

migrations =
  for _ <- 1..3 do
    {:ok, %{members: members}} = C.call(a, Raft, :members, ["big"])
    [target] = Enum.map(peers, & &1.node) -- Enum.map(members, &elem(&1, 1))

    {us, :ok} =
      :timer.tc(fn ->
        C.call(a, DSPex.Bridge.HAManager, :migrate_session, ["big", target], 60_000)
      end)

    us
  end

IO.puts(
  "migrating a 10,000-variable session: p50 #{div(median.(migrations), 1000)} ms " <>
    "(#{inspect(Enum.map(migrations, &div(&1, 1000)), charlists: :as_lists)}) (target <= 2000)"
)

{store_w, nif_w, store_r, nif_r} = C.call(a, HABench.Work, :local, [100_000], 600_000)

IO.puts(
  "non-replicated (NIF) session, 100k ops: write #{Float.round(store_w / 100_000, 2)} us via SessionStore, " <>
    "#{Float.round(nif_w / 100_000, 2)} us NIF direct (ratio #{Float.round(store_w / nif_w, 2)}); " <>
    "read #{Float.round(store_r / 100_000, 2)} us vs #{Float.round(nif_r / 100_000, 2)} us " <>
    "(ratio #{Float.round(store_r / nif_r, 2)})"
)

# Failover: kill -9 the leader, time to the first acknowledged write elsewhere.
{failovers, _} =
  Enum.map_reduce(1..3, peers, fn round, live ->
    sid = "fo#{round}"
    [p | _] = live
    {:ok, _} = C.call(p, DSPex.Bridge.SessionStore, :create_session, [sid, [replicas: 3]])
    {:ok, _} = C.call(p, DSPex.Bridge.SessionStore, :register_variable, [sid, :x, :integer, 0])
    {:ok, leader} = C.call(p, Raft, :leader_node, [sid])
    {[dead], [client | _] = rest} = Enum.split_with(live, &(&1.node == leader))
    # The OS clock: the same on every peer of this machine.
    t0 = :os.system_time(:microsecond)
    C.kill9(dead)
    us = C.call(client, HABench.Work, :until_write, [sid, t0], 60_000)
    restarted = C.start_peer(dead.name, dir)
    load.(restarted)
    C.connect_all([restarted | rest])
    {us, [restarted | rest]}
  end)

IO.puts(
  "failover after kill -9: p50 #{div(median.(failovers), 1000)} ms " <>
    "(#{inspect(Enum.map(failovers, &div(&1, 1000)), charlists: :as_lists)}) (target <= 1000)"
)

IO.puts("load average after: #{load_avg.()}")
