defmodule DSPex.Bridge.DependencyManager.ComputeProcessTest do
  # The computations of a propagation pass share one process apart from the
  # worker, and each still finds that process as a fresh one would be: an
  # empty mailbox, a fresh process dictionary, no links. A computation that
  # fails, or leaves the process changed, gets it replaced.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.Bridge.DependencyManager.Propagator

  setup do
    sid = "compute_proc_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 0)
    %{sid: sid}
  end

  # A chain a -> d1 -> d2 -> ... of `steps`, so one pass recomputes them in
  # order. `step` gets the step's index and the input's value, runs in the
  # compute process, and returns the new value; each step reports
  # `{:step, i, pid, seen}` to the test with what `step` returned as `seen`.
  defp chain(sid, steps, step) do
    test = self()

    for i <- 1..steps do
      input = if i == 1, do: :a, else: :"d#{i - 1}"

      {:ok, _} =
        DependencyManager.defderived(sid, :"d#{i}", :integer, [input], fn values ->
          value = Map.fetch!(values, input)
          # Only the recomputations after a write to :a, not the first value.
          if SessionStore.get_variable_value(sid, :a) > 0 do
            seen = step.(i, value)
            send(test, {:step, i, self(), seen})
          end

          value + 1
        end)
    end
  end

  defp write(sid, value) do
    :ok = SessionStore.update_variable(sid, :a, value)
    :ok = DependencyManager.await_propagation(sid)
  end

  defp steps(n), do: for(i <- 1..n, do: assert_receive({:step, ^i, _pid, _} = step) && step)

  test "the computations of one pass run in one process, not the worker", %{sid: sid} do
    chain(sid, 4, fn _i, _value -> :ok end)
    write(sid, 1)
    pids = for {:step, _, pid, _} <- steps(4), uniq: true, do: pid
    assert [pid] = pids
    assert pid != Propagator.whereis(sid)
    # Ended with the pass.
    ref = Process.monitor(pid)
    assert_receive {:DOWN, ^ref, :process, ^pid, _}
    assert SessionStore.get_variable_value(sid, :d4) == 5
  end

  test "each computation finds an empty mailbox and a fresh process dictionary",
       %{sid: sid} do
    chain(sid, 3, fn i, _value ->
      seen = {Process.get(:left_by), Process.get(:"$callers") |> List.wrap() |> length()}

      mailbox =
        receive do
          message -> message
        after
          0 -> :empty
        end

      Process.put(:left_by, i)
      :rand.uniform()
      send(self(), {:left_by, i})
      {seen, mailbox}
    end)

    write(sid, 1)
    [{_, _, p1, s1}, {_, _, p2, s2}, {_, _, p3, s3}] = steps(3)
    # A dictionary or a mailbox left behind does not cost the process...
    assert p1 == p2 and p2 == p3
    # ... and is not seen by the next computation.
    for {{left_by, callers}, mailbox} <- [s1, s2, s3] do
      assert left_by == nil
      assert callers >= 1
      assert mailbox == :empty
    end
  end

  test "a process linked to a computation ends with it", %{sid: sid} do
    test = self()

    chain(sid, 2, fn
      1, _value ->
        linked = spawn_link(fn -> Process.sleep(:infinity) end)
        send(test, {:linked, linked})
        :ok

      2, _value ->
        :ok
    end)

    write(sid, 1)
    assert_receive {:linked, linked}
    ref = Process.monitor(linked)
    assert_receive {:DOWN, ^ref, :process, ^linked, _}
    [{_, _, p1, _}, {_, _, p2, _}] = steps(2)
    # The process with the link was not used again.
    assert p1 != p2
    assert SessionStore.get_variable_value(sid, :d2) == 3
  end

  test "after a computation fails, the next one runs in a new process", %{sid: sid} do
    test = self()

    chain(sid, 2, fn
      1, _value ->
        :ok

      2, _value ->
        send(test, {:step, 2, self(), :raising})
        raise "boom"
    end)

    # d2 fails, so it is not dirty: this one is recomputed for :a, after d2.
    {:ok, _} =
      DependencyManager.defderived(sid, :after_failure, :integer, [:d2, :a], fn values ->
        if values.a > 0, do: send(test, {:step, 3, self(), :after})
        values.a
      end)

    write(sid, 1)
    assert_receive {:step, 1, p1, :ok}
    assert_receive {:step, 2, p2, :raising}
    assert_receive {:step, 3, p3, :after}
    assert p1 == p2
    assert p3 != p2
    assert {:ok, %{status: :stale}} = DependencyManager.derived_status(sid, :d2)
    assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :after_failure)
    assert SessionStore.get_variable_value(sid, :after_failure) == 1
  end
end
