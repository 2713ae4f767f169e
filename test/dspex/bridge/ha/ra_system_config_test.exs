defmodule DSPex.Bridge.HA.RaSystemConfigTest do
  # `config :dspex_bridge, ra_system: ...` is checked before ra sees it: a
  # bad setting leaves replicated sessions unavailable on that node, with
  # an error naming it, and the application (and its other sessions) up.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Backend.Raft.System, as: RaftSystem
  alias DSPex.Test.OpsPeer

  describe "ra_settings/1" do
    test "ra's settings pass, as a map or a keyword list" do
      assert {:ok, %{}} = RaftSystem.ra_settings(%{})

      assert {:ok, %{wal_write_strategy: :default, wal_max_batch_size: 4096}} =
               RaftSystem.ra_settings(wal_write_strategy: :default, wal_max_batch_size: 4096)

      assert {:ok, %{wal_max_entries: :undefined, wal_pre_allocate: true}} =
               RaftSystem.ra_settings(%{wal_max_entries: :undefined, wal_pre_allocate: true})
    end

    test "a bad shape, key or value is an error naming it" do
      for {settings, says} <- [
            {"o_sync", "not a map or keyword list"},
            {[:o_sync], "not a {setting, value} pair"},
            {[{"wal_write_strategy", :o_sync}], "not a {setting, value} pair"},
            {%{wal_write_strategy: :bogus}, ":wal_write_strategy cannot be :bogus"},
            {%{wal_max_batch_size: 0}, ":wal_max_batch_size cannot be 0"},
            {%{wal_max_size_bytes: "1GB"}, ":wal_max_size_bytes cannot be \"1GB\""},
            {%{wal_garbage_collect: "yes"}, ":wal_garbage_collect cannot be \"yes\""},
            {%{wal_write_stratgey: :o_sync}, "unknown setting :wal_write_stratgey"},
            {%{data_dir: '/tmp/x'}, ":data_dir is set by dspex"}
          ] do
        assert {:error, {:bad_ra_system, why}} = RaftSystem.ra_settings(settings)
        assert why =~ says, "#{inspect(settings)}: #{why}"
      end
    end
  end

  test "a VM configured with a bad setting starts, without replicated sessions" do
    if RaftSystem.available?() do
      peer = OpsPeer.start()
      on_exit(fn -> OpsPeer.stop(peer) end)

      dir =
        Path.join(System.tmp_dir!(), "dspex-ra-bad-config-#{System.unique_integer([:positive])}")

      on_exit(fn -> File.rm_rf!(dir) end)

      :ok = OpsPeer.boot(peer, [ra_system: %{wal_write_strategy: :bogus}], dir)
      refute OpsPeer.call(peer, RaftSystem, :available?, [])

      assert {:error, :ra_unavailable} =
               OpsPeer.call(peer, DSPex.Bridge.SessionStore, :create_session, [
                 "bad-ra-config",
                 [replicas: 1]
               ])

      # Readiness says so: its durable sessions are not being served.
      assert {:error, %{raft: {:error, :ra_unavailable}, store: :ok}} =
               OpsPeer.call(peer, DSPex.Bridge.Health, :ready, [])

      # Its in-memory sessions work.
      assert {:ok, "plain"} =
               OpsPeer.call(peer, DSPex.Bridge.SessionStore, :create_session, ["plain", []])

      assert {:ok, _} =
               OpsPeer.call(peer, DSPex.Bridge.SessionStore, :register_variable, [
                 "plain",
                 :x,
                 :integer,
                 1
               ])
    end
  end
end
