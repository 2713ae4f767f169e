defmodule DSPex.Bridge.DirLock do
  @moduledoc false
  # One VM at a time in a directory whose files have no locking of their
  # own (the dead-letter queue's DETS file, ra's write-ahead log): a second
  # VM writing them corrupts them (seen: two non-distributed VMs in one
  # project directory share the defaults' `<node>`, `nonode@nohost`, and
  # the first got `premature_eof` on its next DETS insert). The lock is a
  # file naming the OS process using the directory, created exclusively;
  # one naming a process that is gone (a VM killed with kill -9) is taken
  # over. A VM restarting its own server finds its own pid and goes on.

  @doc "`:ok`, or `{:error, {:in_use, os_pid}}` while another live VM holds `dir`."
  @spec acquire(Path.t(), String.t()) :: :ok | {:error, term}
  def acquire(dir, file), do: acquire(dir, file, 2)

  defp acquire(dir, file, tries) do
    path = Path.join(dir, file)
    me = System.pid()

    case File.open(path, [:write, :exclusive]) do
      {:ok, io} ->
        IO.binwrite(io, me)
        File.close(io)

      {:error, :eexist} when tries > 0 ->
        case File.read(path) do
          {:ok, ^me} ->
            :ok

          {:ok, other} ->
            if os_alive?(other),
              do: {:error, {:in_use, other}},
              else: retake(path, dir, file, tries)

          {:error, _} ->
            retake(path, dir, file, tries)
        end

      {:error, :eexist} ->
        {:error, {:in_use, :unknown}}

      {:error, _} = error ->
        error
    end
  end

  defp retake(path, dir, file, tries) do
    _ = File.rm(path)
    acquire(dir, file, tries - 1)
  end

  @doc "Removes the lock if this VM holds it."
  @spec release(Path.t(), String.t()) :: :ok
  def release(dir, file) do
    path = Path.join(dir, file)
    me = System.pid()

    case File.read(path) do
      {:ok, ^me} -> _ = File.rm(path)
      _ -> :ok
    end

    :ok
  end

  defp os_alive?(os_pid) do
    case Integer.parse(String.trim(os_pid)) do
      {n, ""} when n > 0 ->
        if File.dir?("/proc/self"),
          do: File.dir?("/proc/#{n}"),
          else: match?({_, 0}, System.cmd("kill", ["-0", "#{n}"], stderr_to_stdout: true))

      # Not a pid: not a lock this module wrote.
      _ ->
        false
    end
  end
end
