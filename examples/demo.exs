# The main job: a realistic tuning session on the embedded NIF backend,
# printing what happens as it goes. Run with `make demo` (or
# `mix run examples/demo.exs`). Each feature has its own section below.

defmodule Demo do
  alias DSPex.Bridge.SessionStore

  def say(text), do: IO.puts(text)
  def show(label, value), do: IO.puts("  #{label}: #{inspect(value, pretty: true, limit: 12)}")
  def section(title), do: IO.puts("\n== #{title} ==")

  def run do
    sid = "demo-tuning-#{System.unique_integer([:positive])}"
    sessions(sid)
    dependencies(sid)
    optimizers()
    access_control()
    port_backend()
    context()
    SessionStore.delete_session(sid)
    observability()
    say("\ndone.")
  end

  # Typed variables with constraints, conditional writes, history, rollback,
  # export and import.
  defp sessions(sid) do
    section("Session store: typed, versioned variables")
    {:ok, ^sid} = SessionStore.create_session(sid, ttl: :timer.minutes(30), max_history: 50)
    say("created session #{sid}")

    {:ok, _} =
      SessionStore.register_variable(sid, :temperature, :float, 0.7,
        constraints: %{min: 0.0, max: 2.0},
        description: "sampling temperature"
      )

    {:ok, _} =
      SessionStore.register_variable(sid, :max_tokens, :integer, 256,
        constraints: %{min: 1, max: 4096}
      )

    {:ok, _} =
      SessionStore.register_variable(sid, :strategy, :choice, "chain_of_thought",
        constraints: %{choices: ["predict", "chain_of_thought", "react"]}
      )

    {:ok, _} =
      SessionStore.register_variable(sid, :instruction, :string, "Answer briefly.",
        constraints: %{max_length: 200}
      )

    say("registered temperature, max_tokens, strategy, instruction")

    for {t, score} <- [{0.9, 0.71}, {1.1, 0.74}, {0.8, 0.78}] do
      :ok = SessionStore.update_variable(sid, :temperature, t, %{trial_score: score})
      say("  tuner tried temperature=#{t} (score #{score})")
    end

    show("bad write (above max)", SessionStore.update_variable(sid, :temperature, 3.5))
    show("bad write (wrong type)", SessionStore.update_variable(sid, :max_tokens, "many"))

    show(
      "bad write (not a choice)",
      SessionStore.update_variable(sid, :strategy, "guess")
    )

    {:ok, %{version: v}} = SessionStore.get_variable(sid, :temperature)
    say("two tuners read temperature at version #{v} and race to write it:")

    results =
      [1.2, 0.6]
      |> Enum.map(fn t ->
        Task.async(fn ->
          {t, SessionStore.update_variable(sid, :temperature, t, %{expected_version: v})}
        end)
      end)
      |> Enum.map(&Task.await/1)

    for {t, r} <- results, do: show("  write #{t}", r)

    {:ok, history} = SessionStore.get_variable_history(sid, :temperature, 10)

    say("history of temperature (newest first):")

    for h <- history,
        do: say("  v#{h.version} = #{h.value} #{inspect(h.metadata)}")

    best = Enum.max_by(history, &Map.get(&1.metadata, :trial_score, 0))
    :ok = SessionStore.rollback_variable(sid, :temperature, best.version)
    {:ok, now} = SessionStore.get_variable(sid, :temperature)
    say("rolled back to the best trial (v#{best.version}): now v#{now.version} = #{now.value}")

    {:ok, snapshot} = SessionStore.export_session(sid)
    copy = sid <> "-copy"
    {:ok, ^copy} = SessionStore.import_session(snapshot, session_id: copy)
    say("exported #{byte_size(snapshot)} bytes of MessagePack and imported them as #{copy}")
    show("copy's temperature", SessionStore.get_variable_value(copy, :temperature))
    show("import of garbage", SessionStore.import_session("not a snapshot"))

    {:ok, diag} = SessionStore.get_session_diagnostics(sid)
    say("diagnostics: #{diag.variable_count} variables, #{diag.memory_bytes} bytes in the engine")
    SessionStore.delete_session(copy)
  end

  # Two optimizers compete for one variable: the second waits, then
  # preempts the first once it has run 10 iterations; the first's late
  # writes are fenced off.
  defp optimizers do
    section("Optimizer coordination: two optimizers, one variable")
    alias DSPex.Bridge.OptimizerCoordinator
    sid = "demo-optimize-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.7)
    demo = self()

    slow =
      spawn(fn ->
        {:ok, %{token: token}} =
          SessionStore.start_optimization(sid, :temperature, self(), optimizer_id: "grid")

        send(demo, {:started, token})

        # A grid search: one write and one progress report per iteration,
        # until preempted.
        Enum.reduce_while(1..1_000, nil, fn i, _ ->
          value = 0.5 + i / 100
          write = SessionStore.update_variable(sid, :temperature, value, %{}, lock_token: token)
          {:ok, _} = OptimizerCoordinator.report_progress("grid", i, value, %{loss: 1 / i})

          receive do
            {:optimization_preempted, :temperature} ->
              send(demo, {:preempted, i})
              {:halt, nil}

            :write_again ->
              late = SessionStore.update_variable(sid, :temperature, 0.0, %{}, lock_token: token)
              send(demo, {:late_write, late})
              {:cont, write}
          after
            5 -> {:cont, write}
          end
        end)

        receive do
          :write_again ->
            late = SessionStore.update_variable(sid, :temperature, 0.0, %{}, lock_token: token)
            send(demo, {:late_write, late})
        end
      end)

    receive do:
              ({:started, token} ->
                 say("optimizer \"grid\" locked :temperature (token #{token})"))

    show(
      "a plain write while it optimizes",
      SessionStore.update_variable(sid, :temperature, 1.0)
    )

    show(
      "\"bayes\" asking with conflict_resolution: :abort",
      SessionStore.start_optimization(sid, :temperature, self(), optimizer_id: "bayes")
    )

    say("\"bayes\" asks again with :preempt; it waits until \"grid\" has run 10 iterations")

    {:ok, %{token: token}} =
      SessionStore.start_optimization(sid, :temperature, self(),
        optimizer_id: "bayes",
        conflict_resolution: :preempt,
        timeout: 5_000
      )

    receive do: ({:preempted, i} -> say("\"grid\" was preempted after #{i} iterations"))
    say("\"bayes\" holds the lock with token #{token}")
    send(slow, :write_again)
    receive do: ({:late_write, result} -> show("\"grid\" writing with its old token", result))

    show(
      "\"bayes\" writing with its token",
      SessionStore.update_variable(sid, :temperature, 0.42, %{}, lock_token: token)
    )

    {:ok, %{waiters: 0, optimizer_id: "bayes"}} =
      OptimizerCoordinator.get_lock_info(:temperature, session_id: sid)

    {:ok, _} = OptimizerCoordinator.report_progress("bayes", 1, 0.42, %{loss: 0.05})
    {:ok, status} = OptimizerCoordinator.get_optimization_status("bayes")
    show("status of \"bayes\"", Map.take(status, [:iteration, :best_value, :best_metrics]))
    :ok = SessionStore.stop_optimization(sid, :temperature, optimizer_id: "bayes")

    show(
      "after stop_optimization, a plain write",
      SessionStore.update_variable(sid, :temperature, 0.8)
    )

    Process.exit(slow, :kill)
    SessionStore.delete_session(sid)
  end

  # Derived variables: a small pipeline that follows the tuner, recomputed
  # in topological order after each change, once per change.
  defp dependencies(sid) do
    section("Dependencies: derived variables reacting to tuning")
    alias DSPex.Bridge.DependencyManager, as: Deps

    {:ok, _} = Deps.defderived(sid, :token_budget, :integer, [:max_tokens], &(&1.max_tokens * 4))

    {:ok, _} =
      Deps.defderived(sid, :sampling, :string, [:strategy, :temperature], fn v ->
        "#{v.strategy} at t=#{v.temperature}"
      end)

    {:ok, _} =
      Deps.defderived(sid, :cost_estimate, :float, [:token_budget, :temperature], fn v ->
        Float.round(v.token_budget * 0.002 * (1 + v.temperature), 4)
      end)

    say("token_budget <- max_tokens; sampling <- strategy, temperature;")
    say("cost_estimate <- token_budget, temperature")
    {:ok, order} = Deps.get_update_order(sid, :max_tokens)
    show("update order when max_tokens changes", order)
    {:ok, mermaid} = Deps.visualize_graph(sid, :mermaid)
    say("the graph, as Mermaid:")
    IO.write(mermaid)

    for {t, n} <- [{0.4, 512}, {0.9, 1024}] do
      :ok = SessionStore.update_variables(sid, %{temperature: t, max_tokens: n}, atomic: true)
      :ok = Deps.await_propagation(sid)
      get = &SessionStore.get_variable_value(sid, &1)

      say(
        "  tuner set temperature=#{t}, max_tokens=#{n}: token_budget=#{get.(:token_budget)}, " <>
          "sampling=#{inspect(get.(:sampling))}, cost_estimate=#{get.(:cost_estimate)}"
      )
    end

    {:ok, cost} = SessionStore.get_variable(sid, :cost_estimate)
    show("cost_estimate's last write names its causes", cost.last_write)

    show(
      "adding cost_estimate -> max_tokens",
      Deps.add_dependency(sid, :cost_estimate, :max_tokens)
    )

    {:ok, _} =
      Deps.defderived(sid, :tokens_per_degree, :float, [:max_tokens, :temperature], fn v ->
        v.max_tokens / v.temperature
      end)

    :ok = SessionStore.update_variable(sid, :temperature, 0.0)
    :ok = Deps.await_propagation(sid)
    {:ok, status} = Deps.derived_status(sid, :tokens_per_degree)
    say("temperature=0.0 makes tokens_per_degree's function raise:")
    show("status", Map.take(status, [:status, :error]))
    show("value kept", SessionStore.get_variable_value(sid, :tokens_per_degree))
    {:ok, [letter | _]} = Deps.dead_letters(sid)
    show("dead letter", Map.take(letter, [:variable, :reason, :caused_by]))
    :ok = SessionStore.update_variable(sid, :temperature, 0.8)
    :ok = Deps.await_propagation(sid)
    {:ok, %{status: status}} = Deps.derived_status(sid, :tokens_per_degree)

    say(
      "temperature=0.8: tokens_per_degree=#{SessionStore.get_variable_value(sid, :tokens_per_degree)}, #{status} again"
    )
  end

  # The same API on the port backend: the engine in its own OS process.
  # A variable shared across sessions: readable by anyone, writable by
  # "admin_*" only; denials audited; a rate-limited session.
  defp access_control do
    section("Access control: a shared variable, audit, rate limits")
    alias DSPex.Bridge.AccessControl
    sid = "demo-shared-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)

    rules = [
      %{session_pattern: :any, permissions: [:read]},
      %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
    ]

    :ok = AccessControl.validate_rules(rules)

    {:ok, _} =
      SessionStore.register_variable(sid, :base_prompt, :string, "Be concise.",
        access_rules: rules
      )

    {:ok, _} = SessionStore.register_variable(sid, :api_budget, :integer, 100)
    say("#{sid} shares :base_prompt (read: anyone, write: admin_*) and keeps :api_budget private")

    show(
      "worker_7 reads :base_prompt",
      SessionStore.get_variable_value(sid, :base_prompt, nil, principal: "worker_7")
    )

    show(
      "worker_7 writes :base_prompt",
      SessionStore.update_variable(sid, :base_prompt, "Be verbose.", %{}, principal: "worker_7")
    )

    show(
      "not_admin_1 writes :base_prompt (a regex would have let it in)",
      SessionStore.update_variable(sid, :base_prompt, "x", %{}, principal: "not_admin_1")
    )

    show(
      "admin_ops writes :base_prompt",
      SessionStore.update_variable(sid, :base_prompt, "Be precise.", %{}, principal: "admin_ops")
    )

    show(
      "worker_7 reads private :api_budget",
      SessionStore.get_variable(sid, :api_budget, principal: "worker_7")
    )

    {:ok, visible} = SessionStore.list_variables(sid, nil, principal: "worker_7")
    show("what worker_7 can list", Enum.map(visible, & &1.name))

    show(
      "a bad rule",
      AccessControl.validate_rules([%{session_pattern: :any, permissions: [:all]}])
    )

    say("audit log (newest first):")

    for e <- AccessControl.audit_log(sid) do
      say("  ##{e.seq} #{e.event} #{e.principal} #{e.permission} on #{e.variable}")
    end

    limited = sid <> "-limited"
    {:ok, ^limited} = SessionStore.create_session(limited, rate_limit: {10, 3})
    {:ok, _} = SessionStore.register_variable(limited, :n, :integer, 0)
    results = for i <- 1..4, do: SessionStore.update_variable(limited, :n, i)
    show("a session limited to {10 ops/s, burst 3}: register + 4 writes", results)
    SessionStore.delete_session(limited)
    SessionStore.delete_session(sid)
  end

  defp port_backend do
    section("Port backend: the same engine out of process")
    alias DSPex.Bridge.Backend.Port, as: PortBackend
    sid = "demo-port-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
    {:ok, _} = SessionStore.register_variable(sid, :temperature, :float, 0.7)
    :ok = SessionStore.update_variable(sid, :temperature, 0.9)
    say("session #{sid} lives in OS process #{PortBackend.os_pid()}")
    show("temperature", SessionStore.get_variable_value(sid, :temperature))
    show("a bad write", SessionStore.update_variable(sid, :temperature, "hot"))

    {:ok, snapshot} = SessionStore.export_session(sid)
    {:ok, moved} = SessionStore.import_session(snapshot, session_id: sid <> "-nif", backend: :nif)
    say("exported from the port, imported into the NIF as #{moved}")

    os_pid = PortBackend.os_pid()
    System.cmd("kill", ["-9", Integer.to_string(os_pid)])
    Process.sleep(50)
    show("after kill -9 of #{os_pid}, a call on its session", SessionStore.get_variable(sid, :x))
    show("the NIF copy still answers", SessionStore.get_variable_value(moved, :temperature))
    wait_for_restart(os_pid)

    say(
      "the port server started a new program after its backoff: OS process #{PortBackend.os_pid()}"
    )

    SessionStore.delete_session(moved)
  end

  defp wait_for_restart(old) do
    case DSPex.Bridge.Backend.Port.os_pid() do
      pid when is_integer(pid) and pid != old -> :ok
      _ -> Process.sleep(20) && wait_for_restart(old)
    end
  end

  # A DSPex context: local first, then bridged into a session.
  defp context do
    section("Context and Variables: local, then bridged")
    alias DSPex.{Context, Variables}
    {:ok, ctx} = Context.start_link()
    {:ok, _} = Variables.defvariable(ctx, :top_p, :float, 0.9, constraints: %{max: 1.0})
    :ok = Variables.set(ctx, :top_p, 0.95)
    say("local context: top_p = #{Variables.get(ctx, :top_p)}")
    :ok = Context.ensure_bridged(ctx)
    {:ok, sid} = Context.session_id(ctx)
    say("bridged into session #{sid}; top_p = #{Variables.get(ctx, :top_p)}")
    :ok = Variables.update(ctx, :top_p, &Float.round(&1 - 0.05, 2))
    say("after update: top_p = #{Variables.get(ctx, :top_p)}")

    try do
      Variables.set!(ctx, :top_p, 1.5)
    rescue
      e -> say("set! raised #{inspect(e.__struct__)}: #{Exception.message(e)}")
    end

    Context.stop(ctx)
  end

  # Analytics fed by the store's own events, then the Prometheus text.
  defp observability do
    section("Observability: Analytics dashboard and Prometheus")
    alias DSPex.Bridge.Analytics
    {:ok, analytics} = Analytics.start_link(aggregation_interval: 1_000)

    {:ok, sid} =
      SessionStore.create_session("demo-observed-#{System.unique_integer([:positive])}")

    {:ok, _} = SessionStore.register_variable(sid, :learning_rate, :float, 0.01)

    for i <- 1..200 do
      :ok = SessionStore.update_variable(sid, :learning_rate, i / 10_000)
      _ = SessionStore.get_variable_value(sid, :learning_rate)
    end

    {:error, {:version_mismatch, _}} =
      SessionStore.update_variable(sid, :learning_rate, 0.5, %{expected_version: 0})

    d = Analytics.get_dashboard()
    m = d.last_minute
    h = d.last_hour

    say(
      "last minute: #{m.variable_reads} reads (avg #{us(m.avg_read_latency)}), " <>
        "#{m.variable_writes} writes (avg #{us(m.avg_write_latency)})"
    )

    say(
      "last hour: #{h.total_operations} operations, error rate #{Float.round(h.error_rate, 4)}, " <>
        "p95 #{us(h.p95_latency)}, #{h.active_sessions} live sessions"
    )

    now = System.os_time(:microsecond)
    {:ok, p99} = Analytics.get_metrics(:read_latency, now - 60_000_000, now, :p99)
    say("p99 read latency over the last minute: #{us(p99)}")

    say("Prometheus (a few lines of Analytics.prometheus_text/0):")

    Analytics.prometheus_text()
    |> IO.iodata_to_binary()
    |> String.split("\n")
    |> Enum.filter(
      &(&1 =~
          ~r/^(dspex_analytics_variable_(read|write)(_count|\{quantile="0.99"\})|dspex_core_sessions_created_total|dspex_sessions) /)
    )
    |> Enum.each(&say("  " <> &1))

    SessionStore.delete_session(sid)
    GenServer.stop(analytics)
  end

  defp us(nil), do: "n/a"
  defp us(x), do: "#{Float.round(x * 1.0, 2)} us"
end

Demo.run()
