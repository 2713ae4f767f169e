defmodule DSPex.TelemetryEmitters.Backup do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{Backup, SessionStore}

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :backup, :snapshot_taken] => fn ->
        in_dir(fn dir -> {:ok, _} = Backup.snapshot_now(session(), dir: dir) end)
      end,
      [:dspex, :bridge, :backup, :snapshot_failed] => fn ->
        in_dir(fn dir ->
          {:error, :session_not_found} = Backup.snapshot_now("emit-backup-none", dir: dir)
        end)
      end,
      [:dspex, :bridge, :backup, :restored] => fn ->
        in_dir(fn dir ->
          {:ok, %{path: path}} = Backup.snapshot_now(session(), dir: dir)
          as = DSPex.TelemetryEmitters.sid("emit-restored")
          {:ok, ^as} = Backup.restore(path, as: as)
          SessionStore.delete_session(as)
        end)
      end,
      [:dspex, :bridge, :backup, :restore_failed] => fn ->
        in_dir(fn dir ->
          {:error, {:no_such_file, _}} = Backup.restore(Path.join(dir, "none.dspex-backup"))
        end)
      end
    }
  end

  defp session do
    sid = DSPex.TelemetryEmitters.sid("emit-backup")
    {:ok, _} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    sid
  end

  defp in_dir(fun) do
    dir = Path.join(System.tmp_dir!(), "dspex-emit-backup-#{System.unique_integer([:positive])}")

    try do
      fun.(dir)
    after
      File.rm_rf(dir)
    end
  end
end
