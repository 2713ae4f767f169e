# The dependency graph against Erlang's own `:digraph.new([:acyclic])` (the
# seed's DependencyManager, ../shared/seeds/002), in one run:
#
#   1. a random DAG: 10,000 variables, 40,000 edge insert attempts (cycles
#      rejected), per insert;
#   2. a 100,000-vertex chain built, then the edge closing it rejected;
#   3. the update order of a variable with 10,000 transitive dependents
#      (the seed: reachable set, subgraph, topsort per call);
#   4. propagation of one write through a chain of 1,000 derived variables,
#      next to 1,000 plain writes as the floor (the two taking turns, three
#      rounds; the ratio is their median).
#
# `:digraph` slows down as the random DAG fills (each insert searches for a
# path back from scratch), so its 40,000 attempts would take about ten
# minutes: its per-insert cost is measured on every 20th attempt of the
# sequence (digraph.erl's own acyclic insert, on the same graph state), the
# other attempts are applied unchecked. A check on the first 4,000 attempts
# compares this emulation with `:digraph.new([:acyclic])` itself.
#
#   MIX_ENV=prod mix run bench/graph_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule GraphBench do
  alias DSPex.Bridge.{DependencyManager, SessionStore}

  @vertices 10_000
  @attempts 40_000
  @chain 100_000
  @sample_every 20

  def session(prefix, names) do
    sid = "#{prefix}_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    for n <- names, do: {:ok, _} = SessionStore.register_variable(sid, n, :integer, 0)
    sid
  end

  def names(prefix, n), do: for(i <- 0..(n - 1), do: :"#{prefix}#{i}")

  ## 1. random DAG

  def random_dag do
    :rand.seed(:exsss, {7, 7, 7})
    names = names("r", @vertices) |> List.to_tuple()

    pairs =
      for _ <- 1..@attempts,
          do:
            {elem(names, :rand.uniform(@vertices) - 1), elem(names, :rand.uniform(@vertices) - 1)}

    sid = session("graph_bench_dag", Tuple.to_list(names))

    # Ours: the public API, one call per attempt, every attempt timed.
    {ours_us, outcomes} =
      :timer.tc(fn ->
        Enum.map(pairs, fn {a, b} -> DependencyManager.add_dependency(sid, a, b) == :ok end)
      end)

    SessionStore.delete_session(sid)

    # :digraph: the same sequence on the same graph. Every @sample_every-th
    # attempt runs digraph.erl's acyclic insert (get_path(to, from), then
    # insert) and is timed; the others are applied as the engine answered,
    # without the check. Each sampled answer must equal the engine's.
    g = :digraph.new()
    for n <- Tuple.to_list(names), do: :digraph.add_vertex(g, n)

    {samples, sampled_us} =
      pairs
      |> Enum.zip(outcomes)
      |> Enum.with_index(1)
      |> Enum.reduce({0, 0}, fn {{{a, b}, ours_ok}, i}, {n, us} ->
        if rem(i, @sample_every) == 0 do
          {t, ok} = :timer.tc(fn -> acyclic_add_edge(g, a, b) end)
          ^ours_ok = ok
          {n + 1, us + t}
        else
          if ours_ok, do: :digraph.add_edge(g, a, b)
          {n, us}
        end
      end)

    :digraph.delete(g)

    %{
      ours_us: ours_us,
      accepted: Enum.count(outcomes, & &1),
      base_per_insert_us: sampled_us / samples,
      samples: samples
    }
  end

  # digraph.erl's acyclic_add_edge/5, on a graph created without :acyclic.
  defp acyclic_add_edge(_g, v, v), do: false

  defp acyclic_add_edge(g, a, b) do
    case :digraph.get_path(g, b, a) do
      false ->
        :digraph.add_edge(g, a, b)
        true

      _path ->
        false
    end
  end

  # The emulation against the real thing, where the real thing is quick:
  # the first `n` attempts on `:digraph.new([:acyclic])`.
  def check_emulation(n) do
    :rand.seed(:exsss, {7, 7, 7})
    names = names("r", @vertices) |> List.to_tuple()

    pairs =
      for _ <- 1..n,
          do:
            {elem(names, :rand.uniform(@vertices) - 1), elem(names, :rand.uniform(@vertices) - 1)}

    real = :digraph.new([:acyclic])
    emulated = :digraph.new()

    for g <- [real, emulated], v <- Tuple.to_list(names), do: :digraph.add_vertex(g, v)

    {real_us, real_ok} =
      :timer.tc(fn -> Enum.map(pairs, fn {a, b} -> is_list(:digraph.add_edge(real, a, b)) end) end)

    {emu_us, emu_ok} =
      :timer.tc(fn -> Enum.map(pairs, fn {a, b} -> acyclic_add_edge(emulated, a, b) end) end)

    ^real_ok = emu_ok
    :digraph.delete(real)
    :digraph.delete(emulated)
    {real_us / n, emu_us / n}
  end

  ## 2. the 100,000 chain

  def chain do
    names = names("c", @chain)
    sid = session("graph_bench_chain", names)
    pairs = Enum.zip(names, tl(names))

    {build_us, :ok} =
      :timer.tc(fn ->
        Enum.each(pairs, fn {a, b} -> :ok = DependencyManager.add_dependency(sid, a, b) end)
      end)

    {close_us, result} =
      :timer.tc(fn -> DependencyManager.add_dependency(sid, List.last(names), hd(names)) end)

    {:error, :would_create_cycle} = result

    {order_us, {:ok, order}} =
      :timer.tc(fn -> DependencyManager.get_update_order(sid, hd(names)) end)

    @chain = length(order)
    SessionStore.delete_session(sid)

    g = :digraph.new([:acyclic])
    for n <- names, do: :digraph.add_vertex(g, n)

    {base_build_us, :ok} =
      :timer.tc(fn -> Enum.each(pairs, fn {a, b} -> [_ | _] = :digraph.add_edge(g, a, b) end) end)

    {base_close_us, {:error, _}} =
      :timer.tc(fn -> :digraph.add_edge(g, List.last(names), hd(names)) end)

    :digraph.delete(g)

    %{
      build_us: build_us,
      close_us: close_us,
      order_us: order_us,
      base_build_us: base_build_us,
      base_close_us: base_close_us
    }
  end

  ## 3. update order with 10,000 transitive dependents

  # A chain through every vertex plus 20,000 random forward edges: the root
  # reaches all 10,000 others along many paths.
  def wide_dag do
    :rand.seed(:exsss, {3, 3, 3})
    n = 10_001
    names = names("w", n) |> List.to_tuple()
    chain = for i <- 0..(n - 2), do: {i, i + 1}

    extra =
      for _ <- 1..20_000 do
        i = :rand.uniform(n - 1) - 1
        {i, i + :rand.uniform(n - 1 - i)}
      end

    edges =
      Enum.uniq(chain ++ extra) |> Enum.map(fn {i, j} -> {elem(names, i), elem(names, j)} end)

    sid = session("graph_bench_wide", Tuple.to_list(names))
    Enum.each(edges, fn {a, b} -> :ok = DependencyManager.add_dependency(sid, a, b) end)
    # The edges are known to be acyclic: no need to pay for the checks here.
    g = :digraph.new()
    for v <- Tuple.to_list(names), do: :digraph.add_vertex(g, v)
    Enum.each(edges, fn {a, b} -> :digraph.add_edge(g, a, b) end)
    {sid, g, elem(names, 0)}
  end

  # The seed's get_update_order: collect what is reachable, build a subgraph
  # of it, topsort that.
  def seed_update_order(g, root) do
    reachable = :digraph_utils.reachable([root], g)
    sub = :digraph_utils.subgraph(g, reachable)
    order = :digraph_utils.topsort(sub)
    :digraph.delete(sub)
    order
  end

  ## 4. propagation through 1,000 derived variables

  def derived_chain(n) do
    sid = session("graph_bench_prop", [:x0])

    for i <- 1..n do
      input = :"x#{i - 1}"

      {:ok, _} =
        DependencyManager.defderived(
          sid,
          :"x#{i}",
          :integer,
          [input],
          &(Map.fetch!(&1, input) + 1)
        )
    end

    sid
  end
