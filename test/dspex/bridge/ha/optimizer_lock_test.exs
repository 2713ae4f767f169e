defmodule DSPex.Bridge.HA.OptimizerLockTest do
  # OptimizerCoordinator on a replicated session's variables, through the
  # public API: the lock is a command in the session's Raft log, its token
  # the grant's log index, and the variable's fence moves on every member.
  # On this VM (`replicas: 1`); the leader-failover scenario on three peers
  # is at the end.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{OptimizerCoordinator, SessionStore}
  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Test.HACluster, as: C
  alias DSPex.TelemetryHelper

  @moduletag :ha

  @acquired [:dspex, :optimization, :lock_acquired]
  @released [:dspex, :optimization, :lock_released]
  @expired [:dspex, :optimization, :lock_expired]
  @conflict [:dspex, :optimization, :lock_conflict]

  setup do
    sid = "ha-lock-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
    {:ok, _} = SessionStore.register_variable(sid, :t, :float, 0.5)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid}
  end

  test "a grant fences the variable's writes inside the state machine", %{sid: sid} do
    assert {:ok, %{optimizer_id: "opt-a", token: token}} =
             SessionStore.start_optimization(sid, :t, self(), optimizer_id: "opt-a")

    assert {:error, {:locked_by, "opt-a"}} = SessionStore.update_variable(sid, :t, 0.6)
    assert :ok = SessionStore.update_variable(sid, :t, 0.7, %{}, lock_token: token)
    assert :ok = SessionStore.update_variable(sid, :t, 0.8, %{}, optimizer_id: "opt-a")
    assert 0.8 = SessionStore.get_variable_value(sid, :t)

    assert {:error, {:already_optimizing, %{optimizer_id: "opt-a", token: ^token}}} =
             SessionStore.start_optimization(sid, :t, self(), optimizer_id: "opt-b")

    assert :ok = SessionStore.stop_optimization(sid, :t)
    assert {:error, :not_optimizing} = SessionStore.stop_optimization(sid, :t)
    assert :ok = SessionStore.update_variable(sid, :t, 0.9)
  end

  test "tokens are log indexes: they only increase, and an old one is stale", %{sid: sid} do
    opts = [session_id: sid]
    assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(:t, "opt-a", self(), opts)

    assert {:ok, %{token: t1, optimizer_id: "opt-a"}} =
             OptimizerCoordinator.get_lock_info(:t, opts)

    # Re-entrant: the holder keeps its token.
    assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(:t, "opt-a", self(), opts)
    assert {:ok, %{token: ^t1}} = OptimizerCoordinator.get_lock_info(:t, opts)
    assert {:ok, ^t1} = OptimizerCoordinator.renew_lock(:t, "opt-a", opts)
    assert :ok = OptimizerCoordinator.release_lock(:t, "opt-a", opts)
    assert {:error, :not_lock_owner} = OptimizerCoordinator.release_lock(:t, "opt-a", opts)

    assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(:t, "opt-b", self(), opts)
    assert {:ok, %{token: t2}} = OptimizerCoordinator.get_lock_info(:t, opts)
    assert t2 > t1
    assert {:ok, %{members: [_]}} = Raft.members(sid)

    assert {:error, :stale_lock_token} =
             SessionStore.update_variable(sid, :t, 0.1, %{}, lock_token: t1)

    assert :ok = SessionStore.update_variable(sid, :t, 0.2, %{}, lock_token: t2)
    assert :ok = OptimizerCoordinator.release_lock(:t, "opt-b", opts)
    # Released, the fence stays: the old token is still refused.
    assert {:error, :stale_lock_token} =
             SessionStore.update_variable(sid, :t, 0.3, %{}, lock_token: t1)
  end

  test "conflicts: abort answers, wait queues in the log, a waiter may time out",
       %{sid: sid} do
    ref = TelemetryHelper.attach([@acquired, @conflict])
    opts = [session_id: sid]
    assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(:t, "opt-a", self(), opts)
    assert_receive {@acquired, ^ref, _, %{optimizer_id: "opt-a", how: :immediate}}

    assert {:error, {:lock_held_by, "opt-a"}} =
             OptimizerCoordinator.acquire_lock(
               :t,
               "opt-b",
               self(),
               [conflict_resolution: :abort] ++ opts
             )

    assert_receive {@conflict, ^ref, _, %{optimizer_id: "opt-b", resolution: :abort}}

    assert {:error, :timeout} =
             OptimizerCoordinator.acquire_lock(:t, "opt-c", self(), [timeout: 50] ++ opts)

    parent = self()

    waiter =
      Task.async(fn ->
        send(parent, :waiting)
        # Held for the test process: the lock outlives this task.
        OptimizerCoordinator.acquire_lock(:t, "opt-d", parent, [timeout: 10_000] ++ opts)
      end)

    assert_receive :waiting
    assert_receive {@conflict, ^ref, _, %{optimizer_id: "opt-d", resolution: :wait}}, 5_000
    assert :ok = OptimizerCoordinator.release_lock(:t, "opt-a", opts)
    assert {:ok, :lock_acquired_after_wait} = Task.await(waiter, 10_000)
    assert_receive {@acquired, ^ref, _, %{optimizer_id: "opt-d", how: :after_wait}}
    # The timed-out waiter never got it.
    assert {:ok, %{optimizer_id: "opt-d"}} = OptimizerCoordinator.get_lock_info(:t, opts)
    refute_received {@acquired, ^ref, _, %{optimizer_id: "opt-c"}}
  end

  test "a lease runs out: the leader appends the expiry, telemetry fires once", %{sid: sid} do
    ref = TelemetryHelper.attach([@expired, @released])
    opts = [session_id: sid]

    assert {:ok, :lock_acquired} =
             OptimizerCoordinator.acquire_lock(:t, "opt-a", self(), [lease: 100] ++ opts)

    assert {:ok, %{token: token}} = OptimizerCoordinator.get_lock_info(:t, opts)
    assert_receive {@expired, ^ref, _, %{optimizer_id: "opt-a", token: ^token}}, 5_000
    assert_receive {@released, ^ref, _, %{optimizer_id: "opt-a", reason: :expired}}
    refute_received {@expired, ^ref, _, _}
    assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(:t, opts)
    assert :ok = SessionStore.update_variable(sid, :t, 0.1)
  end

  test "the holder's death releases the lock to the next waiter", %{sid: sid} do
    ref = TelemetryHelper.attach([@released, @conflict])
    opts = [session_id: sid]
    holder = spawn(fn -> receive do: (:stop -> :ok) end)
    assert {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(:t, "opt-a", holder, opts)
    me = self()
    waiter = Task.async(fn -> OptimizerCoordinator.acquire_lock(:t, "opt-b", me, opts) end)
    # Reported once the request is queued in the state machine.
    assert_receive {@conflict, ^ref, _, %{optimizer_id: "opt-b"}}, 5_000
    assert {:ok, %{waiters: 1}} = OptimizerCoordinator.get_lock_info(:t, opts)
    send(holder, :stop)
    assert {:ok, :lock_acquired_after_wait} = Task.await(waiter, 10_000)
    assert_receive {@released, ^ref, _, %{optimizer_id: "opt-a", reason: :owner_down}}, 5_000
    assert {:ok, %{optimizer_id: "opt-b"}} = OptimizerCoordinator.get_lock_info(:t, opts)
  end

  test "bad arguments are refused, the session untouched", %{sid: sid} do
    opts = [session_id: sid]

    assert {:error, {:invalid_argument, {:lease, -1}}} =
             OptimizerCoordinator.acquire_lock(:t, "opt-a", self(), [lease: -1] ++ opts)

    assert {:error, :not_found} = OptimizerCoordinator.acquire_lock(:nope, "opt-a", self(), opts)
    assert {:error, :not_locked} = OptimizerCoordinator.get_lock_info(:t, opts)
    assert :ok = SessionStore.update_variable(sid, :t, 0.4)
  end

  describe "on three nodes" do
    @describetag timeout: 120_000

    setup do
      :ok = C.ensure_epmd()
      dir = Path.join(System.tmp_dir!(), "dspex_ha_lock_#{System.unique_integer([:positive])}")
      id = System.unique_integer([:positive])
      peers = C.start(for(x <- ~w(a b c), do: :"hl#{id}#{x}"), dir)
      on_exit(fn -> C.stop(peers) && File.rm_rf(dir) end)
      %{peers: peers}
    end

    test "leader killed while a lock is held: the lock survives, tokens only increase, " <>
           "a stale holder's fenced write is refused",
         %{peers: [a | _] = peers} do
      sid = "hlk"
      lock = [session_id: sid]
      assert {:ok, ^sid} = C.call(a, SessionStore, :create_session, [sid, [replicas: 3]])
      assert {:ok, _} = C.call(a, SessionStore, :register_variable, [sid, :t, :integer, 0])
      {:ok, old} = C.call(a, Raft, :leader_node, [sid])
      {[dead], [p1, p2]} = Enum.split_with(peers, &(&1.node == old))

      # The holder lives on p1, so the kill does not end its lock.
      holder = C.call(p1, :erlang, :spawn, [:timer, :sleep, [:infinity]])

      assert {:ok, :lock_acquired} =
               C.call(p1, OptimizerCoordinator, :acquire_lock, [:t, "opt-1", holder, lock])

      assert {:ok, %{token: t1}} = C.call(p1, OptimizerCoordinator, :get_lock_info, [:t, lock])

      assert :ok = C.call(p1, SessionStore, :update_variable, [sid, :t, 1, %{}, [lock_token: t1]])

      C.kill9(dead)
      assert C.await_new_leader(p2, sid, old) in [p1.node, p2.node]

      # The new leader has the grant: the lock is still held with t1, and
      # a write without it is refused on the new leader.
      assert {:ok, %{token: ^t1, optimizer_id: "opt-1"}} =
               C.call(p2, OptimizerCoordinator, :get_lock_info, [:t, lock], 30_000)

      assert {:error, {:locked_by, "opt-1"}} =
               C.call(p2, SessionStore, :update_variable, [sid, :t, 2], 30_000)

      assert :ok = C.call(p1, OptimizerCoordinator, :release_lock, [:t, "opt-1", lock])
      holder2 = C.call(p2, :erlang, :spawn, [:timer, :sleep, [:infinity]])

      assert {:ok, :lock_acquired} =
               C.call(p2, OptimizerCoordinator, :acquire_lock, [:t, "opt-2", holder2, lock])

      assert {:ok, %{token: t2}} = C.call(p2, OptimizerCoordinator, :get_lock_info, [:t, lock])
      assert t2 > t1

      # The old holder's token is refused on every member (decided in the
      # state machine), the new one accepted.
      assert {:error, :stale_lock_token} =
               C.call(p1, SessionStore, :update_variable, [sid, :t, 3, %{}, [lock_token: t1]])

      assert :ok = C.call(p1, SessionStore, :update_variable, [sid, :t, 4, %{}, [lock_token: t2]])

      for p <- [p1, p2] do
        assert {:ok, 4} = C.call(p, Raft, :read, [sid, :var_get_value, [sid, :t, nil], :leader])
      end
    end

    test "a member rebuilt from a snapshot fences the locked variable as the others do",
         %{peers: [a | _] = peers} do
      sid = "hls"
      lock = [session_id: sid]
      # A snapshot every 5 entries: the member added below gets one.
      for p <- peers,
          do: C.call(p, Application, :put_env, [:dspex_bridge, :raft_snapshot_every, 5])

      assert {:ok, ^sid} = C.call(a, SessionStore, :create_session, [sid, [replicas: 2]])
      assert {:ok, _} = C.call(a, SessionStore, :register_variable, [sid, :t, :integer, 0])
      {:ok, %{members: members}} = C.call(a, Raft, :members, [sid])
      [target] = Enum.map(peers, & &1.node) -- Enum.map(members, &elem(&1, 1))
      [p1 | _] = Enum.filter(peers, &(&1.node != target))

      holder = C.call(p1, :erlang, :spawn, [:timer, :sleep, [:infinity]])

      assert {:ok, :lock_acquired} =
               C.call(p1, OptimizerCoordinator, :acquire_lock, [:t, "o1", holder, lock])

      assert {:ok, %{token: t1}} = C.call(p1, OptimizerCoordinator, :get_lock_info, [:t, lock])
      assert :ok = C.call(p1, OptimizerCoordinator, :release_lock, [:t, "o1", lock])

      assert {:ok, :lock_acquired} =
               C.call(p1, OptimizerCoordinator, :acquire_lock, [:t, "o2", holder, lock])

      assert {:ok, %{token: t2}} = C.call(p1, OptimizerCoordinator, :get_lock_info, [:t, lock])

      for v <- 1..12 do
        assert :ok =
                 C.call(p1, SessionStore, :update_variable, [sid, :t, v, %{}, [lock_token: t2]])
      end

      # The target joins from the snapshot and becomes the leader: its
      # engine copy, rebuilt from the export, has the fence back.
      assert :ok = C.call(a, DSPex.Bridge.HAManager, :migrate_session, [sid, target], 30_000)
      assert {:ok, ^target} = C.call(a, Raft, :leader_node, [sid])
      tp = Enum.find(peers, &(&1.node == target))

      assert {:error, {:locked_by, "o2"}} =
               C.call(tp, SessionStore, :update_variable, [sid, :t, -1])

      assert {:error, :stale_lock_token} =
               C.call(tp, SessionStore, :update_variable, [sid, :t, -2, %{}, [lock_token: t1]])

      assert :ok =
               C.call(tp, SessionStore, :update_variable, [sid, :t, 13, %{}, [lock_token: t2]])

      assert :ok = C.call(tp, OptimizerCoordinator, :release_lock, [:t, "o2", lock])
      # Released, an older token stays stale on the rebuilt member too.
      assert {:error, :stale_lock_token} =
               C.call(tp, SessionStore, :update_variable, [sid, :t, -3, %{}, [lock_token: t1]])

      assert {:ok, 13} = C.call(tp, Raft, :read, [sid, :var_get_value, [sid, :t, nil], :local])
    end
  end
end
