defmodule DSPex.Bridge.DependencyManager.Compute do
  @moduledoc """
  Runs calls of compute functions in a process apart, under a deadline, so
  nothing they do reaches their caller (the session's worker, or the
  process calling `defderived/6`): the process is spawned unlinked and
  monitored, its links and exits end it alone, and it is killed when a call
  overruns.

  `run/4` spends one process on one call: the process exits with its
  result, so processes it linked to (a `Task.async` it did not await, a
  `spawn_link`) go with it. An abandoned computation never outlives its
  caller: by default a watchdog process kills it if the caller dies first;
  a caller with a cheaper way (the session's worker records the pid, and
  `DSPex.Bridge.DependencyManager.Table` kills it when the worker dies)
  passes its own `on_start`.

  `run/5` runs the calls of one propagation pass in one reusable process
  (`stop/1` ends it when the pass ends): a process costs about 2 us to
  spawn and reap, a call in a living one a message each way. Each call
  still gets what a fresh process gives it:

  - an empty mailbox (what arrived since the previous call is dropped) and
    the process dictionary of a fresh process (`:"$callers"` only);
  - when the previous call ended in any other way than returning a value
    (a raise, throw or exit, a crash of the process, its deadline), or left
    the process changed where a call can see it (a link or a port, a
    monitor, `trap_exit`, a registered name, another group leader, priority
    or maximum heap size), the process is not used again: it exits with the
    result, as `run/4`'s does, taking its links with it, and the next call
    gets a new one.

  What a call can leave that the process cannot see in itself (an ETS table
  it owns, a timer that has not fired, its pid handed to another process)
  lasts until the process is replaced, at the latest when the pass ends.
  The process also dies with its caller: it monitors the caller while it
  waits for the next call, and a call in progress is killed by `on_start`'s
  arrangement.
  """

  @done :"$dspex_compute_done"
  # What a call may leave as it found it for the process to be used again.
  @probe [
    :links,
    :monitors,
    :trap_exit,
    :registered_name,
    :group_leader,
    :priority,
    :max_heap_size
  ]

  @type result ::
          {:ok, term}
          | {:error, :timeout}
          | {:error, {:raised, :error | :exit | :throw, term, Exception.stacktrace()}}

  @typedoc "A reusable compute process (`run/5`), or `nil` before the first call."
  @opaque worker :: {pid, reference} | nil

  @doc """
  `fun.(arg)` in its own process: `{:ok, value}`, `{:error, :timeout}` after
  `timeout` ms (the process is killed), or `{:error, {:raised, kind, reason,
  stacktrace}}` when it raised, threw or exited (an exit from a linked
  process or a kill included; those have no stack trace).
  """
  @spec run((term -> term), term, pos_integer, (pid -> term)) :: result
  def run(fun, arg, timeout, on_start \\ &watchdog/1) do
    callers = callers()

    {pid, ref} =
      spawn_monitor(fn ->
        Process.put(:"$callers", callers)
        exit({@done, call(fun, arg)})
      end)

    on_start.(pid)

    receive do
      {:DOWN, ^ref, :process, ^pid, reason} -> outcome(reason)
    after
      timeout -> killed(pid, ref)
    end
  end

  @doc """
  `fun.(arg)` as `run/4` does, in `worker` (a new one when it is `nil`):
  `{result, worker}`, the worker to pass to the next call (`nil` when this
  one is not to be used again). `on_start` is called with each new
  process's pid. The same caller must make every call of a worker.
  """
  @spec run(worker, (term -> term), term, pos_integer, (pid -> term)) :: {result, worker}
  def run(nil, fun, arg, timeout, on_start) do
    callers = callers()
    owner = self()
    {pid, ref} = spawn_monitor(fn -> serve(owner, callers) end)
    on_start.(pid)
    run({pid, ref}, fun, arg, timeout, on_start)
  end

  def run({pid, ref} = worker, fun, arg, timeout, _on_start) do
    send(pid, {ref, fun, arg})

    receive do
      {^ref, result} -> {result, worker}
      {:DOWN, ^ref, :process, ^pid, reason} -> {outcome(reason), nil}
    after
      timeout -> {killed(pid, ref), nil}
    end
  end

  @doc "Ends `worker` (between calls); `nil` is already ended."
  @spec stop(worker) :: :ok
  def stop(nil), do: :ok

  def stop({pid, ref}) do
    Process.demonitor(ref, [:flush])
    Process.exit(pid, :kill)
    :ok
  end

  # As a Task does, so tooling that follows callers (Mox, Ecto's sandbox)
  # follows the computation.
  defp callers, do: [self() | Process.get(:"$callers", [])]

  # Overran its deadline: killed. A result that came in meanwhile stands.
  # (Its reply, if any, reaches us before its `:DOWN`.)
  defp killed(pid, ref) do
    Process.exit(pid, :kill)

    receive do
      {^ref, result} ->
        Process.demonitor(ref, [:flush])
        result

      {:DOWN, ^ref, :process, ^pid, {@done, _} = done} ->
        outcome(done)

      {:DOWN, ^ref, :process, ^pid, _killed} ->
        {:error, :timeout}
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

  ## The reusable process

  defp serve(owner, callers) do
    owner_ref = Process.monitor(owner)
    Process.put(:"$callers", callers)
    fresh = Process.info(self(), @probe)
    # The owner's monitor reference tags its calls (the first call brings
    # it): nobody else can make this process run a function.
    receive do
      {ref, _fun, _arg} = call when is_reference(ref) ->
        handle(call, {owner, ref, owner_ref, callers, fresh})

      {:DOWN, ^owner_ref, :process, _, _} ->
        exit(:shutdown)
    end
  end

  defp handle({ref, fun, arg}, {owner, ref, owner_ref, callers, fresh} = its) do
    drain(owner_ref)
    result = call(fun, arg)

    if match?({:ok, _}, result) and reusable?(callers, fresh) do
      send(owner, {ref, result})

      receive do
        {^ref, _fun, _arg} = call -> handle(call, its)
        {:DOWN, ^owner_ref, :process, _, _} -> exit(:shutdown)
      end
    else
      exit({@done, result})
    end
  end

  # What came in since the previous call (a late reply, a timer) is not
  # this call's; the owner's death is.
  defp drain(owner_ref) do
    receive do
      {:DOWN, ^owner_ref, :process, _, _} -> exit(:shutdown)
      _stray -> drain(owner_ref)
    after
      0 -> :ok
    end
  end

  # The process as the next call must find it: its dictionary is reset (a
  # call that used `:rand` or `Logger.metadata/1` leaves the process fit
  # for reuse); anything else changed retires it.
  defp reusable?(callers, fresh) do
    if Process.get() != [{:"$callers", callers}] do
      :erlang.erase()
      Process.put(:"$callers", callers)
    end

    Process.info(self(), @probe) == fresh
  end

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
