defmodule DSPex.Chaos.Runner do
  @moduledoc """
  The chaos run: a steady mixed load on four paths (in-VM callers on NIF
  and port sessions, Python clients through the gRPC gateway, callers on
  replicated sessions of three `:peer` nodes), the faults of
  `DSPex.Chaos.Faults` injected one after another while it runs, then
  every fault healed, the clients stopped, every variable read back, and
  `DSPex.Chaos.Checker` judging the histories. Prints the tables, writes
  the JSON, returns the result.
  """

  require Logger

  alias DSPex.Bridge.{DependencyManager, Gateway, SessionStore}
  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Bridge.Backend.Port, as: PortBackend
  alias DSPex.Bridge.State.Bridged
  alias DSPex.Chaos.{Checker, Client, Cluster, Faults, History, Report}
  alias DSPex.Test.HACluster, as: C

  @root Path.expand("../../..", __DIR__)

  @profiles %{
    short: %{
      nif: {8, 25},
      port: {4, 3},
      raft: {6, 1},
      grpc: {3, 2},
      interval: %{nif: 2, port: 2, raft: 5, grpc: 5},
      warmup_s: 5,
      window_s: 12,
      hold_s: 3,
      settle_s: 6
    },
    full: %{
      nif: {16, 64},
      port: {8, 5},
      raft: {6, 2},
      grpc: {6, 4},
      interval: %{nif: 2, port: 2, raft: 5, grpc: 5},
      warmup_s: 30,
      window_s: 180,
      hold_s: 30,
      settle_s: 60
    }
  }

  def profile(name), do: Map.fetch!(@profiles, name)

  def run(opts) do
    profile = Keyword.get(opts, :profile, :short)
    p = Map.merge(profile(profile), Map.new(Keyword.get(opts, :override, [])))
    faults = Keyword.get(opts, :faults, Faults.all())
    raft? = Keyword.get(opts, :raft, true) and Raft.System.available?()
    grpc? = Keyword.get(opts, :grpc, true)
    trace_dir = if Keyword.get(opts, :trace, false), do: trace_dir(profile)

    faults =
      Enum.filter(faults, fn f ->
        (raft? or f not in [:raft_leader_kill, :raft_partition]) and (grpc? or f != :gateway_kill)
      end)

    cfg = %{
      profile: profile,
      port_timeout: 1_000,
      raft_timeout: 2_000,
      grpc_timeout: 2_000,
      nif_timeout: 1_000,
      nif_sessions: sessions(p.nif),
      port_sessions: sessions(p.port),
      raft_sessions: if(raft?, do: sessions(p.raft), else: 0),
      grpc_sessions: if(grpc?, do: sessions(p.grpc), else: 0),
      cores: :erlang.system_info(:logical_processors),
      faults: faults,
      window_s: p.window_s,
      hold_s: p.hold_s
    }

    Logger.configure(level: :error)
    log("chaos #{profile}: faults #{Enum.join(faults, ", ")}")
    load_before = loadavg()

    Application.put_env(:dspex_bridge, :port_timeout, cfg.port_timeout)
    :ok = Bridged.install(:port, deadline: cfg.port_timeout)
    Faults.notify(self())
    :ok = Faults.start_signaller()
    Client.attach_cache_probe()
    Faults.attach_counter()
    Client.compute_crash(:off)

    grpc = if grpc?, do: start_gateway()
    id = System.unique_integer([:positive])

    dir = Path.join(System.tmp_dir!(), "dspex_chaos_#{id}")

    if raft? do
      log("starting 3 peer nodes")
      {:ok, _} = Cluster.start(for(x <- ~w(a b c), do: :"chaos#{id}#{x}"), dir)
    end

    specs = client_specs(p, cfg, id, raft?) |> Enum.map(&Map.put(&1, :trace_dir, trace_dir))
    log("starting #{length(specs)} Elixir clients")
    clients = Map.new(specs, fn s -> {s.id, {s, Client.start(s)}} end)
    await_ready(Map.keys(clients), 120_000)

    python =
      if grpc? do
        log("starting #{elem(p.grpc, 0)} Python clients")
        start_python(grpc, p, cfg, id, trace_dir)
      end

    # The load runs from here: throughput and the baseline count from now.
    load_started_us = System.os_time(:microsecond)
    log("warm-up #{p.warmup_s} s")
    Process.sleep(p.warmup_s * 1_000)

    raft_sids = for s <- specs, s.path == :raft, sid <- s.sids, do: sid
    nif_sids = for s <- specs, s.path == :nif, sid <- s.sids, do: sid
    ctx = %{hold_ms: p.hold_s * 1_000, raft_sids: raft_sids, nif_sids: nif_sids}

    injected =
      for f <- faults do
        window_end = System.monotonic_time(:millisecond) + p.window_s * 1_000
        log("fault #{f}")
        rec = Faults.inject(f, ctx)
        rec = heal_extra(f, rec, ctx)
        log("  #{rec.note}; healed after #{div(rec.healed_us - rec.at_us, 1_000)} ms")
        Process.sleep(max(0, window_end - System.monotonic_time(:millisecond)))
        rec
      end

    log("settling #{p.settle_s} s")
    Process.sleep(p.settle_s * 1_000)
    stopped_us = System.os_time(:microsecond)

    log("stopping clients")
    {histories, hung} = stop_clients(clients)
    {py_history, py_hung} = if python, do: stop_python(python), else: {History.new(), []}
    history = History.merge([py_history | histories])

    log("reading back #{map_size(history.vars)} variables")
    finals = read_back(history, specs)
    replicas = if raft?, do: check_replicas(history, raft_sids), else: []
    derived = check_derived(nif_sids)

    faults_with_windows = windows(injected, stopped_us)

    result =
      Checker.check(history, finals, faults_with_windows,
        hung: hung ++ py_hung,
        replicas: replicas,
        derived: derived,
        faults_failed: unmet(injected),
        started_us: load_started_us,
        stopped_us: stopped_us
      )

    result =
      Map.merge(result, %{
        config: Map.drop(cfg, [:faults]),
        machine: machine(load_before),
        fault_records: injected
      })

    IO.puts(Report.table(result, cfg))
    path = write_json(result, profile)
    IO.puts("JSON: #{Path.relative_to(path, @root)}")
    if trace_dir, do: IO.puts("every operation: #{Path.relative_to(trace_dir, @root)}/*.tsv")

    cleanup(raft?, grpc?)
    result
  end

  defp sessions({clients, per}), do: clients * per

  defp log(msg), do: IO.puts("[chaos #{Time.utc_now() |> Time.truncate(:second)}] #{msg}")

  # After the fault, as the runbook says: stale derived variables are
  # recomputed from their dead letters (each session's replay ends with a
  # sync of the dead-letter queue's file, so this takes a while; the fault
  # itself was healed when the compute function stopped crashing).
  defp heal_extra(:compute_crash, rec, ctx) do
    t0 = System.monotonic_time(:millisecond)

    replayed =
      ctx.nif_sids
      |> Enum.map(&DependencyManager.replay_dead_letters(&1, timeout: 5_000))
      |> Enum.map(fn
        {:ok, %{replayed: n}} -> n
        _ -> 0
      end)
      |> Enum.sum()

    took = System.monotonic_time(:millisecond) - t0

    %{
      rec
      | note:
          rec.note <>
            "; then dead letters replayed: #{replayed} in #{length(ctx.nif_sids)} sessions, #{took} ms"
    }
  end

  defp heal_extra(_f, rec, _ctx), do: rec

  # What each fault is for, which did not happen.
  defp unmet(injected) do
    for f <- injected,
        {key, expected} <- [
          breaker_opened: true,
          handler_detached: true,
          other_handler_alive: true
        ],
        Map.has_key?(f, key),
        Map.fetch!(f, key) != expected,
        do: %{fault: f.name, expected: key, note: f.note}
  end

  defp windows(faults, stopped_us) do
    ends = Enum.map(Enum.drop(faults, 1), & &1.at_us) ++ [stopped_us]
    Enum.zip_with(faults, ends, fn f, until -> Map.put(f, :until_us, until) end)
  end

  ## Clients

  defp client_specs(p, cfg, id, raft?) do
    owner = self()

    local =
      for path <- [:nif, :port] do
        {n, per} = Map.fetch!(p, path)

        for i <- 1..n//1 do
          %{
            id: "#{path}-#{i}",
            path: path,
            sids: for(k <- 1..per, do: "chaos-#{id}-#{path}-#{i}-#{k}"),
            interval_ms: p.interval[path],
            # The last port session of each client is read-mostly.
            read_mostly: if(path == :port, do: ["chaos-#{id}-#{path}-#{i}-#{per}"], else: []),
            timeout_ms: if(path == :nif, do: cfg.nif_timeout, else: cfg.port_timeout),
            owner: owner
          }
        end
      end

    raft =
      if raft? do
        {n, per} = p.raft

        for i <- 1..n//1 do
          %{
            id: "raft-#{i}",
            path: :raft,
            sids: for(k <- 1..per, do: "chaos-#{id}-raft-#{i}-#{k}"),
            interval_ms: p.interval.raft,
            timeout_ms: cfg.raft_timeout,
            call_timeout_ms: 3 * cfg.raft_timeout,
            node_index: i,
            peers: &Cluster.peers/0,
            owner: owner
          }
        end
      else
        []
      end

    List.flatten(local) ++ raft
  end

  defp await_ready([], _timeout), do: :ok

  defp await_ready(ids, timeout) do
    receive do
      {:chaos_ready, id} ->
        await_ready(List.delete(ids, id), timeout)

      {:chaos_setup_failed, id, reason} ->
        raise "client #{id} could not set up its sessions: #{inspect(reason)}"
    after
      timeout -> raise "clients not ready: #{inspect(ids)}"
    end
  end

  defp stop_clients(clients) do
    for {_id, {_spec, {pid, _ref}}} <- clients, do: send(pid, {:chaos_stop, self()})
    deadline = System.monotonic_time(:millisecond) + 15_000
    collect(clients, deadline, [], [])
  end

  defp collect(clients, _deadline, hs, hung) when map_size(clients) == 0, do: {hs, hung}

  defp collect(clients, deadline, hs, hung) do
    wait = max(0, deadline - System.monotonic_time(:millisecond))

    receive do
      {:chaos_history, id, h} ->
        {{_, {_, ref}}, clients} = Map.pop(clients, id)
        Process.demonitor(ref, [:flush])
        collect(clients, deadline, [h | hs], hung)

      {:DOWN, _ref, :process, _pid, reason} = down ->
        {id, _} = Enum.find(clients, fn {_, {_, {p, _}}} -> p == elem(down, 3) end)
        raise "client #{id} died: #{inspect(reason)}"
    after
      wait ->
        # What is left never answered its stop: its current call hangs.
        {more_hs, more_hung} =
          for {id, {_spec, {pid, _}}} <- clients, reduce: {[], []} do
            {a, b} ->
              info = Process.info(pid, [:dictionary, :current_stacktrace]) || []
              h = get_in(info, [:dictionary, :dspex_chaos_history]) || History.new()
              Process.exit(pid, :kill)
              {[h | a], [%{client: id, stacktrace: inspect(info[:current_stacktrace])} | b]}
          end

        {more_hs ++ hs, more_hung ++ hung}
    end
  end

  ## Python clients through the gateway

  defp start_gateway do
    {:ok, _} =
      Supervisor.start_child(
        DSPex.Bridge.Supervisor,
        {DSPex.Bridge.Gateway.Supervisor, [port: 0, ip: "127.0.0.1"]}
      )

    {:ok, port} = Gateway.port(30_000)
    {:ok, token} = Gateway.issue_token(:session, sessions: ["chaos-py-*"], ttl: :timer.hours(24))
    %{address: "127.0.0.1:#{port}", token: token}
  end

  defp start_python(grpc, p, cfg, id, trace_dir) do
    python = Path.join(@root, ".venv/bin/python")
    {workers, per} = p.grpc
    prefix = "chaos-py-#{id}"
    owner = self()

    if not File.dir?(Path.join(@root, "python/dspex_bridge/_proto")) do
      {_, 0} = System.cmd(python, ["python/dspex_bridge/_generate.py"], cd: @root)
    end

    args = [
      Path.join(@root, "bench/chaos/grpc_clients.py"),
      "--address",
      grpc.address,
      "--token",
      grpc.token,
      "--prefix",
      prefix,
      "--workers",
      Integer.to_string(workers),
      "--sessions-per-worker",
      Integer.to_string(per),
      "--timeout",
      Float.to_string(cfg.grpc_timeout / 1_000),
      "--interval-ms",
      Integer.to_string(p.interval.grpc)
    ]

    pid =
      spawn_link(fn ->
        port =
          Port.open({:spawn_executable, python}, [
            :binary,
            :exit_status,
            :stderr_to_stdout,
            {:line, 16_384},
            args: args,
            cd: @root
          ])

        h =
          for i <- 0..(workers - 1),
              k <- 0..(per - 1),
              var <- ~w(w0 w1 w2 w3 b0 b1 lk)a,
              reduce: History.new() do
            h -> History.declare(h, "#{prefix}-#{i}-#{k}", 0, var, 0)
          end

        if trace_dir do
          {:ok, file} =
            File.open(Path.join(trace_dir, "grpc.tsv"), [:write, :raw, :delayed_write])

          Process.put(:dspex_chaos_trace, file)
        end

        python_loop(port, owner, h, [], nil)
      end)

    receive do
      {:python_ready, ^pid, ^workers} -> :ok
      {:python_ready, ^pid, n} -> raise "only #{n} of #{workers} Python clients set up"
    after
      120_000 -> raise "the Python clients did not start"
    end

    pid
  end

  defp python_loop(port, owner, h, hung, stopper) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        case String.split(line, " ") do
          ["op" | fields] ->
            op = python_op(fields)

            if trace = Process.get(:dspex_chaos_trace),
              do: IO.binwrite(trace, History.trace_line(op))

            python_loop(port, owner, History.record(h, op), hung, stopper)

          ["ready", n] ->
            send(owner, {:python_ready, self(), String.to_integer(n)})
            python_loop(port, owner, h, hung, stopper)

          ["hung", client] ->
            python_loop(port, owner, h, [%{client: client, stacktrace: "python"} | hung], stopper)

          ["done"] ->
            python_loop(port, owner, h, hung, stopper)

          _ ->
            IO.puts("python: " <> line)
            python_loop(port, owner, h, hung, stopper)
        end

      {^port, {:data, {:noeol, _}}} ->
        python_loop(port, owner, h, hung, stopper)

      {^port, {:exit_status, _}} ->
        if trace = Process.get(:dspex_chaos_trace), do: File.close(trace)
        if stopper, do: send(stopper, {:python_history, h, hung})

      {:stop, from} ->
        Port.command(port, "stop\n")
        python_loop(port, owner, h, hung, from)
    end
  end

  @ops ~w(read write cas batch lock_acquire lock_release)
  @vars ~w(w0 w1 w2 w3 b0 b1 lk)

  defp python_op([client, sid, op, writes, start, dur, timeout, class, reason, read]) do
    op = if op in @ops, do: String.to_atom(op), else: raise("python op #{op}")

    %{
      path: :grpc,
      client: client,
      sid: sid,
      epoch: 0,
      op: op,
      writes: pairs(writes),
      read: List.first(pairs(read)),
      start_us: String.to_integer(start),
      dur_us: String.to_integer(dur),
      timeout_ms: String.to_integer(timeout),
      outcome:
        case class do
          "ok" -> :ok
          "refused" -> {:refused, reason}
          "fail" -> {:fail, reason}
          "unknown" -> {:unknown, reason}
        end,
      cache: false
    }
  end

  defp pairs("-"), do: []

  defp pairs(text) do
    for pair <- String.split(text, ","),
        [k, v] = String.split(pair, "="),
        k in @vars,
        do: {String.to_atom(k), parse_value(v)}
  end

  defp parse_value(v) do
    case Integer.parse(v) do
      {n, ""} -> n
      _ -> v
    end
  end

  defp stop_python(pid) do
    send(pid, {:stop, self()})

    receive do
      {:python_history, h, hung} -> {h, hung}
    after
      60_000 -> {History.new(), [%{client: "python", stacktrace: "did not stop"}]}
    end
  end

  ## Reading back

  defp read_back(history, specs) do
    raft_sids = MapSet.new(for s <- specs, s.path == :raft, sid <- s.sids, do: sid)

    history.vars
    |> Map.keys()
    |> Enum.map(fn {sid, _epoch, var} -> {sid, var} end)
    |> Enum.uniq()
    |> Map.new(fn {sid, var} ->
      read =
        if MapSet.member?(raft_sids, sid),
          do: fn -> raft_read(sid, var) end,
          else: fn -> SessionStore.get_variable(sid, var) end

      {{sid, var}, retry(read, 50)}
    end)
  end

  # A read after healing may meet a breaker still half-open, or a Raft
  # group still electing: tried again, 100 ms apart, up to `n` times.
  defp retry(read, n) do
    case read.() do
      {:ok, %{value: v}} ->
        {:ok, v}

      {:error, _} = error when n <= 1 ->
        error

      _ ->
        Process.sleep(100)
        retry(read, n - 1)
    end
  end

  defp raft_read(sid, var) do
    case Cluster.peers() do
      [p | _] -> C.call(p, SessionStore, :get_variable, [sid, var], 10_000)
      [] -> {:error, :no_node}
    end
  catch
    _, reason -> {:error, {:call_failed, reason}}
  end

  # Every replica's own engine holds what the group acknowledged, once it
  # has caught up (a barrier write carries the commit index to followers).
  defp check_replicas(history, raft_sids) do
    peers = Cluster.peers()

    for sid <- raft_sids do
      [p | _] = peers

      C.call(p, Raft, :write_with_position, [
        sid,
        :var_set,
        [sid, :__barrier__, 0, %{}, nil, nil]
      ])
    end

    for {{sid, _epoch, var}, _} <- history.vars,
        sid in raft_sids,
        p <- peers,
        problem = replica_problem(p, sid, var, 100),
        do: problem
  end

  defp replica_problem(p, sid, var, tries) do
    leader =
      case C.call(p, SessionStore, :get_variable, [sid, var]) do
        {:ok, %{value: v}} -> v
        other -> {:unreadable, other}
      end

    local = C.call(p, Raft, :read, [sid, :var_get_value, [sid, var, nil], :local])

    cond do
      local == {:ok, leader} -> nil
      tries <= 0 -> %{node: p.node, sid: sid, var: var, local: local, group: leader}
      true -> Process.sleep(100) && replica_problem(p, sid, var, tries - 1)
    end
  end

  defp check_derived(nif_sids) do
    for sid <- nif_sids,
        problem = derived_problem(sid),
        do: problem
  end

  defp derived_problem(sid) do
    with :ok <- DependencyManager.await_propagation(sid, 5_000),
         {:ok, %{found: %{in: %{value: i}, out: %{value: o}}}} <-
           SessionStore.get_variables(sid, [:in, :out]) do
      if o == 2 * i, do: nil, else: %{sid: sid, in: i, out: o}
    else
      other -> %{sid: sid, error: inspect(other)}
    end
  end

  ## Output

  defp machine(load_before) do
    {uname, 0} = System.cmd("uname", ["-srm"])

    %{
      cores: :erlang.system_info(:logical_processors),
      uname: String.trim(uname),
      otp: System.otp_release(),
      elixir: System.version(),
      loadavg_before: load_before,
      loadavg_after: loadavg(),
      memory_mb: div(:erlang.memory(:total), 1_048_576)
    }
  end

  defp loadavg do
    case File.read("/proc/loadavg") do
      {:ok, text} -> text |> String.split() |> Enum.take(3) |> Enum.join(" ")
      _ -> nil
    end
  end

  defp trace_dir(profile) do
    stamp = DateTime.utc_now() |> DateTime.to_iso8601(:basic) |> String.slice(0, 15)
    dir = Path.join(@root, "bench/chaos/results/trace-#{profile}-#{stamp}")
    File.mkdir_p!(dir)
    dir
  end

  defp write_json(result, profile) do
    dir = Path.join(@root, "bench/chaos/results")
    File.mkdir_p!(dir)
    stamp = DateTime.utc_now() |> DateTime.to_iso8601(:basic) |> String.slice(0, 15)
    path = Path.join(dir, "chaos-#{profile}-#{stamp}.json")

    result = update_in(result.violations, &Map.new(&1, fn {k, v} -> {k, Enum.take(v, 50)} end))
    File.write!(path, Report.json(result))
    path
  end

  defp cleanup(raft?, grpc?) do
    Client.compute_crash(:off)
    if pid = PortBackend.os_pid(), do: System.cmd("kill", ["-CONT", Integer.to_string(pid)])
    if raft?, do: Cluster.stop()

    if grpc? do
      Supervisor.terminate_child(DSPex.Bridge.Supervisor, DSPex.Bridge.Gateway.Supervisor)
      Supervisor.delete_child(DSPex.Bridge.Supervisor, DSPex.Bridge.Gateway.Supervisor)
    end

    :ok
  end
end
