# Replicated sessions on 3 local nodes (`:peer`, loopback), side by side:
#   replicated write  vs a minimal ra machine (the floor; target <= 1.3x)
#   16 writers        target >= 10k writes/s
#   failover          first acknowledged write after kill -9 of the leader (p50 <= 1 s)
#   migration         a 10,000-variable session to a new member (<= 2 s)
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

  def floor(ids, n), do: timed(fn -> for i <- 1..n, do: {:ok, :ok, _} = :ra.process_command(ids, {:put, i}) end)
  def writes(sid, n), do: timed(fn -> for i <- 1..n, do: :ok = SessionStore.update_variable(sid, :x, i) end)

  def writers(sid, k, n) do
    timed(fn ->
      1..k
      |> Enum.map(fn _ -> Task.async(fn -> for i <- 1..n, do: SessionStore.update_variable(sid, :x, i) end) end)
      |> Task.await_many(600_000)
    end)
  end

  def until_write(sid, t0) do
    case SessionStore.update_variable(sid, :x, 1) do
      :ok -> :os.system_time(:microsecond) - t0
      _ -> until_write(sid, t0)
    end
  end

  def fill(sid, n) do
    updates = for i <- 1..n, do: {"v" <> Integer.to_string(i), :integer, i}
    for chunk <- Enum.chunk_every(updates, 500) do
      for {name, type, v} <- chunk, do: {:ok, _} = SessionStore.register_variable(sid, name, type, v)
    end
    :ok
  end

  defp timed(fun) do
    {us, _} = :timer.tc(fun)
    us
  end
end
"""

modules = Code.compile_string(work)

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
n = 2_000

floor_ids = for p <- peers, do: {:bench_floor, p.node}

{:ok, _, _} =
  C.call(a, :ra, :start_cluster, [:dspex, :bench_floor, {:module, HABench.Floor, %{}}, floor_ids])

_ = C.call(a, HABench.Work, :floor, [floor_ids, 200], 120_000)
floor_us = C.call(a, HABench.Work, :floor, [floor_ids, n], 120_000)

{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :create_session, ["bench", [replicas: 3]])
{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :register_variable, ["bench", :x, :integer, 0])
_ = C.call(a, HABench.Work, :writes, ["bench", 200], 120_000)
write_us = C.call(a, HABench.Work, :writes, ["bench", n], 120_000)

IO.puts(
  "replicated write: #{Float.round(write_us / n, 1)} us/write; floor #{Float.round(floor_us / n, 1)} us/write; " <>
    "ratio #{Float.round(write_us / floor_us, 2)} (target <= 1.3)"
)

per_writer = 1_000
multi_us = C.call(a, HABench.Work, :writers, ["bench", 16, per_writer], 600_000)
IO.puts("16 writers: #{round(16 * per_writer / (multi_us / 1_000_000))} writes/s (target >= 10k)")

# Migration: a 10,000-variable session (2 members) to the third node.
{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :create_session, ["big", [replicas: 2]])
:ok = C.call(a, HABench.Work, :fill, ["big", 10_000], 600_000)
{:ok, %{members: members}} = C.call(a, Raft, :members, ["big"])
[target] = Enum.map(peers, & &1.node) -- Enum.map(members, &elem(&1, 1))

{mig_us, :ok} =
  :timer.tc(fn -> C.call(a, DSPex.Bridge.HAManager, :migrate_session, ["big", target], 60_000) end)

IO.puts("migrating a 10,000-variable session: #{div(mig_us, 1000)} ms (target <= 2000)")

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
    "(#{inspect(Enum.map(failovers, &div(&1, 1000)))}) (target <= 1000)"
)
