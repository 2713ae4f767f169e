defmodule DSPexLoad.Node do
  @moduledoc false
  # The part of a run that lives on each calling node (this VM for the
  # in-VM and gRPC paths, each :peer for replicated sessions). State sits in
  # an ETS table owned by a process that outlives the RPCs that create it.

  alias DSPexLoad.{Gen, Sampler, Stats, Workload}

  @table :dspex_load_node

  def prepare do
    if :ets.whereis(@table) == :undefined do
      parent = self()

      spawn(fn ->
        :ets.new(@table, [:public, :named_table, :set])
        :ets.new(:dspex_load_reasons, [:public, :named_table, write_concurrency: true])
        # Scheduler wall time is measured while the process that asked lives.
        :erlang.system_flag(:scheduler_wall_time, true)
        send(parent, :ready)
        Process.sleep(:infinity)
      end)

      receive do: (:ready -> :ok)
    end

    :ok = Stats.setup(Workload.ops())
    :ets.insert(@table, {:wall, :erlang.statistics(:scheduler_wall_time)})
    :ets.insert(@table, {:callers, []})
    :ok
  end

  def setup(ids, opts, prefill, derived?), do: Workload.setup(ids, opts, prefill, derived?)

  def start_callers(groups, prefill) do
    pids = Gen.start_callers(groups, prefill)
    :ets.insert(@table, {:callers, pids})
    length(pids)
  end

  defp callers, do: :ets.lookup_element(@table, :callers, 2)

  # Blocks until the profile is over; it starts `delay_ms` from now.
  def run(profile, delay_ms, timeout_ms, null \\ false) do
    t0 = :erlang.monotonic_time(:millisecond) + delay_ms
    Gen.run(callers(), profile, t0, timeout_ms, null)
  end

  def run_closed(ms, null \\ false), do: Gen.run_closed(callers(), ms, null)

  def take, do: Stats.take()

  def sample do
    prev = :ets.lookup_element(@table, :wall, 2)
    {sample, wall} = Sampler.sample(MapSet.new(callers()), prev)
    :ets.insert(@table, {:wall, wall})
    sample
  end

  # A sampler of its own (high priority), so the controller never waits for
  # one: a sample now and every `every_ms`, kept in order until `samples/0`.
  def start_sampler(every_ms) do
    stop_sampler()
    :ets.insert(@table, {:samples, []})

    pid =
      spawn(fn ->
        Process.flag(:priority, :high)
        sampler_loop(every_ms, System.monotonic_time(:millisecond))
      end)

    :ets.insert(@table, {:sampler, pid})
    :ok
  end

  defp sampler_loop(every_ms, next) do
    s = sample()
    :ets.insert(@table, {:samples, [s | :ets.lookup_element(@table, :samples, 2)]})
    next = next + every_ms
    wait = max(next - System.monotonic_time(:millisecond), 0)

    receive do
      :stop -> :ok
    after
      wait -> sampler_loop(every_ms, next)
    end
  end

  def latest_sample do
    case :ets.lookup(@table, :samples) do
      [{:samples, [s | _]}] -> s
      _ -> nil
    end
  end

  # Stops the sampler after one last sample; returns every sample, oldest first.
  def stop_sampler do
    case :ets.lookup(@table, :sampler) do
      [{:sampler, pid}] ->
        ref = Process.monitor(pid)
        send(pid, :stop)
        receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
        :ets.delete(@table, :sampler)

      [] ->
        :ok
    end

    last = sample()
    samples = [last | :ets.lookup_element(@table, :samples, 2)]
    :ets.insert(@table, {:samples, []})
    Enum.reverse(samples)
  rescue
    ArgumentError -> []
  end

  def verify, do: Gen.verify(callers())

  ## Where the time goes (`--msacc`): microstate accounting of the
  ## schedulers, and reductions per group of processes (the callers, each
  ## registered or initial-call module), over the profile.

  def prof_start do
    :msacc.start()
    :ets.insert(@table, {:prof, reductions(), elem(:erlang.statistics(:reductions), 0), cpu_ms()})
    :ok
  end

  def prof_stop(top \\ 12) do
    stats = :msacc.stats()
    :msacc.stop()
    [{:prof, before, total0, cpu0}] = :ets.lookup(@table, :prof)
    cpu = cpu_ms() - cpu0
    total = elem(:erlang.statistics(:reductions), 0) - total0
    callers = MapSet.new(callers())

    groups =
      reductions()
      |> Enum.map(fn {pid, r} -> {group(pid, callers), r - Map.get(before, pid, 0)} end)
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
      |> Enum.map(fn {g, rs} -> {g, length(rs), Enum.sum(rs)} end)
      |> Enum.sort_by(&elem(&1, 2), :desc)

    seen = groups |> Enum.map(&elem(&1, 2)) |> Enum.sum()

    %{
      msacc: msacc(stats),
      cpu_ms: cpu,
      reductions_total: total,
      # Processes that lived and died within the profile (or whose
      # reductions were not seen at the start) are the difference.
      reductions_unseen: total - seen,
      groups: Enum.take(groups, top)
    }
  end

  # This VM's CPU time (user + system, ms) from /proc.
  defp cpu_ms do
    with {:ok, stat} <- File.read("/proc/#{System.pid()}/stat"),
         [_, rest] <- String.split(stat, ") ", parts: 2) do
      fields = String.split(rest)
      (String.to_integer(Enum.at(fields, 11)) + String.to_integer(Enum.at(fields, 12))) * 10
    else
      _ -> 0
    end
  end

  defp reductions do
    for pid <- Process.list(),
        {:reductions, r} <- [Process.info(pid, :reductions)],
        into: %{},
        do: {pid, r}
  end

  defp group(pid, callers) do
    cond do
      MapSet.member?(callers, pid) ->
        :driver_callers

      true ->
        case Process.info(pid, [:registered_name, :dictionary, :initial_call]) do
          [{:registered_name, name} | _] when is_atom(name) and name != [] ->
            name

          [_, {:dictionary, d}, {:initial_call, ic}] ->
            case Keyword.get(d, :"$initial_call") do
              {m, f, a} -> {m, f, a}
              nil -> ic
            end

          _ ->
            :gone
        end
    end
  end

  # Per state, the share of all schedulers' time (normal, dirty CPU, dirty
  # IO and aux threads summed by type).
  defp msacc(stats) do
    by_type =
      stats
      |> Enum.group_by(& &1.type, & &1.counters)
      |> Map.new(fn {type, cs} ->
        sum = Enum.reduce(cs, %{}, &Map.merge(&1, &2, fn _, a, b -> a + b end))
        all = sum |> Map.values() |> Enum.sum() |> max(1)

        {type,
         sum
         |> Enum.filter(fn {_, v} -> v * 1000 >= all end)
         |> Enum.sort_by(&elem(&1, 1), :desc)
         |> Map.new(fn {k, v} -> {k, Float.round(v / all, 3)} end)}
      end)

    Map.take(by_type, [:scheduler, :dirty_cpu_scheduler, :dirty_io_scheduler, :aux, :poll])
  end

  def stop do
    Gen.stop(callers())
    :ets.insert(@table, {:callers, []})
    :ok
  end
end
