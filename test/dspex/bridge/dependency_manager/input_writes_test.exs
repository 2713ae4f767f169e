defmodule DSPex.Bridge.DependencyManager.InputWritesTest do
  # Only a write to an input of a derived variable tells the session's
  # worker anything: a write to any other variable starts no pass and is
  # named in none. A definition added later (even while the variable is being
  # written) makes the writes to its inputs recompute it, and none is missed.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.TelemetryHelper

  @start [:dspex, :bridge, :propagation, :start]
  @stop [:dspex, :bridge, :propagation, :stop]

  setup do
    sid = "input_writes_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    for v <- [:x0, :x1, :x5], do: {:ok, _} = SessionStore.register_variable(sid, v, :integer, 0)
    %{sid: sid, ref: TelemetryHelper.attach([@start, @stop])}
  end

  # A derived variable `d = 10 * x0` whose computation of x0 == 1 waits for
  # `:go`, so the writes made meanwhile are all in the next pass.
  defp blocking_derived(sid) do
    test = self()

    fun = fn %{x0: v} ->
      if v == 1 do
        send(test, {:blocked, self()})
        receive do: (:go -> :ok)
      end

      v * 10
    end

    {:ok, _} =
      DependencyManager.defderived(sid, :d, :integer, [:x0], fun, compute_timeout: 10_000)
  end

  defp passes(sid, ref, acc \\ []) do
    receive do
      {@start, ^ref, _, %{session_id: ^sid, changed: changed}} ->
        passes(sid, ref, [changed | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  test "a write to a variable that is no input starts no pass", %{sid: sid, ref: ref} do
    blocking_derived(sid)
    for k <- 1..20, do: :ok = SessionStore.update_variable(sid, :x5, k)
    :ok = DependencyManager.await_propagation(sid)
    assert passes(sid, ref) == []
    :ok = SessionStore.update_variable(sid, :x0, 3)
    :ok = DependencyManager.await_propagation(sid)
    assert passes(sid, ref) == [[:x0]]
    assert SessionStore.get_variable_value(sid, :d) == 30
  end

  test "writes to other variables are not part of the next pass", %{sid: sid, ref: ref} do
    blocking_derived(sid)
    :ok = SessionStore.update_variable(sid, :x0, 1)
    assert_receive {:blocked, computation}, 5_000
    # While the worker computes: a write to a non-input, then to the input,
    # alone and in batches (atomic or not).
    :ok = SessionStore.update_variable(sid, :x5, 7)
    :ok = SessionStore.update_variable(sid, :x0, 2)
    :ok = SessionStore.update_variables(sid, [x5: 8, x1: 9], atomic: true)
    {:ok, %{x5: :ok, x0: :ok}} = SessionStore.update_variables(sid, x5: 9, x0: 4)
    send(computation, :go)
    :ok = DependencyManager.await_propagation(sid)

    assert passes(sid, ref) == [[:x0], [:x0]]
    assert SessionStore.get_variable_value(sid, :d) == 40
  end

  test "a variable made an input later recomputes on its writes, by name or by id", %{
    sid: sid,
    ref: ref
  } do
    blocking_derived(sid)
    :ok = SessionStore.update_variable(sid, :x5, 2)
    :ok = DependencyManager.await_propagation(sid)
    assert passes(sid, ref) == []

    {:ok, _} = DependencyManager.defderived(sid, :e, :integer, [:x5], &(&1.x5 + 100))
    assert SessionStore.get_variable_value(sid, :e) == 102
    :ok = SessionStore.update_variable(sid, :x5, 3)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :e) == 103

    {:ok, %{id: x5_id}} = SessionStore.get_variable(sid, :x5)
    :ok = SessionStore.update_variable(sid, x5_id, 4)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :e) == 104
    assert [[:x5], [_]] = passes(sid, ref)

    # Deleted, the definition no longer makes x5 an input.
    :ok = SessionStore.delete_variable(sid, :e)
    :ok = SessionStore.update_variable(sid, :x5, 5)
    :ok = DependencyManager.await_propagation(sid)
    assert passes(sid, ref) == []
  end

  test "an input given by id is an input by name too", %{sid: sid} do
    {:ok, %{id: x5_id}} = SessionStore.get_variable(sid, :x5)
    {:ok, _} = DependencyManager.defderived(sid, :e, :integer, [x5_id], &Map.fetch!(&1, x5_id))
    :ok = SessionStore.update_variable(sid, :x5, 8)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :e) == 8
    :ok = SessionStore.update_variable(sid, x5_id, 9)
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :e) == 9
  end

  test "a definition added while its input is being written misses no write", %{sid: sid} do
    # The writer keeps writing until the new derived variable is registered
    # (the definition is not complete yet: edges, the table, the catch-up
    # follow), then `extra` writes more, so the last writes land at every
    # point of the definition's end.
    for extra <- 0..39 do
      name = :"e#{extra}"
      test = self()

      writer =
        Task.async(fn ->
          send(test, :writing)

          Enum.reduce_while(Stream.iterate(1, &(&1 + 1)), extra, fn k, left ->
            :ok = SessionStore.update_variable(sid, :x5, extra * 100_000 + k)

            cond do
              left == 0 -> {:halt, :done}
              match?({:ok, _}, SessionStore.get_variable(sid, name)) -> {:cont, left - 1}
              true -> {:cont, left}
            end
          end)
        end)

      assert_receive :writing
      {:ok, _} = DependencyManager.defderived(sid, name, :integer, [:x5], &(&1.x5 + 1))
      :done = Task.await(writer)
      :ok = DependencyManager.await_propagation(sid)

      assert SessionStore.get_variable_value(sid, name) ==
               SessionStore.get_variable_value(sid, :x5) + 1,
             "#{extra} writes after the registration"
    end
  end
end
