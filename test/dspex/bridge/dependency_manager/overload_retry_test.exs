defmodule DSPex.Bridge.DependencyManager.OverloadRetryTest do
  # Recomputations the backend refuses with `:overloaded` for longer than the
  # worker's patience are retried until it admits them again: derived values
  # converge. The refusals are real: a `replicas: 1` session whose Raft member
  # is suspended while other writers hold every place of `raft_max_in_flight`
  # (as in DSPex.Bridge.HA.RaftOverloadTest), or the shared port program
  # stopped while requests hold every place of its pipe (as in
  # DSPex.Bridge.Backend.PortOverloadTest). Changes the application env and
  # stops the port program: not async.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.{Port, Raft}
  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.Bridge.State.Bridged
  alias DSPex.TelemetryHelper

  @places 3
  @derived 6

  setup do
    config = Application.fetch_env(:dspex_bridge, DependencyManager)

    # A short patience: the refusals outlast it many times over.
    Application.put_env(
      :dspex_bridge,
      DependencyManager,
      Keyword.put(
        Application.get_env(:dspex_bridge, DependencyManager, []),
        :overload_patience,
        50
      )
    )

    on_exit(fn -> restore_env(DependencyManager, config) end)
  end

  describe "a replicated session (Raft, raft_max_in_flight)" do
    @describetag :ha

    setup do
      unless Raft.System.available?(), do: flunk("ra is not on the code path")
      sid = "overload-retry-#{System.unique_integer([:positive])}"
      {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      max = Application.fetch_env(:dspex_bridge, :raft_max_in_flight)
      timeout = Application.fetch_env(:dspex_bridge, :raft_timeout)
      Application.put_env(:dspex_bridge, :raft_max_in_flight, @places)
      Application.put_env(:dspex_bridge, :raft_timeout, 60_000)
      {:ok, [{name, _node}]} = Raft.known_members(sid)
      member = Process.whereis(name)
      :ok = DSPex.Test.RaftGate.await_idle()

      on_exit(fn ->
        if Process.alive?(member), do: :sys.resume(member)
        restore_env(:raft_max_in_flight, max)
        restore_env(:raft_timeout, timeout)
        SessionStore.delete_session(sid)
      end)

      # The member stops: @places writers take every place and wait there.
      %{sid: sid, stop: fn -> :sys.suspend(member) end, resume: fn -> :sys.resume(member) end}
    end

    test "recomputations refused past the patience converge once the node admits again", ctx do
      converges(ctx)
    end
  end

  describe "a :port session (port max_in_flight)" do
    setup do
      # Without the breaker: the admitted calls' timeouts would open it, and
      # its refusals are not the admission's.
      :ok = Bridged.uninstall(:port)
      port = Application.fetch_env(:dspex_bridge, :port)
      timeout = Application.fetch_env(:dspex_bridge, :port_timeout)
      Application.put_env(:dspex_bridge, :port_timeout, 60_000)

      Application.put_env(
        :dspex_bridge,
        :port,
        Keyword.put(Application.get_env(:dspex_bridge, :port, []), :max_in_flight, @places)
      )

      sid = "overload-retry-port-#{System.unique_integer([:positive])}"
      {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
      os_pid = Port.os_pid()
      true = is_integer(os_pid)
      signal = &System.cmd("kill", [&1, Integer.to_string(os_pid)], stderr_to_stdout: true)

      on_exit(fn ->
        signal.("-CONT")
        restore_env(:port, port)
        restore_env(:port_timeout, timeout)
        :ok = Bridged.install(:port)
        SessionStore.delete_session(sid)
      end)

      # The program stops: @places requests take every place of its pipe.
      %{sid: sid, stop: fn -> {_, 0} = signal.("-STOP") end, resume: fn -> signal.("-CONT") end}
    end

    test "recomputations refused past the patience converge once the program admits again",
         ctx do
      converges(ctx)
    end
  end

  # @derived variables of `x`, one of two of them and one of `y`; a write to
  # `x`, and one to `y` while its pass runs, then
  # every place taken while its pass runs, so the pass's reads and writes are
  # refused; then the places come back, and every value must end f(inputs).
  defp converges(%{sid: sid, stop: stop, resume: resume}) do
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    {:ok, _} = SessionStore.register_variable(sid, :y, :integer, 1)
    {:ok, _} = SessionStore.register_variable(sid, :filler, :integer, 0)
    test = self()
    # The first recomputation after `hold` is armed waits until the test
    # has taken every place.
    hold = :atomics.new(1, [])

    gate = fn ->
      if :atomics.compare_exchange(hold, 1, 1, 0) == :ok do
        send(test, {:computing, self()})
        receive do: (:go -> :ok)
      end
    end

    for i <- 1..@derived do
      {:ok, _} =
        DependencyManager.defderived(
          sid,
          :"d#{i}",
          :integer,
          [:x],
          fn %{x: x} ->
            gate.()
            x * i
          end,
          compute_timeout: 60_000
        )
    end

    # Downstream of refused ones: recomputed once its inputs are.
    {:ok, _} = DependencyManager.defderived(sid, :sum, :integer, [:d1, :d2], &(&1.d1 + &1.d2))
    assert SessionStore.get_variable_value(sid, :sum) == 3
    {:ok, _} = DependencyManager.defderived(sid, :y1, :integer, [:y], &(&1.y + 1))

    events = TelemetryHelper.attach([[:dspex, :bridge, :propagation, :failed]])
    :atomics.put(hold, 1, 1)
    :ok = SessionStore.update_variable(sid, :x, 7)
    assert_receive {:computing, computing}, 10_000
    # Accepted while the pass runs: the next pass begins with the engine's
    # update order for `y`, which is refused too.
    :ok = SessionStore.update_variable(sid, :y, 5)

    # @places writers are admitted and wait, the others are refused at once.
    stop.()

    tasks =
      for i <- 1..(@places + 4),
          do: Task.async(fn -> SessionStore.update_variable(sid, :filler, i) end)

    refused =
      for _ <- 1..4, do: receive(do: ({ref, result} when is_reference(ref) -> {ref, result}))

    assert Enum.all?(refused, &match?({_, {:error, :overloaded}}, &1))
    refused_refs = Enum.map(refused, &elem(&1, 0))
    for t <- tasks, t.ref in refused_refs, do: Process.demonitor(t.ref, [:flush])
    admitted = Enum.reject(tasks, &(&1.ref in refused_refs))

    send(computing, :go)

    # Every recomputation of the pass is refused past the patience: each
    # variable's refusal is reported once, its old value left in place.
    names = for i <- 1..@derived, do: :"d#{i}"

    failures =
      for _ <- names do
        assert_receive {[:dspex, :bridge, :propagation, :failed], ^events, _, meta}, 30_000
        assert meta.reason in [{:write_rejected, :overloaded}, {:read_rejected, :overloaded}]
        meta.variable
      end

    assert Enum.sort(failures) == Enum.sort(names)

    # Refusals go on for a while (retries are refused, not reported again),
    # then the backend admits again.
    refute_receive {[:dspex, :bridge, :propagation, :failed], ^events, _, _}, 500
    resume.()
    assert Enum.uniq(Task.await_many(admitted, 60_000)) == [:ok]

    # Every derived value ends equal to f(inputs), with no further write.
    expected = Map.new(1..@derived, fn i -> {:"d#{i}", 7 * i} end) |> Map.merge(%{sum: 21, y1: 6})

    poll_until(30_000, fn ->
      Enum.all?(expected, fn {name, value} ->
        SessionStore.get_variable_value(sid, name) == value
      end)
    end)

    for name <- Map.keys(expected),
        do: assert({:ok, %{status: :fresh}} = DependencyManager.derived_status(sid, name))

    # Recomputed by themselves: their refusals' dead letters are gone.
    assert {:ok, []} = DependencyManager.dead_letters(sid)
  end

  # Polls `fun` until it is true; flunks after `ms` (a deadline, not a timing).
  defp poll_until(ms, fun) do
    deadline = System.monotonic_time(:millisecond) + ms
    do_poll(deadline, fun)
  end

  defp do_poll(deadline, fun) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        flunk("not true before the deadline")

      true ->
        Process.sleep(20)
        do_poll(deadline, fun)
    end
  end

  defp restore_env(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore_env(key, :error), do: Application.delete_env(:dspex_bridge, key)
end
