defmodule DSPex.Bridge.DependencyManagerTest do
  # The DependencyManager cases run once per backend (see
  # test/support/conformance/dependency_cases.ex); what follows is specific
  # to the NIF backend or to contexts.
  use ExUnit.Case, async: true

  use DSPex.Bridge.Conformance, cases: [DSPex.Bridge.Conformance.DependencyCases]

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.{Context, Variables}

  doctest DependencyManager

  setup do
    sid = "dep_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid}
  end

  defp vars(sid, names, initial \\ 0) do
    for name <- names, do: {:ok, _} = SessionStore.register_variable(sid, name, :integer, initial)
    :ok
  end

  defp index(list, x), do: Enum.find_index(list, &(&1 == x))

  describe "start_link/1 (seed 002)" do
    test "gives the session's dependency process, the same one while it runs", %{sid: sid} do
      assert {:ok, pid} = DependencyManager.start_link(sid)
      assert is_pid(pid) and Process.alive?(pid)
      assert {:ok, ^pid} = DependencyManager.start_link(sid)
      assert {:error, :session_not_found} = DependencyManager.start_link("#{sid}_none")
      assert {:error, :session_not_found} = DependencyManager.start_link(:not_an_id)
    end
  end

  describe "add_dependency/4" do
    test "an insert needing a large search moves to a dirty scheduler", %{sid: sid} do
      n = 12_000
      chain = for i <- 0..(n - 1), do: "c#{i}"
      vars(sid, chain ++ [:w, :x])

      chain
      |> Enum.zip(tl(chain))
      |> Enum.each(fn {a, b} -> :ok = DependencyManager.add_dependency(sid, a, b) end)

      :ok = DependencyManager.add_dependency(sid, :w, :x)

      # x sits after the whole chain: putting it before c0 moves 12,000 vertices.
      assert :over_budget = DSPex.Bridge.Native.graph_add_edge(sid, :x, "c0", :data, nil)
      assert :ok = DependencyManager.add_dependency(sid, :x, "c0")
      {:ok, order} = DependencyManager.get_update_order(sid, :w)
      assert Enum.take(order, 3) == [:w, :x, "c0"]
      assert length(order) == n + 2

      assert {:error, :would_create_cycle} =
               DependencyManager.add_dependency(sid, List.last(chain), :w)
    end
  end

  describe "get_update_order/3 on either side of the normal-scheduler budget" do
    # A small graph's order is walked on the caller's scheduler, a large
    # one's (or a long list of changed variables) on a dirty one: the
    # answers are the same.
    test "a chain of 5,000 (over the budget) and of 5 (within it)", %{sid: sid} do
      names = for i <- 1..5_000, do: "c#{i}"
      :ok = vars(sid, names)

      for [a, b] <- Enum.chunk_every(names, 2, 1, :discard),
          do: :ok = DependencyManager.add_dependency(sid, a, b)

      assert {:ok, order} = DependencyManager.get_update_order(sid, "c1")
      assert order == names

      assert {:ok, ["c4996", "c4997", "c4998", "c4999", "c5000"]} =
               DependencyManager.get_update_order(sid, "c4996")

      small = "dep_small_#{System.unique_integer([:positive])}"
      {:ok, ^small} = SessionStore.create_session(small)
      on_exit(fn -> SessionStore.delete_session(small) end)
      :ok = vars(small, ~w(a b c d e))

      for [a, b] <- Enum.chunk_every(~w(a b c d e), 2, 1, :discard),
          do: :ok = DependencyManager.add_dependency(small, a, b)

      assert {:ok, ~w(a b c d e)} = DependencyManager.get_update_order(small, "a")
      # 5,000 changed names (over the budget) of a small graph: the same
      # order, from the dirty variant; unknown ones are refused either way.
      assert {:ok, ~w(a b c d e)} =
               DependencyManager.get_update_order(small, List.duplicate("a", 5_000))

      assert {:error, _} = DependencyManager.get_update_order(small, ["a", "nope"])

      assert {:error, _} =
               DependencyManager.get_update_order(small, ["a" | List.duplicate("nope", 5_000)])
    end
  end

  describe "property: the engine agrees with an acyclic :digraph" do
    test "random edge sequences are accepted iff :digraph accepts them", %{sid: sid} do
      names = for i <- 1..8, do: :"p#{i}"
      vars(sid, names)

      prop =
        :proper.forall(
          :proper_types.list(
            :proper_types.tuple([
              :proper_types.oneof([:add, :add, :add, :remove]),
              :proper_types.elements(names),
              :proper_types.elements(names)
            ])
          ),
          fn ops -> agrees?(sid, names, ops) end
        )

      assert :proper.quickcheck(prop, [{:numtests, 150}, {:to_file, :user}, :quiet]) == true
    end
  end

  defp agrees?(sid, names, ops) do
    for n <- names, do: :ok = DependencyManager.clear_dependencies(sid, n)
    g = :digraph.new([:acyclic])
    for n <- names, do: :digraph.add_vertex(g, n)

    result =
      Enum.all?(ops, fn
        {:add, a, b} ->
          expected =
            cond do
              a == b ->
                {:error, :self_dependency}

              match?({:error, _}, :digraph.add_edge(g, {a, b}, a, b, [])) ->
                {:error, :would_create_cycle}

              true ->
                :ok
            end

          DependencyManager.add_dependency(sid, a, b) == expected

        {:remove, a, b} ->
          :digraph.del_edge(g, {a, b})
          DependencyManager.remove_dependency(sid, a, b) == :ok
      end) and
        Enum.all?(names, fn n ->
          {:ok, order} = DependencyManager.get_update_order(sid, n)
          reach = :digraph_utils.reachable([n], g)

          edges_forward =
            for e <- :digraph.edges(g), {_, x, y, _} <- [:digraph.edge(g, e)], do: {x, y}

          Enum.sort(order) == Enum.sort(reach) and
            Enum.all?(edges_forward, fn {x, y} ->
              index(order, x) == nil or index(order, y) == nil or
                index(order, x) < index(order, y)
            end)
        end)

    :digraph.delete(g)
    result
  end

  describe "DSPex.Variables.defderived/6" do
    test "bridges a local context and keeps the derived value current" do
      {:ok, ctx} = Context.start_link()
      {:ok, _} = Variables.defvariable(ctx, :max_tokens, :integer, 100)
      {:ok, _} = Variables.defderived(ctx, :budget, :integer, [:max_tokens], &(&1.max_tokens * 4))
      assert Context.bridged?(ctx)
      :ok = Variables.set(ctx, :max_tokens, 250)
      {:ok, sid} = Context.session_id(ctx)
      :ok = DependencyManager.await_propagation(sid)
      assert Variables.get(ctx, :budget) == 1000

      assert_raise DSPex.Bridge.Error.VariableNotFound, fn ->
        Variables.defderived!(ctx, :bad, :integer, [:nope], & &1)
      end

      Context.stop(ctx)
    end
  end
end
