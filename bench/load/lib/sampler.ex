defmodule DSPexLoad.Sampler do
  @moduledoc false
  # What a node looks like right now: BEAM memory (:erlang.memory), the
  # engine's own allocation counter (the NIF's counting allocator), the RSS
  # of this VM, of the port program and of the gRPC gateway
  # (/proc/PID/status), the longest message queue among the library's
  # processes (everything but the driver's callers), scheduler utilisation
  # since the previous sample, the run queue and the load average.

  alias DSPex.Bridge.Backend

  # `exclude`: a MapSet of pids (the callers). `prev_wall`: the previous
  # :scheduler_wall_time sample. Returns {sample, wall}.
  def sample(exclude, prev_wall) do
    mem = :erlang.memory()
    wall = :erlang.statistics(:scheduler_wall_time)
    {queue_max, queue_top} = queues(exclude)

    sample = %{
      t_ms: System.os_time(:millisecond),
      beam_total: mem[:total],
      beam_processes: mem[:processes],
      beam_binary: mem[:binary],
      beam_ets: mem[:ets],
      engine_bytes: engine(),
      dlq_depth: dlq_depth(),
      beam_rss: rss(System.pid()),
      port_rss: rss(port_pid()),
      gateway_rss: rss(gateway_pid()),
      process_count: :erlang.system_info(:process_count),
      queue_max: queue_max,
      queue_top: queue_top,
      scheduler_busy: utilisation(prev_wall, wall),
      run_queue: :erlang.statistics(:total_run_queue_lengths),
      loadavg: loadavg(),
      node: node()
    }

    {sample, wall}
  end

  defp dlq_depth do
    case DSPex.Bridge.DeadLetterQueue.stats() do
      %{depth: depth, added_total: added} -> %{depth: depth, added_total: added}
      _ -> nil
    end
  catch
    _, _ -> nil
  end

  defp engine do
    Backend.Native.memory()
  rescue
    _ -> nil
  end

  defp port_pid do
    if Process.whereis(Backend.Port), do: Backend.Port.os_pid()
  end

  defp gateway_pid do
    if Process.whereis(DSPex.Bridge.Gateway), do: DSPex.Bridge.Gateway.os_pid()
  end

  def rss(nil), do: nil

  def rss(pid) do
    case File.read("/proc/#{pid}/status") do
      {:ok, text} ->
        case Regex.run(~r/VmRSS:\s+(\d+) kB/, text) do
          [_, kb] -> String.to_integer(kb) * 1024
          _ -> nil
        end

      _ ->
        nil
    end
  end

  def loadavg do
    case File.read("/proc/loadavg") do
      {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.map(&String.to_float/1)
      _ -> nil
    end
  end

  defp utilisation(a, b) when not is_list(a) or not is_list(b), do: nil

  # Of the normal schedulers only (the dirty ones idle while NIFs are short).
  defp utilisation(a, b) do
    normal = :erlang.system_info(:schedulers)
    keep = fn l -> l |> Enum.filter(fn {id, _, _} -> id <= normal end) |> Enum.sort() end

    {active, total} =
      Enum.zip(keep.(a), keep.(b))
      |> Enum.reduce({0, 0}, fn {{i, a0, t0}, {i, a1, t1}}, {sa, st} ->
        {sa + (a1 - a0), st + (t1 - t0)}
      end)

    if total > 0, do: Float.round(active / total, 3), else: nil
  end

  # The longest mailbox outside `exclude`, and the three longest with names.
  # Asking another process for its queue length is a signal it answers when
  # next scheduled, which under load takes a while: the questions go out in
  # parallel (chunks of 32) and the sampler waits at most 10 s for them.
  defp queues(exclude) do
    me = self()

    chunks =
      Process.list()
      |> Enum.reject(&(MapSet.member?(exclude, &1) or &1 == me))
      |> Enum.chunk_every(32)

    refs =
      for chunk <- chunks do
        {pid, ref} =
          spawn_monitor(fn ->
            Process.flag(:priority, :high)

            lens =
              for pid <- chunk,
                  {:message_queue_len, n} <- [Process.info(pid, :message_queue_len)],
                  n > 0,
                  do: {n, pid}

            exit({:lens, lens})
          end)

        {pid, ref}
      end

    deadline = System.monotonic_time(:millisecond) + 10_000

    lens =
      Enum.flat_map(refs, fn {pid, ref} ->
        wait = max(deadline - System.monotonic_time(:millisecond), 0)

        receive do
          {:DOWN, ^ref, :process, _, {:lens, lens}} -> lens
          {:DOWN, ^ref, :process, _, _} -> []
        after
          wait ->
            Process.exit(pid, :kill)
            [{:unknown, pid}]
        end
      end)

    {known, unknown} = Enum.split_with(lens, fn {n, _} -> is_integer(n) end)
    # The driver's own processes (its runner tasks collect the callers'
    # answers) are not the library's.
    # (A process gone by now, like a finished runner, is not either.)
    known =
      Enum.reject(known, fn {_, pid} ->
        not Process.alive?(pid) or String.starts_with?(name(pid), "DSPexLoad")
      end)

    top =
      known
      |> Enum.sort(:desc)
      |> Enum.take(3)
      |> Enum.map(fn {n, pid} -> %{len: n, process: name(pid)} end)

    top = if unknown != [], do: top ++ [%{len: :not_answered, chunks: length(unknown)}], else: top
    {Enum.max(Enum.map(known, &elem(&1, 0)), fn -> 0 end), top}
  end

  def name(pid) do
    case Process.info(pid, [:registered_name, :dictionary, :current_function]) do
      [{:registered_name, name}, _, _] when is_atom(name) and name != [] ->
        inspect(name)

      [_, {:dictionary, dict}, {:current_function, cur}] ->
        case dict[:"$initial_call"] do
          {m, f, a} -> "#{inspect(m)}.#{f}/#{a}"
          _ -> inspect(cur)
        end

      _ ->
        inspect(pid)
    end
  end
end
