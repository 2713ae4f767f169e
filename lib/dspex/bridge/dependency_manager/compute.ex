defmodule DSPex.Bridge.DependencyManager.Compute do
  @moduledoc """
  Runs one call of a compute function in a process of its own, under a
  deadline, so nothing it does reaches its caller (the session's worker, or
  the process calling `defderived/6`): it is spawned unlinked and monitored,
  its links and exits end it alone, and it is killed when it overruns.

  The process exits with its result, so processes it linked to (a
  `Task.async` it did not await, a `spawn_link`) go with it. An abandoned
  computation never outlives its caller: by default a watchdog process kills
  it if the caller dies first; a caller with a cheaper way (the session's
  worker records the pid, and `DSPex.Bridge.DependencyManager.Table` kills
  it when the worker dies) passes its own `on_start`.
  """

  @done :"$dspex_compute_done"

  @type result ::
          {:ok, term}
          | {:error, :timeout}
          | {:error, {:raised, :error | :exit | :throw, term, Exception.stacktrace()}}

  @doc """
  `fun.(arg)` in its own process: `{:ok, value}`, `{:error, :timeout}` after
  `timeout` ms (the process is killed), or `{:error, {:raised, kind, reason,
  stacktrace}}` when it raised, threw or exited (an exit from a linked
  process or a kill included; those have no stack trace).
  """
  @spec run((term -> term), term, pos_integer, (pid -> term)) :: result
  def run(fun, arg, timeout, on_start \\ &watchdog/1) do
    owner = self()
    # As a Task does, so tooling that follows callers (Mox, Ecto's sandbox)
    # follows the computation.
    callers = [owner | Process.get(:"$callers", [])]

    {pid, ref} =
      spawn_monitor(fn ->
        Process.put(:"$callers", callers)
        exit({@done, call(fun, arg)})
      end)

    on_start.(pid)

    receive do
      {:DOWN, ^ref, :process, ^pid, reason} -> outcome(reason)
    after
      timeout ->
        Process.exit(pid, :kill)

        receive do
          # Finished in the meantime: the result stands.
          {:DOWN, ^ref, :process, ^pid, {@done, _} = done} -> outcome(done)
          {:DOWN, ^ref, :process, ^pid, _killed} -> {:error, :timeout}
        end
    end
  end

  defp call(fun, arg) do
    {:ok, fun.(arg)}
  catch
    kind, reason ->
      {:error, {:raised, kind, Exception.normalize(kind, reason, __STACKTRACE__), __STACKTRACE__}}
  end

  defp outcome({@done, result}), do: result
  defp outcome(reason), do: {:error, {:raised, :exit, reason, []}}

  defp watchdog(pid) do
    owner = self()
    spawn(fn -> watch(owner, pid) end)
  end

  defp watch(owner, pid) do
    owner_ref = Process.monitor(owner)
    pid_ref = Process.monitor(pid)

    receive do
      {:DOWN, ^owner_ref, :process, _, _} -> Process.exit(pid, :kill)
      {:DOWN, ^pid_ref, :process, _, _} -> :ok
    end
  end
end
