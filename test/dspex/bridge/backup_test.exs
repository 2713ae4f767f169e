defmodule DSPex.Bridge.BackupTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{Backup, SessionStore}
  alias DSPex.TelemetryHelper

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex-backup-test-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf(dir) end)
    %{dir: dir}
  end

  defp sid(prefix), do: "#{prefix}-#{System.unique_integer([:positive])}"

  # A session with a float written three times (history), a string with
  # constraints, a dependency edge.
  defp session(prefix \\ "bk") do
    sid = sid(prefix)
    {:ok, ^sid} = SessionStore.create_session(sid, max_history: 10)
    {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.5)
    for v <- [0.6, 0.7, 0.8], do: :ok = SessionStore.update_variable(sid, :temperature, v)

    {:ok, _} =
      SessionStore.register_variable(sid, :mode, :string, "fast",
        constraints: %{enum: ["fast", "slow"]}
      )

    :ok = DSPex.Bridge.DependencyManager.add_dependency(sid, :temperature, :mode)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  defp restored(as) do
    on_exit(fn -> SessionStore.delete_session(as) end)
    as
  end

  defp files(dir),
    do: dir |> File.ls!() |> Enum.reject(&String.starts_with?(&1, ".")) |> Enum.sort()

  defp flip_byte(path, offset_from_end) do
    bytes = File.read!(path)
    at = byte_size(bytes) - offset_from_end
    <<head::binary-size(at), b, rest::binary>> = bytes
    File.write!(path, [head, <<Bitwise.bxor(b, 0x01)>>, rest])
  end

  describe "snapshot_now/2 and restore/2" do
    test "a restore brings back every variable, version, history entry and edge", %{dir: dir} do
      sid = session()
      {:ok, info} = Backup.snapshot_now(sid, dir: dir)
      assert %{session_id: ^sid, path: path, bytes: bytes, pruned: 0} = info
      assert File.stat!(path).size == bytes
      assert Path.dirname(path) == dir

      as = restored(sid("bk-copy"))
      assert {:ok, ^as} = Backup.restore(path, as: as)

      assert SessionStore.get_variable_value(as, :temperature) == 0.8
      assert {:ok, %{version: 3}} = SessionStore.get_variable(as, :temperature)
      {:ok, history} = SessionStore.get_variable_history(as, :temperature)
      assert Enum.map(history, & &1.value) == [0.7, 0.6, 0.5]
      assert SessionStore.get_variable_value(as, :mode) == "fast"
      assert {:error, {:constraint_violation, _}} = SessionStore.update_variable(as, :mode, "x")

      assert {:ok, [:temperature, :mode]} =
               DSPex.Bridge.DependencyManager.get_update_order(as, :temperature)
    end

    test "restores under the backup's own id once that is free", %{dir: dir} do
      sid = session()
      {:ok, %{path: path}} = Backup.snapshot_now(sid, dir: dir)
      assert {:error, :already_exists} = Backup.restore(path)
      :ok = SessionStore.delete_session(sid)
      assert {:ok, ^sid} = Backup.restore(path)
      assert SessionStore.get_variable_value(sid, :temperature) == 0.8
    end

    test "an unknown session is an error and writes nothing", %{dir: dir} do
      ref = TelemetryHelper.attach([[:dspex, :bridge, :backup, :snapshot_failed]])
      assert {:error, :session_not_found} = Backup.snapshot_now(sid("bk-none"), dir: dir)

      assert_receive {[:dspex, :bridge, :backup, :snapshot_failed], ^ref, _,
                      %{reason: :session_not_found}}

      assert files(dir) == []
    end

    test "bad options are errors", %{dir: dir} do
      sid = session()

      for opts <- [[keep: 0], [keep: :many], [dir: nil], [dir: ""], [bogus: 1], :not_a_list] do
        assert {:error, {:invalid_argument, _}} = Backup.snapshot_now(sid, opts)
      end

      assert {:error, {:invalid_argument, {:dir, nil}}} = Backup.snapshot_now(sid)
      assert {:error, {:invalid_argument, {:sessions, 42}}} = Backup.snapshot_now(42, dir: dir)
      assert {:error, {:invalid_argument, _}} = Backup.restore(dir, as: "")
      assert {:error, {:invalid_argument, _}} = Backup.restore(:not_a_path)
    end

    test "a directory that cannot be made is an error", %{dir: dir} do
      File.mkdir_p!(dir)
      blocker = Path.join(dir, "a-file")
      File.write!(blocker, "x")

      assert {:error, {:mkdir_failed, _, :enotdir}} =
               Backup.snapshot_now(session(), dir: Path.join(blocker, "sub"))
    end

    test "keep bounds the files per session, deleting the oldest", %{dir: dir} do
      sid = session()
      other = session("bk-other")
      {:ok, _} = Backup.snapshot_now(other, dir: dir, keep: 2)

      infos =
        for i <- 1..6 do
          :ok = SessionStore.update_variable(sid, :temperature, i * 1.0)
          {:ok, info} = Backup.snapshot_now(sid, dir: dir, keep: 3)
          info
        end

      assert Enum.map(infos, & &1.pruned) == [0, 0, 0, 1, 1, 1]
      {:ok, entries} = Backup.list(dir: dir, session_id: sid)

      assert Enum.map(entries, & &1.path) ==
               infos |> Enum.take(-3) |> Enum.map(& &1.path) |> Enum.reverse()

      # The other session's file is its own count.
      assert {:ok, [_]} = Backup.list(dir: dir, session_id: other)
      assert length(files(dir)) == 4

      # The newest is the last write.
      as = restored(sid("bk-keep"))
      {:ok, ^as} = Backup.restore(dir, session_id: sid, as: as)
      assert SessionStore.get_variable_value(as, :temperature) == 6.0
    end

    test "a selector snapshots the live sessions it picks", %{dir: dir} do
      tag = "bk-sel#{System.unique_integer([:positive])}"
      a = session(tag <> "-a")
      b = session(tag <> "-b")
      _c = session("bk-unpicked")

      assert {:ok, results} = Backup.snapshot_now({:glob, tag <> "-*"}, dir: dir)
      assert results |> Map.keys() |> Enum.sort() == Enum.sort([a, b])
      assert Enum.all?(Map.values(results), &match?({:ok, _}, &1))

      assert {:ok, %{^a => {:ok, _}}} = Backup.snapshot_now([a, "bk-missing"], dir: dir)
      assert {:ok, %{^b => {:ok, _}}} = Backup.snapshot_now(&(&1 == b), dir: dir)
    end

    test "emits :snapshot_taken and :restored", %{dir: dir} do
      ref =
        TelemetryHelper.attach([
          [:dspex, :bridge, :backup, :snapshot_taken],
          [:dspex, :bridge, :backup, :restored]
        ])

      sid = session()
      {:ok, %{path: path, bytes: bytes}} = Backup.snapshot_now(sid, dir: dir)

      assert_receive {[:dspex, :bridge, :backup, :snapshot_taken], ^ref, %{bytes: ^bytes},
                      %{session_id: ^sid, path: ^path}}

      as = restored(sid("bk-ev"))
      {:ok, ^as} = Backup.restore(path, as: as)

      assert_receive {[:dspex, :bridge, :backup, :restored], ^ref, %{bytes: _},
                      %{session_id: ^as, from: ^sid, path: ^path}}
    end
  end

  describe "restore/2 refuses bad files" do
    setup %{dir: dir} do
      sid = session()
      {:ok, %{path: path}} = Backup.snapshot_now(sid, dir: dir)
      %{sid: sid, path: path}
    end

    test "a missing file or directory", %{dir: dir} do
      assert {:error, {:no_such_file, _}} = Backup.restore(Path.join(dir, "nope.dspex-backup"))
      assert {:error, {:no_such_file, _}} = Backup.restore(Path.join(dir, "no/such/dir"))
      assert {:error, {:no_such_directory, _}} = Backup.list(Path.join(dir, "no-dir"))
    end

    test "a truncated file", %{path: path, sid: sid} do
      bytes = File.read!(path)

      for keep <- [byte_size(bytes) - 1, div(byte_size(bytes), 2), 40, 12, 3] do
        File.write!(path, binary_part(bytes, 0, keep))
        assert {:error, {:corrupt_backup, :truncated}} = Backup.restore(path, as: sid <> "-t")
      end

      File.write!(path, "")
      assert {:error, {:corrupt_backup, :empty}} = Backup.restore(path, as: sid <> "-t")
      assert {:error, :session_not_found} = SessionStore.get_session(sid <> "-t")
    end

    test "a changed byte in the snapshot or in the header's session id", %{path: path, sid: sid} do
      good = File.read!(path)
      flip_byte(path, 10)

      assert {:error, {:corrupt_backup, :checksum_mismatch}} =
               Backup.restore(path, as: sid <> "-c")

      # The session id's last byte sits just before the length and the digest.
      File.write!(path, good)
      {:ok, _, _} = DSPex.Bridge.Backup.Archive.read(path)
      payload_len = byte_size(good) - (8 + 2 + 8 + 2 + byte_size(sid) + 8 + 32)
      flip_byte(path, payload_len + 32 + 8 + 1)
      assert {:error, {:corrupt_backup, :checksum_mismatch}} = Backup.restore(path)
      assert {:error, :session_not_found} = SessionStore.get_session(sid <> "-c")
    end

    test "bytes appended, garbage, a future format", %{path: path, sid: sid} do
      good = File.read!(path)
      File.write!(path, good <> "extra")

      assert {:error, {:corrupt_backup, {:trailing_bytes, 5}}} =
               Backup.restore(path, as: sid <> "-g")

      File.write!(path, :crypto.strong_rand_bytes(4096))
      assert {:error, {:corrupt_backup, :bad_magic}} = Backup.restore(path, as: sid <> "-g")

      <<magic::binary-8, _format::16, rest::binary>> = good
      File.write!(path, [magic, <<99::16>>, rest])

      assert {:error, {:corrupt_backup, {:unknown_format, 99}}} =
               Backup.restore(path, as: sid <> "-g")
    end

    test "a file whose checksum is right but whose snapshot the engine refuses", %{dir: dir} do
      # A well-formed archive around a payload that is not a snapshot.
      sid = sid("bk-bogus")

      path =
        Path.join(dir, DSPex.Bridge.Backup.Archive.file_name(sid, System.os_time(:microsecond)))

      File.write!(path, DSPex.Bridge.Backup.Archive.encode(sid, 0, "not msgpack"))
      assert {:error, {:invalid_snapshot, _}} = Backup.restore(path)
      assert {:error, :session_not_found} = SessionStore.get_session(sid)
    end

    test "a directory: the newest good file, skipping corrupt ones", %{
      dir: dir,
      sid: sid,
      path: first
    } do
      :ok = SessionStore.update_variable(sid, :temperature, 1.5)
      {:ok, %{path: second}} = Backup.snapshot_now(sid, dir: dir)
      flip_byte(second, 3)

      as = restored(sid("bk-dir"))
      assert {:ok, ^as} = Backup.restore(dir, as: as)
      # The corrupt newest gave way to the first backup.
      assert SessionStore.get_variable_value(as, :temperature) == 0.8

      flip_byte(first, 3)

      assert {:error,
              {:no_valid_backup, [{^second, {:corrupt_backup, :checksum_mismatch}}, {^first, _}]}} =
               Backup.restore(dir, as: as <> "-2")
    end

    test "a directory: unknown session, several sessions, none at all", %{dir: dir, sid: sid} do
      assert {:error, {:no_backup, "bk-unknown"}} = Backup.restore(dir, session_id: "bk-unknown")

      other = session("bk-second")
      {:ok, _} = Backup.snapshot_now(other, dir: dir)
      assert {:error, {:ambiguous, sids}} = Backup.restore(dir)
      assert Enum.sort(sids) == Enum.sort([sid, other])

      empty = Path.join(dir, "empty")
      File.mkdir_p!(empty)
      assert {:error, {:no_backup, ^empty}} = Backup.restore(empty)
      assert {:error, {:no_such_directory, _}} = Backup.restore(Path.join(dir, "gone") <> "/")
    end

    test "a file of another session than session_id:", %{path: path} do
      assert {:error, {:other_session, _}} = Backup.restore(path, session_id: "someone-else")
    end

    test "emits :restore_failed", %{path: path} do
      ref = TelemetryHelper.attach([[:dspex, :bridge, :backup, :restore_failed]])
      File.write!(path, "garbage")
      {:error, reason} = Backup.restore(path, as: "bk-failed")

      assert_receive {[:dspex, :bridge, :backup, :restore_failed], ^ref, _,
                      %{path: ^path, reason: ^reason}}
    end

    test "a temporary file a crash left is neither listed nor restored", %{dir: dir, sid: sid} do
      tmp = Path.join(dir, "." <> DSPex.Bridge.Backup.Archive.prefix(sid) <> ".tmp-99")
      File.write!(tmp, "half a backup")
      {:ok, entries} = Backup.list(dir)
      assert Enum.all?(entries, &(&1.error == nil))
      refute Enum.any?(entries, &(&1.path == tmp))
      as = restored(sid("bk-tmp"))
      assert {:ok, ^as} = Backup.restore(dir, as: as)
    end
  end

  describe "list/1" do
    test "newest first, by session, with unreadable files marked", %{dir: dir} do
      a = session("bk-la")
      b = session("bk-lb")
      {:ok, a1} = Backup.snapshot_now(a, dir: dir)
      {:ok, b1} = Backup.snapshot_now(b, dir: dir)
      {:ok, a2} = Backup.snapshot_now(a, dir: dir)
      junk = Path.join(dir, "junk.dspex-backup")
      File.write!(junk, "junk")

      {:ok, entries} = Backup.list(dir)

      assert [a2.path, b1.path, a1.path, junk] == Enum.map(entries, & &1.path)
      assert [%{session_id: ^a, error: nil, taken_at: %DateTime{}} | _] = entries

      assert %{session_id: nil, error: {:corrupt_backup, :bad_magic}} =
               Enum.find(entries, &(&1.path == junk))

      assert {:ok, [%{session_id: ^b}]} = Backup.list(dir: dir, session_id: b)
    end

    test "bad arguments", %{dir: dir} do
      assert {:error, {:invalid_argument, _}} = Backup.list(dir: dir, nope: 1)
      assert {:error, {:no_such_directory, _}} = Backup.list(dir)
      File.mkdir_p!(dir)
      file = Path.join(dir, "f")
      File.write!(file, "")
      assert {:error, {:not_a_directory, ^file}} = Backup.list(file)
    end
  end

  describe "the periodic process" do
    test "snapshots the chosen sessions every interval, keeping `keep` of each", %{dir: dir} do
      tag = "bk-per#{System.unique_integer([:positive])}"
      chosen = session(tag)
      other = session("bk-per-not-chosen")
      test = self()
      ref = make_ref()

      # Runs in the round's process right after each snapshot (and its
      # pruning), before the next one: the count is the one that must hold.
      :ok =
        DSPex.Bridge.Telemetry.attach(
          {__MODULE__, ref},
          [:dspex, :bridge, :backup, :snapshot_taken],
          fn _, _, %{session_id: sid}, _ ->
            if sid in [chosen, other] do
              {:ok, entries} = Backup.list(dir: dir, session_id: sid)
              send(test, {ref, sid, length(entries)})
            end
          end,
          nil
        )

      on_exit(fn -> DSPex.Bridge.Telemetry.detach({__MODULE__, ref}) end)

      pid =
        start_supervised!(
          {Backup,
           dir: dir, interval: 20, sessions: [chosen], keep: 2, name: :"backup_test_#{tag}"},
          restart: :temporary
        )

      counts =
        for _ <- 1..6 do
          assert_receive {^ref, ^chosen, count}, 5_000
          count
        end

      assert counts == [1, 2, 2, 2, 2, 2]
      GenServer.stop(pid)
      refute_received {^ref, ^other, _}
    end

    test "status/1 reports the rounds", %{dir: dir} do
      sid = session("bk-status")
      ref = TelemetryHelper.attach([[:dspex, :bridge, :backup, :snapshot_taken]])
      name = :"backup_status_#{System.unique_integer([:positive])}"
      start_supervised!({Backup, dir: dir, interval: 20, sessions: [sid], name: name})

      assert_receive {[:dspex, :bridge, :backup, :snapshot_taken], ^ref, _, %{session_id: ^sid}},
                     5_000

      assert_receive {[:dspex, :bridge, :backup, :snapshot_taken], ^ref, _, %{session_id: ^sid}},
                     5_000

      assert %{dir: ^dir, interval: 20, keep: 12, rounds: rounds} = Backup.status(name)
      assert rounds >= 1
      assert %{last_round: %{taken: 1, failed: []}} = Backup.status(name)
    end

    test "a round that dies is reported, and the next one runs", %{dir: dir} do
      _ = session("bk-crash")
      test = self()
      name = :"backup_crash_#{System.unique_integer([:positive])}"

      # The selector runs in the round's process: this one kills it.
      selector = fn _sid ->
        send(test, :selecting)
        Process.exit(self(), :kill)
      end

      pid = start_supervised!({Backup, dir: dir, interval: 20, sessions: selector, name: name})

      # A second round starts only once the first one's end is recorded.
      assert_receive :selecting, 5_000
      assert_receive :selecting, 5_000

      assert %{rounds: rounds, last_round: %{taken: 0, failed: [{:round, :killed}]}} =
               Backup.status(name)

      assert rounds >= 1
      assert Process.alive?(pid)
    end

    test "a bad config starts nothing", %{dir: dir} do
      for opts <- [
            [],
            [dir: dir, interval: 0],
            [dir: dir, interval: "5m"],
            [dir: dir, keep: 0],
            [dir: dir, sessions: []],
            [dir: dir, sessions: [:not_a_string]],
            [dir: dir, sessions: {:glob, 1}],
            [dir: dir, sessions: {NoSuchModule, :f, []}],
            [dir: dir, typo: 1]
          ] do
        assert {:error, {:invalid_argument, _}} = Backup.start_link(opts), inspect(opts)
      end
    end
  end
end
