defmodule DSPex.Test.HACluster do
  @moduledoc false
  # Real nodes for the HA fault tests: `:peer` nodes on loopback, controlled
  # over their standard I/O (so cutting distribution between peers never
  # cuts the test's control), each with the project's and ra's code, its own
  # ra data directory, and dspex_bridge started.

  @cookie :dspex_ha_test

  def ensure_epmd do
    case :erl_epmd.names() do
      {:ok, _} -> :ok
      _ -> System.cmd("epmd", ["-daemon"]) && wait_epmd(50)
    end
  end

  defp wait_epmd(0), do: {:error, :no_epmd}

  defp wait_epmd(n) do
    case :erl_epmd.names() do
      {:ok, _} -> :ok
      _ -> Process.sleep(20) && wait_epmd(n - 1)
    end
  end

  @doc "Starts `names` as peers sharing `dir`, connected to each other."
  def start(names, dir) do
    peers = Enum.map(names, &start_peer(&1, dir))
    connect_all(peers)
    peers
  end

  def start_peer(name, dir) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, pid, node} =
      :peer.start(%{
        name: name,
        host: ~c"localhost",
        connection: :standard_io,
        args:
          [
            ~c"-setcookie",
            Atom.to_charlist(@cookie),
            ~c"-kernel",
            ~c"net_ticktime",
            ~c"4",
            ~c"-kernel",
            ~c"prevent_overlapping_partitions",
            ~c"false"
          ] ++ paths
      })

    :ok = :peer.call(pid, Application, :put_env, [:dspex_bridge, :ra_data_dir, dir])
    :ok = :peer.call(pid, Application, :put_env, [:dspex_bridge, :raft_timeout, 2_000])
    :ok = :peer.call(pid, Application, :put_env, [:logger, :level, :error])
    {:ok, _} = :peer.call(pid, Application, :ensure_all_started, [:dspex_bridge], 30_000)
    %{pid: pid, node: node, name: name, os_pid: :peer.call(pid, :os, :getpid, [])}
  end

  def connect_all(peers) do
    for a <- peers, b <- peers, a.node < b.node do
      true = call(a, :net_kernel, :connect_node, [b.node])
    end

    :ok
  end

  def call(peer, m, f, a, timeout \\ 15_000), do: :peer.call(peer.pid, m, f, a, timeout)

  def kill9(peer), do: signal(peer, "-9")
  def sigstop(peer), do: signal(peer, "-STOP")
  def sigcont(peer), do: signal(peer, "-CONT")

  defp signal(peer, sig),
    do: System.cmd("kill", [sig, to_string(peer.os_pid)], stderr_to_stdout: true)

  # Never leaves a stopped process behind: a peer a failed test left
  # SIGSTOPped is continued before it is stopped.
  def stop(peers) do
    for p <- peers do
      sigcont(p)

      try do
        :peer.stop(p.pid)
      catch
        _, _ -> :ok
      end
    end

    :ok
  end

  @doc "Cuts `peer` off from `others` (bad cookie per pair, then disconnect)."
  def partition(peer, others) do
    # Different cookies on the two sides, so a reconnection attempt fails.
    for o <- others do
      call(peer, :erlang, :set_cookie, [o.node, :bad_cookie_inside])
      call(o, :erlang, :set_cookie, [peer.node, :bad_cookie_outside])
      call(peer, :erlang, :disconnect_node, [o.node])
    end

    :ok
  end

  def heal(peer, others) do
    for o <- others do
      call(peer, :erlang, :set_cookie, [o.node, @cookie])
      call(o, :erlang, :set_cookie, [peer.node, @cookie])
      call(peer, :net_kernel, :connect_node, [o.node])
    end

    :ok
  end

  @doc """
  A client on `peer` writing `n` values 1..n to variable `var` of `sid`, one
  after another; each operation recorded as `{value, :ok, pos}`,
  `{value, :fail, reason}` or `{value, :info, :timeout}` (unknown outcome).
  """
  def writer(peer, sid, var, n, pause_ms \\ 5) do
    parent = self()

    Task.async(fn ->
      for v <- 1..n do
        outcome =
          try do
            call(
              peer,
              DSPex.Bridge.Backend.Raft,
              :write_with_position,
              [
                sid,
                :var_set,
                [sid, var, v, %{}, nil, nil]
              ],
              10_000
            )
          catch
            _, reason -> {:error, {:call_failed, reason}}
          end

        if pause_ms > 0, do: Process.sleep(pause_ms)

        case outcome do
          {:ok, {:ok, _version}, pos} -> send(parent, {:acked, var, v}) && {v, :ok, pos}
          {:ok, {:error, reason}, _pos} -> {v, :fail, reason}
          {:error, :timeout_unknown_outcome} -> {v, :info, :timeout}
          {:error, {:call_failed, _}} -> {v, :info, :call_failed}
          {:error, reason} -> {v, :fail, reason}
        end
      end
    end)
  end

  @doc """
  The node `peer` knows as the leader of `sid` once it is not `old` (the
  group elected one after `old` was killed, stopped or cut off), waiting
  up to `timeout` ms: calls made meanwhile may fail, as they would for a
  user during a failover.
  """
  def await_new_leader(peer, sid, old, timeout \\ 30_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    await_new_leader_until(peer, sid, old, deadline)
  end

  defp await_new_leader_until(peer, sid, old, deadline) do
    case call(peer, DSPex.Bridge.Backend.Raft, :leader_node, [sid]) do
      {:ok, n} when n != old ->
        n

      other ->
        if System.monotonic_time(:millisecond) >= deadline,
          do: raise("no new leader of #{sid} on #{peer.node}: #{inspect(other)}")

        Process.sleep(25)
        await_new_leader_until(peer, sid, old, deadline)
    end
  end

  @doc "Values of `var` this replica's history holds (a local read)."
  def local_values(peer, sid, var) do
    {:ok, entries} =
      call(peer, DSPex.Bridge.Backend.Raft, :read, [
        sid,
        :var_history,
        [sid, var, 100_000, nil],
        :local
      ])

    # The history holds the earlier values; the current one is the variable's.
    {:ok, current} =
      call(peer, DSPex.Bridge.Backend.Raft, :read, [sid, :var_get_value, [sid, var, nil], :local])

    MapSet.new([current | Enum.map(entries, & &1.value)])
  end

  defp barrier([r | _], sid) do
    call(r, DSPex.Bridge.Backend.Raft, :write_with_position, [
      sid,
      :var_set,
      [sid, :__barrier__, 0, %{}, nil, nil]
    ])
  end

  # A replica that was cut off catches up from the log: poll until it holds
  # every acknowledged value, up to ~10 s.
  defp await_values(r, sid, var, acked, tries) do
    values =
      try do
        local_values(r, sid, var)
      rescue
        _ -> MapSet.new()
      catch
        _, _ -> MapSet.new()
      end

    missing = Enum.reject(acked, &MapSet.member?(values, &1))

    cond do
      missing == [] -> :ok
      tries == 0 -> raise("acknowledged writes lost on #{r.node}: #{inspect(missing)}")
      true -> Process.sleep(50) && await_values(r, sid, var, acked, tries - 1)
    end
  end

  @doc """
  The checker: every acknowledged write is in every live replica's history;
  log positions of one client's acknowledged writes strictly increase; no
  term had two leaders accepting writes. Returns the acknowledged count.
  """
  def check!(history, replicas, sid, var) do
    acked = for {v, :ok, pos} <- history, do: {v, pos}

    # ra tells followers the commit index with the next entry: one more write
    # (to a variable that does not exist, a no-op) carries it to every replica.
    barrier(replicas, sid)
    for r <- replicas, do: await_values(r, sid, var, Enum.map(acked, &elem(&1, 0)), 200)

    positions = Enum.map(acked, fn {_, p} -> {p.term, p.index} end)

    unless positions == Enum.sort(positions) and positions == Enum.uniq(positions),
      do: raise("log positions not increasing: #{inspect(positions)}")

    acked
    |> Enum.group_by(fn {_, p} -> p.term end, fn {_, p} -> p.leader end)
    |> Enum.each(fn {term, leaders} ->
      if length(Enum.uniq(leaders)) > 1,
        do: raise("two leaders accepted writes in term #{term}: #{inspect(Enum.uniq(leaders))}")
    end)

    length(acked)
  end

  @doc """
  `k` concurrent clients on `peer`, each writing `n` values to its own
  variable `:"w<i>"` of `sid` through `SessionStore.update_variable/3` (the
  batched path). Returns, per client, `{var, [{value, :ok | :fail | :info, reason}]}`.
  """
  def store_writers(peer, sid, k, n) do
    for i <- 1..k do
      var = :"w#{i}"

      Task.async(fn ->
        history =
          for v <- 1..n do
            outcome =
              try do
                call(peer, DSPex.Bridge.SessionStore, :update_variable, [sid, var, v], 15_000)
              catch
                _, reason -> {:error, {:call_failed, reason}}
              end

            case outcome do
              :ok -> {v, :ok, nil}
              {:error, :timeout_unknown_outcome} -> {v, :info, :timeout}
              {:error, {:call_failed, r}} -> {v, :info, r}
              {:error, reason} -> {v, :fail, reason}
            end
          end

        {var, history}
      end)
    end
  end

  @doc "Every acknowledged value of `histories` (from `store_writers/4`) is on each of `replicas`."
  def check_store!(histories, replicas, sid) do
    barrier(replicas, sid)

    Enum.reduce(histories, 0, fn {var, history}, count ->
      acked = for {v, :ok, _} <- history, do: v
      for r <- replicas, do: await_values(r, sid, var, acked, 200)
      count + length(acked)
    end)
  end

  ## Telemetry on a peer
  #
  # The controller is not a distributed node, so events on a peer are
  # collected there by a process that `await_event/3` (a call made on the
  # peer) asks.

  @doc "Starts collecting `events` on the node it runs on (call it on a peer); returns the collector."
  def collect(events) do
    pid = spawn(__MODULE__, :collector, [[], []])

    :ok =
      DSPex.Bridge.Telemetry.attach_many({__MODULE__, pid}, events, &__MODULE__.forward/4, pid)

    pid
  end

  @doc false
  def forward(event, measurements, metadata, pid),
    do: send(pid, {:event, {event, measurements, metadata}})

  @doc false
  def collector(seen, waiting) do
    receive do
      {:event, {event, _, _} = e} ->
        {ready, waiting} = Enum.split_with(waiting, fn {want, _} -> want == event end)
        for {_, from} <- ready, do: send(from, {:collected, e})
        collector([e | seen], waiting)

      {:await, event, from} ->
        case Enum.find(Enum.reverse(seen), fn {ev, _, _} -> ev == event end) do
          nil -> collector(seen, [{event, from} | waiting])
          e -> send(from, {:collected, e}) && collector(seen, waiting)
        end
    end
  end

  @doc "On the collector's node: the first `event` it saw or sees within `timeout`, or `:timeout`."
  def await_event(collector, event, timeout) do
    send(collector, {:await, event, self()})

    receive do
      {:collected, e} -> e
    after
      timeout -> :timeout
    end
  end
end
