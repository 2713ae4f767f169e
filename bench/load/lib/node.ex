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
  def run(profile, delay_ms, timeout_ms) do
    t0 = :erlang.monotonic_time(:millisecond) + delay_ms
    Gen.run(callers(), profile, t0, timeout_ms)
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

  def stop do
    Gen.stop(callers())
    :ets.insert(@table, {:callers, []})
    :ok
  end
end
