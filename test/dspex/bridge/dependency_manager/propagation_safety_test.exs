defmodule DSPex.Bridge.DependencyManager.PropagationSafetyTest do
  # The propagation worker against bad definitions, misbehaving compute
  # functions, floods and its own death: derived variables are never lost
  # silently, and no public call hangs.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.TelemetryHelper

  setup do
    sid = "dep_safety_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 1)
    # A healthy derived variable, to show the worker keeps working.
    {:ok, _} = DependencyManager.defderived(sid, :ok, :integer, [:a], &(&1.a + 100))
    %{sid: sid}
  end

  defp write(sid, var, value) do
    :ok = SessionStore.update_variable(sid, var, value)
    :ok = DependencyManager.await_propagation(sid)
  end

  defp value(sid, var), do: SessionStore.get_variable_value(sid, var)

  # A compute that reports its process and waits for `:go` when `a` is `hold`.
  defp holding(test, hold) do
    fn %{a: a} ->
      if a == hold do
        send(test, {:holding, self()})

        receive do
          :go -> a
        end
      else
        a
      end
    end
  end

  describe "defderived/6 inputs" do
    test "garbage inputs are invalid arguments and the worker keeps working", %{sid: sid} do
      pid = Propagator.whereis(sid)
      f = fn _ -> 1 end

      for inputs <- [[self()], [{:a, 1}], [1 | 2], [:a | :b], [nil], [1.5], :a, "a"] do
        assert {:error, {:invalid_argument, _}} =
                 DependencyManager.defderived(sid, :bad, :integer, inputs, f),
               "inputs #{inspect(inputs)}"
      end

      assert {:error, :not_found} = SessionStore.get_variable(sid, :bad)
      assert Propagator.whereis(sid) == pid
      write(sid, :a, 5)
      assert value(sid, :ok) == 105
    end
  end

  describe "compute functions run isolated" do
    test "one using Task.async works, and the worker survives it", %{sid: sid} do
      pid = Propagator.whereis(sid)

      {:ok, _} =
        DependencyManager.defderived(sid, :tasked, :integer, [:a], fn %{a: a} ->
          Task.async(fn -> a * 2 end) |> Task.await()
        end)

      assert value(sid, :tasked) == 2
      write(sid, :a, 4)
      assert value(sid, :tasked) == 8
      write(sid, :a, 6)
      assert value(sid, :tasked) == 12
      assert value(sid, :ok) == 106
      assert Propagator.whereis(sid) == pid
    end

    test "a linked process crashing it, or it killing itself, is a visible failure", %{sid: sid} do
      ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :failed]])

      {:ok, _} =
        DependencyManager.defderived(sid, :linked, :integer, [:a], fn %{a: a} ->
          if a == 2 do
            spawn_link(fn -> exit(:boom) end)
            Process.sleep(:infinity)
          end

          a
        end)

      {:ok, _} =
        DependencyManager.defderived(sid, :suicidal, :integer, [:a], fn %{a: a} ->
          if a == 2, do: Process.exit(self(), :kill)
          a
        end)

      write(sid, :a, 2)

      assert_receive {_, ^ref, _,
                      %{session_id: ^sid, variable: :linked, kind: :exit, reason: :boom}}

      assert_receive {_, ^ref, _,
                      %{session_id: ^sid, variable: :suicidal, kind: :exit, reason: :killed}}

      assert {:ok, %{status: :stale, error: {:exit, :boom}}} =
               DependencyManager.derived_status(sid, :linked)

      assert {:ok, %{status: :stale, error: {:exit, :killed}}} =
               DependencyManager.derived_status(sid, :suicidal)

      {:ok, letters} = DependencyManager.dead_letters(sid)

      assert Enum.map(letters, &{&1.variable, &1.reason}) |> Enum.sort() ==
               [linked: {:exit, :boom}, suicidal: {:exit, :killed}]

      assert value(sid, :ok) == 102

      # Everything keeps recomputing, the failed ones included.
      write(sid, :a, 3)
      assert {value(sid, :ok), value(sid, :linked), value(sid, :suicidal)} == {103, 3, 3}
      assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :suicidal)
    end
  end

  describe "compute deadlines" do
    test "a defderived/6 caller that dies takes its computation with it", %{sid: sid} do
      test = self()

      caller =
        spawn(fn ->
          DependencyManager.defderived(sid, :orphan, :integer, [:a], holding(test, 1),
            compute_timeout: 60_000
          )
        end)

      assert_receive {:holding, compute}
      cref = Process.monitor(compute)
      Process.exit(caller, :kill)
      assert_receive {:DOWN, ^cref, :process, ^compute, :killed}
      assert {:error, :not_found} = SessionStore.get_variable(sid, :orphan)
    end

    test "defderived/6 with a compute that never returns fails within its deadline", %{sid: sid} do
      assert {:error, {:compute_failed, :timeout}} =
               DependencyManager.defderived(
                 sid,
                 :never,
                 :integer,
                 [:a],
                 fn _ -> Process.sleep(:infinity) end,
                 compute_timeout: 50
               )

      assert {:error, :not_found} = SessionStore.get_variable(sid, :never)
      write(sid, :a, 7)
      assert value(sid, :ok) == 107
    end

    test "a recomputation overrunning its deadline is killed, marked stale and dead-lettered",
         %{sid: sid} do
      ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :failed]])

      {:ok, _} =
        DependencyManager.defderived(
          sid,
          :slow,
          :integer,
          [:a],
          fn %{a: a} ->
            if a == 2, do: Process.sleep(:infinity)
            a
          end,
          compute_timeout: 100
        )

      write(sid, :a, 2)

      assert_receive {_, ^ref, _,
                      %{session_id: ^sid, variable: :slow, kind: :exit, reason: :timeout}}

      assert {:ok, %{status: :stale, error: :timeout}} =
               DependencyManager.derived_status(sid, :slow)

      assert {:ok, [%{variable: :slow, reason: :timeout}]} = DependencyManager.dead_letters(sid)
      assert value(sid, :slow) == 1
      assert value(sid, :ok) == 102

      write(sid, :a, 3)
      assert {value(sid, :ok), value(sid, :slow)} == {103, 3}
    end
  end

  describe "a stuck compute" do
    setup %{sid: sid} do
      test = self()

      {:ok, _} =
        DependencyManager.defderived(sid, :held, :integer, [:a], holding(test, 2),
          compute_timeout: 60_000
        )

      :ok = SessionStore.update_variable(sid, :a, 2)
      assert_receive {:holding, compute}
      %{compute: compute}
    end

    test "a burst of writes leaves the worker's mailbox bounded", %{sid: sid, compute: compute} do
      for i <- 3..10_002, do: :ok = SessionStore.update_variable(sid, :a, i)
      pid = Propagator.whereis(sid)
      {:message_queue_len, queued} = Process.info(pid, :message_queue_len)
      assert queued <= 2

      send(compute, :go)
      :ok = DependencyManager.await_propagation(sid)
      assert {value(sid, :held), value(sid, :ok)} == {10_002, 10_102}
    end

    test "the public calls answer instead of exiting", %{sid: sid, compute: compute} do
      assert {:error, :timeout} = DependencyManager.await_propagation(sid, 50)
      assert {:error, :timeout} = DependencyManager.replay_dead_letters(sid, timeout: 50)
      # Status and dead letters do not wait for the worker at all.
      assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :held)
      assert {:ok, []} = DependencyManager.dead_letters(sid)

      # Abandoned waits leave nothing behind in the worker's mailbox.
      for _ <- 1..1_000, do: {:error, :timeout} = DependencyManager.await_propagation(sid, 0)
      {:message_queue_len, queued} = Process.info(Propagator.whereis(sid), :message_queue_len)
      assert queued <= 2

      send(compute, :go)
      assert :ok = DependencyManager.await_propagation(sid)
      assert value(sid, :held) == 2
    end

    test "the computation in flight dies with the worker", %{sid: sid, compute: compute} do
      cref = Process.monitor(compute)
      Process.exit(Propagator.whereis(sid), :kill)
      assert_receive {:DOWN, ^cref, :process, ^compute, :killed}
      # The restarted worker recomputes everything, :held included.
      assert_receive {:holding, again}
      send(again, :go)
      :ok = DependencyManager.await_propagation(sid)
      assert value(sid, :held) == 2
    end
  end

  describe "the worker" do
    test "a worker that dies is restarted with its definitions, and the death is visible",
         %{sid: sid} do
      ref = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :failed]])
      old = Propagator.whereis(sid)
      mref = Process.monitor(old)
      Process.exit(old, :kill)
      assert_receive {:DOWN, ^mref, :process, ^old, :killed}

      assert_receive {_, ^ref, _,
                      %{
                        session_id: ^sid,
                        variable: nil,
                        kind: :exit,
                        reason: {:worker_exit, :killed}
                      }}

      write(sid, :a, 9)
      assert value(sid, :ok) == 109
      new = Propagator.whereis(sid)
      assert is_pid(new) and new != old
      assert {:ok, %{status: :fresh, restarts: 1}} = DependencyManager.derived_status(sid, :ok)

      assert {:ok, [%{variable: nil, reason: {:worker_exit, :killed}}]} =
               DependencyManager.dead_letters(sid)
    end

    test "writes made while the worker is down are propagated after its restart", %{sid: sid} do
      old = Propagator.whereis(sid)
      mref = Process.monitor(old)
      Process.exit(old, :kill)
      assert_receive {:DOWN, ^mref, :process, ^old, :killed}
      :ok = SessionStore.update_variable(sid, :a, 11)
      :ok = DependencyManager.await_propagation(sid)
      assert value(sid, :ok) == 111
    end
  end

  describe "options" do
    test "options that are not a keyword list are invalid arguments", %{sid: sid} do
      f = & &1.a

      for bad <- [[:oops], "x", %{principal: "p"}, [{"principal", "p"}], [nope: 1]] do
        calls = [
          fn -> DependencyManager.add_dependency(sid, :a, :ok, :data, bad) end,
          fn -> DependencyManager.remove_dependency(sid, :a, :ok, bad) end,
          fn -> DependencyManager.clear_dependencies(sid, :a, bad) end,
          fn -> DependencyManager.get_dependencies(sid, :ok, bad) end,
          fn -> DependencyManager.get_dependents(sid, :a, bad) end,
          fn -> DependencyManager.get_update_order(sid, :a, bad) end,
          fn -> DependencyManager.visualize_graph(sid, :dot, bad) end,
          fn -> DependencyManager.graph_info(sid, bad) end,
          fn -> DependencyManager.defderived(sid, :d, :integer, [:a], f, bad) end,
          fn -> DependencyManager.derived_status(sid, :ok, bad) end,
          fn -> DependencyManager.propagate_change(sid, :a, 2, %{}, bad) end,
          fn -> DependencyManager.replay_dead_letters(sid, bad) end
        ]

        for call <- calls do
          assert {:error, {:invalid_argument, _}} = call.(), "options #{inspect(bad)}"
        end
      end

      assert {:error, {:invalid_argument, _}} = DependencyManager.await_propagation(sid, :soon)
      assert {:error, {:invalid_argument, _}} = DependencyManager.propagate_change(sid, :a, 2, :m)

      assert {:error, {:invalid_argument, _}} =
               DependencyManager.get_dependents(sid, :a, transitive: 1)

      assert {:error, :not_found} = SessionStore.get_variable(sid, :d)
      assert value(sid, :a) == 1
    end
  end
end
