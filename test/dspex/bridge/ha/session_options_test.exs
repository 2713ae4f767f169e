defmodule DSPex.Bridge.HA.SessionOptionsTest do
  # Replicated sessions and the SessionStore options that concern them:
  # per-call `consistency:` on reads, `ttl:` (the expiry is a command the
  # leader appends) and `import_session(snapshot, replicas: n)`. On this VM
  # first (`replicas: 1`), then on three peers.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.SessionStore
  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Test.HACluster, as: C
  alias DSPex.TelemetryHelper

  @moduletag :ha
  @expired [:dspex, :bridge, :session, :expired]

  setup do
    sid = "ha-opts-#{System.unique_integer([:positive])}"
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid}
  end

  describe "consistency: per call" do
    test "reads take it; a bad value is an invalid argument", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 3)

      for c <- [:consistent, :leader, :local] do
        assert 3 = SessionStore.get_variable_value(sid, :x, nil, consistency: c)
        assert {:ok, %{value: 3}} = SessionStore.get_variable(sid, :x, consistency: c)
        assert {:ok, true} = SessionStore.variable_exists?(sid, :x, consistency: c)
        assert {:ok, [%{name: :x}]} = SessionStore.list_variables(sid, consistency: c)
        assert {:ok, []} = SessionStore.get_variable_history(sid, :x, 10, consistency: c)

        assert {:ok, %{found: %{x: %{value: 3}}, missing: [:y]}} =
                 SessionStore.get_variables(sid, [:x, :y], consistency: c)
      end

      assert {:error, {:invalid_argument, {:consistency, :eventual}}} =
               SessionStore.get_variable(sid, :x, consistency: :eventual)

      # Writes have no consistency to choose: they always go through the log.
      assert {:error, {:invalid_argument, {:unknown_options, [:consistency]}}} =
               SessionStore.update_variable(sid, :x, 4, %{}, consistency: :local)
    end

    test "a session that is not replicated has one copy, read as usual", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 3)
      assert {:ok, %{value: 3}} = SessionStore.get_variable(sid, :x, consistency: :local)
    end
  end

  describe "ttl:" do
    test "an idle replicated session expires by a command in its log", %{sid: sid} do
      ref = TelemetryHelper.attach([@expired])
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1, ttl: 200)
      assert {:ok, %{ttl: 200}} = SessionStore.get_session(sid)
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 3)

      assert_receive {@expired, ^ref, _, %{session_id: ^sid}}, 10_000
      assert {:error, :session_not_found} = SessionStore.backend(sid)
      assert {:error, :session_not_found} = SessionStore.get_variable(sid, :x)
      refute sid in SessionStore.list_sessions()
      # The id is free again.
      assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      refute_received {@expired, ^ref, _, _}
    end

    test "a bad ttl is refused", %{sid: sid} do
      assert {:error, {:invalid_argument, _}} =
               SessionStore.create_session(sid, replicas: 1, ttl: -5)

      assert {:error, :session_not_found} = SessionStore.backend(sid)
    end
  end

  describe "import_session/2 with replicas:" do
    test "a snapshot becomes a replicated session, ttl and rate limit carried over",
         %{sid: sid} do
      source = sid <> "-src"
      on_exit(fn -> SessionStore.delete_session(source) end)
      assert {:ok, ^source} = SessionStore.create_session(source, ttl: 60_000)
      assert {:ok, _} = SessionStore.register_variable(source, :x, :integer, 1)
      assert :ok = SessionStore.update_variable(source, :x, 2)
      assert {:ok, _} = SessionStore.register_variable(source, :s, :string, "a")
      assert {:ok, snapshot} = SessionStore.export_session(source)

      assert {:ok, ^sid} = SessionStore.import_session(snapshot, session_id: sid, replicas: 1)
      assert {:ok, :raft} = SessionStore.backend(sid)
      assert 2 = SessionStore.get_variable_value(sid, :x)
      assert {:ok, [%{version: 0, value: 1}]} = SessionStore.get_variable_history(sid, :x)
      assert {:ok, %{ttl: 60_000, variable_count: 2}} = SessionStore.get_session(sid)
      # Writes go through the log as in any replicated session.
      assert :ok = SessionStore.update_variable(sid, :x, 3)
      assert 3 = SessionStore.get_variable_value(sid, :x, nil, consistency: :local)

      assert {:error, :already_exists} =
               SessionStore.import_session(snapshot, session_id: sid, replicas: 1)

      assert {:error, :already_exists} =
               SessionStore.import_session(snapshot, session_id: source, replicas: 1)
    end

    test "the snapshot's own id, and garbage refused", %{sid: sid} do
      assert {:ok, ^sid} = SessionStore.create_session(sid, rate_limit: {1_000, 10})
      assert {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
      assert {:ok, snapshot} = SessionStore.export_session(sid)
      assert :ok = SessionStore.delete_session(sid)

      assert {:ok, ^sid} = SessionStore.import_session(snapshot, replicas: 1)

      assert {:ok, %{rate_limit: %{ops_per_sec: 1_000, burst: 10}}} =
               SessionStore.get_session(sid)

      assert 1 = SessionStore.get_variable_value(sid, :x)

      other = sid <> "-bad"

      assert {:error, {:invalid_snapshot, _}} =
               SessionStore.import_session("garbage", session_id: other, replicas: 1)

      assert {:error, {:invalid_snapshot, _}} =
               SessionStore.import_session(
                 binary_part(snapshot, 0, div(byte_size(snapshot), 2)),
                 session_id: other,
                 replicas: 1
               )

      assert {:error, {:invalid_argument, :bad_session_id}} =
               SessionStore.import_session(snapshot, session_id: 123, replicas: 1)

      assert {:error, {:invalid_argument, :bad_session_id}} =
               SessionStore.import_session(snapshot, session_id: <<255>>, replicas: 1)

      assert {:error, :session_not_found} = SessionStore.backend(other)
    end
  end

  describe "on three nodes" do
    @describetag timeout: 120_000

    setup do
      :ok = C.ensure_epmd()
      dir = Path.join(System.tmp_dir!(), "dspex_ha_opts_#{System.unique_integer([:positive])}")
      id = System.unique_integer([:positive])
      peers = C.start(for(x <- ~w(a b c), do: :"ho#{id}#{x}"), dir)
      on_exit(fn -> C.stop(peers) && File.rm_rf(dir) end)
      %{peers: peers}
    end

    test "a :local read is served by a cut-off follower's own copy; a default read is not",
         %{peers: [a | _] = peers} do
      sid = "hoc"
      assert {:ok, ^sid} = C.call(a, SessionStore, :create_session, [sid, [replicas: 3]])
      assert {:ok, _} = C.call(a, SessionStore, :register_variable, [sid, :x, :integer, 1])
      {:ok, leader} = C.call(a, Raft, :leader_node, [sid])
      [follower | _] = others = Enum.reject(peers, &(&1.node == leader))
      # Every member has x = 1 before the cut.
      assert :ok = C.call(hd(others), SessionStore, :update_variable, [sid, :x, 2])
      C.check_store!([{:x, [{2, :ok, nil}]}], peers, sid)

      C.partition(follower, peers -- [follower])
      [m | _] = peers -- [follower]
      assert :ok = C.call(m, SessionStore, :update_variable, [sid, :x, 3], 30_000)

      # The follower answers from its own copy (stale), the majority has 3.
      assert 2 =
               C.call(follower, SessionStore, :get_variable_value, [
                 sid,
                 :x,
                 nil,
                 [consistency: :local]
               ])

      assert 3 =
               C.call(m, SessionStore, :get_variable_value, [sid, :x, nil, [consistency: :leader]])

      # Without :local the follower must reach a leader, and cannot.
      assert {:error, reason} = C.call(follower, SessionStore, :get_variable, [sid, :x], 30_000)
      assert reason in [:timeout, :unavailable]
      C.heal(follower, peers -- [follower])
    end

    test "ttl: every member agrees on the expiry, reported once", %{peers: [a | _] = peers} do
      sid = "hot"
      collectors = Map.new(peers, &{&1.node, C.call(&1, C, :collect, [[@expired]])})

      assert {:ok, ^sid} =
               C.call(a, SessionStore, :create_session, [sid, [replicas: 3, ttl: 1_000]])

      assert {:ok, _} = C.call(a, SessionStore, :register_variable, [sid, :x, :integer, 1])
      {:ok, leader} = C.call(a, Raft, :leader_node, [sid])
      lp = Enum.find(peers, &(&1.node == leader))

      assert {@expired, _, %{session_id: ^sid}} =
               C.call(lp, C, :await_event, [collectors[leader], @expired, 20_000], 30_000)

      for p <- peers do
        assert {:error, :session_not_found} = C.call(p, SessionStore, :backend, [sid])
        assert {:error, :session_not_found} = C.call(p, SessionStore, :get_variable, [sid, :x])
      end

      # The other nodes did not report it.
      for p <- peers, p.node != leader do
        assert :timeout = C.call(p, C, :await_event, [collectors[p.node], @expired, 0])
      end
    end

    test "import_session(snapshot, replicas: 3) makes a group on three nodes",
         %{peers: [a | _] = peers} do
      assert {:ok, "src"} = C.call(a, SessionStore, :create_session, ["src"])
      assert {:ok, _} = C.call(a, SessionStore, :register_variable, ["src", :x, :integer, 7])
      assert {:ok, snapshot} = C.call(a, SessionStore, :export_session, ["src"])

      assert {:ok, "imp"} =
               C.call(a, SessionStore, :import_session, [
                 snapshot,
                 [session_id: "imp", replicas: 3]
               ])

      assert {:ok, %{members: members}} = C.call(a, Raft, :members, ["imp"])
      assert length(members) == 3
      C.check_store!([{:x, [{7, :ok, nil}]}], peers, "imp")
    end
  end
end
