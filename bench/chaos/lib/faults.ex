defmodule DSPex.Chaos.Faults do
  @moduledoc """
  The faults of the chaos run, each injected into the running system and
  healed (by the system itself, or by the runner for the faults that
  last). Each returns `%{name, paths, at_us, healed_us, note}` (os time,
  µs), plus `ends_sessions` for the one that destroys sessions by design.

  The runner's process receives `{:chaos_event, event, metadata, at_us}`
  for the gateway's and the port program's starts and the breakers'
  state changes (`notify/1`); the faults wait on those, not on time.
  """

  alias DSPex.Bridge.Backend.Port, as: PortBackend
  alias DSPex.Bridge.{Gateway, Telemetry}
  alias DSPex.Chaos.{Client, Cluster}

  @notify "dspex-chaos-notify"
  @crash_handler "dspex-chaos-crashing-handler"
  @counter_handler "dspex-chaos-write-counter"
  @write_event [:dspex, :bridge, :variable, :write]
  @crash_key {__MODULE__, :handler_crash}

  def all,
    do: [
      :gateway_kill,
      :port_kill,
      :raft_leader_kill,
      :raft_partition,
      :port_sigstop,
      :telemetry_crash,
      :compute_crash
    ]

  @doc "Sends the runner the events the faults wait on."
  def notify(runner) do
    Telemetry.attach_many(
      @notify,
      [
        [:dspex, :bridge, :gateway, :started],
        [:dspex, :bridge, :port, :started],
        [:dspex, :bridge, :circuit_breaker, :state_change]
      ],
      fn event, _m, meta, pid -> send(pid, {:chaos_event, event, meta, now()}) end,
      runner
    )
  end

  defp now, do: System.os_time(:microsecond)

  @doc """
  Starts the signaller: a shell whose builtin `kill` sends the signals, so
  that a fault's time is the signal's, not that of forking a `kill`
  program on a loaded machine (which took up to several hundred ms).
  """
  def start_signaller do
    sh = System.find_executable("sh")

    port =
      Port.open({:spawn_executable, sh}, [
        :binary,
        {:line, 256},
        args: ["-c", "while read sig pid; do kill -$sig $pid; echo $?; done"]
      ])

    :persistent_term.put({__MODULE__, :signaller}, port)
    :ok
  end

  # Sends `sig` to `os_pid`; `{at_us, 0}` (the os time just before) on success.
  defp kill(os_pid, "-" <> sig) do
    port = :persistent_term.get({__MODULE__, :signaller})
    at = now()
    true = Port.command(port, "#{sig} #{os_pid}\n")

    receive do
      {^port, {:data, {:eol, status}}} -> {at, String.to_integer(status)}
    after
      10_000 -> raise "the signaller did not answer"
    end
  end

  defp done(name, paths, at, healed, note, extra \\ %{}) do
    Map.merge(%{name: name, paths: paths, at_us: at, healed_us: healed, note: note}, extra)
  end

  ## The faults

  @doc "kill -9 of the gRPC gateway program; healed when a new one listens."
  def inject(:gateway_kill, _ctx) do
    old = Gateway.os_pid()
    {at, 0} = kill(old, "-9")
    healed = await_started([:dspex, :bridge, :gateway, :started], old, at, 30_000)
    done(:gateway_kill, [:grpc], at, healed, "gateway os pid #{old} killed")
  end

  def inject(:port_kill, _ctx) do
    old = PortBackend.os_pid()
    {at, 0} = kill(old, "-9")
    healed = await_started([:dspex, :bridge, :port, :started], old, at, 30_000)

    done(:port_kill, [:port], at, healed, "port program os pid #{old} killed", %{
      ends_sessions: [:port]
    })
  end

  def inject(:raft_leader_kill, ctx) do
    node = Cluster.busiest_leader(ctx.raft_sids)
    leaders = Cluster.leaders(ctx.raft_sids)
    {at, 0} = kill(Cluster.peer(node).os_pid, "-9")
    :ok = Cluster.forget(node)
    Process.sleep(ctx.hold_ms)
    :ok = Cluster.restart(node)
    :ok = Cluster.await_members(node, ctx.raft_sids)

    done(
      :raft_leader_kill,
      [:raft],
      at,
      now(),
      "#{node} killed, leaders before: #{inspect(leaders)}"
    )
  end

  def inject(:raft_partition, ctx) do
    node = Cluster.busiest_leader(ctx.raft_sids)
    leaders = Cluster.leaders(ctx.raft_sids)
    at = now()
    :ok = Cluster.partition(node)
    Process.sleep(ctx.hold_ms)
    Cluster.heal(node)

    done(
      :raft_partition,
      [:raft],
      at,
      now(),
      "#{node} cut off, leaders before: #{inspect(leaders)}"
    )
  end

  def inject(:port_sigstop, ctx) do
    os_pid = PortBackend.os_pid()
    {at, 0} = kill(os_pid, "-STOP")

    opened =
      receive do
        {:chaos_event, [_, _, :circuit_breaker, :state_change],
         %{name: {:dspex_backend, :port}, to: :open}, t}
        when t >= at ->
          t
      after
        60_000 -> nil
      end

    # Open a little while: the clients meet an open breaker, then SIGCONT.
    Process.sleep(div(ctx.hold_ms, 2))
    {_, 0} = kill(os_pid, "-CONT")

    note =
      if opened,
        do: "breaker opened #{div(opened - at, 1_000)} ms after SIGSTOP",
        else: "breaker did not open within 60 s"

    done(:port_sigstop, [:port], at, now(), note, %{breaker_opened: opened != nil})
  end

  def inject(:telemetry_crash, ctx) do
    runner = self()
    :persistent_term.put(@crash_key, runner)
    before = counted()
    at = now()

    # The handler raises on its next event, from whichever caller emits it.
    :ok = Telemetry.attach(@crash_handler, @write_event, &__MODULE__.crashing_handler/4, nil)

    crashed =
      receive do
        {:chaos_handler_crashing, t} -> t
      after
        30_000 -> nil
      end

    detached = await(fn -> not attached?(@crash_handler) end, 10_000)
    healed = now()
    Process.sleep(div(ctx.hold_ms, 2))
    after_count = counted()
    :persistent_term.erase(@crash_key)

    note =
      "handler crashed: #{crashed != nil}, detached: #{detached}, other handler still " <>
        "attached: #{attached?(@counter_handler)}, writes it counted meanwhile: #{after_count - before}"

    done(:telemetry_crash, [:nif, :port, :grpc], at, healed, note, %{
      handler_detached: detached,
      other_handler_alive: attached?(@counter_handler) and after_count > before
    })
  end

  def inject(:compute_crash, ctx) do
    at = now()
    Client.compute_crash(:raise)
    Process.sleep(div(ctx.hold_ms, 2))
    Client.compute_crash(:exit)
    Process.sleep(div(ctx.hold_ms, 2))
    Client.compute_crash(:off)
    done(:compute_crash, [:nif], at, now(), "compute function raised, then exited")
  end

  @doc false
  def crashing_handler(_event, _m, _meta, _config) do
    case :persistent_term.get(@crash_key, nil) do
      nil -> :ok
      runner -> send(runner, {:chaos_handler_crashing, now()}) && raise("chaos: handler crashed")
    end
  end

  @doc "A second handler on the same event, counting: it must outlive the crash."
  def attach_counter do
    counter = :atomics.new(1, [])
    :persistent_term.put({__MODULE__, :counter}, counter)

    Telemetry.attach(
      @counter_handler,
      @write_event,
      fn _, _, _, c -> :atomics.add(c, 1, 1) end,
      counter
    )
  end

  defp counted do
    case :persistent_term.get({__MODULE__, :counter}, nil) do
      nil -> 0
      c -> :atomics.get(c, 1)
    end
  end

  defp attached?(id), do: Enum.any?(Telemetry.handlers(@write_event), &(elem(&1, 0) == id))

  defp await_started(event, old, at, timeout) do
    receive do
      {:chaos_event, ^event, %{os_pid: p}, t} when p != old and t >= at -> t
    after
      timeout -> raise "#{inspect(event)} not seen within #{timeout} ms"
    end
  end

  # A state with no event of its own (a handler's detachment): polled.
  defp await(fun, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    cond do
      fun.() -> true
      System.monotonic_time(:millisecond) > deadline -> false
      true -> Process.sleep(10) && poll(fun, deadline)
    end
  end
end
