# Replicated sessions on 3 local nodes (`:peer`, loopback), side by side:
#   replicated write  vs a minimal ra machine (the floor; target <= 1.3x)
#   16 writers        target >= 10k writes/s
#   failover          first acknowledged write after kill -9 of the leader (p50 <= 1 s)
#   migration         a 10,000-variable session to a new member (<= 2 s)
# Run: MIX_ENV=prod mix run bench/ha_bench.exs (needs scripts/setup.sh's ra).
Code.require_file("../test/support/ha_cluster.ex", __DIR__)

alias DSPex.Test.HACluster, as: C
alias DSPex.Bridge.Backend.Raft

defmodule HABench do
  def time_us(fun) do
    {us, result} = :timer.tc(fun)
    {us, result}
  end

  def median(xs), do: xs |> Enum.sort() |> Enum.at(div(length(xs), 2))
end

unless Raft.System.available?(), do: raise("ra is not on the code path: run scripts/setup.sh")
:ok = C.ensure_epmd()
dir = Path.join(System.tmp_dir!(), "dspex_ha_bench_#{System.unique_integer([:positive])}")
id = System.unique_integer([:positive])
peers = C.start(for(x <- ~w(a b c), do: :"bench#{id}#{x}"), dir)
[a, b, c] = peers
n = 2_000

# Floor: a minimal ra machine keeping the last value, same system, same nodes.
floor_ids = for p <- peers, do: {:bench_floor, p.node}
machine = {:simple, fn {_k, v}, _ -> v end, nil}
{:ok, _, _} = C.call(a, :ra, :start_cluster, [:dspex, :bench_floor, machine, floor_ids])

{floor_us, _} =
  HABench.time_us(fn ->
    C.call(
      a,
      Enum,
      :each,
      [1..n, fn i -> {:ok, _, _} = :ra.process_command(floor_ids, {:k, i}) end],
      120_000
    )
  end)

{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :create_session, ["bench", [replicas: 3]])
{:ok, _} = C.call(a, DSPex.Bridge.SessionStore, :register_variable, ["bench", :x, :integer, 0])

{write_us, _} =
  HABench.time_us(fn ->
    C.call(
      a,
      Enum,
      :each,
      [1..n, fn i -> :ok = DSPex.Bridge.SessionStore.update_variable("bench", :x, i) end],
      120_000
    )
  end)

floor_per = floor_us / n
write_per = write_us / n

IO.puts(
  "replicated write: #{Float.round(write_per, 1)} us/write; floor #{Float.round(floor_per, 1)} us/write; ratio #{Float.round(write_per / floor_per, 2)} (target <= 1.3)"
)

# 16 writers, each sequential, all at once.
per_writer = 1_000

{multi_us, _} =
  HABench.time_us(fn ->
    C.call(a, Task, :await_many, [
      for w <- 1..16 do
        Task.async(fn -> :ok end) && nil
      end
      |> Enum.reject(&is_nil/1)
    ])

    C.call(
      a,
      Enum,
      :map,
      [
        1..1,
        fn _ ->
          1..16
          |> Enum.map(fn _ ->
            Task.async(fn ->
              for i <- 1..per_writer,
                  do: DSPex.Bridge.SessionStore.update_variable("bench", :x, i)
            end)
          end)
          |> Task.await_many(300_000)
        end
      ],
      300_000
    )
  end)

IO.puts("16 writers: #{round(16 * per_writer / (multi_us / 1_000_000))} writes/s (target >= 10k)")

# Failover: kill -9 the leader, time to the first acknowledged write elsewhere.
failovers =
  for round <- 1..3 do
    sid = "fo#{round}"
    live = Enum.filter(peers, &match?({:ok, _}, C.call(&1, Raft.System, :available?, [])))
    [p | _] = live
    {:ok, _} = C.call(p, DSPex.Bridge.SessionStore, :create_session, [sid, [replicas: 3]])
    {:ok, _} = C.call(p, DSPex.Bridge.SessionStore, :register_variable, [sid, :x, :integer, 0])
    {:ok, leader} = C.call(p, Raft, :leader_node, [sid])
    {[dead], [client | _]} = Enum.split_with(live, &(&1.node == leader))
    t0 = System.monotonic_time(:microsecond)
    C.kill9(dead)

    wait = fn wait ->
      case C.call(client, DSPex.Bridge.SessionStore, :update_variable, [sid, :x, 1]) do
        :ok -> System.monotonic_time(:microsecond) - t0
        _ -> wait.(wait)
      end
    end

    us = wait.(wait)
    restarted = C.start_peer(dead.name, dir)
    C.connect_all([restarted | List.delete(live, dead)])
    us
  end

IO.puts(
  "failover after kill -9: p50 #{div(HABench.median(failovers), 1000)} ms (#{inspect(Enum.map(failovers, &div(&1, 1000)))}) (target <= 1000)"
)
