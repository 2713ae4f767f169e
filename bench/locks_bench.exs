# Optimizer locks: the NIF lock table against seed 002's GenServer
# OptimizerCoordinator (../shared/seeds/002, section 2), in one run.
#
#   MIX_ENV=prod mix run bench/locks_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule LocksBench.SeedCoordinator do
  @moduledoc """
  Seed 002's design: one GenServer holding `%{var_id => {optimizer_id, pid,
  acquired_at}}`; acquire and release are `GenServer.call`s; the holder is
  `Process.monitor`ed; waiters sit in one `:queue` scanned per key; a `:DOWN`
  cleans the holder's locks and replies to the first waiter.

  Two fixes so that it is a lock at all and does not leak: the waiter that is
  replied to is also made the holder (the seed replied without granting), and
  release demonitors (the seed kept one monitor per acquire forever).
  """
  use GenServer

  def start_link, do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  def acquire_lock(var_id, optimizer_id, pid, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, 5000)
    mode = Keyword.get(opts, :conflict_resolution, :wait)
    GenServer.call(__MODULE__, {:acquire_lock, var_id, optimizer_id, pid, mode}, timeout)
  end

  def release_lock(var_id, optimizer_id),
    do: GenServer.call(__MODULE__, {:release_lock, var_id, optimizer_id})

  def waiters, do: :queue.len(:sys.get_state(__MODULE__).queue)

  @impl true
  def init(nil), do: {:ok, %{locks: %{}, monitors: %{}, queue: :queue.new()}}

  @impl true
  def handle_call({:acquire_lock, var_id, optimizer_id, pid, mode}, from, state) do
    case Map.get(state.locks, var_id) do
      nil ->
        {:reply, {:ok, :lock_acquired}, grant(state, var_id, optimizer_id, pid)}

      {holder, holder_pid, _} ->
        if Process.alive?(holder_pid) do
          case mode do
            :abort ->
              {:reply, {:error, {:lock_held_by, holder}}, state}

            _ ->
              entry = {var_id, optimizer_id, from, System.monotonic_time(:millisecond)}
              {:noreply, %{state | queue: :queue.in(entry, state.queue)}}
          end
        else
          state = cleanup(state, var_id)
          handle_call({:acquire_lock, var_id, optimizer_id, pid, mode}, from, state)
        end
    end
  end

  def handle_call({:release_lock, var_id, optimizer_id}, _from, state) do
    case Map.get(state.locks, var_id) do
      {^optimizer_id, _, _} -> {:reply, :ok, cleanup(state, var_id)}
      _ -> {:reply, {:error, :not_lock_owner}, state}
    end
  end

  @impl true
  def handle_info({:DOWN, ref, :process, pid, _}, state) do
    state = %{state | monitors: Map.delete(state.monitors, ref)}

    held = for {var_id, {_, ^pid, _}} <- state.locks, do: var_id

    {:noreply, Enum.reduce(held, state, &cleanup(&2, &1))}
  end

  defp grant(state, var_id, optimizer_id, pid) do
    ref = Process.monitor(pid)

    %{
      state
      | locks: Map.put(state.locks, var_id, {optimizer_id, pid, ref}),
        monitors: Map.put(state.monitors, ref, var_id)
    }
  end

  defp cleanup(state, var_id) do
    {{_, _, ref}, locks} = Map.pop(state.locks, var_id)
    Process.demonitor(ref, [:flush])
    state = %{state | locks: locks, monitors: Map.delete(state.monitors, ref)}

    list = :queue.to_list(state.queue)

    case Enum.find_index(list, fn {v, _, _, _} -> v == var_id end) do
      nil ->
        state

      i ->
        {{^var_id, optimizer_id, {pid, _} = from, _}, rest} = List.pop_at(list, i)
        GenServer.reply(from, {:ok, :lock_acquired_after_wait})
        grant(%{state | queue: :queue.from_list(rest)}, var_id, optimizer_id, pid)
    end
  end
end

