defmodule DSPex.Bridge.HA.RaftPropagationRefusedTest do
  # A derived variable of a replicated session whose recomputation is
  # refused (`:overloaded`: the node's `raft_max_in_flight` is taken by a
  # call waiting at a suspended member of another session) past the
  # worker's patience is recomputed once the node admits again, with no
  # write to its inputs after the overload.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Bridge.{DependencyManager, SessionStore}

  @moduletag :ha

  setup_all do
    if Raft.System.available?(),
      do: :ok,
      else: {:skip, "ra is not on the code path (scripts/setup.sh fetches it into .cache/ra)"}
  end

  setup do
    n = System.unique_integer([:positive])
    sid = "raft-prop-refused-#{n}"
    blocker = "raft-prop-blocker-#{n}"
    {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
    {:ok, ^blocker} = SessionStore.create_session(blocker, replicas: 1)
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 1)
    {:ok, _} = SessionStore.register_variable(blocker, :y, :integer, 0)

    saved =
      for key <- [:raft_max_in_flight, :raft_timeout, DependencyManager],
          into: %{},
          do: {key, Application.fetch_env(:dspex_bridge, key)}

    on_exit(fn ->
      for {key, value} <- saved, do: restore_env(key, value)
      SessionStore.delete_session(sid)
      SessionStore.delete_session(blocker)
    end)

    {:ok, [{name, _node}]} = Raft.known_members(blocker)
    :ok = DSPex.Test.RaftGate.await_idle()
    %{sid: sid, blocker: blocker, member: Process.whereis(name)}
  end

  test "a recomputation refused past the patience converges once admitted, and is reported once",
       %{sid: sid, blocker: blocker, member: member} do
    test = self()
    hold = :ets.new(:hold, [:public])

    # While `hold` has :on, each computation waits for the test's :go.
    fun = fn %{a: a} ->
      if :ets.member(hold, :on) do
        send(test, {:computing, self()})
        receive(do: (:go -> :ok), after: (5_000 -> :ok))
      end

      a * 10
    end

    assert {:ok, _} = DependencyManager.defderived(sid, :d, :integer, [:a], fun)
    assert SessionStore.get_variable_value(sid, :d) == 10

    :telemetry.attach(
      "raft-prop-refused-#{sid}",
      [:dspex, :bridge, :propagation, :failed],
      fn _, _, meta, _ -> if meta.session_id == sid, do: send(test, {:failed, meta.reason}) end,
      nil
    )

    on_exit(fn -> :telemetry.detach("raft-prop-refused-#{sid}") end)

    :ets.insert(hold, {:on})
    :ok = SessionStore.update_variable(sid, :a, 7)
    assert_receive {:computing, computer}, 5_000

    # The node's one place is taken by a write waiting at the suspended
    # member of the other session: every call here is refused now.
    Application.put_env(:dspex_bridge, :raft_max_in_flight, 1)
    Application.put_env(:dspex_bridge, :raft_timeout, 20_000)
    Application.put_env(:dspex_bridge, DependencyManager, overload_patience: 30)
    :ok = :sys.suspend(member)
    on_exit(fn -> if Process.alive?(member), do: :sys.resume(member) end)
    waiting = Task.async(fn -> SessionStore.update_variable(blocker, :y, 1) end)
    # Admitted (a refusal would have answered at once): it waits.
    assert Task.yield(waiting, 300) == nil
    assert SessionStore.get_variable(sid, :a) == {:error, :overloaded}

    :ets.delete(hold, :on)
    send(computer, :go)

    # Refused past the patience: reported once, however many retries (the
    # dead letters are this VM's; the variable's status is behind the same
    # refusing node).
    assert_receive {:failed, {:write_rejected, :overloaded}}, 5_000

    Process.sleep(300)
    refute_received {:failed, _}

    assert {:ok, [%{variable: :d, reason: {:write_rejected, :overloaded}}]} =
             DependencyManager.dead_letters(sid)

    # Admitted again: no input is written, yet d catches up with a.
    :ok = :sys.resume(member)
    assert Task.await(waiting, 15_000) == :ok
    assert eventually(fn -> SessionStore.get_variable_value(sid, :d) == 70 end)
    assert {:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, :d)
    assert {:ok, []} = DependencyManager.dead_letters(sid)
    refute_received {:failed, _}
  end

  defp eventually(fun, deadline \\ 10_000) do
    cond do
      fun.() -> true
      deadline <= 0 -> false
      true -> Process.sleep(20) && eventually(fun, deadline - 20)
    end
  end

  defp restore_env(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore_env(key, :error), do: Application.delete_env(:dspex_bridge, key)
end
