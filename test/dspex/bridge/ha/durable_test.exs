defmodule DSPex.Bridge.HA.DurableTest do
  # `replicas: 1`: a durable session on one node. A `:peer` node writes,
  # is killed with kill -9, is restarted on the same ra data directory, and
  # every acknowledged write is back.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.SessionStore
  alias DSPex.Test.HACluster, as: C

  @moduletag :ha
  @moduletag timeout: 60_000

  setup_all do
    if DSPex.Bridge.Backend.Raft.System.available?() do
      :ok = C.ensure_epmd()
    else
      {:skip, "ra is not on the code path (scripts/setup.sh fetches it into .cache/ra)"}
    end
  end

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex_ha_#{System.unique_integer([:positive])}")
    name = :"ha_durable_#{System.unique_integer([:positive])}"
    on_exit(fn -> File.rm_rf(dir) end)
    %{dir: dir, name: name}
  end

  test "acknowledged writes survive kill -9 of the node and a restart", %{dir: dir, name: name} do
    peer = C.start_peer(name, dir)
    on_exit(fn -> C.stop([peer]) end)
    sid = "durable-#{System.unique_integer([:positive])}"

    assert {:ok, ^sid} =
             C.call(peer, SessionStore, :create_session, [sid, [replicas: 1, max_history: 500]])

    assert C.call(peer, SessionStore, :backend, [sid]) == {:ok, :raft}
    # What is durable here is written through a WAL opened with O_SYNC (the default).
    assert %{wal_write_strategy: :o_sync} = C.call(peer, :ra_system, :fetch, [:dspex])
    assert {:ok, _} = C.call(peer, SessionStore, :register_variable, [sid, :x, :integer, 0])

    acked =
      for v <- 1..50 do
        assert :ok = C.call(peer, SessionStore, :update_variable, [sid, :x, v])
        v
      end

    assert 50 = C.call(peer, SessionStore, :get_variable_value, [sid, :x])
    C.kill9(peer)
    C.stop([peer])

    peer = C.start_peer(name, dir)
    on_exit(fn -> C.stop([peer]) end)

    # The member is restarted at boot and registers its session once it
    # has re-elected itself from its log.
    assert :ok = await(fn -> C.call(peer, SessionStore, :backend, [sid]) == {:ok, :raft} end)
    assert 50 = C.call(peer, SessionStore, :get_variable_value, [sid, :x])

    assert {:ok, entries} = C.call(peer, SessionStore, :get_variable_history, [sid, :x, 1_000])

    values = MapSet.new(Enum.map(entries, & &1.value))
    assert Enum.reject(acked -- [50], &MapSet.member?(values, &1)) == []

    # And it still takes writes, stamped after the restart.
    assert :ok = C.call(peer, SessionStore, :update_variable, [sid, :x, 51])
    assert 51 = C.call(peer, SessionStore, :get_variable_value, [sid, :x])
  end

  defp await(check, tries \\ 200) do
    cond do
      check.() -> :ok
      tries == 0 -> :timeout
      true -> Process.sleep(50) && await(check, tries - 1)
    end
  end
end