defmodule LocksBench do
  alias DSPex.Bridge.OptimizerCoordinator
  alias LocksBench.SeedCoordinator

  def store_cycle do
    {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock(key(), "bench", self())
    :ok = OptimizerCoordinator.release_lock(key(), "bench")
  end

  def seed_cycle do
    {:ok, :lock_acquired} = SeedCoordinator.acquire_lock(key(), "bench", self())
    :ok = SeedCoordinator.release_lock(key(), "bench")
  end

  # One key per benchmarking process, so parallel runs do not contend: a
  # string, like a variable id.
  defp key do
    case Process.get(:bench_key) do
      nil ->
        key = "bench-var-#{:erlang.unique_integer([:positive])}"
        Process.put(:bench_key, key)
        key

      key ->
        key
    end
  end

  @doc """
  Microseconds from killing a holder to its waiter's grant, `n` times:
  the waiter is queued first, then the holder is killed.
  """
  def handoff(n, acquire, queued?) do
    for i <- 1..n do
      key = {:handoff, i}
      test = self()

      holder =
        spawn(fn ->
          {:ok, :lock_acquired} = acquire.(key, "holder", self())
          send(test, :held)
          Process.sleep(:infinity)
        end)

      receive do: (:held -> :ok)

      waiter =
        spawn(fn ->
          {:ok, :lock_acquired_after_wait} = acquire.(key, "waiter", self())
          send(test, {:granted, System.monotonic_time()})
        end)

      wait_until(fn -> queued?.(key) end)
      t0 = System.monotonic_time()
      Process.exit(holder, :kill)

      receive do
        {:granted, t1} ->
          Process.exit(waiter, :kill)
          System.convert_time_unit(t1 - t0, :native, :nanosecond) / 1000
      after
        5_000 -> raise "waiter #{i} never got the lock"
      end
    end
  end

  defp wait_until(fun) do
    unless fun.() do
      Process.sleep(1)
      wait_until(fun)
    end
  end

  def percentiles(samples) do
    sorted = Enum.sort(samples)
    n = length(sorted)
    at = fn q -> Enum.at(sorted, min(n - 1, round(q * (n - 1)))) end
    %{p50: at.(0.5), p99: at.(0.99)}
  end
end

{:ok, _} = LocksBench.SeedCoordinator.start_link()
# Five rounds, the cases taking turns: ratios are medians of the rounds.
opts = [time: 5, warmup: 1, rounds: 5]

cycle =
  DSPex.Bench.run(
    %{
      "store acquire_lock + release_lock" => &LocksBench.store_cycle/0,
      "seed GenServer acquire + release" => &LocksBench.seed_cycle/0
    },
    [title: "uncontended acquire + release, one process"] ++ opts
  )

parallel =
  DSPex.Bench.run(
    %{
      "store, 2 processes, own keys" => {&LocksBench.store_cycle/0, parallel: 2},
      "seed GenServer, 2 processes, own keys" => {&LocksBench.seed_cycle/0, parallel: 2}
    },
    [title: "uncontended acquire + release, two processes"] ++ opts
  )

n = 500

store_handoff =
  LocksBench.handoff(
    n,
    &DSPex.Bridge.OptimizerCoordinator.acquire_lock(&1, &2, &3, timeout: 5_000),
    &match?({:ok, %{waiters: 1}}, DSPex.Bridge.OptimizerCoordinator.get_lock_info(&1))
  )
  |> LocksBench.percentiles()

seed_handoff =
  LocksBench.handoff(
    n,
    &LocksBench.SeedCoordinator.acquire_lock(&1, &2, &3, timeout: 5_000),
    fn _ -> LocksBench.SeedCoordinator.waiters() == 1 end
  )
  |> LocksBench.percentiles()

IO.puts("\n## holder death to the next waiter's grant (#{n} handoffs)\n")

IO.puts(
  "store: p50 #{Float.round(store_handoff.p50, 1)} us, p99 #{Float.round(store_handoff.p99, 1)} us"
)

IO.puts(
  "seed:  p50 #{Float.round(seed_handoff.p50, 1)} us, p99 #{Float.round(seed_handoff.p99, 1)} us"
)

IO.puts("\n## ratios\n")

one =
  DSPex.Bench.ratio(
    cycle,
    "store acquire_lock + release_lock",
    "seed GenServer acquire + release"
  )

two =
  DSPex.Bench.ratio(
    parallel,
    "store, 2 processes, own keys",
    "seed GenServer, 2 processes, own keys"
  )

us = fn ns -> Float.round(ns / 1000, 2) end
store = cycle["store acquire_lock + release_lock"]
seed = cycle["seed GenServer acquire + release"]
loadavg = File.read!("/proc/loadavg") |> String.split() |> hd()

IO.puts("""

| case | store | seed GenServer | ratio | target |
| --- | --- | --- | --- | --- |
| uncontended acquire + release, 1 process (average; ratio: median of 5 rounds) | #{us.(store.average_ns)} us | #{us.(seed.average_ns)} us | #{Float.round(one, 1)}x faster | >= 5x |
| same, median (p50) | #{us.(store.p50_ns)} us | #{us.(seed.p50_ns)} us | #{Float.round(seed.p50_ns / store.p50_ns, 1)}x faster | |
| same, 2 processes (own keys), throughput (median of 5 rounds) | #{DSPex.Bench.fmt_ips(parallel["store, 2 processes, own keys"].ips)} | #{DSPex.Bench.fmt_ips(parallel["seed GenServer, 2 processes, own keys"].ips)} | #{Float.round(two, 1)}x | |
| holder death -> next grant, p50 | #{Float.round(store_handoff.p50, 1)} us | #{Float.round(seed_handoff.p50, 1)} us | | reported |
| holder death -> next grant, p99 | #{Float.round(store_handoff.p99, 1)} us | #{Float.round(seed_handoff.p99, 1)} us | | reported |

(load average during the run: #{loadavg}, #{System.schedulers_online()} schedulers)
""")