end

opts = [time: 3, warmup: 1]
IO.puts("# dependency graph vs :digraph.new([:acyclic])")

{real_per, emu_per} = GraphBench.check_emulation(4_000)
dag = GraphBench.random_dag()
per_ours = dag.ours_us / 40_000
per_base = dag.base_per_insert_us
insert_ratio = per_base / per_ours

IO.puts("""

## random DAG, 10,000 variables, 40,000 insert attempts

ours: #{Float.round(dag.ours_us / 1000, 1)} ms for all 40,000 (#{dag.accepted} accepted): #{Float.round(per_ours, 2)} us per insert
:digraph acyclic insert, timed on #{dag.samples} attempts spread over the same sequence: #{Float.round(per_base, 1)} us per insert
-> #{Float.round(insert_ratio, 1)}x
(emulation check, first 4,000 attempts: :digraph.new([:acyclic]) #{Float.round(real_per, 2)} us, emulated #{Float.round(emu_per, 2)} us per insert, same answers)
""")

chain = GraphBench.chain()

IO.puts("""
## 100,000-vertex chain

ours: built in #{Float.round(chain.build_us / 1000, 1)} ms, closing edge rejected in #{Float.round(chain.close_us / 1000, 2)} ms, update order of the head (100,000 names) in #{Float.round(chain.order_us / 1000, 1)} ms
:digraph: built in #{Float.round(chain.base_build_us / 1000, 1)} ms, closing edge rejected in #{Float.round(chain.base_close_us / 1000, 2)} ms
""")

