defmodule DSPex.Bridge.Conformance.DependencyCases do
  @moduledoc """
  Every `DSPex.Bridge.DependencyManager` case that goes through a backend,
  run against each backend by `DSPex.Bridge.DependencyManagerTest`: edges,
  cycle detection, update order, rendering, snapshots, and derived
  variables propagating through the session's worker.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [unique_id: 1]

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.TelemetryHelper

  conformance "add_dependency/4: rejects the edge closing a -> b -> c -> a and reports the path",
              %{sid: sid} do
    vars(sid, [:a, :b, :c])
    ref = TelemetryHelper.attach([[:dspex, :bridge, :dependency, :cycle_detected]])
    assert :ok = DependencyManager.add_dependency(sid, :a, :b)
    assert :ok = DependencyManager.add_dependency(sid, :b, :c)
    assert {:error, :would_create_cycle} = DependencyManager.add_dependency(sid, :c, :a)

    assert_receive {[:dspex, :bridge, :dependency, :cycle_detected], ^ref, %{path_length: 4},
                    %{session_id: ^sid, from: :c, to: :a, path: [:c, :a, :b, :c]}}

    # The rejected edge changed nothing.
    assert {:ok, [:a, :b, :c]} = DependencyManager.get_update_order(sid, :a)
    assert {:ok, []} = DependencyManager.get_dependents(sid, :c)
  end

  conformance "add_dependency/4: a variable cannot depend on itself, by name or by id", %{
    sid: sid
  } do
    {:ok, id} = SessionStore.register_variable(sid, :a, :integer, 0)
    assert {:error, :self_dependency} = DependencyManager.add_dependency(sid, :a, :a)
    assert {:error, :self_dependency} = DependencyManager.add_dependency(sid, :a, "a")
    assert {:error, :self_dependency} = DependencyManager.add_dependency(sid, id, :a)
  end

  conformance "add_dependency/4: unknown variables and sessions", %{sid: sid} do
    vars(sid, [:a])
    assert {:error, {:not_found, :nope}} = DependencyManager.add_dependency(sid, :a, :nope)
    assert {:error, {:not_found, "nope"}} = DependencyManager.add_dependency(sid, "nope", :a)

    assert {:error, :session_not_found} =
             DependencyManager.add_dependency("no-such-session", :a, :b)
  end

  conformance "add_dependency/4: bad arguments are errors, not crashes", %{sid: sid} do
    vars(sid, [:a, :b])

    assert {:error, {:invalid_argument, {:edge_type, "data"}}} =
             DependencyManager.add_dependency(sid, :a, :b, "data")

    assert {:error, {:invalid_argument, _}} = DependencyManager.add_dependency(sid, 1, :b)
    assert {:error, {:invalid_argument, _}} = DependencyManager.add_dependency(sid, :a, {:b})
    assert {:error, {:invalid_argument, _}} = DependencyManager.add_dependency(sid, nil, :b)
    assert {:error, {:invalid_argument, _}} = DependencyManager.add_dependency(123, :a, :b)
  end

  conformance "add_dependency/4: emits :added once per new edge; re-adding replaces the type", %{
    sid: sid
  } do
    vars(sid, [:a, :b])
    ref = TelemetryHelper.attach([[:dspex, :bridge, :dependency, :added]])
    assert :ok = DependencyManager.add_dependency(sid, :a, :b)
    assert :ok = DependencyManager.add_dependency(sid, "a", "b", :control)

    assert_receive {_, ^ref, %{system_time: _},
                    %{session_id: ^sid, from: :a, to: :b, type: :data}}

    refute_receive {_, ^ref, _, %{session_id: ^sid}}
    {:ok, dot} = DependencyManager.visualize_graph(sid)
    assert IO.iodata_to_binary(dot) =~ ~s("a" -> "b" [label="control"])
  end

  conformance "add_dependency/4: another session is denied", %{sid: sid} do
    vars(sid, [:a, :b])

    assert {:error, :access_denied} =
             DependencyManager.add_dependency(sid, :a, :b, :data, principal: "intruder")

    assert {:error, :access_denied} = DependencyManager.visualize_graph(sid, :dot, principal: "x")
  end

  conformance "add_dependency/4: many processes adding edges at once never build a cycle", %{
    sid: sid
  } do
    names = for i <- 1..20, do: :"v#{i}"
    vars(sid, names)

    1..16
    |> Enum.map(fn seed ->
      Task.async(fn ->
        :rand.seed(:exsss, {seed, seed, seed})

        for _ <- 1..300 do
          a = Enum.random(names)
          b = Enum.random(names)
          DependencyManager.add_dependency(sid, a, b)
        end
      end)
    end)
    |> Task.await_many(30_000)

    # Rebuilding the final graph in an acyclic :digraph accepts every edge.
    g = :digraph.new([:acyclic])
    for n <- names, do: :digraph.add_vertex(g, n)

    edges =
      for n <- names,
          {:ok, deps} <- [DependencyManager.get_dependents(sid, n)],
          d <- deps,
          do: {n, d}

    assert edges != []
    assert Enum.all?(edges, fn {a, b} -> is_list(:digraph.add_edge(g, a, b)) end)
    :digraph.delete(g)
  end

  conformance "get_update_order/2: orders the diamond a -> b, a -> c, b -> d, c -> d", %{sid: sid} do
    vars(sid, [:a, :b, :c, :d])

    for {f, t} <- [a: :b, a: :c, b: :d, c: :d],
        do: :ok = DependencyManager.add_dependency(sid, f, t)

    {:ok, order} = DependencyManager.get_update_order(sid, :a)
    assert length(order) == 4
    assert hd(order) == :a
    assert List.last(order) == :d
    assert index(order, :b) < index(order, :d) and index(order, :c) < index(order, :d)
    assert {:ok, [:c, :d]} = DependencyManager.get_update_order(sid, :c)

    assert {:ok, [:b, :c, :d]} = DependencyManager.get_update_order(sid, [:c, :b]) |> sorted_mid()
  end

  conformance "get_update_order/2: a variable without edges is its own update order", %{sid: sid} do
    vars(sid, [:lonely])
    assert {:ok, [:lonely]} = DependencyManager.get_update_order(sid, :lonely)
    assert {:error, {:not_found, :ghost}} = DependencyManager.get_update_order(sid, :ghost)
  end

  conformance "dependencies and dependents: direct and transitive, in topological order", %{
    sid: sid
  } do
    vars(sid, [:a, :b, :c, :d])
    for {f, t} <- [a: :b, b: :c, c: :d], do: :ok = DependencyManager.add_dependency(sid, f, t)
    assert {:ok, [:c]} = DependencyManager.get_dependencies(sid, :d)
    assert {:ok, [:a, :b, :c]} = DependencyManager.get_dependencies(sid, :d, transitive: true)
    assert {:ok, [:b]} = DependencyManager.get_dependents(sid, :a)
    assert {:ok, [:b, :c, :d]} = DependencyManager.get_dependents(sid, :a, transitive: true)
    assert {:ok, []} = DependencyManager.get_dependencies(sid, :a)
    assert {:error, {:not_found, :x}} = DependencyManager.get_dependents(sid, :x)
  end

  conformance "dependencies and dependents: removal, then re-adding the other way round", %{
    sid: sid
  } do
    vars(sid, [:a, :b])
    ref = TelemetryHelper.attach([[:dspex, :bridge, :dependency, :removed]])
    :ok = DependencyManager.add_dependency(sid, :a, :b)
    assert {:error, :would_create_cycle} = DependencyManager.add_dependency(sid, :b, :a)
    assert :ok = DependencyManager.remove_dependency(sid, :a, :b)
    assert_receive {_, ^ref, %{count: 1}, %{session_id: ^sid, from: :a, to: :b}}
    assert :ok = DependencyManager.remove_dependency(sid, :a, :b)
    refute_receive {_, ^ref, _, %{session_id: ^sid}}
    assert :ok = DependencyManager.add_dependency(sid, :b, :a)
    assert {:ok, [:b, :a]} = DependencyManager.get_update_order(sid, :b)
  end

  conformance "dependencies and dependents: clear_dependencies/2 and delete_variable remove every edge",
              %{sid: sid} do
    vars(sid, [:a, :b, :c])
    for {f, t} <- [a: :b, b: :c], do: :ok = DependencyManager.add_dependency(sid, f, t)
    assert :ok = DependencyManager.clear_dependencies(sid, :b)
    assert {:ok, %{edges: 0, vertices: 0}} = DependencyManager.graph_info(sid)
    :ok = DependencyManager.add_dependency(sid, :a, :b)
    :ok = SessionStore.delete_variable(sid, :a)
    assert {:ok, []} = DependencyManager.get_dependencies(sid, :b)
    # A new :a starts with no edges.
    vars(sid, [:a])
    assert {:ok, [:a]} = DependencyManager.get_update_order(sid, :a)
  end

  conformance "dependencies and dependents: edges travel in snapshots", %{sid: sid, backend: b} do
    vars(sid, [:a, :b, :c])
    for {f, t} <- [a: :b, b: :c], do: :ok = DependencyManager.add_dependency(sid, f, t)
    {:ok, snapshot} = SessionStore.export_session(sid)
    copy = unique_id(b)
    {:ok, ^copy} = SessionStore.import_session(snapshot, session_id: copy, backend: b)
    ExUnit.Callbacks.on_exit(fn -> SessionStore.delete_session(copy) end)
    assert {:ok, [:a, :b, :c]} = DependencyManager.get_update_order(copy, :a)
    assert {:error, :would_create_cycle} = DependencyManager.add_dependency(copy, :c, :a)
  end

  conformance "visualize_graph/2: dot and mermaid, with names that need escaping", %{sid: sid} do
    vars(sid, [:a, "say \"hi\""])
    :ok = DependencyManager.add_dependency(sid, :a, "say \"hi\"")
    {:ok, dot} = DependencyManager.visualize_graph(sid, :dot)
    assert IO.iodata_to_binary(dot) =~ ~s("a" -> "say \\"hi\\"";)
    {:ok, mermaid} = DependencyManager.visualize_graph(sid, :mermaid)
    assert IO.iodata_to_binary(mermaid) =~ ~s(v0["a"] --> v1["say #quot;hi#quot;"])

    assert {:error, {:invalid_argument, {:unknown_format, :svg}}} =
             DependencyManager.visualize_graph(sid, :svg)
  end

  conformance "defderived/6: recomputes a diamond glitch-free: d once, from both new inputs", %{
    sid: sid
  } do
    test = self()
    vars(sid, [:a], 1)

    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], &(&1.a + 1))
    {:ok, _} = DependencyManager.defderived(sid, :c, :integer, [:a], &(&1.a * 10))

    {:ok, _} =
      DependencyManager.defderived(sid, :d, :integer, [:b, :c], fn %{b: b, c: c} ->
        send(test, {:d_computed, b, c})
        b + c
      end)

    assert_receive {:d_computed, 2, 10}
    ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :stop]])

    :ok = SessionStore.update_variable(sid, :a, 5, %{trial: 7})
    :ok = DependencyManager.await_propagation(sid)

    assert_receive {:d_computed, 6, 50}
    refute_receive {:d_computed, _, _}
    assert SessionStore.get_variable_value(sid, :d) == 56

    assert_receive {_, ^ref, %{recomputed: 3, failed: 0}, %{session_id: ^sid, changed: [:a]}}

    {:ok, d} = SessionStore.get_variable(sid, :d)
    assert d.last_write == %{derived: true, caused_by: [%{variable: :a, version: 1}]}
    assert d.metadata.derived_from == [:b, :c]
    assert {:ok, [:b, :c]} = DependencyManager.get_dependencies(sid, :d)
  end

  conformance "defderived/6: a burst of writes to one input coalesces", %{sid: sid} do
    test = self()
    vars(sid, [:x], 0)
    gate = :atomics.new(1, [])

    {:ok, _} =
      DependencyManager.defderived(sid, :slow, :integer, [:x], fn %{x: x} ->
        # Hold the worker on the first recomputation so the burst piles up.
        if :atomics.get(gate, 1) == 1 do
          send(test, {:held, self()})
          receive do: (:go -> :ok)
        end

        send(test, {:computed, x})
        x
      end)

    assert_receive {:computed, 0}
    :atomics.put(gate, 1, 1)
    :ok = SessionStore.update_variable(sid, :x, 1)
    assert_receive {:held, compute}
    :atomics.put(gate, 1, 0)
    # The burst arrives while the worker waits on the held computation.
    for i <- 2..101, do: :ok = SessionStore.update_variable(sid, :x, i)
    send(compute, :go)
    :ok = DependencyManager.await_propagation(sid)

    # The held one (x = 1), then one recomputation for the whole burst.
    computed = collect(:computed)
    assert computed == [1, 101]
    assert SessionStore.get_variable_value(sid, :slow) == 101
  end

  conformance "defderived/6: a raising compute function marks the variable stale and is dead-lettered",
              %{sid: sid} do
    vars(sid, [:n], 1)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :failed]])

    {:ok, _} = DependencyManager.defderived(sid, :inv, :float, [:n], fn %{n: n} -> 1 / n end)

    {:ok, _} = DependencyManager.defderived(sid, :twice, :float, [:inv], &(&1.inv * 2))

    :ok = SessionStore.update_variable(sid, :n, 0)
    :ok = DependencyManager.await_propagation(sid)

    assert_receive {_, ^ref, %{duration: _},
                    %{
                      session_id: ^sid,
                      variable: :inv,
                      kind: :error,
                      reason: %ArithmeticError{}
                    }}

    assert SessionStore.get_variable_value(sid, :inv) == 1.0
    assert SessionStore.get_variable_value(sid, :twice) == 2.0

    assert {:ok, %{status: :stale, error: %ArithmeticError{}}} =
             DependencyManager.derived_status(sid, :inv)

    assert {:ok, [%{variable: :inv, reason: %ArithmeticError{}, caused_by: [%{variable: :n}]}]} =
             DependencyManager.dead_letters(sid)

    # Replaying while the input is still bad fails again, as a new entry.
    assert {:ok, %{replayed: 0, failed: 1}} = DependencyManager.replay_dead_letters(sid)
    assert {:ok, [%{variable: :inv, id: 2}]} = DependencyManager.dead_letters(sid)

    # The session carries on; a replay after fixing the input recomputes.
    {:ok, %{version: v}} = SessionStore.get_variable(sid, :n)
    :ok = SessionStore.update_variable(sid, :n, 4, %{expected_version: v})
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :twice) == 0.5
    assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :inv)
    assert {:ok, %{replayed: 1, failed: 0}} = DependencyManager.replay_dead_letters(sid)
    assert {:ok, []} = DependencyManager.dead_letters(sid)
  end

  conformance "defderived/6: a result the type rejects is a failure too", %{sid: sid} do
    vars(sid, [:n], 1)

    {:ok, _} =
      DependencyManager.defderived(
        sid,
        :label,
        :integer,
        [:n],
        &if(&1.n > 5, do: "big", else: &1.n)
      )

    :ok = SessionStore.update_variable(sid, :n, 9)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :label) == 1

    assert {:ok, [%{reason: {:write_rejected, {:invalid_value, _}}}]} =
             DependencyManager.dead_letters(sid)
  end

  conformance "defderived/6: bad definitions are refused and register nothing", %{sid: sid} do
    vars(sid, [:a])
    f = fn %{a: a} -> a end

    assert {:error, {:not_found, :ghost}} =
             DependencyManager.defderived(sid, :d, :integer, [:ghost], f)

    assert {:error, {:compute_failed, %RuntimeError{}}} =
             DependencyManager.defderived(sid, :d, :integer, [:a], fn _ -> raise "no" end)

    assert {:error, {:invalid_argument, {:inputs, []}}} =
             DependencyManager.defderived(sid, :d, :integer, [], f)

    assert {:error, {:invalid_argument, {:compute_fun, _}}} =
             DependencyManager.defderived(sid, :d, :integer, [:a], fn -> 1 end)

    assert {:error, {:invalid_value, _}} =
             DependencyManager.defderived(sid, :d, :integer, [:a], fn _ -> "x" end)

    assert {:error, :already_exists} = DependencyManager.defderived(sid, :a, :integer, [:a], f)

    assert {:error, :session_not_found} =
             DependencyManager.defderived("nope", :d, :integer, [:a], f)

    assert {:error, :not_found} = SessionStore.get_variable(sid, :d)
  end

  conformance "defderived/6: propagate_change/5 writes and propagates; a rejected value is returned and dead-lettered",
              %{sid: sid} do
    vars(sid, [:a], 1)
    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], &(&1.a * 3))
    :ok = DependencyManager.propagate_change(sid, :a, 4, %{source: :test})
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :b) == 12

    assert {:error, {:invalid_value, _}} =
             DependencyManager.propagate_change(sid, :a, "four", %{})

    :ok = DependencyManager.await_propagation(sid)

    assert {:ok, [%{variable: :a, reason: {:write_rejected, _}}]} =
             DependencyManager.dead_letters(sid)

    # Not a recomputation: a replay leaves it.
    assert {:ok, %{replayed: 0, failed: 0}} = DependencyManager.replay_dead_letters(sid)
    assert {:ok, [%{variable: :a}]} = DependencyManager.dead_letters(sid)
  end

  conformance "defderived/6: sessions without derived variables have no worker; deletion stops it",
              %{sid: sid} do
    vars(sid, [:a])
    :ok = SessionStore.update_variable(sid, :a, 1)
    assert Propagator.whereis(sid) == nil
    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], & &1.a)
    pid = Propagator.whereis(sid)
    mref = Process.monitor(pid)
    :ok = SessionStore.delete_session(sid)
    assert_receive {:DOWN, ^mref, :process, ^pid, :normal}
    assert Propagator.whereis(sid) == nil
  end

  conformance "defderived/6: a write that reaches no derived variable makes no pass", %{sid: sid} do
    vars(sid, [:a, :z])
    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], & &1.a)
    ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :start]])
    :ok = SessionStore.update_variable(sid, :z, 5)
    :ok = DependencyManager.await_propagation(sid)
    refute_receive {_, ^ref, _, %{session_id: ^sid}}
    :ok = SessionStore.update_variable(sid, :a, 5)
    :ok = DependencyManager.await_propagation(sid)
    assert_receive {_, ^ref, _, %{session_id: ^sid, changed: [:a]}}
  end

  conformance "defderived/6: a deleted derived variable is forgotten", %{sid: sid} do
    vars(sid, [:a])
    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], & &1.a)
    :ok = SessionStore.delete_variable(sid, :b)
    {:ok, _} = SessionStore.register_variable(sid, :b, :integer, 42)
    :ok = DependencyManager.add_dependency(sid, :a, :b)
    :ok = SessionStore.update_variable(sid, :a, 7)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :b) == 42
    assert {:error, :not_found} = DependencyManager.derived_status(sid, :b)
  end

  conformance "defderived/6, propagate_change/5, derived_status/3: a foreign principal is denied",
              %{sid: sid} do
    vars(sid, [:a], 1)
    {:ok, _} = DependencyManager.defderived(sid, :b, :integer, [:a], &(&1.a * 2))
    f = &(&1.a + 1)

    assert {:error, :access_denied} =
             DependencyManager.defderived(sid, :c, :integer, [:a], f, principal: "intruder")

    assert {:error, :not_found} = SessionStore.get_variable(sid, :c)

    assert {:error, :access_denied} =
             DependencyManager.propagate_change(sid, :a, 5, %{}, principal: "intruder")

    assert {:error, :access_denied} =
             DependencyManager.derived_status(sid, :b, principal: "intruder")

    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :a) == 1
    assert SessionStore.get_variable_value(sid, :b) == 2

    # The session itself, named or by default, may.
    assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :b, principal: sid)
    assert :ok = DependencyManager.propagate_change(sid, :a, 5, %{}, principal: sid)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :b) == 10

    denied = DSPex.Bridge.AccessControl.audit_log(sid, event: :denied, by: "intruder")
    assert length(denied) >= 3
  end

  conformance "defderived/6: a grant lets a principal read the status and write the inputs; the recomputation runs as the definer",
              %{sid: sid} do
    rules = [%{session_pattern: "worker_*", permissions: [:read, :write]}]
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 1, access_rules: rules)

    {:ok, _} =
      DependencyManager.defderived(sid, :b, :integer, [:a], &(&1.a * 2),
        access_rules: [%{session_pattern: "worker_*", permissions: [:read]}]
      )

    assert :ok = DependencyManager.propagate_change(sid, :a, 3, %{}, principal: "worker_1")
    :ok = DependencyManager.await_propagation(sid)
    # worker_1 may not write :b, but the recomputation is the session's own.
    assert SessionStore.get_variable_value(sid, :b) == 6

    assert {:ok, %{status: :fresh}} =
             DependencyManager.derived_status(sid, :b, principal: "worker_1")

    assert {:error, :access_denied} =
             DependencyManager.propagate_change(sid, :b, 1, %{}, principal: "worker_1")
  end

  defp vars(sid, names, initial \\ 0) do
    for name <- names, do: {:ok, _} = SessionStore.register_variable(sid, name, :integer, initial)
    :ok
  end

  defp index(list, x), do: Enum.find_index(list, &(&1 == x))

  # [:b, :c, :d] or [:c, :b, :d]: both are valid orders.
  defp sorted_mid({:ok, [x, y, :d]}), do: {:ok, Enum.sort([x, y]) ++ [:d]}
  defp sorted_mid(other), do: other

  defp collect(tag, acc \\ []) do
    receive do
      {^tag, x} -> collect(tag, [x | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end
end
