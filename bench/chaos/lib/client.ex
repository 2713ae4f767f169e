defmodule DSPex.Chaos.Client do
  @moduledoc """
  A client of the chaos run: a process that owns a few sessions and keeps
  a mixed workload on them through the public API until told to stop,
  recording every operation in its `DSPex.Chaos.History`.

  Paths:

  - `:nif`, `:port`: `SessionStore` (and `DependencyManager`,
    `OptimizerCoordinator` through it) called from this process on
    sessions of that backend; `:port` calls go through `State.Bridged`
    (breaker, retries, cache).
  - `:raft`: the same API called on one of the `:peer` nodes
    (`:peer.call/5`, so the call runs on that node, and is timed there)
    on replicated sessions (`replicas: 3`). The client starts on a node
    of its own and moves to the next one after a failure, as a client of
    a cluster does.

  The mix (percent): reads 70; writes 10 and writes with `expected_version`
  (read, then conditional write) 10; atomic batches of two variables 5;
  lock cycles (start_optimization, a write under the lock token,
  stop_optimization) 3; derived variables 2 (write the input, await the
  propagation, read input and output). Sessions listed in `read_mostly`
  get reads 98 and writes 2 instead: while the port's breaker is open,
  their reads are the ones its last-known-value cache can answer (a write
  to a session makes its cached reads unusable). The `:raft` path does no lock
  cycles nor derived variables (the coordinator does not take Raft locks
  yet; see the README), and the `:port` path no derived variables: their
  shares go to writes and batches.

  Each client writes only its own variables, with values from one counter
  that only grows. A `:port` session that is gone (`:session_not_found`,
  after the program died) is created again and its variables registered
  again: a new epoch.
  """

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.Chaos.History

  @written [:w0, :w1, :w2, :w3]
  @batch [:b0, :b1]
  @owned @written ++ @batch ++ [:lk, :in]
  @readable @written ++ @batch
  # {share, op} per path.
  @mixes %{
    nif: [{70, :read}, {10, :write}, {10, :cas}, {5, :batch}, {3, :lock}, {2, :derived}],
    port: [{70, :read}, {11, :write}, {11, :cas}, {5, :batch}, {3, :lock}],
    # Sessions mostly read, whose reads the port breaker's cache can answer.
    read_mostly: [{98, :read}, {2, :write}],
    raft: [{70, :read}, {12, :write}, {12, :cas}, {6, :batch}]
  }
  @crash_key {__MODULE__, :compute_crash}
  @cache_key :dspex_chaos_cache_hit
  @remote_us_key :dspex_chaos_remote_us

  @doc "The variables a client registers in each of its sessions."
  def variables(path), do: if(path == :nif, do: @owned ++ [:out], else: @owned)

  @doc "The compute function of the derived variable `out = 2 * in`; crashes while the fault is on."
  def double(%{in: x}) do
    case :persistent_term.get(@crash_key, :off) do
      :off -> x * 2
      :raise -> raise "chaos: compute function crashed"
      :exit -> exit(:chaos_compute_exit)
    end
  end

  @doc "Turns the compute function's crash on (`:raise`, `:exit`) or `:off`."
  def compute_crash(mode) when mode in [:off, :raise, :exit],
    do: :persistent_term.put(@crash_key, mode)

  @doc """
  Attaches, in this VM, the handler that marks the calling process when a
  read was answered from the port breaker's cache.
  """
  def attach_cache_probe do
    DSPex.Bridge.Telemetry.attach(
      "dspex-chaos-cache-probe",
      [:dspex, :bridge, :cache, :hit],
      &__MODULE__.cache_hit/4,
      nil
    )
  end

  @doc false
  def cache_hit(_event, _measurements, _meta, _config), do: Process.put(@cache_key, true)

  @doc """
  Starts a client (monitored by the caller). `spec`: `id`, `path`, `sids`,
  `interval_ms` (pause between operations), `timeout_ms` (the bound its
  calls are judged by), `owner` (told `{:chaos_ready, id}` once its
  sessions exist, `{:chaos_setup_failed, id, reason}` if they cannot be
  made), and for `:raft`: `node_index`, `peers` (a fun returning the live
  peers), `call_timeout_ms`. With `trace_dir`, every operation is also
  written there as a line (`DSPex.Chaos.History.trace_line/1`).
  """
  def start(spec) do
    spawn_monitor(fn -> init(spec) end)
  end

  defp init(spec) do
    :rand.seed(:exsss, {:erlang.phash2(spec.id), 7, 11})

    if dir = Map.get(spec, :trace_dir) do
      {:ok, file} = File.open(Path.join(dir, "#{spec.id}.tsv"), [:write, :raw, :delayed_write])
      Process.put(:dspex_chaos_trace, file)
    end

    state = %{
      spec: spec,
      h: History.new(),
      n: 0,
      epochs: Map.new(spec.sids, &{&1, 0}),
      lost: MapSet.new(),
      target: Map.get(spec, :node_index, 0)
    }

    case setup_all(state) do
      {:ok, state} ->
        send(spec.owner, {:chaos_ready, spec.id})
        loop(state)

      {:error, reason} ->
        send(spec.owner, {:chaos_setup_failed, spec.id, reason})
    end
  end

  defp setup_all(state) do
    Enum.reduce_while(state.spec.sids, {:ok, state}, fn sid, {:ok, st} ->
      case setup(st, sid, 0) do
        {:ok, st} -> {:cont, {:ok, st}}
        error -> {:halt, error}
      end
    end)
  end

  defp setup(st, sid, epoch) do
    path = st.spec.path

    create_opts =
      case path do
        :nif -> [max_history: 100]
        :port -> [backend: :port, max_history: 100]
        :raft -> [replicas: 3, max_history: 100]
      end

    with {:ok, st} <- created(st, call(st, SessionStore, :create_session, [sid, create_opts])),
         {:ok, st} <- register_all(st, sid),
         {:ok, st} <- derived(st, sid) do
      h = Enum.reduce(@owned, st.h, &History.declare(&2, sid, epoch, &1, 0))
      {:ok, %{st | h: h}}
    end
  end

  defp created(_st, {{:ok, _}, st2}), do: {:ok, st2}
  defp created(_st, {{:error, {:session_exists, _}}, st2}), do: {:ok, st2}
  defp created(_st, {{:error, :session_exists}, st2}), do: {:ok, st2}
  defp created(_st, {other, _}), do: {:error, {:create_session, other}}

  defp register_all(st, sid) do
    Enum.reduce_while(@owned, {:ok, st}, fn var, {:ok, st} ->
      case call(st, SessionStore, :register_variable, [sid, var, :integer, 0]) do
        {{:ok, _}, st} -> {:cont, {:ok, st}}
        {other, _} -> {:halt, {:error, {:register_variable, var, other}}}
      end
    end)
  end

  defp derived(%{spec: %{path: :nif}} = st, sid) do
    case DependencyManager.defderived(sid, :out, :integer, [:in], &__MODULE__.double/1,
           compute_timeout: 1_000
         ) do
      {:ok, _} -> {:ok, st}
      other -> {:error, {:defderived, other}}
    end
  end

  defp derived(st, _sid), do: {:ok, st}

  ## The loop

  defp loop(st) do
    receive do
      {:chaos_stop, from} ->
        st = probe(st)
        if trace = Process.get(:dspex_chaos_trace), do: File.close(trace)
        send(from, {:chaos_history, st.spec.id, st.h})
    after
      0 ->
        st = step(st)
        Process.put(:dspex_chaos_history, st.h)
        if st.spec.interval_ms > 0, do: Process.sleep(st.spec.interval_ms)
        loop(st)
    end
  end

  # The last operations, once every fault is healed: one read of each
  # session (and a derived round trip on NIF sessions), so that a session
  # still failing at the end shows as such.
  defp probe(st) do
    Enum.reduce(st.spec.sids, st, fn sid, st ->
      st = if MapSet.member?(st.lost, sid), do: recreate(st, sid), else: st
      st = run(st, sid, :read)
      if st.spec.path == :nif, do: run(st, sid, :derived), else: st
    end)
  end

  defp step(st) do
    sid = Enum.random(st.spec.sids)

    if MapSet.member?(st.lost, sid),
      do: recreate(st, sid),
      else: run(st, sid, pick(mix(st, sid)))
  end

  defp mix(st, sid) do
    if sid in Map.get(st.spec, :read_mostly, []),
      do: @mixes.read_mostly,
      else: Map.fetch!(@mixes, st.spec.path)
  end

  defp pick(mix) do
    roll = :rand.uniform(100)

    Enum.reduce_while(mix, 0, fn {share, op}, acc ->
      if roll <= acc + share, do: {:halt, op}, else: {:cont, acc + share}
    end)
  end

  defp next(st), do: {st.n + 1, %{st | n: st.n + 1}}

  defp run(st, sid, :read) do
    var = Enum.random(@readable)

    {result, st} =
      timed(st, sid, :read, [], fn st -> call(st, SessionStore, :get_variable, [sid, var]) end)

    case result do
      {{:ok, %{value: v}}, op} -> record(st, %{op | read: {var, v}}, :ok)
      {other, op} -> record(st, op, read_outcome(other))
    end
  end

  defp run(st, sid, :write) do
    var = Enum.random(@written)
    {v, st} = next(st)
    write(st, sid, :write, [{var, v}], [sid, var, v])
  end

  defp run(st, sid, :cas) do
    var = Enum.random(@written)

    {result, st} =
      timed(st, sid, :read, [], fn st -> call(st, SessionStore, :get_variable, [sid, var]) end)

    case result do
      {{:ok, %{value: value, version: version}}, op} ->
        st = record(st, %{op | read: {var, value}}, :ok)
        {v, st} = next(st)
        write(st, sid, :cas, [{var, v}], [sid, var, v, %{}, [expected_version: version]])

      {other, op} ->
        record(st, op, read_outcome(other))
    end
  end

  defp run(st, sid, :batch) do
    {v, st} = next(st)
    {v2, st} = next(st)
    writes = [{:b0, v}, {:b1, v2}]

    {{result, op}, st} =
      timed(st, sid, :batch, writes, fn st ->
        call(st, SessionStore, :update_variables, [sid, %{b0: v, b1: v2}, [atomic: true]])
      end)

    record(st, op, write_outcome(result))
  end

  defp run(st, sid, :lock) do
    {{result, op}, st} =
      timed(st, sid, :lock_acquire, [], fn st ->
        call(st, SessionStore, :start_optimization, [sid, :lk, self()])
      end)

    case result do
      {:ok, %{token: token}} ->
        st = record(st, op, :ok)
        {v, st} = next(st)
        st = write(st, sid, :write, [{:lk, v}], [sid, :lk, v, %{}, [lock_token: token]])
        release(st, sid)

      {:error, {:already_optimizing, _}} ->
        # An earlier release went unanswered: the lock is still ours.
        st = record(st, op, {:refused, :already_optimizing})
        release(st, sid)

      other ->
        record(st, op, write_outcome(other))
    end
  end

  defp run(st, sid, :derived) do
    {v, st} = next(st)
    st = write(st, sid, :write, [{:in, v}], [sid, :in, v])

    {{result, op}, st} = timed(st, sid, :derived, [], fn st -> {derived_check(sid), st} end)

    record(st, op, read_outcome(result))
  end

  # After the write of `in`: the propagation done, `out` is `2 * in`.
  defp derived_check(sid) do
    with :ok <- DependencyManager.await_propagation(sid, 1_000),
         {:ok, %{found: found}} <- SessionStore.get_variables(sid, [:in, :out]) do
      case found do
        %{in: %{value: i}, out: %{value: o}} when o == 2 * i -> :ok
        %{in: _, out: _} -> {:error, :derived_stale}
        _ -> {:error, :derived_missing}
      end
    end
  end

  defp release(st, sid) do
    {{result, op}, st} =
      timed(st, sid, :lock_release, [], fn st ->
        call(st, SessionStore, :stop_optimization, [sid, :lk])
      end)

    record(st, op, write_outcome(result))
  end

  defp write(st, sid, kind, writes, args) do
    {{result, op}, st} =
      timed(st, sid, kind, writes, fn st -> call(st, SessionStore, :update_variable, args) end)

    record(st, op, write_outcome(result))
  end

  # A port session found gone: create it again, as a new epoch.
  defp recreate(st, sid) do
    epoch = st.epochs[sid] + 1
    start_us = System.os_time(:microsecond)
    t0 = System.monotonic_time(:microsecond)

    case setup(st, sid, epoch) do
      {:ok, st} ->
        op = op(st, sid, :recreate, [], start_us, System.monotonic_time(:microsecond) - t0)
        h = History.recreated(st.h, sid, epoch, start_us)

        st = %{
          st
          | h: h,
            epochs: Map.put(st.epochs, sid, epoch),
            lost: MapSet.delete(st.lost, sid)
        }

        record(st, op, :ok)

      {:error, reason} ->
        op = op(st, sid, :recreate, [], start_us, System.monotonic_time(:microsecond) - t0)
        record(st, op, {:fail, setup_reason(reason)})
    end
  end

  defp setup_reason({_step, {:error, r}}), do: r
  defp setup_reason({_step, _var, {:error, r}}), do: r
  defp setup_reason(other), do: other

  ## Timing, calls, outcomes

  # Runs `fun.(st)` (which returns `{result, st}`), timed: `{{result, op}, st}`.
  defp timed(st, sid, kind, writes, fun) do
    Process.delete(@cache_key)
    Process.delete(@remote_us_key)
    start_us = System.os_time(:microsecond)
    t0 = System.monotonic_time(:microsecond)
    {result, st} = fun.(st)
    dur = Process.delete(@remote_us_key) || System.monotonic_time(:microsecond) - t0
    op = op(st, sid, kind, writes, start_us, dur)
    {{result, %{op | cache: Process.delete(@cache_key) == true}}, st}
  end

  defp op(st, sid, kind, writes, start_us, dur) do
    %{
      path: st.spec.path,
      client: st.spec.id,
      sid: sid,
      epoch: st.epochs[sid],
      op: kind,
      writes: writes,
      read: nil,
      start_us: start_us,
      dur_us: dur,
      timeout_ms: st.spec.timeout_ms,
      outcome: :ok,
      cache: false
    }
  end

  defp record(st, op, outcome) do
    st =
      if st.spec.path == :port and outcome == {:fail, :session_not_found},
        do: %{st | lost: MapSet.put(st.lost, op.sid)},
        else: st

    st = if outcome != :ok and st.spec.path == :raft, do: failover(st, outcome), else: st
    op = %{op | outcome: outcome}
    if trace = Process.get(:dspex_chaos_trace), do: IO.binwrite(trace, History.trace_line(op))
    %{st | h: History.record(st.h, op)}
  end

  # Refusals are the caller's doing; only failures move a Raft client on.
  defp failover(st, {:refused, _}), do: st
  defp failover(st, _), do: %{st | target: st.target + 1}

  # Local paths call in this process; `:raft` calls on the client's node.
  defp call(%{spec: %{path: :raft}} = st, m, f, a) do
    peers = st.spec.peers.()
    peer = Enum.at(peers, rem(st.target, max(length(peers), 1)))

    result =
      if peer == nil do
        {:error, :no_node}
      else
        try do
          # Timed on the node, by the process making the call: the caller
          # the timeout is for. The hop from here over the peer's standard
          # I/O is left out (its own timeout, call_timeout_ms, still holds).
          {us, result} = :peer.call(peer.pid, :timer, :tc, [m, f, a], st.spec.call_timeout_ms)
          Process.put(@remote_us_key, us)
          result
        catch
          # The peer's control connection: gone with its node, or no answer.
          :exit, {:timeout, {:gen_server, :call, _}} -> {:error, :call_timeout}
          :exit, {reason, {:gen_server, :call, _}} when reason != :timeout -> {:error, :node_down}
          :error, :noconnection -> {:error, :node_down}
          # Raised or exited inside the call on the node: a finding, not a fault.
          kind, reason -> {:error, {:raised_on_node, {kind, reason}}}
        end
      end

    {result, st}
  end

  defp call(st, m, f, a), do: {apply(m, f, a), st}

  @refusals [
    :version_mismatch,
    :locked_by,
    :stale_lock_token,
    :already_optimizing,
    :not_optimizing,
    :not_lock_owner,
    :rate_limited
  ]
  # A write's outcome: refused (the engine answered no), failed (it was
  # not sent, or what it did is gone with its session), or unknown.
  @definite [:circuit_open, :session_not_found, :backend_unavailable, :no_node]

  defp write_outcome(:ok), do: :ok
  defp write_outcome({:ok, _}), do: :ok
  defp write_outcome({:error, reason}), do: error_outcome(reason)
  defp write_outcome(other), do: {:unknown, {:unexpected, other}}

  defp error_outcome(reason) do
    name = if is_tuple(reason), do: elem(reason, 0), else: reason

    cond do
      name in @refusals -> {:refused, reason}
      name in @definite -> {:fail, name}
      true -> {:unknown, name}
    end
  end

  defp read_outcome(:ok), do: :ok
  defp read_outcome({:ok, _}), do: :ok

  defp read_outcome({:error, reason}) do
    name = if is_tuple(reason), do: elem(reason, 0), else: reason
    if name in @refusals, do: {:refused, reason}, else: {:fail, name}
  end

  defp read_outcome(other), do: {:fail, {:unexpected, other}}
end
