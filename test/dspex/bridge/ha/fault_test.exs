defmodule DSPex.Bridge.HA.FaultTest do
  # Fault injection on three real nodes (`:peer`, loopback): each client
  # records every operation and its outcome; `HACluster.check!/4` asserts
  # that every acknowledged write survives on every replica, that log
  # positions only increase and that no term had two writing leaders.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Bridge.HAManager
  alias DSPex.Test.HACluster, as: C

  @moduletag :ha
  @moduletag timeout: 120_000

  setup_all do
    if DSPex.Bridge.Backend.Raft.System.available?() do
      :ok = C.ensure_epmd()
      :ok
    else
      {:skip, "ra is not on the code path (run scripts/setup.sh)"}
    end
  end

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex_ha_#{System.unique_integer([:positive])}")
    id = System.unique_integer([:positive])
    names = for x <- ~w(a b c), do: :"ha#{id}#{x}"
    peers = C.start(names, dir)
    on_exit(fn -> C.stop(peers) && File.rm_rf(dir) end)
    %{peers: peers, dir: dir}
  end

  defp create!(peer, sid, replicas) do
    assert {:ok, ^sid} =
             C.call(peer, DSPex.Bridge.SessionStore, :create_session, [
               sid,
               [replicas: replicas, max_history: 1_000]
             ])

    assert {:ok, _} =
             C.call(peer, DSPex.Bridge.SessionStore, :register_variable, [sid, :x, :integer, 0])

    :ok
  end

  defp leader(peer, sid) do
    {:ok, node} = C.call(peer, HAManager, :get_session_owner, [sid])
    node
  end

  defp split(peers, node), do: Enum.split_with(peers, &(&1.node == node))

  # A restarted member tells the other nodes about its session once it
  # has recovered.
  defp await_members(peer, sid, tries) do
    case C.call(peer, Raft, :members, [sid]) do
      {:ok, _} = ok -> ok
      _ when tries > 0 -> Process.sleep(25) && await_members(peer, sid, tries - 1)
    end
  end

  test "leader killed by kill -9 mid-writes: no acknowledged write lost, tokens increase",
       %{peers: [a | _] = peers} do
    create!(a, "k9", 3)
    old = leader(a, "k9")
    {[dead], [p1, p2]} = split(peers, old)
    assert {:ok, t1} = C.call(p1, Raft, :lock_acquire, ["k9", :opt, "holder-1", nil])

    w = C.writer(p1, "k9", :x, 120)
    assert_receive {:acked, :x, 20}, 10_000
    C.kill9(dead)
    history = Task.await(w, 60_000)

    assert C.await_new_leader(p2, "k9", old) in [p1.node, p2.node]
    assert C.check!(history, [p1, p2], "k9", :x) > 20
    # The lock outlives the leader; a new grant gets a larger token and the
    # old token is fenced off inside the state machine.
    assert :ok = C.call(p2, Raft, :lock_release, ["k9", :opt, t1])
    assert {:ok, t2} = C.call(p2, Raft, :lock_acquire, ["k9", :opt, "holder-2", nil])
    assert t2 > t1

    assert {:error, :stale_fencing_token} =
             C.call(p1, Raft, :fenced, ["k9", :opt, t1, :var_set, ["k9", :x, -1, %{}, nil, nil]])

    assert {:ok, _} =
             C.call(p1, Raft, :fenced, ["k9", :opt, t2, :var_set, ["k9", :x, -2, %{}, nil, nil]])
  end

  test "leader partitioned from the majority: its writes are never acknowledged",
       %{peers: [a | _] = peers} do
    create!(a, "part", 3)

    assert {:ok, _} =
             C.call(a, DSPex.Bridge.SessionStore, :register_variable, ["part", :y, :integer, 0])

    old = leader(a, "part")
    {[cut], majority = [m1, _]} = split(peers, old)
    C.partition(cut, majority)

    minority = C.writer(cut, "part", :x, 5, 0)
    majority_writes = C.writer(m1, "part", :y, 20, 0)
    minority = Task.await(minority, 60_000)
    majority_writes = Task.await(majority_writes, 60_000)
    C.heal(cut, majority)

    # Every minority write timed out or failed: none was acknowledged.
    assert Enum.all?(minority, fn {_, outcome, _} -> outcome in [:info, :fail] end)
    # The majority elected a leader and acknowledged writes meanwhile.
    assert C.check!(majority_writes, peers, "part", :y) > 0
    assert C.check!(minority, peers, "part", :x) == 0
  end

  test "migration under writes", %{peers: [a | _] = peers} do
    create!(a, "mig", 2)

    {:ok, %{members: members}} = C.call(a, Raft, :members, ["mig"])
    member_nodes = Enum.map(members, &elem(&1, 1))
    [target] = Enum.map(peers, & &1.node) -- member_nodes
    old = leader(a, "mig")
    client = Enum.find(peers, &(&1.node != old))

    w = C.writer(client, "mig", :x, 100)
    assert_receive {:acked, :x, 10}, 10_000
    assert :ok = C.call(a, HAManager, :migrate_session, ["mig", target], 30_000)
    history = Task.await(w, 60_000)

    assert leader(a, "mig") == target
    {:ok, %{members: after_members}} = C.call(a, Raft, :members, ["mig"])
    refute old in Enum.map(after_members, &elem(&1, 1))
    live = Enum.filter(peers, &(&1.node in Enum.map(after_members, fn {_, n} -> n end)))
    # A write in flight across the leader transfer may time out (its outcome
    # unknown); none acknowledged is lost (check! raises on a loss).
    assert C.check!(history, live, "mig", :x) > 10
  end

  test "draining a node under writes moves its leaderships off", %{peers: [a | _] = peers} do
    create!(a, "drain", 3)
    old = leader(a, "drain")
    {[drained], [client, _]} = split(peers, old)

    w = C.writer(client, "drain", :x, 100)
    assert_receive {:acked, :x, 10}, 10_000
    assert :ok = C.call(drained, HAManager, :start_draining, [old])
    assert :ok = C.call(drained, HAManager, :await_drainage, [[timeout: 20_000]], 30_000)
    history = Task.await(w, 60_000)

    assert leader(a, "drain") != old
    assert %{draining: [^old]} = C.call(client, HAManager, :cluster_status, [])
    assert :ok = C.call(drained, HAManager, :stop_draining, [old])
    assert C.check!(history, peers, "drain", :x) > 10
  end

  test "a SIGSTOP'd leader is replaced, then catches up", %{peers: [a | _] = peers} do
    create!(a, "stop", 3)
    old = leader(a, "stop")
    {[stopped], [p1, p2]} = split(peers, old)

    w = C.writer(p1, "stop", :x, 120)
    assert_receive {:acked, :x, 10}, 10_000
    C.sigstop(stopped)
    assert C.await_new_leader(p2, "stop", old) != old
    history = Task.await(w, 60_000)
    C.sigcont(stopped)

    assert C.check!(history, peers, "stop", :x) > 10
  end

  test "the whole cluster killed and restarted from disk", %{peers: [a | _] = peers, dir: dir} do
    create!(a, "all", 3)
    create!(a, "solo", 1)
    history = C.writer(a, "all", :x, 50, 0) |> Task.await(60_000)
    solo = C.writer(a, "solo", :x, 20, 0) |> Task.await(60_000)

    Enum.each(peers, &C.kill9/1)
    restarted = Enum.map(peers, &C.start_peer(&1.name, dir))
    C.connect_all(restarted)
    on_exit(fn -> C.stop(restarted) end)

    assert C.check!(history, restarted, "all", :x) == 50
    {:ok, %{members: [{_, solo_node}]}} = await_members(hd(restarted), "solo", 200)
    solo_peer = Enum.find(restarted, &(&1.node == solo_node))
    assert C.check!(solo, [solo_peer], "solo", :x) == 20
  end

  describe "batched writes (SessionStore, group commit)" do
    defp index(peer, sid) do
      {:ok, _, %{index: i}} =
        C.call(peer, Raft, :write_with_position, [
          sid,
          :var_set,
          [sid, :__pos__, 0, %{}, nil, nil]
        ])

      i
    end

    test "16 concurrent writers: every acknowledged write on every replica, " <>
           "in fewer log entries than writes",
         %{peers: [a | _] = peers} do
      create!(a, "batch", 3)

      for i <- 1..16 do
        assert {:ok, _} =
                 C.call(a, DSPex.Bridge.SessionStore, :register_variable, [
                   "batch",
                   :"w#{i}",
                   :integer,
                   0
                 ])
      end

      before = index(a, "batch")
      histories = a |> C.store_writers("batch", 16, 40) |> Task.await_many(120_000)
      entries = index(a, "batch") - before - 1

      assert C.check_store!(histories, peers, "batch") == 16 * 40
      assert entries < 16 * 40
    end

    test "a partitioned leader acknowledges none of them", %{peers: [a | _] = peers} do
      create!(a, "bpart", 3)

      assert {:ok, _} =
               C.call(a, DSPex.Bridge.SessionStore, :register_variable, [
                 "bpart",
                 :w1,
                 :integer,
                 0
               ])

      old = leader(a, "bpart")
      {[cut], majority = [m1, _]} = split(peers, old)
      C.partition(cut, majority)

      minority = C.store_writers(cut, "bpart", 4, 3)
      majority_writes = C.store_writers(m1, "bpart", 1, 20)
      minority = Task.await_many(minority, 120_000)
      majority_writes = Task.await_many(majority_writes, 120_000)
      C.heal(cut, majority)

      for {_var, history} <- minority,
          do: assert(Enum.all?(history, fn {_, outcome, _} -> outcome in [:info, :fail] end))

      assert C.check_store!(majority_writes, peers, "bpart") > 0
    end
  end
end
