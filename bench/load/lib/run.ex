defmodule DSPexLoad.Run do
  @moduledoc false
  # The controller: sets the path up, runs the profiles one after another on
  # the same sessions, prints a line per operation every interval, samples
  # memory and queues, checks, writes the JSON, and plots the memory.

  alias DSPexLoad.{Gen, JSON, Node, Report, Stats}

  @defaults %{
    path: "vm",
    backend: "nif",
    profiles: ["sustained"],
    rate: nil,
    duration: nil,
    scale: 1.0,
    sessions: 1000,
    callers: nil,
    prefill: nil,
    max_history: 50,
    timeout: 5_000,
    report_every: 10,
    sample_every: nil,
    warmup: nil,
    memory_tolerance: 0.10,
    max_queue: 1_000,
    rate_limit: nil,
    offered: nil,
    port_max_in_flight: nil,
    raft_max_in_flight: nil,
    grpc_procs: 2,
    grpc_max_in_flight: nil,
    check: false,
    plot: nil,
    analytics: false,
    msacc: false,
    null: false,
    out: nil
  }

  # Default target rates (ops/s) per path: the issue's targets.
  @targets %{"vm" => 100_000, "grpc" => 5_000, "raft" => 5_000}

  # Profile lengths (seconds) before --scale; spike: a third at the target,
  # a third at 2x, a third at the target.
  @lengths %{
    "ramp" => 300,
    "sustained" => 600,
    "spike" => 180,
    "soak" => 3600,
    "overload" => 60
  }

  def main(argv) do
    # The controller must not queue behind a thousand busy callers: its
    # reports and samples are on time however far behind they are.
    Process.flag(:priority, :high)
    opts = parse(argv)
    results_dir = Path.expand("../results", __DIR__)
    File.mkdir_p!(results_dir)
    machine = Report.machine()
    IO.puts("machine: #{machine.nproc} cpus (#{machine.cpu}), load #{inspect(machine.loadavg)}")

    target = setup_path(opts)

    outcomes =
      for {profile, secs} <- opts.profiles do
        result = run_profile(target, profile, %{opts | duration: secs || opts.duration})
        file = write(results_dir, opts, profile, Map.put(result, :machine_at_start, machine))
        IO.puts("results: #{file}")
        if opts.plot && result.memory != [], do: plot(file, opts.plot)
        {profile, result.checks.passed}
      end

    teardown(target)

    failed = for {p, false} <- outcomes, do: p

    cond do
      failed == [] ->
        IO.puts("load: all checks passed (#{Enum.map_join(opts.profiles, ", ", &elem(&1, 0))})")

      opts.check ->
        IO.puts("load: CHECKS FAILED in #{Enum.join(failed, ", ")}")
        System.halt(1)

      true ->
        IO.puts("load: checks failed in #{Enum.join(failed, ", ")}")
    end
  end

  ## Options

  defp parse(argv) do
    switches = [
      path: :string,
      backend: :string,
      profile: :string,
      rate: :integer,
      duration: :float,
      scale: :float,
      sessions: :integer,
      callers: :integer,
      prefill: :integer,
      max_history: :integer,
      timeout: :integer,
      report_every: :float,
      sample_every: :float,
      warmup: :float,
      memory_tolerance: :float,
      max_queue: :integer,
      rate_limit: :integer,
      offered: :integer,
      port_max_in_flight: :integer,
      raft_max_in_flight: :integer,
      grpc_procs: :integer,
      grpc_max_in_flight: :integer,
      check: :boolean,
      plot: :string,
      analytics: :boolean,
      msacc: :boolean,
      null: :boolean,
      out: :string
    ]

    {parsed, rest, invalid} = OptionParser.parse(argv, strict: switches)

    if rest != [] or invalid != [],
      do: raise(ArgumentError, "bad arguments: #{inspect(rest ++ invalid)}")

    opts = Enum.reduce(parsed, @defaults, fn {k, v}, acc -> Map.put(acc, k, v) end)

    # `name` or `name:seconds`, comma-separated.
    profiles =
      case parsed[:profile] do
        nil -> opts.profiles
        "all" -> ["ramp", "sustained", "spike", "soak"]
        list -> String.split(list, ",", trim: true)
      end
      |> Enum.map(fn p ->
        case String.split(p, ":") do
          [name] -> {name, nil}
          [name, secs] -> {name, elem(Float.parse(secs), 0)}
        end
      end)

    for {p, _} <- profiles,
        not Map.has_key?(@lengths, p),
        do: raise(ArgumentError, "unknown profile #{p}")

    rate = opts.rate || Map.fetch!(@targets, opts.path)
    %{opts | profiles: profiles, rate: rate}
  end

  ## Paths

  # A target: %{kind, nodes: [call target], ...}; every node runs a share of
  # the callers on its share of the sessions.
  defp setup_path(%{path: "vm"} = opts) do
    configure_local(opts)
    :ok = Node.prepare()
    run_id = System.unique_integer([:positive])
    ids = for i <- 1..opts.sessions, do: "load-#{run_id}-#{i}"

    create =
      [max_history: opts.max_history, backend: String.to_atom(opts.backend)] ++
        if(opts.rate_limit,
          do: [rate_limit: {opts.rate_limit, max(div(opts.rate_limit, 10), 1)}],
          else: []
        )

    prefill = opts.prefill || opts.max_history + 1
    {us, n} = :timer.tc(fn -> Node.setup(ids, create, prefill, true) end)
    IO.puts("setup: #{n} sessions (#{opts.backend}), prefill #{prefill} in #{div(us, 1000)} ms")
    callers = start_callers([:local], ids, opts, prefill)
    %{kind: :vm, nodes: [:local], callers: callers, sessions: n, opts: opts}
  end

  defp setup_path(%{path: "raft"} = opts) do
    Code.require_file("../../../test/support/ha_cluster.ex", __DIR__)
    cluster = Module.concat([DSPex, Test, HACluster])

    unless DSPex.Bridge.Backend.Raft.System.available?(),
      do: raise("ra missing: scripts/setup.sh")

    :ok = cluster.ensure_epmd()
    dir = Path.join(System.tmp_dir!(), "dspex_load_raft_#{System.unique_integer([:positive])}")
    id = System.unique_integer([:positive])
    peers = cluster.start(for(x <- ~w(a b c), do: :"load#{id}#{x}"), dir)
    modules = :persistent_term.get({__MODULE__, :modules})

    for p <- peers do
      for {m, bin} <- modules,
          do: {:module, _} = cluster.call(p, :code, :load_binary, [m, ~c"nofile", bin])

      if opts.raft_max_in_flight,
        do:
          cluster.call(p, Application, :put_env, [
            :dspex_bridge,
            :raft_max_in_flight,
            opts.raft_max_in_flight
          ])

      cluster.call(p, Application, :put_env, [:dspex_bridge, :raft_timeout, opts.timeout])
      :ok = cluster.call(p, Node, :prepare, [])
    end

    nodes = Enum.map(peers, &{:peer, &1.pid})
    ids = for i <- 1..opts.sessions, do: "lr-#{id}-#{i}"
    prefill = opts.prefill || 0
    shares = split(ids, length(nodes))

    {us, n} =
      :timer.tc(fn ->
        nodes
        |> Enum.zip(shares)
        |> Enum.map(fn {node, share} ->
          Task.async(fn ->
            call(
              node,
              Node,
              :setup,
              [
                share,
                [replicas: 3, max_history: opts.max_history, setup_concurrency: 4],
                prefill,
                true
              ],
              :infinity
            )
          end)
        end)
        |> Task.await_many(:infinity)
        |> Enum.sum()
      end)

    IO.puts("setup: #{n} replicated sessions (3 members each) in #{div(us, 1000)} ms")

    callers =
      nodes
      |> Enum.zip(shares)
      |> Enum.map(fn {node, share} ->
        start_callers(
          [node],
          share,
          %{opts | callers: div(opts.callers || opts.sessions, length(nodes))},
          prefill
        )
      end)
      |> Enum.sum()

    %{
      kind: :raft,
      nodes: nodes,
      callers: callers,
      sessions: n,
      opts: opts,
      peers: peers,
      cluster: cluster,
      dir: dir
    }
  end

  defp setup_path(%{path: "grpc"} = opts) do
    configure_local(opts)
    :ok = Node.prepare()

    grpc =
      [port: 0] ++
        if(opts.grpc_max_in_flight, do: [max_in_flight: opts.grpc_max_in_flight], else: [])

    {:ok, _} =
      Supervisor.start_child(DSPex.Bridge.Supervisor, {DSPex.Bridge.Gateway.Supervisor, grpc})

    {:ok, port} = DSPex.Bridge.Gateway.port(30_000)
    run_id = System.unique_integer([:positive])
    ids = for i <- 1..opts.sessions, do: "lg-#{run_id}-#{i}"
    prefill = opts.prefill || opts.max_history + 1

    {us, n} =
      :timer.tc(fn ->
        Node.setup(
          ids,
          [max_history: opts.max_history, backend: String.to_atom(opts.backend)],
          prefill,
          true
        )
      end)

    IO.puts(
      "setup: #{n} sessions behind the gateway on 127.0.0.1:#{port}, prefill #{prefill} in #{div(us, 1000)} ms"
    )

    {:ok, token} =
      DSPex.Bridge.Gateway.issue_token(:session, sessions: :any, ttl: :timer.hours(4))

    %{
      kind: :grpc,
      nodes: [:local],
      callers: opts.grpc_procs,
      sessions: n,
      opts: opts,
      address: "127.0.0.1:#{port}",
      token: token,
      ids: ids,
      prefill: prefill
    }
  end

  defp configure_local(opts) do
    if opts.port_max_in_flight do
      port = Application.get_env(:dspex_bridge, :port, [])

      Application.put_env(
        :dspex_bridge,
        :port,
        Keyword.put(port, :max_in_flight, opts.port_max_in_flight)
      )
    end

    if opts.raft_max_in_flight,
      do: Application.put_env(:dspex_bridge, :raft_max_in_flight, opts.raft_max_in_flight)

    if opts.analytics do
      {:ok, _} = Supervisor.start_child(DSPex.Bridge.Supervisor, {DSPex.Bridge.Analytics, []})
    end

    Logger.configure(level: :error)
  end

  # In this VM, by default a caller per 50 sessions (20 for the default
  # 1,000): a caller wakes once per 1 ms tick for all its due arrivals, so
  # at 100k ops/s 20 callers wake 20k times a second where one caller per
  # session would wake 100k times, and the schedulers' run queue is not a
  # thousand callers deep (docs/performance.md, "Where the latency at 100k/s
  # comes from"). The port backend (a call is a round trip to another
  # program: its admission limit is on calls in flight, which only that
  # many callers reach) and replicated sessions (`setup_path/1` divides the
  # sessions among the nodes) keep one caller per session.
  defp start_callers(nodes, ids, opts, prefill) do
    default =
      if nodes == [:local] and opts.backend == "nif",
        do: div(length(ids) + 49, 50),
        else: length(ids)

    callers = min(opts.callers || default, length(ids))
    groups = split(ids, callers)

    Enum.map(nodes, fn node -> call(node, Node, :start_callers, [groups, prefill]) end)
    |> Enum.sum()
  end

  defp split(list, n) do
    n = max(n, 1)

    list
    |> Enum.with_index()
    |> Enum.group_by(fn {_, i} -> rem(i, n) end, &elem(&1, 0))
    |> Map.values()
  end

  defp teardown(%{kind: :raft} = t) do
    for node <- t.nodes, do: call(node, Node, :stop, [])
    t.cluster.stop(t.peers)
    File.rm_rf(t.dir)
  end

  defp teardown(t), do: for(node <- t.nodes, do: call(node, Node, :stop, []))

  defp call(node, m, f, a, timeout \\ 60_000)
  defp call(:local, m, f, a, _timeout), do: apply(m, f, a)
  defp call({:peer, pid}, m, f, a, timeout), do: :peer.call(pid, m, f, a, timeout)

  ## A profile

  defp segments(profile, opts) do
    length_s = opts.duration || @lengths[profile] * opts.scale
    ms = round(length_s * 1000)
    r = opts.rate * 1.0

    case profile do
      "ramp" ->
        [{0, ms, 0.0, r}]

      "sustained" ->
        [{0, ms, r, r}]

      "spike" ->
        [
          {0, div(ms, 3), r, r},
          {div(ms, 3), div(2 * ms, 3), 2 * r, 2 * r},
          {div(2 * ms, 3), ms, r, r}
        ]

      "soak" ->
        [{0, ms, r / 2, r / 2}]

      "overload" ->
        [{0, ms, r, r}]
    end
  end

  defp run_profile(target, profile, opts) do
    {segments, capacity} =
      cond do
        profile == "overload" and opts.offered != nil ->
          # A given offered rate (to compare runs at the same load).
          IO.puts("overload: offering #{opts.offered} ops/s (--offered)")
          {segments(profile, %{opts | rate: opts.offered}), nil}

        profile == "overload" ->
          floor = probe(target, opts, true)
          capacity = probe(target, opts, false)

          if floor,
            do:
              IO.puts(
                "capacity: the driver alone #{round(floor)} ops/s (closed loop, nothing called); " <>
                  "with the library #{round(capacity)} ops/s (#{Float.round(capacity / floor, 3)} of it)"
              )

          Process.put(:driver_floor, floor)

          IO.puts(
            "overload: measured capacity #{round(capacity)} ops/s; offering 2x = #{round(2 * capacity)} ops/s"
          )

          {segments(profile, %{opts | rate: 2 * capacity}), capacity}

        true ->
          {segments(profile, opts), nil}
      end

    length_ms = Gen.length_ms(segments)
    sample_every = opts.sample_every || min(60.0, max(length_ms / 1000 / 12, 1.0))
    warmup_ms = round((opts.warmup || min(300.0, length_ms / 1000 / 6)) * 1000)

    IO.puts(
      "\n== #{opts.path} #{profile}: #{Float.round(length_ms / 1000, 1)} s, " <>
        "#{round(Gen.expected_ops(segments))} ops planned, #{target.callers} callers, " <>
        "#{target.sessions} sessions; memory every #{sample_every} s"
    )

    # Drain what an earlier profile left in the counters.
    _ = take_all(target)
    started = System.monotonic_time(:millisecond)
    if opts.msacc, do: for(node <- target.nodes, do: call(node, Node, :prof_start, []))
    runner = start_runner(target, profile, segments)
    state = %{intervals: [], totals: %{}, reasons: %{}, memory: [], last_report: started}
    for node <- target.nodes, do: call(node, Node, :start_sampler, [round(sample_every * 1000)])
    state = loop(target, runner, segments, started, opts, sample_every, state)
    state = %{state | memory: collect_samples(target)}
    elapsed_s = (System.monotonic_time(:millisecond) - started) / 1000
    extra = finish_runner(runner)

    # Before the verification's reads.
    prof =
      if opts.msacc, do: for(node <- target.nodes, do: {node, call(node, Node, :prof_stop, [])})

    {summary, verify} =
      case extra do
        %{"summary" => s, "verify" => v} ->
          {client_summary(s), %{checked: v["checked"], lost: v["lost"], examples: v["examples"]}}

        %{"error" => e} ->
          {summarize(%{}, 1), %{checked: 0, lost: 1, examples: [e]}}

        nil ->
          {summarize(state.totals, length_ms / 1000), verify_all(target)}
      end

    if prof, do: print_prof(prof, summary)

    memory = state.memory
    flat = flat(memory, warmup_ms, opts.memory_tolerance, target)
    checks = checks(profile, summary, verify, memory, flat, opts, extra)

    print_summary(profile, summary, verify, flat, checks, capacity)

    %{
      path: opts.path,
      backend: opts.backend,
      profile: profile,
      options: Map.drop(opts, [:profiles]),
      segments: segments,
      length_s: length_ms / 1000,
      elapsed_s: elapsed_s,
      capacity_ops_s: capacity,
      driver_floor_ops_s: Process.get(:driver_floor),
      callers: target.callers,
      sessions: target.sessions,
      summary: summary,
      intervals: Enum.reverse(state.intervals),
      reasons: state.reasons,
      verify: verify,
      memory: memory,
      memory_flatness: flat,
      warmup_s: warmup_ms / 1000,
      checks: checks,
      client: extra,
      prof: prof && Enum.map(prof, &prof_json/1),
      machine_at_end: Report.machine()
    }
  end

  # The callers of every node run the profile; the controller watches.
  defp start_runner(%{kind: :grpc} = t, profile, segments) do
    out =
      Path.join(System.tmp_dir!(), "dspex_grpc_load_#{System.unique_integer([:positive])}.json")

    py = Path.expand("../../.venv/bin/python", Path.dirname(__DIR__))

    script = Path.expand("grpc_load.py", Path.dirname(__DIR__))

    args = [
      script,
      "--address",
      t.address,
      "--token",
      t.token,
      "--sessions",
      Enum.join(t.ids, ","),
      "--procs",
      Integer.to_string(t.opts.grpc_procs),
      "--segments",
      JSON.encode(segments),
      "--timeout",
      Integer.to_string(t.opts.timeout),
      "--report-every",
      to_string(t.opts.report_every),
      "--prefill",
      Integer.to_string(t.prefill),
      "--label",
      "grpc #{profile}",
      "--out",
      out
    ]

    port =
      Port.open({:spawn_executable, py}, [
        :binary,
        :exit_status,
        :stderr_to_stdout,
        {:line, 4096},
        args: args
      ])

    %{kind: :grpc, port: port, out: out, done: false}
  end

  defp start_runner(t, _profile, segments) do
    tasks =
      for node <- t.nodes do
        Task.async(fn ->
          call(node, Node, :run, [segments, 300, t.opts.timeout, t.opts.null], :infinity)
        end)
      end

    %{kind: :beam, tasks: tasks}
  end

  defp runner_done?(%{kind: :beam, tasks: tasks}),
    do: Enum.all?(tasks, fn %Task{ref: ref} -> Process.get({:done, ref}) end)

  defp runner_done?(%{kind: :grpc, port: port}), do: Process.get({:done, port}) == true

  # The loop has taken the tasks' replies.
  defp finish_runner(%{kind: :beam}), do: nil

  defp finish_runner(%{kind: :grpc, out: out}) do
    case File.read(out) do
      {:ok, text} ->
        File.rm(out)
        JSON.decode!(text)

      _ ->
        %{"error" => "the Python driver wrote no results"}
    end
  end

  defp loop(target, runner, segments, started, opts, sample_every, state) do
    receive do
      {ref, _} when is_reference(ref) ->
        Process.put({:done, ref}, true)
        Process.demonitor(ref, [:flush])
        continue(target, runner, segments, started, opts, sample_every, state)

      {port, {:data, {_, line}}} when is_port(port) ->
        IO.puts(line)
        continue(target, runner, segments, started, opts, sample_every, state)

      {port, {:exit_status, _}} when is_port(port) ->
        Process.put({:done, port}, true)
        continue(target, runner, segments, started, opts, sample_every, state)
    after
      200 -> continue(target, runner, segments, started, opts, sample_every, state)
    end
  end

  defp continue(target, runner, segments, started, opts, sample_every, state) do
    now = System.monotonic_time(:millisecond)
    done = runner_done?(runner)

    state =
      if now - state.last_report >= opts.report_every * 1000 or done do
        report(target, segments, started, now, state, runner)
      else
        state
      end

    if done,
      do: state,
      else: loop(target, runner, segments, started, opts, sample_every, state)
  end

  defp report(target, segments, started, now, state, runner) do
    seconds = (now - state.last_report) / 1000
    t = (now - started) / 1000
    # The gRPC driver reports its own intervals (client-side latency).
    {per_op, reasons} = if runner.kind == :grpc, do: {%{}, []}, else: take_all(target)

    offered = Gen.rate_at(segments, round(now - started - 300 - seconds * 500))

    if runner.kind != :grpc do
      IO.puts(Report.line("t=#{round(t)}s", per_op, seconds, offered))
    end

    latest = Enum.map(target.nodes, fn node -> call(node, Node, :latest_sample, [], 10_000) end)

    # Printed once per new sample.
    if Enum.all?(latest, &is_map/1) and
         Process.put(:printed_sample, hd(latest).t_ms) != hd(latest).t_ms do
      s = combine(latest)
      mb = fn v -> if is_integer(v), do: "#{Float.round(v / 1_048_576, 1)}MB", else: "-" end

      IO.puts(
        "    memory: beam #{mb.(s.beam_total)} engine #{mb.(s.engine_bytes)} rss #{mb.(s.beam_rss)}" <>
          " port #{mb.(s.port_rss)} gateway #{mb.(s.gateway_rss)} | longest library queue #{s.queue_max}" <>
          " | dead letters #{inspect(s[:dlq_depth])}" <>
          " | schedulers #{inspect(s.scheduler_busy)} run queue #{s.run_queue} load #{inspect(s.loadavg)}"
      )
    end

    interval = %{
      t_s: Float.round(t, 1),
      seconds: Float.round(seconds, 2),
      offered_ops_s: Float.round(offered, 1),
      ops: Map.new(per_op, fn {op, s} -> {op, Report.figures(s, seconds)} end)
    }

    reasons =
      Enum.reduce(reasons, state.reasons, fn {k, n}, acc ->
        Map.update(acc, inspect(k), n, &(&1 + n))
      end)

    %{
      state
      | intervals: [interval | state.intervals],
        totals: Stats.merge_ops(state.totals, per_op),
        reasons: reasons,
        last_report: now
    }
  end

  defp take_all(target) do
    target.nodes
    |> Enum.map(fn node -> call(node, Node, :take, [], 30_000) end)
    |> Enum.reduce({%{}, []}, fn {per_op, reasons}, {acc, rs} ->
      {Stats.merge_ops(acc, per_op), reasons ++ rs}
    end)
  end

  # Every node's samples, in time order; several nodes' samples of the same
  # round are combined into one sample of the cluster.
  defp collect_samples(target) do
    per_node = Enum.map(target.nodes, fn node -> call(node, Node, :stop_sampler, [], 120_000) end)
    rounds = per_node |> Enum.map(&length/1) |> Enum.min()

    for i <- 0..(rounds - 1)//1 do
      combine(Enum.map(per_node, &Enum.at(&1, i)))
    end
  end

  defp combine(samples) do
    case samples do
      [one] ->
        one

      many ->
        # One sample of the cluster: sums of sizes, the worst queue.
        sum = fn key ->
          many |> Enum.map(&Map.get(&1, key)) |> Enum.reject(&is_nil/1) |> Enum.sum()
        end

        %{
          t_ms: hd(many).t_ms,
          beam_total: sum.(:beam_total),
          beam_processes: sum.(:beam_processes),
          beam_binary: sum.(:beam_binary),
          beam_ets: sum.(:beam_ets),
          engine_bytes: sum.(:engine_bytes),
          beam_rss: sum.(:beam_rss),
          port_rss: nil,
          gateway_rss: nil,
          process_count: sum.(:process_count),
          queue_max: many |> Enum.map(& &1.queue_max) |> Enum.max(),
          queue_top:
            many
            |> Enum.flat_map(fn s -> Enum.map(s.queue_top, &Map.put(&1, :node, s.node)) end)
            |> Enum.sort_by(& &1.len, :desc)
            |> Enum.take(3),
          scheduler_busy:
            many
            |> Enum.map(& &1.scheduler_busy)
            |> Enum.reject(&is_nil/1)
            |> then(&if(&1 == [], do: nil, else: Float.round(Enum.sum(&1) / length(&1), 3))),
          run_queue: sum.(:run_queue),
          loadavg: hd(many).loadavg,
          nodes: many
        }
    end
  end

  defp verify_all(%{kind: :grpc}), do: nil

  defp verify_all(target) do
    target.nodes
    |> Enum.map(fn node -> call(node, Node, :verify, [], 600_000) end)
    |> Enum.reduce(%{checked: 0, lost: 0, examples: []}, fn r, acc ->
      %{
        checked: acc.checked + r.checked,
        lost: acc.lost + r.lost,
        examples: Enum.take(r.examples ++ acc.examples, 10)
      }
    end)
  end

  defp summarize(totals, seconds) do
    per_op = Map.new(totals, fn {op, s} -> {op, Report.figures(s, seconds)} end)
    %{ops: per_op, all: Report.figures(Report.all(totals), seconds)}
  end

  defp flat(memory, warmup_ms, tol, target) do
    keys =
      [:beam_total, :engine_bytes, :beam_rss] ++
        if(target.kind == :grpc, do: [:gateway_rss], else: []) ++
        if(target.opts.backend == "port" and target.kind != :raft, do: [:port_rss], else: [])

    Map.new(keys, &{&1, Report.flatness(memory, &1, warmup_ms, tol)})
  end

  ## Checks: the run's own verdict

  defp checks(profile, summary, verify, memory, flat, opts, client) do
    client_checks = if is_map(client), do: Map.get(client, "checks", %{}), else: %{}

    all = summary.all
    queue_max = memory |> Enum.map(& &1.queue_max) |> Enum.max(fn -> 0 end)

    base = [
      {"no errors other than clear refusals", all.errors == 0, all.errors},
      {"every caller answered within its timeout (#{opts.timeout} ms)", all.unanswered == 0,
       all.unanswered},
      {"zero acknowledged writes lost", verify.lost == 0, verify.lost},
      {"operations completed", all.ok > 0, all.ok},
      {"library mailboxes bounded (max <= #{opts.max_queue})", queue_max <= opts.max_queue,
       queue_max}
    ]

    # The engine that holds the sessions: the NIF's, or the port program's.
    memory_checks =
      for {key, f} <- flat,
          f.flat != nil,
          key in [:beam_total, if(opts.backend == "port", do: :port_rss, else: :engine_bytes)] do
        {"#{key} flat within #{round(opts.memory_tolerance * 100)}% after warm-up", f.flat,
         %{growth: f.growth, trend: f.trend_over_window, band: f.band}}
      end

    overload =
      if profile == "overload" do
        # A refusal's own time (from its call, not from the arrival: refusals
        # come when callers are behind) against admitted calls' latency.
        ok_p99 = get_in(all, [:latency_us, "p99"])
        ref_p99 = get_in(all, [:refused_service_us, "p99"])

        [
          {"overload produced clear refusals", all.refused > 0, all.refused},
          {"a refusal takes less than an admitted call (p99, us)",
           is_number(ref_p99) and is_number(ok_p99) and ref_p99 <= ok_p99, {ref_p99, ok_p99}}
        ]
      else
        []
      end

    extra = for {name, v} <- client_checks, do: {name, v == true, v}
    list = base ++ memory_checks ++ overload ++ extra

    %{
      passed: Enum.all?(list, fn {_, ok, _} -> ok end),
      list: Enum.map(list, fn {name, ok, value} -> %{check: name, passed: ok, value: value} end)
    }
  end

  # The Python driver's summary, in this module's shape.
  defp client_summary(s) do
    conv = fn f ->
      %{
        ok: f["ok"],
        refused: f["refused"],
        errors: f["errors"],
        unanswered: f["unanswered"],
        ok_per_s: f["ok_per_s"],
        refused_per_s: f["refused_per_s"],
        latency_us: f["latency_us"],
        refused_latency_us: f["refused_latency_us"],
        refused_service_us: f["refused_service_us"]
      }
    end

    %{all: conv.(s["all"]), ops: Map.new(s["ops"], fn {k, v} -> {k, conv.(v)} end)}
  end

  defp print_summary(profile, summary, verify, flat, checks, capacity) do
    IO.puts(
      "\n-- summary: #{profile}" <>
        if(capacity, do: " (capacity #{round(capacity)} ops/s)", else: "")
    )

    for {op, f} <- Enum.sort(summary.ops), f.ok + f.refused + f.errors + f.unanswered > 0 do
      IO.puts(
        "  #{String.pad_trailing(to_string(op), 11)} ok #{f.ok} (#{f.ok_per_s}/s) refused #{f.refused} " <>
          "errors #{f.errors} unanswered #{f.unanswered} | latency us #{inspect(f.latency_us)}" <>
          if(f.refused > 0,
            do:
              " | refused us #{inspect(f.refused_latency_us)} (in the library: #{inspect(f[:refused_service_us])})",
            else: ""
          )
      )
    end

    a = summary.all

    IO.puts(
      "  all         ok #{a.ok} (#{a.ok_per_s}/s) refused #{a.refused} errors #{a.errors} unanswered #{a.unanswered} | latency us #{inspect(a.latency_us)}"
    )

    if verify,
      do:
        IO.puts(
          "  verify: #{verify.checked} variables checked, #{verify.lost} lost #{inspect(verify.examples)}"
        )

    for {k, f} <- flat do
      IO.puts(
        "  memory #{k}: " <>
          inspect(Map.take(f, [:samples, :min, :max, :band, :growth, :trend_over_window, :flat]))
      )
    end

    for c <- checks.list,
        do: IO.puts("  [#{if c.passed, do: "ok", else: "FAIL"}] #{c.check}: #{inspect(c.value)}")
  end

  defp print_prof(prof, summary) do
    ops = summary.all.ok + summary.all.refused + summary.all.errors + summary.all.unanswered

    for {node, p} <- prof do
      IO.puts("\n-- where the time went (#{inspect(node)})")
      for {type, states} <- p.msacc, do: IO.puts("  msacc #{type}: #{inspect(states)}")

      IO.puts(
        "  VM CPU #{p.cpu_ms} ms, #{Float.round(p.cpu_ms * 1000 / max(ops, 1), 2)} us per operation"
      )

      IO.puts(
        "  reductions #{p.reductions_total}, by processes gone or new: #{p.reductions_unseen}"
      )

      for {g, n, r} <- p.groups do
        share = Float.round(100 * r / max(p.reductions_total, 1), 1)
        IO.puts("  #{share}% #{inspect(g)} (#{n} processes)")
      end
    end
  end

  defp prof_json({node, p}) do
    groups =
      Enum.map(p.groups, fn {g, n, r} -> %{group: inspect(g), processes: n, reductions: r} end)

    p |> Map.put(:groups, groups) |> Map.put(:node, inspect(node))
  end

  ## Overload: what can the path serve? Closed loop, every caller as fast
  ## as it can, for a few seconds.

  # The gRPC path's capacity is its Python clients' (closed loop, client side).
  defp probe(%{kind: :grpc} = t, opts, null) do
    if null do
      nil
    else
      seconds = max(min(5.0, (opts.duration || @lengths["overload"] * opts.scale) / 3), 2.0)
      py = Path.expand("../../.venv/bin/python", Path.dirname(__DIR__))

      script = Path.expand("grpc_load.py", Path.dirname(__DIR__))

      args = [
        script,
        "--address",
        t.address,
        "--token",
        t.token,
        "--sessions",
        Enum.join(t.ids, ","),
        "--procs",
        Integer.to_string(t.opts.grpc_procs),
        "--segments",
        "[[0,1,0,0]]",
        "--timeout",
        Integer.to_string(t.opts.timeout),
        "--closed",
        to_string(seconds)
      ]

      {out, 0} = System.cmd(py, args)

      %{"capacity" => capacity} =
        out |> String.split("\n", trim: true) |> List.last() |> JSON.decode!()

      capacity
    end
  end

  defp probe(target, opts, null) do
    seconds = max(min(5.0, (opts.duration || @lengths["overload"] * opts.scale) / 3), 2.0)
    _ = take_all(target)
    ms = round(seconds * 1000)

    tasks =
      for node <- target.nodes,
          do: Task.async(fn -> call(node, Node, :run_closed, [ms, null], :infinity) end)

    Task.await_many(tasks, :infinity)
    {per_op, _} = take_all(target)
    all = Report.figures(Report.all(per_op), seconds)
    all.ok / seconds
  end

  ## Output

  defp write(dir, opts, profile, result) do
    stamp = Calendar.strftime(DateTime.utc_now(), "%Y%m%dT%H%M%S")

    name =
      opts.out ||
        "#{opts.path}#{if opts.backend != "nif", do: "-" <> opts.backend, else: ""}-#{profile}"

    file = Path.join(dir, "#{name}-#{stamp}.json")
    json = JSON.encode(result)
    File.write!(file, json)
    File.write!(Path.join(dir, "#{name}-latest.json"), json)
    file
  end

  defp plot(file, png) do
    py = Path.expand("../../.venv/bin/python", Path.dirname(__DIR__))
    script = Path.expand("plot.py", Path.dirname(__DIR__))

    case System.cmd(py, [script, file, png], stderr_to_stdout: true) do
      {out, 0} -> IO.puts(String.trim(out))
      {out, _} -> IO.puts("plot failed: #{out}")
    end
  end
end
