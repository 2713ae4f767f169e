defmodule DSPex.Bridge.Backend.Raft.Machine do
  @moduledoc """
  The Raft state machine (`ra_machine`) of one replicated session.

  Every member applies the same log to its own node's replica engine
  (`Native.replica_execute/1`, a second engine in the VM that only this
  machine writes). A log entry is the core's `Command` as a MessagePack
  frame, stamped by the leader with the time before it is appended, so
  applying it is a function of (state, entry) on every member.

  ## State

  The ra state is small: the engine holds the session. `applied` is the
  index of the last command applied to the engine; `snap` is the engine's
  export at `applied` when the state came from a snapshot. Each node keeps,
  in an ETS table, the index its engine copy reflects; when the two differ
  (the VM restarted, a snapshot was installed, the server restarted) the
  copy is rebuilt from `snap` before the next apply or query.

  ## Done here, deterministically

  - Rate limit (config replicated in the state): a GCRA bucket over the
    leader's stamped times, counting writes (commands in the log).
  - Optimizer locks: a grant's fencing token is its Raft index; a fenced
    write is applied only while its token is the lock's current one. A
    lease's expiry is a ra timer (the leader appends `{:timeout, ...}`),
    a holder's death a ra monitor (the leader appends `{:down, ...}`).
  - Snapshots: every `snapshot_every` writes, a `release_cursor` with the
    engine's export, which bounds the log.
  """

  # The `ra_machine` behaviour, not declared: ra is optional at compile time.

  import Kernel, except: [apply: 3]

  alias DSPex.Bridge.Native

  @engine :dspex_raft_engine
  @default_snapshot_every 4096

  @doc "The ETS table of engine indexes (created by `Raft.System`)."
  def engine_table, do: @engine

  def init(config) do
    %{
      sid: Map.fetch!(config, :sid),
      # The default read consistency, restored with the member after a restart.
      consistency: Map.get(config, :consistency, :consistent),
      applied: 0,
      snap: nil,
      since_snap: 0,
      snapshot_every: Map.get(config, :snapshot_every, @default_snapshot_every),
      rate: nil,
      tat: 0,
      # The last stamped time: the time of the commands the machine issues.
      now: 0,
      locks: %{}
    }
  end

  # Every entry: the engine copy is brought to `applied` first, the entry
  # handled, then `applied` (in the state and in the node's table) moves to
  # the entry's index, and a snapshot is due every `snapshot_every` entries.
  def apply(%{index: index, term: term}, cmd, state) do
    state = sync(state)

    {state, reply, effects} =
      case handle(cmd, index, state) do
        {state, reply} -> {state, reply, []}
        triple -> triple
      end

    reply =
      case cmd do
        {:exec_meta, _, _, _} -> {reply, %{index: index, term: term}}
        _ -> reply
      end

    state = %{state | applied: index, snap: nil, since_snap: state.since_snap + 1}
    :ets.insert(@engine, {state.sid, index})
    {state, snapshot} = snapshot(state, index)
    {state, reply, effects ++ snapshot}
  end

  defp handle({:create, now, frame, rate}, _index, state) do
    state = %{state | now: now}
    reply = execute(:write, frame, now)
    state = if reply == :ok, do: %{state | rate: rate_config(rate), tat: now}, else: state
    {state, reply}
  end

  defp handle({:exec, now, kind, frame}, _index, state) do
    state = %{state | now: max(state.now, now)}

    case admit(state, now) do
      {:ok, state} -> {state, execute(kind, frame, now)}
      :rate_limited -> {state, {:error, :rate_limited}}
    end
  end

  # As `:exec`; the reply also says where the write sits in the log.
  defp handle({:exec_meta, now, kind, frame}, index, state),
    do: handle({:exec, now, kind, frame}, index, state)

  defp handle({:lock_acquire, now, lock, holder, lease_ms}, index, state) do
    case Map.get(state.locks, lock) do
      %{holder: ^holder, token: token} ->
        # Re-entrant: the holder renews its lease and keeps its token.
        state = put_in(state.locks[lock].lease_ms, lease_ms)
        {state, {:ok, token}, lease_effects(lock, token, holder, lease_ms)}

      nil ->
        grant = %{token: index, holder: holder, lease_ms: lease_ms, granted_at: now}
        state = %{state | locks: Map.put(state.locks, lock, grant)}
        {state, {:ok, index}, lease_effects(lock, index, holder, lease_ms)}

      %{holder: other} ->
        {state, {:error, {:locked, other}}}
    end
  end

  defp handle({:lock_release, lock, token}, _index, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} -> {%{state | locks: Map.delete(state.locks, lock)}, :ok}
      _ -> {state, {:error, :stale_fencing_token}}
    end
  end

  defp handle({:fenced, lock, token, now, kind, frame}, index, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} -> handle({:exec, now, kind, frame}, index, state)
      _ -> {state, {:error, :stale_fencing_token}}
    end
  end

  # Appended by the leader when a lease's timer fires.
  defp handle({:timeout, {:lease, lock, token}}, _index, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} -> {%{state | locks: Map.delete(state.locks, lock)}, :ok}
      _ -> {state, :ok}
    end
  end

  # Appended by the leader when a monitored lock holder dies.
  defp handle({:down, pid, _info}, _index, state) do
    {%{state | locks: Map.reject(state.locks, fn {_, l} -> l.holder == pid end)}, :ok}
  end

  defp handle(_other, _index, state), do: {state, {:error, :bad_command}}

  # The engine's export as the state at `index`: ra writes it as a snapshot
  # and truncates the log before it.
  defp snapshot(state, index) do
    with true <- state.since_snap >= state.snapshot_every,
         {:ok, bin} <- execute(:heavy_read, export_frame(state.sid), state.now) do
      state = %{state | since_snap: 0}
      {state, [{:release_cursor, index, %{state | snap: bin}}]}
    else
      _ -> {state, []}
    end
  end

  def state_enter(:eol, %{sid: sid}) do
    # This member was removed or its group deleted: drop the engine copy.
    _ = Native.replica_execute(delete_frame(sid), 0)
    _ = :ets.delete(@engine, sid)
    []
  end

  def state_enter(:leader, state) do
    # Re-arm monitors of lock holders: a new leader has none of its own.
    for {_lock, %{holder: pid}} <- state.locks, is_pid(pid), do: {:monitor, :process, pid}
  end

  def state_enter(_role, _state), do: []

  def overview(state) do
    %{sid: state.sid, applied: state.applied, locks: map_size(state.locks)}
  end

  @doc "A query on this member's engine copy (runs in the ra server process)."
  def query(kind, frame, state) do
    _ = sync(state)
    execute(kind, frame, :os.system_time(:microsecond))
  end

  @doc "The fencing token of `lock`, or `nil` (a query)."
  def lock_token(lock, state) do
    case Map.get(state.locks, lock) do
      %{token: token} -> token
      nil -> nil
    end
  end

  ## Internals

  defp lease_effects(_lock, _token, holder, _lease_ms) when not is_pid(holder), do: []

  defp lease_effects(lock, token, holder, lease_ms) do
    timer =
      if is_integer(lease_ms) and lease_ms > 0,
        do: [{:timer, {:lease, lock, token}, lease_ms}],
        else: []

    [{:monitor, :process, holder} | timer]
  end

  # The engine copy on this node reflects `state.applied`, or is rebuilt.
  defp sync(%{sid: sid, applied: applied} = state) do
    case :ets.lookup(@engine, sid) do
      [{_, ^applied}] when applied > 0 ->
        state

      _ ->
        _ = Native.replica_execute(delete_frame(sid), state.now)

        cond do
          applied == 0 ->
            :ok

          is_binary(state.snap) ->
            {:ok, _} = Native.replica_execute_dirty(import_frame(state.snap, sid), state.now)

          true ->
            # Neither a snapshot nor the entries since: let ra restart this
            # server, which recovers from its snapshot and replays the log.
            exit({:engine_out_of_sync, sid})
        end

        :ets.insert(@engine, {sid, applied})
        %{state | snap: nil}
    end
  end

  defp execute(kind, frame, now) when kind in [:heavy_read, :heavy_write],
    do: Native.replica_execute_dirty(frame, now)

  defp execute(_kind, frame, now), do: Native.replica_execute(frame, now)

  defp rate_config(%{ops_per_sec: ops, burst: burst}), do: rate_config({ops, burst})

  defp rate_config({ops, burst}) when is_integer(ops) and ops > 0 and is_integer(burst),
    do: %{interval: div(1_000_000, ops) |> max(1), tolerance: max(burst, 1) * div(1_000_000, ops)}

  defp rate_config(_), do: nil

  # GCRA over the leader's stamped times: deterministic on every member.
  defp admit(%{rate: nil} = state, _now), do: {:ok, state}

  defp admit(%{rate: %{interval: i, tolerance: t}, tat: tat} = state, now) do
    next = max(tat, now) + i
    if next - now > t, do: :rate_limited, else: {:ok, %{state | tat: next}}
  end

  defp delete_frame(sid), do: frame("session_delete", session: sid)
  defp export_frame(sid), do: frame("session_export", session: sid)
  defp import_frame(bin, sid), do: frame("session_import", snapshot: bin, session: sid)

  defp frame(name, args) do
    {:ok, _kind, frame} = DSPex.Bridge.Backend.Raft.Command.encode_raw(name, args)
    frame
  end
end
