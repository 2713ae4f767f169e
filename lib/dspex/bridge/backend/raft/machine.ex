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
      applied: 0,
      snap: nil,
      since_snap: 0,
      snapshot_every: Map.get(config, :snapshot_every, @default_snapshot_every),
      rate: nil,
      tat: 0,
      locks: %{}
    }
  end

  def apply(%{index: index}, {:create, now, frame, rate}, state) do
    state = sync(state)
    reply = execute(:write, frame)

    state =
      if reply == :ok, do: %{state | rate: rate_config(rate), tat: now}, else: state

    applied(state, index, reply)
  end

  def apply(%{index: index}, {:exec, now, kind, frame}, state) do
    state = sync(state)

    case admit(state, now) do
      {:ok, state} -> applied(state, index, execute(kind, frame))
      :rate_limited -> applied(state, index, {:error, :rate_limited})
    end
  end

  # As `:exec`, answering `{reply, %{index: i, term: t}}`: where the write
  # sits in the log (for clients that check histories).
  def apply(%{index: index, term: term} = meta, {:exec_meta, now, kind, frame}, state) do
    case apply(meta, {:exec, now, kind, frame}, state) do
      {state, reply} -> {state, {reply, %{index: index, term: term}}}
      {state, reply, effects} -> {state, {reply, %{index: index, term: term}}, effects}
    end
  end

  def apply(%{index: index}, {:lock_acquire, now, lock, holder, lease_ms}, state) do
    state = sync(state)

    case Map.get(state.locks, lock) do
      %{holder: ^holder, token: token} ->
        # Re-entrant: the holder renews its lease and keeps its token.
        state = put_in(state.locks[lock].lease_ms, lease_ms)
        {%{state | applied: index}, {:ok, token}, lease_effects(lock, token, holder, lease_ms)}

      nil ->
        grant = %{token: index, holder: holder, lease_ms: lease_ms, granted_at: now}
        state = %{state | locks: Map.put(state.locks, lock, grant), applied: index}
        {state, {:ok, index}, lease_effects(lock, index, holder, lease_ms)}

      %{holder: other} ->
        {%{state | applied: index}, {:error, {:locked, other}}}
    end
  end

  def apply(%{index: index}, {:lock_release, lock, token}, state) do
    state = sync(state)

    case Map.get(state.locks, lock) do
      %{token: ^token} -> {%{state | locks: Map.delete(state.locks, lock), applied: index}, :ok}
      _ -> {%{state | applied: index}, {:error, :stale_fencing_token}}
    end
  end

  def apply(%{index: index}, {:fenced, lock, token, now, kind, frame}, state) do
    state = sync(state)

    case Map.get(state.locks, lock) do
      %{token: ^token} ->
        case admit(state, now) do
          {:ok, state} -> applied(state, index, execute(kind, frame))
          :rate_limited -> applied(state, index, {:error, :rate_limited})
        end

      _ ->
        {%{state | applied: index}, {:error, :stale_fencing_token}}
    end
  end

  # Appended by the leader when a lease's timer fires.
  def apply(%{index: index}, {:timeout, {:lease, lock, token}}, state) do
    state = sync(state)

    locks =
      case Map.get(state.locks, lock) do
        %{token: ^token} -> Map.delete(state.locks, lock)
        _ -> state.locks
      end

    {%{state | locks: locks, applied: index}, :ok}
  end

  # Appended by the leader when a monitored lock holder dies.
  def apply(%{index: index}, {:down, pid, _info}, state) do
    state = sync(state)
    locks = Map.reject(state.locks, fn {_, l} -> l.holder == pid end)
    {%{state | locks: locks, applied: index}, :ok}
  end

  def apply(%{index: index}, _other, state), do: {%{state | applied: index}, {:error, :bad_command}}

  def state_enter(:eol, %{sid: sid}) do
    # This member was removed or its group deleted: drop the engine copy.
    _ = Native.replica_execute(delete_frame(sid))
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
    execute(kind, frame)
  end

  @doc "The fencing token of `lock`, or `nil` (a query)."
  def lock_token(lock, state) do
    case Map.get(state.locks, lock) do
      %{token: token} -> token
      nil -> nil
    end
  end

  ## Internals

  defp applied(state, index, reply) do
    state = %{state | applied: index, snap: nil, since_snap: state.since_snap + 1}
    :ets.insert(@engine, {state.sid, index})

    if state.since_snap >= state.snapshot_every do
      case execute(:heavy_read, export_frame(state.sid)) do
        {:ok, bin} ->
          snapshot = %{state | snap: bin, since_snap: 0}
          {%{state | since_snap: 0}, reply, [{:release_cursor, index, snapshot}]}

        _ ->
          {state, reply}
      end
    else
      {state, reply}
    end
  end

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
        _ = Native.replica_execute(delete_frame(sid))

        cond do
          applied == 0 ->
            :ok

          is_binary(state.snap) ->
            {:ok, _} = Native.replica_execute_dirty(import_frame(state.snap, sid))

          true ->
            # Neither a snapshot nor the entries since: let ra restart this
            # server, which recovers from its snapshot and replays the log.
            exit({:engine_out_of_sync, sid})
        end

        :ets.insert(@engine, {sid, applied})
        %{state | snap: nil}
    end
  end

  defp execute(kind, frame) when kind in [:heavy_read, :heavy_write],
    do: Native.replica_execute_dirty(frame)

  defp execute(_kind, frame), do: Native.replica_execute(frame)

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

  defp delete_frame(sid), do: frame("session_delete", [sid])
  defp export_frame(sid), do: frame("session_export", [sid])
  defp import_frame(bin, sid), do: frame("session_import", [bin, sid])

  defp frame(name, args) do
    alias DSPex.Bridge.MsgPack

    IO.iodata_to_binary([
      0x81,
      MsgPack.encode!(name),
      MsgPack.array_header(length(args)) | Enum.map(args, &MsgPack.encode!/1)
    ])
  end
end
