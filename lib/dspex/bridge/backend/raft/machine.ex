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
  copy is rebuilt from `snap` before the next apply or query, and the
  variables' lock fences (which an export does not carry) are put back
  from the state.

  ## Done here, deterministically

  - Batches: `{:batch, commands}` (the group commit of `Raft.Batcher`)
    applies each command in order and replies with the list of replies.
  - Rate limit (config replicated in the state): a GCRA bucket over the
    leader's stamped times, counting writes (commands in the log).
  - Optimizer locks: a grant's fencing token is its Raft index; a fenced
    write is applied only while its token is the lock's current one. A
    session variable's lock (`{:var, var_id}`, taken through
    `DSPex.Bridge.OptimizerCoordinator`) also moves the variable's fence in
    the engine, so every member refuses the same writes. Waiters queue in
    the state, first come first served. A lease's expiry is a ra timer
    (the leader appends `{:timeout, ...}`, checked against the entry's
    time), a holder's death a ra monitor (the leader appends `{:down, ...}`).
  - TTL: the leader's `tick/2` appends `{:expire, now, idle_since}` once
    the session has been idle for `ttl_ms`; applying it deletes the
    session on every member unless a write came after `idle_since`.
  - Snapshots: every `snapshot_every` writes, a `release_cursor` with the
    engine's export, which bounds the log.

  Effects (lock grants sent to waiters, lock ends reported to the holder's
  node's `OptimizerCoordinator`, the cleanup of an expired group) run on
  the leader only, as ra runs them.
  """

  # The `ra_machine` behaviour, not declared: ra is optional at compile time.

  import Kernel, except: [apply: 3]

  alias DSPex.Bridge.Native

  @engine :dspex_raft_engine
  @default_snapshot_every 4096
  @coordinator DSPex.Bridge.OptimizerCoordinator

  # Fields added after the first version: a state recovered from an older
  # snapshot gets them on its first apply.
  @later %{ttl_ms: nil, expired: false, waiters: %{}, fences: %{}}

  @doc "The ETS table of engine indexes (created by `Raft.System`)."
  def engine_table, do: @engine

  def init(config) do
    Map.merge(@later, %{
      sid: Map.fetch!(config, :sid),
      # The default read consistency, restored with the member after a restart.
      consistency: Map.get(config, :consistency, :consistent),
      applied: 0,
      snap: nil,
      since_snap: 0,
      snapshot_every: Map.get(config, :snapshot_every, @default_snapshot_every),
      rate: nil,
      tat: 0,
      # The last stamped time of a command: the session's last write.
      now: 0,
      # lock => %{token, holder, pid, lease_ms, renewed_at, var}
      locks: %{}
    })
  end

  # Every entry: the engine copy is brought to `applied` first, the entry
  # handled, then `applied` (in the state and in the node's table) moves to
  # the entry's index, and a snapshot is due every `snapshot_every` entries.
  def apply(%{index: index, term: term} = meta, cmd, state) do
    state = state |> upgrade() |> sync()

    {state, reply, effects} =
      case handle(as_version(cmd, meta), meta, state) do
        {state, reply} -> {state, reply, []}
        triple -> triple
      end

    {reply, writes} =
      case cmd do
        {:exec_meta, _, _, _} -> {{reply, %{index: index, term: term}}, 1}
        {:batch, cmds} -> {reply, length(cmds)}
        _ -> {reply, 1}
      end

    state = %{state | applied: index, snap: nil, since_snap: state.since_snap + writes}
    :ets.insert(@engine, {state.sid, index})
    {state, snapshot} = snapshot(state, index)
    {state, reply, effects ++ snapshot}
  end

  defp upgrade(state) when is_map_key(state, :expired), do: state
  defp upgrade(state), do: Map.merge(@later, state)

  ## Versions
  #
  # Version 1 added batches, session-variable locks with waiters, TTL and
  # imports. ra applies every entry with the group's effective version
  # (the leader's, once its election noop is applied; a member whose code
  # is older stops applying there until upgraded), so while a group runs
  # at version 0 (an old leader, during a rolling upgrade) this code
  # answers as version 0 did: no member diverges.

  @doc false
  def version, do: 1

  @doc false
  def which_module(_version), do: __MODULE__

  defp as_version(cmd, %{machine_version: v}) when is_integer(v) and v >= 1, do: cmd

  defp as_version(cmd, _meta) do
    case cmd do
      {:create, now, frame, opts} when is_map(opts) -> {:create, now, frame, nil}
      {tag, _} when tag in [:batch] -> :v0_unknown
      {tag, _, _} when tag in [:var_unlock, :var_cancel, :expire] -> :v0_unknown
      {tag, _, _, _} when tag in [:var_lock, :expire] -> :v0_unknown
      {:var_renew, _, _, _, _} -> :v0_unknown
      {:timeout, {:lease, lock, token}} -> {:v0_timeout, lock, token}
      other -> other
    end
  end

  ## Sessions

  defp handle({:machine_version, _from, _to}, _meta, state), do: {state, :ok}

  # Version 0's lease end: at the timer, whatever the time.
  defp handle({:v0_timeout, lock, token}, _meta, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} -> {%{state | locks: Map.delete(state.locks, lock)}, :ok}
      _ -> {state, :ok}
    end
  end

  # A create as the first version wrote it (the rate limit alone).
  defp handle({:create, now, frame, rate}, meta, state) when not is_map(rate),
    do: handle({:create, now, frame, %{rate: rate}}, meta, state)

  defp handle({:create, now, frame, opts}, _meta, state) when is_map(opts) do
    state = %{state | now: now}

    case execute(:heavy_write, frame, now) do
      :ok -> {created(state, opts, now), :ok}
      {:ok, _} = ok -> {created(state, opts, now), ok}
      error -> {state, error}
    end
  end

  # Appended by the leader's tick; a write after `idle_since` cancels it.
  defp handle({:expire, now, idle_since}, _meta, state) do
    if expire?(state, now, idle_since) do
      _ = execute(:write, delete_frame(state.sid), now)
      {%{state | expired: true, locks: %{}, waiters: %{}}, :ok, [expired_effect(state.sid)]}
    else
      {state, :ok}
    end
  end

  defp handle({:exec, now, kind, frame}, _meta, state) do
    state = %{state | now: max(state.now, now)}

    case admit(state, now) do
      {:ok, state} -> {state, execute(kind, frame, now)}
      :rate_limited -> {state, {:error, :rate_limited}}
    end
  end

  # As `:exec`; the reply also says where the write sits in the log.
  defp handle({:exec_meta, now, kind, frame}, meta, state),
    do: handle({:exec, now, kind, frame}, meta, state)

  defp handle({:batch, cmds}, meta, state) do
    {state, replies, effects} =
      Enum.reduce(cmds, {state, [], []}, fn cmd, {st, replies, effects} ->
        case batched(cmd, meta, st) do
          {st, reply} -> {st, [reply | replies], effects}
          {st, reply, fx} -> {st, [reply | replies], effects ++ fx}
        end
      end)

    {state, Enum.reverse(replies), effects}
  end

  ## Locks

  defp handle({:lock_acquire, now, lock, holder, lease_ms}, meta, state) do
    pid = if is_pid(holder), do: holder
    request = %{holder: holder, pid: pid, lease_ms: lease_ms, var: nil, mode: :abort, ref: nil}

    case acquire(state, meta, now, lock, request) do
      {state, {:ok, _how, token, _at}, fx} -> {state, {:ok, token}, fx}
      {state, {:error, {:lock_held_by, other}}, fx} -> {state, {:error, {:locked, other}}, fx}
      other -> other
    end
  end

  # A session variable's optimizer lock (OptimizerCoordinator).
  defp handle({:var_lock, now, var, request}, meta, state),
    do: acquire(state, meta, now, {:var, var}, Map.put(request, :var, var))

  defp handle({:var_renew, now, var, holder, lease_ms}, _meta, state) do
    case Map.get(state.locks, {:var, var}) do
      %{holder: ^holder, token: token} = grant ->
        grant = %{grant | renewed_at: now, lease_ms: lease_ms || grant.lease_ms}

        state = %{
          state
          | now: max(state.now, now),
            locks: Map.put(state.locks, {:var, var}, grant)
        }

        {state, {:ok, token}, lease_effects({:var, var}, grant)}

      _ ->
        {state, {:error, :not_lock_owner}}
    end
  end

  # Releases the variable's lock held by `holder` (`:any`: whoever holds it).
  defp handle({:var_unlock, var, holder}, meta, state) do
    lock = {:var, var}

    case Map.get(state.locks, lock) do
      %{holder: h} = grant when h == holder or holder == :any ->
        {state, effects} = release(state, meta, lock, :released)
        {state, {:ok, grant.token, h, finished?(state, h)}, effects}

      nil ->
        {state, {:error, :not_locked}}

      _ ->
        {state, {:error, :not_lock_owner}}
    end
  end

  # A waiter gives up: `:removed`, or `{:granted, token}` when the lock
  # reached it first (it is then the holder), or `:gone`.
  defp handle({:var_cancel, var, ref}, _meta, state) do
    lock = {:var, var}
    queue = Map.get(state.waiters, lock, [])

    case Enum.split_with(queue, &(&1.ref == ref)) do
      {[_], rest} ->
        {%{state | waiters: put_queue(state.waiters, lock, rest)}, :removed}

      {[], _} ->
        case Map.get(state.locks, lock) do
          %{ref: ^ref, token: token} -> {state, {:granted, token}}
          _ -> {state, :gone}
        end
    end
  end

  defp handle({:lock_release, lock, token}, meta, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} ->
        {state, effects} = release(state, meta, lock, :released)
        {state, :ok, effects}

      _ ->
        {state, {:error, :stale_fencing_token}}
    end
  end

  defp handle({:fenced, lock, token, now, kind, frame}, meta, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} -> handle({:exec, now, kind, frame}, meta, state)
      _ -> {state, {:error, :stale_fencing_token}}
    end
  end

  # Appended by the leader when a lease's timer fires: the lease ends if
  # the entry's time is past it (a renewal moved it: the timer is set again).
  defp handle({:timeout, {:lease, lock, token}}, meta, state) do
    case Map.get(state.locks, lock) do
      %{token: ^token} = grant ->
        left_ms = div(grant.renewed_at - time_us(meta, state), 1000) + grant.lease_ms

        if left_ms > 0 do
          {state, :ok, [{:timer, {:lease, lock, token}, left_ms}]}
        else
          {state, effects} = release(state, meta, lock, :expired)
          {state, :ok, effects}
        end

      _ ->
        {state, :ok}
    end
  end

  # Appended by the leader when a monitored lock holder or waiter dies.
  defp handle({:down, pid, _info}, meta, state) do
    waiters =
      state.waiters
      |> Enum.map(fn {lock, q} -> {lock, Enum.reject(q, &waits_for?(&1, pid))} end)
      |> Enum.reject(fn {_, q} -> q == [] end)
      |> Map.new()

    held = for {lock, %{pid: ^pid}} <- state.locks, do: lock

    Enum.reduce(held, {%{state | waiters: waiters}, :ok, []}, fn lock, {st, :ok, fx} ->
      {st, more} = release(st, meta, lock, :owner_down)
      {st, :ok, fx ++ more}
    end)
  end

  defp handle(_other, _meta, state), do: {state, {:error, :bad_command}}

  # What a batch may carry: writes, fenced or not (a lock grant's token is
  # its entry's index, so grants are never batched).
  defp batched({:exec, _, _, _} = cmd, meta, state), do: handle(cmd, meta, state)
  defp batched({:fenced, _, _, _, _, _} = cmd, meta, state), do: handle(cmd, meta, state)
  defp batched(_cmd, _meta, state), do: {state, {:error, :bad_command}}

  defp acquire(%{expired: true} = state, _meta, _now, _lock, _request),
    do: {state, {:error, :session_not_found}, []}

  defp acquire(state, %{index: index}, now, lock, request) do
    state = %{state | now: max(state.now, now)}
    holder = request.holder

    case Map.get(state.locks, lock) do
      nil ->
        grant(state, lock, index, now, request, :granted)

      %{holder: ^holder} = grant ->
        # Re-entrant: the holder renews its lease and keeps its token.
        grant = %{grant | renewed_at: now, lease_ms: request.lease_ms}
        state = %{state | locks: Map.put(state.locks, lock, grant)}
        {state, {:ok, :already_held, grant.token, false}, lease_effects(lock, grant)}

      %{holder: other} when request.mode == :wait and request.ref != nil ->
        # `notify`: the process waiting for the grant (the caller), watched
        # as the holder-to-be is: either's death takes the request back.
        waiter = Map.take(request, [:holder, :pid, :lease_ms, :ref, :var, :notify])
        queue = Map.get(state.waiters, lock, []) ++ [waiter]
        state = %{state | waiters: Map.put(state.waiters, lock, queue)}
        {state, {:wait, request.ref, other}, waiter_monitors(waiter)}

      %{holder: other} ->
        {state, {:error, {:lock_held_by, other}}, []}
    end
  end

  defp grant(state, lock, token, now, request, how) do
    grant = %{
      token: token,
      holder: request.holder,
      pid: request.pid,
      lease_ms: request.lease_ms,
      granted_at: now,
      renewed_at: now,
      var: request[:var],
      ref: request[:ref]
    }

    # Whether this grant starts the holder's optimization (its first lock).
    started? = not Enum.any?(state.locks, fn {_, l} -> l.holder == request.holder end)
    state = %{state | locks: Map.put(state.locks, lock, grant)}
    state = fence(state, grant, :granted)
    {state, {:ok, how, token, started?}, lease_effects(lock, grant)}
  end

  # The grant of `lock` ends (`reason`); the first waiter, if any, gets the
  # lock with this entry's index as its token, and is told.
  defp release(state, meta, lock, reason) do
    %{locks: %{^lock => old}} = state
    state = %{state | locks: Map.delete(state.locks, lock)} |> fence(old, :released)
    ended = ended_effects(state, old, reason)

    case Map.get(state.waiters, lock, []) do
      [] ->
        {state, ended ++ demonitor(state, old.pid)}

      [next | rest] ->
        state = %{state | waiters: put_queue(state.waiters, lock, rest)}
        now = time_us(meta, state)

        {state, {:ok, :granted, token, started?}, fx} =
          grant(state, lock, meta.index, now, next, :granted)

        told =
          case Map.get(next, :notify, next.pid) do
            to when is_pid(to) ->
              [{:send_msg, to, {:dspex_raft_lock_granted, next.ref, token, started?}}]

            _ ->
              []
          end

        {state, ended ++ demonitor(state, old.pid) ++ fx ++ told}
    end
  end

  defp created(state, opts, now),
    do: %{state | rate: rate_config(opts[:rate]), tat: now, ttl_ms: opts[:ttl_ms]}

  defp put_queue(waiters, lock, []), do: Map.delete(waiters, lock)
  defp put_queue(waiters, lock, queue), do: Map.put(waiters, lock, queue)

  # The engine's fence of a locked variable follows its grants; the
  # highest token per variable is kept to restore fences after a rebuild.
  defp fence(state, %{var: nil}, _), do: state

  defp fence(state, %{var: var, token: token, holder: holder}, :granted) do
    _ = execute(:write, fence_frame(state.sid, var, {:granted, holder, token}), state.now)
    %{state | fences: Map.update(state.fences, var, token, &max(&1, token))}
  end

  defp fence(state, %{var: var, token: token}, :released) do
    _ = execute(:write, fence_frame(state.sid, var, {:released, token}), state.now)
    state
  end

  # A coordinator lock's end by expiry or death is reported to the
  # coordinator of the holder's node (its telemetry fires there, once);
  # a release is reported by the caller that released.
  defp ended_effects(state, %{var: var, pid: pid} = grant, reason)
       when is_binary(var) and is_pid(pid) and reason in [:expired, :owner_down] do
    key = {:dspex_session, state.sid, var}

    [
      {:send_msg, {@coordinator, node(pid)},
       {:dspex_lock_ended, reason, key, grant.holder, pid, grant.token,
        finished?(state, grant.holder)}}
    ]
  end

  defp ended_effects(_state, _grant, _reason), do: []

  defp finished?(state, holder),
    do: not Enum.any?(state.locks, fn {_, l} -> l.holder == holder end)

  defp waits_for?(waiter, pid), do: waiter.pid == pid or Map.get(waiter, :notify) == pid

  defp waiter_monitors(waiter) do
    for pid <- Enum.uniq([waiter.pid, Map.get(waiter, :notify)]),
        is_pid(pid),
        do: {:monitor, :process, pid}
  end

  defp demonitor(_state, pid) when not is_pid(pid), do: []

  defp demonitor(state, pid) do
    busy =
      Enum.any?(state.locks, fn {_, l} -> l.pid == pid end) or
        Enum.any?(state.waiters, fn {_, q} -> Enum.any?(q, &waits_for?(&1, pid)) end)

    if busy, do: [], else: [{:demonitor, :process, pid}]
  end

  defp lease_effects(lock, grant) do
    monitor = if is_pid(grant.pid), do: [{:monitor, :process, grant.pid}], else: []

    timer =
      if is_integer(grant.lease_ms) and grant.lease_ms > 0,
        do: [{:timer, {:lease, lock, grant.token}, grant.lease_ms}],
        else: []

    monitor ++ timer
  end

  # An entry's time: ra's stamp of when the leader appended it (ms), or
  # the last command's.
  defp time_us(%{system_time: ms}, _state) when is_integer(ms), do: ms * 1000
  defp time_us(_meta, state), do: state.now

  ## TTL

  defp expire?(%{ttl_ms: ttl, expired: false} = state, now, idle_since) when is_integer(ttl),
    do: state.now <= idle_since and now - idle_since > ttl * 1000

  defp expire?(_state, _now, _idle_since), do: false

  defp expired_effect(sid),
    do: {:mod_call, DSPex.Bridge.Backend.Raft, :expired, [sid]}

  @doc false
  # The leader, once a second: a session idle past its ttl (no write, and
  # no read served by this leader) is expired by a command in the log.
  def tick(time_ms, %{ttl_ms: ttl, expired: false, sid: sid} = state) when is_integer(ttl) do
    read =
      case :ets.lookup(@engine, {:read, sid}) do
        [{_, t}] -> t
        [] -> 0
      end

    idle_since = max(state.now, read)

    if time_ms * 1000 - idle_since > ttl * 1000,
      do: [{:append, {:expire, time_ms * 1000, idle_since}}],
      else: []
  end

  def tick(_time_ms, _state), do: []

  ## Snapshots and roles

  # The engine's export as the state at `index`: ra writes it as a snapshot
  # and truncates the log before it.
  defp snapshot(state, index) do
    with true <- state.since_snap >= state.snapshot_every,
         false <- state.expired,
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
    _ = :ets.delete(@engine, {:read, sid})
    []
  end

  def state_enter(:leader, state) do
    state = upgrade(state)
    now_us = :os.system_time(:microsecond)
    # A new leader starts the session's idle clock (it has seen no read).
    if is_integer(state.ttl_ms), do: :ets.insert(@engine, {{:read, state.sid}, now_us})

    # Re-arm monitors of lock holders and waiters, and lease timers: a new
    # leader has none of its own.
    holders =
      Enum.flat_map(state.locks, fn {lock, grant} ->
        monitor = if is_pid(grant.pid), do: [{:monitor, :process, grant.pid}], else: []

        timer =
          if is_integer(grant.lease_ms) and grant.lease_ms > 0 do
            left = div(grant.renewed_at - now_us, 1000) + grant.lease_ms
            [{:timer, {:lease, lock, grant.token}, max(left, 0)}]
          else
            []
          end

        monitor ++ timer
      end)

    waiters = for {_, q} <- state.waiters, w <- q, m <- waiter_monitors(w), do: m

    # An expiry whose cleanup did not run (the old leader died): run it.
    cleanup = if state.expired, do: [expired_effect(state.sid)], else: []
    holders ++ waiters ++ cleanup
  end

  def state_enter(_role, _state), do: []

  def overview(state) do
    %{sid: state.sid, applied: state.applied, locks: map_size(state.locks)}
  end

  ## Queries

  @doc "A query on this member's engine copy (runs in the ra server process)."
  def query(kind, frame, state) do
    state = state |> upgrade() |> sync()
    now = :os.system_time(:microsecond)
    if is_integer(state.ttl_ms), do: :ets.insert(@engine, {{:read, state.sid}, now})
    execute(kind, frame, now)
  end

  @doc """
  The session's info (a query): the engine's, with the ttl and the rate
  limit the machine enforces (`available`: the writes it would admit now).
  """
  def session_info(frame, state) do
    state = upgrade(state)

    case query(:read, frame, state) do
      {:ok, info} when is_map(info) ->
        {:ok, %{info | ttl_ms: state.ttl_ms, rate_limit: rate_info(state)}}

      other ->
        other
    end
  end

  defp rate_info(%{rate: %{ops_per_sec: ops, burst: burst, interval: i, tolerance: t}, tat: tat}) do
    now = :os.system_time(:microsecond)
    available = div(t - (max(tat, now) - now), i) |> max(0) |> min(burst)
    %{ops_per_sec: ops, burst: burst, available: available}
  end

  defp rate_info(_state), do: nil

  @doc "The fencing token of `lock`, or `nil` (a query)."
  def lock_token(lock, state) do
    case Map.get(state.locks, lock) do
      %{token: token} -> token
      nil -> nil
    end
  end

  @doc "A session variable's lock (a query): `nil` or its grant and queue."
  def var_lock_info(var, state) do
    state = upgrade(state)

    case Map.get(state.locks, {:var, var}) do
      nil ->
        nil

      grant ->
        left =
          if is_integer(grant.lease_ms),
            do:
              max(div(grant.renewed_at - :os.system_time(:microsecond), 1000) + grant.lease_ms, 0)

        %{
          optimizer_id: grant.holder,
          pid: grant.pid,
          token: grant.token,
          acquired_at: grant.granted_at,
          lease_left_ms: left,
          iteration: 0,
          waiters: length(Map.get(state.waiters, {:var, var}, []))
        }
    end
  end

  ## Internals

  # The engine copy on this node reflects `state.applied`, or is rebuilt.
  defp sync(%{sid: sid, applied: applied} = state) do
    case :ets.lookup(@engine, sid) do
      [{_, ^applied}] when applied > 0 ->
        state

      _ ->
        _ = Native.replica_execute(delete_frame(sid), state.now)

        cond do
          applied == 0 or state.expired ->
            :ok

          is_binary(state.snap) ->
            {:ok, _} = Native.replica_execute_dirty(import_frame(state.snap, sid), state.now)
            restore_fences(state)

          true ->
            # Neither a snapshot nor the entries since: let ra restart this
            # server, which recovers from its snapshot and replays the log.
            exit({:engine_out_of_sync, sid})
        end

        :ets.insert(@engine, {sid, applied})
        %{state | snap: nil}
    end
  end

  # An export carries no lock state: each locked variable's fence (its
  # highest token, and its holder while held) is applied again.
  defp restore_fences(state) do
    for {var, top} <- state.fences do
      frame =
        case Map.get(state.locks, {:var, var}) do
          %{token: ^top, holder: holder} -> fence_frame(state.sid, var, {:granted, holder, top})
          _ -> fence_frame(state.sid, var, {:granted, "dspex_restored", top})
        end

      _ = execute(:write, frame, state.now)

      unless match?(%{token: ^top}, Map.get(state.locks, {:var, var})),
        do: execute(:write, fence_frame(state.sid, var, {:released, top}), state.now)
    end

    :ok
  end

  defp execute(kind, frame, now) when kind in [:heavy_read, :heavy_write],
    do: Native.replica_execute_dirty(frame, now)

  defp execute(_kind, frame, now), do: Native.replica_execute(frame, now)

  defp rate_config(%{ops_per_sec: ops, burst: burst}), do: rate_config({ops, burst})

  defp rate_config({ops, burst}) when is_integer(ops) and ops > 0 and is_integer(burst),
    do: %{
      interval: div(1_000_000, ops) |> max(1),
      tolerance: max(burst, 1) * div(1_000_000, ops),
      ops_per_sec: ops,
      burst: burst
    }

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

  defp fence_frame(sid, var, {:granted, holder, token}) do
    change = %{"granted" => %{"optimizer" => to_string(holder), "token" => token}}
    frame("var_fence", session: sid, ident: var, change: change)
  end

  defp fence_frame(sid, var, {:released, token}),
    do: frame("var_fence", session: sid, ident: var, change: %{"released" => %{"token" => token}})

  defp frame(name, args) do
    {:ok, _kind, frame} = DSPex.Bridge.Backend.Raft.Command.encode_raw(name, args)
    frame
  end
end
