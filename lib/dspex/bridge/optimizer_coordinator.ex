defmodule DSPex.Bridge.OptimizerCoordinator do
  @moduledoc """
  Optimization locks: at most one optimizer works on a variable at a time.

      {:ok, :lock_acquired} = OptimizerCoordinator.acquire_lock("temperature", "opt1", self())

      {:error, {:lock_held_by, "opt1"}} =
        OptimizerCoordinator.acquire_lock("temperature", "opt2", self(),
          conflict_resolution: :abort)

      {:ok, true} = OptimizerCoordinator.report_progress("opt1", 1, 0.7, %{loss: 0.31})
      :ok = OptimizerCoordinator.release_lock("temperature", "opt1")

  The lock table lives in Rust, one per VM, held by the NIF library (like
  the session engine): acquiring a free lock and releasing it are one NIF
  call each from the caller's process, with no message to this module's
  process. Every holder and waiter is watched by a resource monitor, so when
  a holder dies its lock passes to the next waiter at once, from inside the
  VM's own exit handling.

  ## Keys

  A lock key is any term: a variable id, a name, a tuple. With
  `session_id:` the lock is on a session variable: the key becomes
  `{:dspex_session, session_id, var_id}` (name and id give the same lock),
  the variable enforces the lock on writes (see "Fencing"), and every call
  on it is checked for the `principal:` (default: the session itself):
  `acquire_lock/4`, `release_lock/3` and `renew_lock/3` need `:optimize`
  on the variable, `get_lock_info/2` `:read`. A denial is audited and
  reported like every other (see `DSPex.Bridge.AccessControl`).

  Session-variable locks are reachable only through `session_id:`: the two
  key spaces are disjoint, and a raw key of the reserved form
  `{:dspex_session, _, _}` is refused with
  `{:error, {:invalid_argument, {:reserved_key, key}}}`. A raw key
  `{session_id, var_id}` is an ordinary lock, unrelated to the variable.

  Options are keyword lists of the keys each function documents; anything
  else is `{:error, {:invalid_argument, {:bad_options, opts}}}` or
  `{:error, {:invalid_argument, {:unknown_options, keys}}}`.

  ## Conflicts

  - `:wait` (default) queues the request FIFO. When the holder releases,
    dies or its lease runs out, the first waiter still waiting is *granted*
    the lock and its call returns `{:ok, :lock_acquired_after_wait}`. A
    waiter whose `timeout:` passes gets `{:error, :timeout}` and leaves the
    queue; it never gets the lock later. A waiter that dies leaves too.
  - `:abort` returns `{:error, {:lock_held_by, holder_id}}` at once.
  - `:preempt` takes the lock at once when the holder's optimizer has
    reported at least `preempt_after` iterations (default 10, seed 002's
    policy); the old holder's process is sent
    `{:optimization_preempted, var_id}`. Otherwise the request waits.

  ## Leases

  A grant lasts `lease:` milliseconds (default 5 minutes, see
  "Configuration"); `renew_lock/3` and every `report_progress/4` of the
  holder extend it. An expired lock passes on like a released one and emits
  `[:dspex, :optimization, :lock_expired]`.

  ## Fencing

  Every grant carries a token, larger than any token granted before on any
  key, so tokens on a key strictly increase. While a session variable is
  locked, `SessionStore.update_variable/5` (and the other writes) succeed
  only with the holder's `lock_token:` or `optimizer_id:`; others get
  `{:error, {:locked_by, optimizer_id}}`, and a preempted holder, or any
  write carrying an older token, gets `{:error, :stale_lock_token}`.

  ## Replicated sessions

  A lock on a variable of a replicated session (`replicas:`, see
  `DSPex.Bridge.Backend.Raft`) is not in this node's table: it is a
  command in the session's Raft log, so it holds on every node and
  survives the leader's failure. Its token is the grant's log index (it
  only increases, also across leader changes); the grant moves the
  variable's fence on every member, so the fencing above is decided inside
  the state machine. `:wait` queues in the state machine (first come,
  first served), which sends the grant to the waiting caller. A lease's
  expiry and the holder's death are commands the leader appends; their
  `:lock_expired` and `:lock_released` events fire once, on the holder's
  node. Every call made about the lock is a round trip to the leader
  (a write to the log, or a read for `get_lock_info/2`), and one that times
  out is `{:error, :timeout_unknown_outcome}` (a grant may have been made:
  its lease and the holder's death still end it).

  Not replicated: progress reports (`report_progress/4`,
  `get_optimization_status/1`, `get_all_active_optimizations/0` cover this
  node's table), so a replicated lock is renewed with `renew_lock/3` and
  `:preempt` never preempts it: it waits, as `:wait` does.

  ## Configuration

      config :dspex_bridge, DSPex.Bridge.OptimizerCoordinator,
        lease: :timer.minutes(5),      # default lease of a grant, ms
        preempt_after: 10,             # iterations before :preempt wins; :never
        sweep_interval: 1_000          # longest pause between lease sweeps, ms

  Telemetry: see the "Optimizer coordination" table in
  `DSPex.Bridge.Telemetry.Catalogue`.
  """
  use GenServer

  import DSPex.Bridge.OptimizerCoordinator.{Args, Events}

  alias DSPex.Bridge.{AccessControl, Native, Options, Telemetry}
  alias DSPex.Bridge.Backend.{Raft, Router}

  require Telemetry

  @type key :: term
  @type optimizer_id :: String.t() | atom
  @type reason :: atom | {atom, term}

  @never 18_446_744_073_709_551_615
  @acquire_opts DSPex.Bridge.OptimizerCoordinator.Args.acquire_opts()
  @start_opts DSPex.Bridge.OptimizerCoordinator.Args.start_opts()
  @session DSPex.Bridge.OptimizerCoordinator.Args.session_tag()

  ## Lifecycle

  @doc """
  Starts the coordinator (the application does). Options override the
  application environment: `lease:` (ms, default 5 minutes),
  `preempt_after:` (an integer or `:never`, default 10), `sweep_interval:`
  (ms, default 1000). The lock table outlives a restart of this process.
  A bad option is `{:error, {:invalid_argument, detail}}`, and nothing is
  started.
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:lease, :preempt_after, :sweep_interval]),
         {:ok, sweep} <-
           configure(Keyword.merge(Application.get_env(:dspex_bridge, __MODULE__, []), opts)),
         do: GenServer.start_link(__MODULE__, sweep, name: __MODULE__)
  end

  # Checked and applied in the caller, so a bad option is an answer, not a
  # crash of the process starting it. The lock table outlives a restart of
  # the coordinator; its configuration is fixed for the VM's lifetime.
  defp configure(config) do
    lease = Keyword.get(config, :lease, :timer.minutes(5))
    preempt_after = Keyword.get(config, :preempt_after, 10)
    sweep = Keyword.get(config, :sweep_interval, 1_000)

    cond do
      not (is_integer(lease) and lease > 0) ->
        Options.bad(:lease, lease)

      not (preempt_after == :never or (is_integer(preempt_after) and preempt_after >= 0)) ->
        Options.bad(:preempt_after, preempt_after)

      not (is_integer(sweep) and sweep > 0) ->
        Options.bad(:sweep_interval, sweep)

      true ->
        preempt_after = if preempt_after == :never, do: @never, else: preempt_after

        with :ok <- Native.lock_table_init(lease, preempt_after), do: {:ok, sweep}
    end
  end

  ## Locks

  @doc """
  Acquires the optimization lock on `var_id` for `optimizer_id`, held by
  `pid` (watched: the lock passes on when it dies).

  Options: `timeout:` how long to wait (ms or `:infinity`, default 5000),
  `conflict_resolution:` `:wait | :abort | :preempt` (default `:wait`),
  `session_id:` lock a session variable (and `principal:` on whose behalf),
  `lease:` ms before the grant expires unless renewed.

  An optimizer that already holds the lock gets `{:ok, :lock_acquired}`
  again and its lease is renewed.

      iex> alias DSPex.Bridge.OptimizerCoordinator
      iex> OptimizerCoordinator.acquire_lock("doc_var", "opt1", self())
      {:ok, :lock_acquired}
      iex> OptimizerCoordinator.acquire_lock("doc_var", "opt2", self(), conflict_resolution: :abort)
      {:error, {:lock_held_by, "opt1"}}
      iex> OptimizerCoordinator.release_lock("doc_var", "opt1")
      :ok
  """
  @spec acquire_lock(key, optimizer_id, pid, keyword) ::
          {:ok, :lock_acquired | :lock_acquired_after_wait}
          | {:error, {:lock_held_by, String.t()} | :timeout | reason}
  def acquire_lock(var_id, optimizer_id, pid \\ self(), opts \\ [])

  def acquire_lock(var_id, _optimizer_id, _pid, _opts) when reserved?(var_id),
    do: reserved(var_id)

  # The common call, with no options to parse; the NIF checks the rest.
  def acquire_lock(var_id, optimizer_id, pid, [])
      when is_binary(optimizer_id) and byte_size(optimizer_id) in 1..255 and is_pid(pid) and
             node(pid) == node() do
    case run_acquire(var_id, var_id, optimizer_id, pid, :wait, 5_000, nil, nil) do
      {:ok, how, _token} -> {:ok, how}
      error -> error
    end
  end

  def acquire_lock(var_id, optimizer_id, pid, opts) do
    case acquire(var_id, optimizer_id, pid, opts) do
      {:ok, how, _token} -> {:ok, how}
      error -> error
    end
  end

  @doc """
  Releases the lock if `optimizer_id` holds it; the first live waiter gets
  it. Options: `session_id:`, `principal:`.
  """
  @spec release_lock(key, optimizer_id, keyword) :: :ok | {:error, :not_lock_owner | reason}
  def release_lock(var_id, optimizer_id, opts \\ [])

  def release_lock(var_id, _optimizer_id, _opts) when reserved?(var_id), do: reserved(var_id)

  def release_lock(var_id, optimizer_id, [])
      when is_binary(optimizer_id) and byte_size(optimizer_id) in 1..255,
      do: release(var_id, optimizer_id)

  def release_lock(var_id, optimizer_id, opts) do
    with {:ok, opts} <- Options.validate(opts, [:session_id, :principal]),
         {:ok, optimizer_id} <- optimizer(optimizer_id),
         {:ok, key} <- key(var_id, opts, :optimize) do
      release(key, optimizer_id)
    end
  end

  defp release(key, optimizer_id) do
    case replicated(key) do
      {sid, id} -> raft_release(key, sid, id, optimizer_id)
      nil -> native_release(key, optimizer_id)
    end
  end

  defp raft_release(key, sid, id, optimizer_id) do
    started_at = started_at(optimizer_id)

    case Raft.var_unlock(sid, id, optimizer_id) do
      {:ok, token, _holder, finished} ->
        ended(key, optimizer_id, token, finished, :released, started_at)
        :ok

      {:error, :not_locked} ->
        {:error, :not_lock_owner}

      error ->
        error
    end
  end

  defp native_release(key, optimizer_id) do
    started_at = started_at(optimizer_id)

    case Native.lock_release(key, optimizer_id) do
      {:ok, token, finished} ->
        ended(key, optimizer_id, token, finished, :released, started_at)
        :ok

      error ->
        error
    end
  end

  @doc """
  Extends the lease of `optimizer_id`'s lock: `{:ok, token}`. Options:
  `lease:` (default: the configured lease), `session_id:`, `principal:`.
  """
  @spec renew_lock(key, optimizer_id, keyword) ::
          {:ok, pos_integer} | {:error, :not_lock_owner | reason}
  def renew_lock(var_id, optimizer_id, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:session_id, :principal, :lease]),
         {:ok, optimizer_id} <- optimizer(optimizer_id),
         {:ok, lease} <- lease(opts[:lease]),
         {:ok, key} <- key(var_id, opts, :optimize) do
      case replicated(key) do
        {sid, id} ->
          Raft.var_renew(sid, id, optimizer_id, lease || default_lease())

        nil ->
          if lease, do: hint_lease(lease)
          Native.lock_renew(key, optimizer_id, lease)
      end
    end
  end

  @doc """
  Records an iteration of an active optimization (one holding a lock) and
  renews its leases. The best report is the one with the lowest
  `:primary_metric` (else `:loss`); `{:ok, true}` when this one is it.
  """
  @spec report_progress(optimizer_id, non_neg_integer, term, map) ::
          {:ok, boolean} | {:error, :not_optimizing | reason}
  def report_progress(optimizer_id, iteration, value, metrics \\ %{}) do
    with {:ok, optimizer_id} <- optimizer(optimizer_id),
         {:ok, best} <- Native.lock_progress(optimizer_id, iteration, value, metrics) do
      Telemetry.execute(
        [:dspex, :optimization, :progress],
        %{iteration: iteration},
        %{optimizer_id: optimizer_id, best: best, value: value, metrics: metrics}
      )

      {:ok, best}
    end
  end

  @doc """
  The lock on `var_id`: `{:ok, %{optimizer_id, pid, token, acquired_at,
  lease_left_ms, iteration, waiters}}` or `{:error, :not_locked}`.
  Options: `session_id:`, `principal:` (who needs `:read` on the variable).
  """
  @spec get_lock_info(key, keyword) :: {:ok, map} | {:error, :not_locked | reason}
  def get_lock_info(var_id, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:session_id, :principal]),
         {:ok, key} <- key(var_id, opts, :read) do
      case lock_info(key) do
        nil -> {:error, :not_locked}
        {:error, _} = error -> error
        info -> {:ok, %{info | acquired_at: datetime(info.acquired_at)}}
      end
    end
  end

  @doc """
  An active optimization: `{:ok, %{optimizer_id, pid, keys, iteration,
  reports, best_value, best_metrics, best_iteration, started_at,
  last_update}}` or `{:error, :not_found}`.
  """
  @spec get_optimization_status(optimizer_id) :: {:ok, map} | {:error, :not_found | reason}
  def get_optimization_status(optimizer_id) do
    with {:ok, optimizer_id} <- optimizer(optimizer_id) do
      case Native.lock_status(optimizer_id) do
        nil -> {:error, :not_found}
        status -> {:ok, status(status)}
      end
    end
  end

  @doc "Every active optimization (one holding at least one lock), by optimizer id."
  @spec get_all_active_optimizations() :: {:ok, [map]}
  def get_all_active_optimizations do
    {:ok, Enum.map(Native.lock_active(), &status/1)}
  end

  ## Session variables (used by SessionStore)

  @doc false
  def start_optimization(session_id, ident, pid, opts) do
    with {:ok, opts} <- Options.validate(opts, @start_opts) do
      {id, opts} = Keyword.pop_lazy(opts, :optimizer_id, &new_optimizer_id/0)
      start(session_id, ident, pid, id, Keyword.put_new(opts, :conflict_resolution, :abort))
    end
  end

  defp start(session_id, ident, pid, id, opts) do
    case acquire(ident, id, pid, [{:session_id, session_id} | opts]) do
      {:ok, _how, token} ->
        {:ok, %{optimizer_id: to_string(id), token: token}}

      {:error, {:lock_held_by, _}} ->
        case get_lock_info(ident, session_id: session_id, principal: opts[:principal]) do
          {:ok, info} ->
            status = %{
              optimizing: true,
              optimizer_id: info.optimizer_id,
              optimizer_pid: info.pid,
              started_at: info.acquired_at,
              token: info.token
            }

            {:error, {:already_optimizing, status}}

          # Released in between: one retry is enough to be fair.
          {:error, :not_locked} ->
            start(session_id, ident, pid, id, opts)

          error ->
            error
        end

      error ->
        error
    end
  end

  @doc false
  def stop_optimization(session_id, ident, opts) do
    with {:ok, opts} <- Options.validate(opts, [:optimizer_id, :principal]),
         {:ok, key} <-
           key(ident, [session_id: session_id, principal: opts[:principal]], :optimize) do
      result =
        case {opts[:optimizer_id], replicated(key)} do
          {id, {sid, var}} ->
            with {:ok, holder} <- if(id, do: optimizer(id), else: {:ok, :any}),
                 {:ok, token, holder, finished} <- Raft.var_unlock(sid, var, holder) do
              {:ok, token, finished, holder}
            end

          {nil, _} ->
            Native.lock_release_any(key)

          {id, _} ->
            with {:ok, id} <- optimizer(id),
                 {:ok, token, finished} <- Native.lock_release(key, id) do
              {:ok, token, finished, id}
            end
        end

      case result do
        {:ok, token, finished, id} ->
          ended(key, id, token, finished, :released)
          :ok

        {:error, :not_locked} ->
          {:error, :not_optimizing}

        {:error, :not_lock_owner} = error ->
          if lock_info(key), do: error, else: {:error, :not_optimizing}

        error ->
          error
      end
    end
  end

  ## The acquire path

  defp acquire(var_id, optimizer_id, pid, opts) do
    with {:ok, opts} <- Options.validate(opts, @acquire_opts),
         {:ok, optimizer_id} <- optimizer(optimizer_id),
         {:ok, mode} <- conflict(opts[:conflict_resolution] || :wait),
         {:ok, timeout} <- timeout(Keyword.get(opts, :timeout, 5_000)),
         {:ok, lease} <- lease(opts[:lease]),
         :ok <- check_pid(pid),
         {:ok, key} <- key(var_id, opts, :optimize) do
      case replicated(key) do
        {_sid, _id} ->
          raft_acquire(key, optimizer_id, pid, mode, timeout, lease)

        nil ->
          if lease, do: hint_lease(lease)
          run_acquire(var_id, key, optimizer_id, pid, mode, timeout, lease, fence(key, opts))
      end
    end
  end

  ## The acquire path of a replicated session's variable
  #
  # The lock is a command in the session's Raft log (`Raft.var_lock/3`):
  # its token is the grant's log index, so it only increases, also across
  # leader changes; the grant moves the variable's fence on every member.
  # Waiters queue in the state machine, which sends the grant to the
  # waiting process. Preemption needs the holder's progress reports, which
  # stay in this node's lock table: `:preempt` waits as `:wait` does.

  defp raft_acquire({@session, sid, id} = key, optimizer_id, pid, mode, timeout, lease) do
    start = start_time()
    ref = make_ref()

    request = %{
      holder: optimizer_id,
      pid: pid,
      lease_ms: lease || default_lease(),
      mode: if(mode == :abort, do: :abort, else: :wait),
      ref: ref,
      notify: self()
    }

    case Raft.var_lock(sid, id, request) do
      {:ok, :granted, token, started} ->
        acquired(key, optimizer_id, pid, token, started, :immediate, start)
        {:ok, :lock_acquired, token}

      {:ok, :already_held, token, _} ->
        {:ok, :lock_acquired, token}

      {:wait, ^ref, _holder} ->
        conflict_event(key, optimizer_id, mode)

        case await_raft_grant(key, ref, optimizer_id, pid, deadline(timeout)) do
          {:ok, token, started} ->
            acquired(key, optimizer_id, pid, token, started, :after_wait, start)
            {:ok, :lock_acquired_after_wait, token}

          error ->
            error
        end

      {:error, {:lock_held_by, _}} = error ->
        conflict_event(key, optimizer_id, mode)
        error

      error ->
        error
    end
  end

  defp deadline(nil), do: nil
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  # The grant is a message from the leader's member. Should it be lost (a
  # leader change at that moment), the lock's state tells: it is looked at
  # once a second. Past the deadline the request is cancelled in the log;
  # if the lock reached it first, it is ours.
  defp await_raft_grant({@session, sid, id} = key, ref, optimizer_id, pid, deadline) do
    left = if deadline, do: max(deadline - System.monotonic_time(:millisecond), 0), else: 1_000

    receive do
      {:dspex_raft_lock_granted, ^ref, token, started} -> {:ok, token, started}
    after
      min(left, 1_000) ->
        case Raft.var_lock_info(sid, id) do
          %{optimizer_id: ^optimizer_id, pid: ^pid, token: token} ->
            flush_grant(ref)
            {:ok, token, true}

          _ when deadline == nil or left > 1_000 ->
            await_raft_grant(key, ref, optimizer_id, pid, deadline)

          _ ->
            case Raft.var_cancel(sid, id, ref) do
              {:granted, token} ->
                flush_grant(ref)
                {:ok, token, true}

              _ ->
                flush_grant(ref)
                {:error, :timeout}
            end
        end
    end
  end

  defp flush_grant(ref) do
    receive do
      {:dspex_raft_lock_granted, ^ref, _, _} -> :ok
    after
      0 -> :ok
    end
  end

  defp default_lease do
    Keyword.get(Application.get_env(:dspex_bridge, __MODULE__, []), :lease, :timer.minutes(5))
  end

  defp lock_info(key) do
    case replicated(key) do
      {sid, id} -> Raft.var_lock_info(sid, id)
      nil -> Native.lock_info(key)
    end
  end

  # `{session_id, var_id}` when `key` is a replicated session's variable.
  defp replicated({@session, sid, id}) do
    if Raft.owns?(sid), do: {sid, id}
  end

  defp replicated(_key), do: nil

  defp run_acquire(var_id, key, optimizer_id, pid, mode, timeout, lease, fence) do
    start = start_time()

    case Native.lock_acquire(key, optimizer_id, pid, mode, timeout, lease, fence) do
      {:ok, :granted, token, started} ->
        acquired(key, optimizer_id, pid, token, started, :immediate, start)
        {:ok, :lock_acquired, token}

      {:ok, :already_held, token} ->
        {:ok, :lock_acquired, token}

      {:ok, :preempted, token, started, previous} ->
        preempted(var_id, key, previous, optimizer_id)
        acquired(key, optimizer_id, pid, token, started, :preempted, start)
        {:ok, :lock_acquired, token}

      {:wait, waiter} ->
        conflict_event(key, optimizer_id, mode)

        case await_grant(key, waiter, timeout) do
          {:ok, token, started, nil} ->
            acquired(key, optimizer_id, pid, token, started, :after_wait, start)
            {:ok, :lock_acquired_after_wait, token}

          # The holder reached the preemption threshold while we waited.
          {:ok, token, started, previous} ->
            preempted(var_id, key, previous, optimizer_id)
            acquired(key, optimizer_id, pid, token, started, :preempted, start)
            {:ok, :lock_acquired_after_wait, token}

          error ->
            error
        end

      {:error, {:lock_held_by, _}} = error ->
        conflict_event(key, optimizer_id, mode)
        error

      error ->
        error
    end
  end

  # The grant is a message from whoever freed the lock. On timeout the
  # request is cancelled in the table; if it was granted meanwhile, the
  # grant message is already on its way and the lock is ours.
  defp await_grant(key, waiter, timeout) do
    receive do
      {:dspex_lock_granted, ^waiter, token, started, previous} ->
        {:ok, token, started, previous}
    after
      timeout_ms(timeout) ->
        case Native.lock_cancel(key, waiter) do
          :removed ->
            {:error, :timeout}

          {:granted, _token} ->
            receive do
              {:dspex_lock_granted, ^waiter, token, started, previous} ->
                {:ok, token, started, previous}
            end

          :gone ->
            receive do
              {:dspex_lock_granted, ^waiter, _, _, _} -> :ok
            after
              0 -> :ok
            end

            {:error, :timeout}
        end
    end
  end

  defp timeout_ms(nil), do: :infinity
  defp timeout_ms(ms), do: ms

  ## GenServer: lease sweeps and events from the lock table

  @impl true
  def init(sweep) do
    :ok = Native.lock_listen(self())
    send(self(), :sweep)
    {:ok, %{sweep: sweep, timer: nil}}
  end

  @impl true
  def handle_info(:sweep, state) do
    next = Native.lock_expire()
    wait = if is_integer(next), do: min(max(next, 1), state.sweep), else: state.sweep
    {:noreply, %{state | timer: Process.send_after(self(), :sweep, wait)}}
  end

  # A grant with a custom lease may end before the next planned sweep.
  def handle_info({:lease, ms}, state) when is_integer(ms) do
    left = state.timer && Process.read_timer(state.timer)

    if is_integer(left) and left > ms do
      Process.cancel_timer(state.timer)
      {:noreply, %{state | timer: Process.send_after(self(), :sweep, max(ms, 1))}}
    else
      {:noreply, state}
    end
  end

  def handle_info({:dspex_lock_ended, reason, key, optimizer_id, pid, token, finished}, state) do
    if reason == :expired do
      emit([:dspex, :optimization, :lock_expired], fn ->
        {now(), %{key: key, optimizer_id: optimizer_id, pid: pid, token: token}}
      end)
    end

    ended(key, optimizer_id, token, finished, reason)

    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  ## Helpers

  defp hint_lease(ms) do
    if pid = Process.whereis(__MODULE__), do: send(pid, {:lease, ms})
  end

  # Session variables lock under {:dspex_session, session_id, var_id}, so a
  # name and its id are the same lock, and no raw key is one. Taking,
  # renewing or giving one up needs `:optimize` on the variable; looking at
  # it, `:read`: one check, audited and reported, for the principal. The
  # name is resolved as the session itself so that the check made is the
  # one asked for (an optimizer needs `:optimize`, not also `:read`).
  defp key(var_id, opts, permission) do
    case opts[:session_id] do
      nil when reserved?(var_id) ->
        reserved(var_id)

      nil ->
        {:ok, var_id}

      sid ->
        with {:ok, %{id: id}} <- DSPex.Bridge.Backend.Router.var_get(sid, var_id, nil),
             :ok <- AccessControl.authorize(sid, id, permission, principal: opts[:principal]) do
          {:ok, {@session, sid, id}}
        end
    end
  end

  # Writes are fenced inside the engine holding the session, whichever
  # backend it is (see `Router.fence/3`).
  defp fence({@session, sid, id}, opts) do
    if opts[:session_id], do: Router.fence(sid, id, opts[:principal])
  end

  defp fence(_key, _opts), do: nil

  defp status(status) do
    %{
      status
      | started_at: datetime(status.started_at),
        last_update: datetime(status.last_update)
    }
  end

  defp datetime(us), do: DateTime.from_unix!(us, :microsecond)
end
