defmodule Mix.Tasks.Dspex.RestoreTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureIO

  alias DSPex.Bridge.{Backup, SessionStore}
  alias DSPex.Test.HACluster

  @moduletag timeout: 300_000
  @root Path.expand("../..", __DIR__)

  setup do
    dir = Path.join(System.tmp_dir!(), "dspex-restore-task-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf(dir) end)
    sid = "restore-task-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.25)
    :ok = SessionStore.update_variable(sid, :temperature, 0.75)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, %{path: path}} = Backup.snapshot_now(sid, dir: dir)
    %{dir: dir, sid: sid, path: path}
  end

  defp run_task(args) do
    Mix.Task.reenable("dspex.restore")
    capture_io(fn -> Mix.Tasks.Dspex.Restore.run(args) end)
  end

  test "--check reports each backup and fails on a bad one", %{dir: dir, sid: sid, path: path} do
    assert run_task([path, "--check"]) =~ ~r/^ok #{sid} \S+ \d+ #{Regex.escape(path)}$/m
    assert run_task([dir, "--check"]) =~ "ok #{sid}"

    File.write!(path, binary_part(File.read!(path), 0, 50))

    assert_raise Mix.Error, ~r/1 of 1 backups failed their checks/, fn ->
      run_task([dir, "--check"])
    end
  end

  test "--list prints the directory's backups", %{dir: dir, sid: sid, path: path} do
    assert run_task([dir, "--list"]) =~ "#{sid} "
    assert run_task([dir, "--list"]) =~ path
  end

  test "bad arguments fail with a reason", %{dir: dir, path: path} do
    assert_raise Mix.Error, ~r/give --node/, fn -> run_task([path]) end
    assert_raise Mix.Error, ~r/expected one DIR_OR_FILE/, fn -> run_task([]) end
    assert_raise Mix.Error, ~r/unknown options/, fn -> run_task([path, "--bogus"]) end

    assert_raise Mix.Error, ~r/no_such_directory/, fn ->
      run_task([Path.join(dir, "x"), "--list"])
    end

    assert_raise Mix.Error, ~r/no_such_file/, fn -> run_task([Path.join(dir, "x"), "--check"]) end
  end

  test "restores into a running node, from a file or a directory", %{
    dir: dir,
    sid: sid,
    path: path
  } do
    :ok = HACluster.ensure_epmd()
    name = :"restore_target_#{System.unique_integer([:positive])}"
    ra_dir = Path.join(dir, "ra")
    peer = HACluster.start_peer(name, ra_dir)
    on_exit(fn -> HACluster.stop([peer]) end)
    node = Atom.to_string(peer.node)

    # In a separate OS process, as an operator runs it.
    mix = fn args ->
      System.cmd("mix", ["dspex.restore" | args] ++ ["--node", node, "--cookie", "dspex_ha_test"],
        cd: @root,
        env: [{"MIX_ENV", "test"}],
        stderr_to_stdout: true
      )
    end

    assert {out, 0} = mix.([path, "--as", "copy-1"])
    assert out =~ "restored copy-1 from #{path}"

    assert HACluster.call(peer, SessionStore, :get_variable_value, ["copy-1", :temperature]) ==
             0.75

    # The backup's own id, from the directory (its newest good backup).
    assert {out, 0} = mix.([dir])
    assert out =~ "restored #{sid} from"
    assert HACluster.call(peer, SessionStore, :get_variable_value, [sid, :temperature]) == 0.75

    # Taken: the node's answer is the task's failure.
    assert {out, 1} = mix.([path])
    assert out =~ ":already_exists"

    # A corrupt file is refused before anything is sent.
    File.write!(path, "garbage")
    assert {out, 1} = mix.([path, "--as", "copy-2"])
    assert out =~ "corrupt_backup"

    assert {:error, :session_not_found} =
             HACluster.call(peer, SessionStore, :get_session, ["copy-2"])
  end
end
