defmodule DSPex.Bridge.HA.RaftOverloadTest do
  # Admission to Raft calls: past `raft_max_in_flight` commands and queries
  # in flight on a node, a call is refused at once instead of queueing at
  # the leader. A `replicas: 1` session in this VM whose member is
  # suspended stands for a leader that cannot keep up.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Bridge.SessionStore

  @moduletag :ha

  @refused [:dspex, :bridge, :admission, :refused]

  setup_all do
    if Raft.System.available?(),
      do: :ok,
      else: {:skip, "ra is not on the code path (scripts/setup.sh fetches it into .cache/ra)"}
  end

  setup do
    sid = "raft-overload-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
    max = Application.fetch_env(:dspex_bridge, :raft_max_in_flight)
    timeout = Application.fetch_env(:dspex_bridge, :raft_timeout)
    Application.put_env(:dspex_bridge, :raft_max_in_flight, 3)
    Application.put_env(:dspex_bridge, :raft_timeout, 10_000)

    on_exit(fn ->
      restore_env(:raft_max_in_flight, max)
      restore_env(:raft_timeout, timeout)
      SessionStore.delete_session(sid)
    end)

    {:ok, [{name, _node}]} = Raft.known_members(sid)
    :ok = DSPex.Test.RaftGate.await_idle()
    %{sid: sid, member: Process.whereis(name)}
  end

  test "past raft_max_in_flight calls are refused with :overloaded; answered, places come back",
       %{sid: sid, member: member} do
    :ok = :sys.suspend(member)
    on_exit(fn -> if Process.alive?(member), do: :sys.resume(member) end)
    refusals = DSPex.TelemetryHelper.attach_with_emitter([@refused])

    tasks =
      Enum.map(1..10, fn i -> Task.async(fn -> SessionStore.update_variable(sid, :x, i) end) end)

    # Seven are refused at once; the three admitted wait for the member.
    refused =
      for _ <- 1..7, do: receive(do: ({ref, result} when is_reference(ref) -> {ref, result}))

    assert Enum.all?(refused, &match?({_, {:error, :overloaded}}, &1))
    refused_refs = Enum.map(refused, &elem(&1, 0))
    admitted = Enum.reject(tasks, &(&1.ref in refused_refs))
    # A read is refused too: it would wait at the same member.
    assert {:error, :overloaded} = SessionStore.get_variable(sid, :x)

    # One event per refusal (seven writes, one read), none for the admitted.
    events = DSPex.TelemetryHelper.emitted_by(refusals, [self() | Enum.map(tasks, & &1.pid)])
    assert length(events) == 8
    assert Enum.uniq(events) == [{%{count: 1}, %{path: :raft, limit: 3, session_id: sid}}]

    :ok = :sys.resume(member)
    assert Task.await_many(admitted, 15_000) == [:ok, :ok, :ok]
    for t <- tasks, t.ref in refused_refs, do: Process.demonitor(t.ref, [:flush])

    # A refused write was never sent: three writes happened, no more.
    assert {:ok, %{version: 3}} = SessionStore.get_variable(sid, :x)

    results =
      1..3
      |> Enum.map(fn _ -> Task.async(fn -> SessionStore.get_variable(sid, :x) end) end)
      |> Task.await_many(15_000)

    assert [{:ok, %{version: 3}}] = Enum.uniq(results)
  end

  test "a caller killed while admitted gives its place back", %{sid: sid, member: member} do
    :ok = :sys.suspend(member)
    on_exit(fn -> if Process.alive?(member), do: :sys.resume(member) end)

    # Three admitted callers wait at the suspended member; killed there,
    # they never reach their own release.
    test = self()

    waiting =
      for i <- 1..3,
          do: spawn(fn -> send(test, {:done, SessionStore.update_variable(sid, :x, i)}) end)

    refute_receive {:done, _}, 300
    assert {:error, :overloaded} = SessionStore.update_variable(sid, :x, 4)
    for pid <- waiting, do: Process.exit(pid, :kill)

    # Their places come back: a new caller is admitted (it waits at the
    # member instead of being refused at once).
    probe =
      Enum.find_value(1..100, fn _ ->
        task = Task.async(fn -> SessionStore.update_variable(sid, :x, 9) end)

        case Task.yield(task, 200) do
          nil -> task
          {:ok, {:error, :overloaded}} -> Process.sleep(50) && nil
        end
      end)

    assert probe, "the killed callers' places never came back"
    :ok = :sys.resume(member)
    assert Task.await(probe, 15_000) == :ok
  end

  defp restore_env(key, {:ok, value}), do: Application.put_env(:dspex_bridge, key, value)
  defp restore_env(key, :error), do: Application.delete_env(:dspex_bridge, key)
end
