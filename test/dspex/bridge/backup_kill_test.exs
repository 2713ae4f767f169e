defmodule DSPex.Bridge.BackupKillTest do
  @moduledoc """
  Backups survive a `kill -9` of the VM taking them: a real BEAM OS process
  (a `:peer`) backs up a session every 30 ms while a writer rewrites every
  variable; it is killed with SIGKILL in the middle of that, and the newest
  backup it left is restored here, in the test's VM. And durable
  (replicated) sessions are backed up too.
  """
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{Backup, SessionStore}
  alias DSPex.Bridge.Backup.Archive
  alias DSPex.Test.OpsPeer

  @moduletag timeout: 180_000
  @vars 200
  @max_history 50

  setup do
    root = Path.join(System.tmp_dir!(), "dspex-backup-kill-#{System.unique_integer([:positive])}")
    dir = Path.join(root, "backups")
    on_exit(fn -> File.rm_rf(root) end)
    %{dir: dir, ra_dir: Path.join(root, "ra")}
  end

  test "after kill -9, the newest backup restores every variable it held", ctx do
    sid = "bk-kill-#{System.unique_integer([:positive])}"
    peer = OpsPeer.start()
    on_exit(fn -> OpsPeer.stop(peer) end)

    :ok =
      OpsPeer.boot(
        peer,
        [backup: [dir: ctx.dir, interval: 30, sessions: [sid], keep: 5]],
        ctx.ra_dir
      )

    :ok = OpsPeer.call(peer, OpsPeer, :prepare, [sid, @vars])

    # Round 5 written, then eight snapshots taken after it: the newest file
    # on disk is at least as new as the eighth, so it holds round >= 5.
    {:ok, %{last_path: reported, round: round}} =
      OpsPeer.call(peer, OpsPeer, :await, [5, 8, 60_000], 70_000)

    :ok = OpsPeer.kill9(peer)
    assert round >= 5

    # Every file left under a backup's name is whole (temporary files a
    # write cut short are not listed), the last one reported among them;
    # `keep: 5` held (a kill between a rename and its pruning leaves one
    # more, which the next snapshot prunes).
    {:ok, entries} = Backup.list(ctx.dir)
    assert length(entries) in 5..6
    assert Enum.all?(entries, &(&1.session_id == sid and &1.error == nil))
    for e <- entries, do: assert({:ok, _, _} = Archive.read(e.path))
    assert Enum.any?(entries, &(&1.path == reported))

    as = "#{sid}-restored"
    on_exit(fn -> SessionStore.delete_session(as) end)
    assert {:ok, ^as} = Backup.restore(ctx.dir, session_id: sid, as: as)
    newest = hd(entries).path
    values = check_every_variable(as, 5)

    # The file restored is the newest, and the last reported is as good.
    {:ok, _header, payload} = Archive.read(newest)
    {:ok, from_newest} = SessionStore.import_session(payload, session_id: as <> "-newest")
    on_exit(fn -> SessionStore.delete_session(from_newest) end)
    assert check_every_variable(from_newest, 5) == values

    as2 = "#{sid}-reported"
    on_exit(fn -> SessionStore.delete_session(as2) end)
    assert {:ok, ^as2} = Backup.restore(reported, as: as2)
    check_every_variable(as2, 5)
  end

  describe "durable sessions" do
    @describetag :ha
    test "a replicas: 1 session is backed up by its leader and restored in memory", ctx do
      sid = "bk-durable-#{System.unique_integer([:positive])}"
      {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
      on_exit(fn -> SessionStore.delete_session(sid) end)
      {:ok, _} = SessionStore.register_variable(sid, :t, :float, 0.5)
      :ok = SessionStore.update_variable(sid, :t, 0.9)

      # Picked by a selector: this node leads its group.
      assert {:ok, %{^sid => {:ok, %{path: path}}}} = Backup.snapshot_now([sid], dir: ctx.dir)

      as = sid <> "-copy"
      on_exit(fn -> SessionStore.delete_session(as) end)
      assert {:ok, ^as} = Backup.restore(path, as: as)
      assert {:ok, :nif} = SessionStore.backend(as)
      assert {:ok, %{value: 0.9, version: 1}} = SessionStore.get_variable(as, :t)
    end
  end

  # Each variable v1..vN is there, its value is its version (the writer's
  # round), at least `min_round`, with a full, gap-free history. (A
  # snapshot copies variable by variable, so variables may show different
  # rounds.) Returns the values.
  defp check_every_variable(sid, min_round) do
    {:ok, vars} = SessionStore.list_variables(sid)
    assert length(vars) == @vars

    values =
      for i <- 1..@vars do
        name = "v#{i}"
        assert {:ok, %{value: value, version: version}} = SessionStore.get_variable(sid, name)
        assert value == version, "#{name}: value #{value}, version #{version}"
        assert value >= min_round

        {:ok, history} = SessionStore.get_variable_history(sid, name, @max_history)
        expected = (value - 1)..max(value - @max_history, 0)//-1 |> Enum.to_list()
        assert Enum.map(history, & &1.version) == expected
        assert Enum.map(history, & &1.value) == expected
        value
      end

    values
  end
end
