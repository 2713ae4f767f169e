defmodule DSPex.Bridge.HA.RaftFeaturesTest do
  # What a replicated session adds, on this VM alone (`replicas: 1`):
  # placement errors, read consistency, the deterministic rate limit, locks
  # with fencing tokens, health and metrics. Multi-node behaviour is in
  # fault_test.exs.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{HAManager, Health, SessionStore}
  alias DSPex.Bridge.Backend.Raft

  @moduletag :ha

  setup_all do
    if Raft.System.available?(),
      do: :ok,
      else: {:skip, "ra is not on the code path (run scripts/setup.sh)"}
  end

  setup do
    sid = "ha-feat-#{System.unique_integer([:positive])}"
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid}
  end

  describe "create_session/2 with replicas:" do
    test "the session is replicated, and the API is the same", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      assert DSPex.Bridge.Backend.Router.kind_of(sid) == :raft
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
      assert :ok = SessionStore.update_variable(sid, :x, 7)
      assert 7 = SessionStore.get_variable_value(sid, :x)
      assert {:ok, [%{value: 1}]} = SessionStore.get_variable_history(sid, :x)
      assert {:ok, %{members: [{_, n}], leader: {_, n}}} = Raft.members(sid)
      assert n == node()
      assert {:ok, ^n} = HAManager.get_session_owner(sid)
      assert sid in SessionStore.list_sessions()
    end

    test "reads with :local consistency", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1, consistency: :local)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 3)
      assert {:ok, 3} = Raft.read(sid, :var_get_value, [sid, :x, nil], :local)
    end

    test "bad options are refused", %{sid: sid} do
      assert {:error, {:invalid_argument, {:replicas, 0}}} =
               SessionStore.create_session(sid, replicas: 0)

      assert {:error, {:invalid_argument, {:consistency, :eventual}}} =
               SessionStore.create_session(sid, replicas: 1, consistency: :eventual)

      assert {:error, {:invalid_argument, {:rate_limit, :fast}}} =
               SessionStore.create_session(sid, replicas: 1, rate_limit: :fast)

      assert {:error, {:insufficient_nodes, 1, 3}} = SessionStore.create_session(sid, replicas: 3)
      assert DSPex.Bridge.Backend.Router.kind_of(sid) == nil
    end

    test "an id taken by another backend is refused", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid)
      assert {:error, :already_exists} = SessionStore.create_session(sid, replicas: 1)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    end

    test "the rate limit counts writes, decided in the state machine", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1, rate_limit: {1, 2})
      results = for v <- 1..5, do: SessionStore.register_variable(sid, :"v#{v}", :integer, v)
      assert {:error, :rate_limited} in results
    end
  end

  describe "locks with fencing tokens" do
    test "tokens increase, a stale token is fenced off", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 0)
      write = fn v -> ["#{sid}", :x, v, %{}, nil, nil] end

      assert {:ok, t1} = Raft.lock_acquire(sid, :opt, "a", nil)
      assert {:error, {:locked, "a"}} = Raft.lock_acquire(sid, :opt, "b", nil)
      assert {:ok, ^t1} = Raft.lock_acquire(sid, :opt, "a", nil)
      assert {:ok, _} = Raft.fenced(sid, :opt, t1, :var_set, write.(1))
      assert :ok = Raft.lock_release(sid, :opt, t1)
      assert {:ok, t2} = Raft.lock_acquire(sid, :opt, "b", nil)
      assert t2 > t1
      assert {:error, :stale_fencing_token} = Raft.fenced(sid, :opt, t1, :var_set, write.(2))
      assert 1 = SessionStore.get_variable_value(sid, :x)
    end

    test "a holder's death releases its lock", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      holder = spawn(fn -> receive do: (:stop -> :ok) end)
      ref = Process.monitor(holder)
      assert {:ok, _} = Raft.lock_acquire(sid, :opt, holder, nil)
      send(holder, :stop)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert await_lock_free(sid, 100)
    end
  end

  # The release is a command the leader appends after the monitor fires.
  defp await_lock_free(sid, 0), do: Raft.lock_acquire(sid, :opt, "c", nil) |> elem(0) == :ok

  defp await_lock_free(sid, n) do
    case Raft.lock_acquire(sid, :opt, "c", nil) do
      {:ok, _} -> true
      {:error, {:locked, _}} -> Process.sleep(20) && await_lock_free(sid, n - 1)
    end
  end

  test "a group still at machine version 0 (an old leader) answers the newer commands as " <>
         "version 0 did, so members running newer code do not diverge",
       %{sid: sid} do
    alias DSPex.Bridge.Backend.Raft.Machine
    state = Machine.init(%{sid: sid})
    v0 = %{index: 1, term: 1, machine_version: 0, system_time: 1}
    v1 = %{v0 | machine_version: 1}

    assert {_, {:error, :bad_command}, _} = Machine.apply(v0, {:batch, []}, state)
    assert {_, [], _} = Machine.apply(v1, {:batch, []}, state)

    lock = {:var_lock, 0, "v", %{holder: "a", pid: nil, lease_ms: nil, mode: :abort, ref: nil}}
    assert {_, {:error, :bad_command}, _} = Machine.apply(v0, lock, state)
    assert {_, {:ok, :granted, 1, true}, _} = Machine.apply(v1, lock, state)
    assert 1 == Machine.version()
  end

  test "health and metrics report replicated sessions", %{sid: sid} do
    assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
    assert {:ok, %{raft: :ok}} = Health.ready()
    text = IO.iodata_to_binary(HAManager.prometheus_text())
    assert text =~ ~r/dspex_raft_sessions [1-9]/
    assert text =~ "dspex_raft_leaderless 0"
  end

  test "migrate_session/2 of a session that is not replicated is :not_owner", %{sid: sid} do
    assert {:ok, ^sid} = SessionStore.create_session(sid)
    assert {:error, :not_owner} = HAManager.migrate_session(sid, node())
  end
end