{sid, g, root} = GraphBench.wide_dag()
{:ok, order} = DSPex.Bridge.DependencyManager.get_update_order(sid, root)
10_001 = length(order)
10_001 = length(GraphBench.seed_update_order(g, root))

orders =
  DSPex.Bench.run(
    %{
      "get_update_order (maintained order)" => fn ->
        {:ok, _} = DSPex.Bridge.DependencyManager.get_update_order(sid, root)
      end,
      "seed: :digraph reachable + subgraph + topsort" => fn ->
        GraphBench.seed_update_order(g, root)
      end
    },
    [title: "update order, 10,000 transitive dependents", batch: 1] ++ opts
  )

order_ratio =
  DSPex.Bench.ratio(
    orders,
    "get_update_order (maintained order)",
    "seed: :digraph reachable + subgraph + topsort"
  )

:digraph.delete(g)
DSPex.Bridge.SessionStore.delete_session(sid)

prop_sid = GraphBench.derived_chain(1_000)
plain_sid = GraphBench.session("graph_bench_plain", [:p])
counter = :counters.new(1, [])

props =
  DSPex.Bench.run(
    %{
      "write + propagate through 1,000 derived" => fn ->
        :counters.add(counter, 1, 1)
        :ok = DSPex.Bridge.SessionStore.update_variable(prop_sid, :x0, :counters.get(counter, 1))
        :ok = DSPex.Bridge.DependencyManager.await_propagation(prop_sid)
      end,
      "1,000 plain update_variable calls" => fn ->
        for i <- 1..1_000, do: :ok = DSPex.Bridge.SessionStore.update_variable(plain_sid, :p, i)
      end
    },
    [title: "propagation through a 1,000-long chain", batch: 1, rounds: 3] ++ opts
  )

# The two taking turns, so the ratio to the floor is the median of three
# rounds measured under the same load.
floor_ratio =
  DSPex.Bench.ratio(
    props,
    "1,000 plain update_variable calls",
    "write + propagate through 1,000 derived"
  )

last = DSPex.Bridge.SessionStore.get_variable_value(prop_sid, :x1000)
x0 = DSPex.Bridge.SessionStore.get_variable_value(prop_sid, :x0)
^last = x0 + 1_000
prop_ns = props["write + propagate through 1,000 derived"].average_ns
plain_ns = props["1,000 plain update_variable calls"].average_ns
DSPex.Bridge.SessionStore.delete_session(prop_sid)
DSPex.Bridge.SessionStore.delete_session(plain_sid)

IO.puts("""

## summary

| case | ours | `:digraph` / floor | ratio | target |
| --- | --- | --- | --- | --- |
| insert into a random DAG (10,000 vertices, 40,000 attempts), per insert | #{Float.round(per_ours, 2)} us | #{Float.round(per_base, 1)} us | #{Float.round(insert_ratio, 1)}x faster | >= 100x |
| 100,000 chain: build / reject closing edge | #{Float.round(chain.build_us / 1000, 1)} ms / #{Float.round(chain.close_us / 1000, 2)} ms | #{Float.round(chain.base_build_us / 1000, 1)} ms / #{Float.round(chain.base_close_us / 1000, 2)} ms | | no crash |
| update order, 10,000 transitive dependents | #{DSPex.Bench.fmt_ns(orders["get_update_order (maintained order)"].average_ns)} | #{DSPex.Bench.fmt_ns(orders["seed: :digraph reachable + subgraph + topsort"].average_ns)} | #{Float.round(order_ratio, 1)}x faster | |
| one write propagated through 1,000 derived variables | #{DSPex.Bench.fmt_ns(prop_ns)} (#{DSPex.Bench.fmt_ns(prop_ns / 1000)} per hop) | #{DSPex.Bench.fmt_ns(plain_ns)} for 1,000 plain writes | #{Float.round(floor_ratio, 2)}x the floor | |
""")
