defmodule DSPex.Bridge.State.Bridged do
  @moduledoc """
  Protection for calls to a backend outside the VM (the port program, later
  other nodes): a circuit breaker, retries, a last-known-value cache for
  reads while the breaker is open, and the dead-letter queue for writes.

  Every call of `DSPex.Bridge.Backend.Port` goes through here (one hook in
  its request function), so every `SessionStore` call on a `:port` session
  is protected; NIF sessions are not touched. The backend `:port` is
  installed when the application starts, with the options of

      config :dspex_bridge, DSPex.Bridge.State.Bridged,
        port: [breaker: [threshold: 5, timeout: 5_000], retry: [max_attempts: 3]]

  (`port: false` leaves the port unprotected). `install/2` changes them at
  run time.

  ## A call

  1. The breaker `{:dspex_backend, backend}` is asked (one NIF call).
  2. Admitted: the call runs under `DSPex.Bridge.RetryPolicy` (budget
     `{:dspex_backend, backend}`, deadline `deadline:`, by default the
     port's call timeout, so a call that timed out once is not repeated
     but one the dead program refused at once is). The breaker then hears
     one outcome: a failure for `:timeout`, `:timeout_unknown_outcome`,
     `:backend_unavailable` and `{:internal_error, _}`; any other result,
     errors of the caller's making (`:access_denied`, `:not_found`, ...)
     included, is a success, so bad requests never open it.
  3. Refused (open, or half-open with its probe out): a read is answered
     from the cache, a write is refused (below).

  ## Which writes are retried

  - `:backend_unavailable` is retried: the port program was down, or died
    with the request; whatever it had applied died with it.
  - `:timeout_unknown_outcome` (the write may yet apply) is retried only
    for writes that cannot apply twice: a `var_set` with an
    `expected_version` (if the first attempt did land, the retry answers
    `:version_mismatch`, which is reported as `:timeout_unknown_outcome`,
    the truth) and `acl_set_rules` (setting rules is idempotent). Every
    other write returns `{:error, :timeout_unknown_outcome}`: read back
    before writing again.

  ## The cache

  Each successful read's result is kept (per command and arguments, so per
  principal too), at most `max_entries` (10 000; past it an arbitrary
  entry goes). While the breaker refuses, a read is answered from it if the
  value is at most `max_stale_ms` old (300 000) and no write to the same
  session went through since; `[:dspex, :bridge, :cache, :hit]` carries its
  `age_ms`. Else `[:dspex, :bridge, :cache, :miss]` and
  `{:error, :circuit_open}`. Both feed `cache_hit_rate` of
  `DSPex.Bridge.Analytics.get_dashboard/0`.

  ## Writes while the breaker is open

  Never served from a cache: `{:error, :circuit_open}`. A caller that opts
  in (`with_options([park_writes: true], fun)`, or `park_writes: true` at
  install) has the write parked in `DSPex.Bridge.DeadLetterQueue` instead
  and is told `{:error, {:queued, dlq_id}}`; so is a parkable write that
  exhausted its retries with `:backend_unavailable`. Session lifecycle
  commands (create, delete, import, sweep) are never parked, nor is a write
  of unknown outcome that is not safe to retry. `DeadLetterQueue.replay/2`
  runs parked writes again through the same breaker.
  """
  use GenServer

  require Logger

  alias DSPex.Bridge.{CircuitBreaker, DeadLetterQueue, RetryPolicy, Telemetry}

  @failures [:timeout, :timeout_unknown_outcome, :backend_unavailable]
  @options [:breaker, :retry, :deadline, :cache, :park_writes, :dlq, :module]
  @cache_options [:max_entries, :max_stale_ms]
  @attempts_key {__MODULE__, :attempts}
  @options_key {__MODULE__, :options}
  # Port commands that are never parked: they keep the port's session table.
  @port_unparkable ~w(session_create session_delete session_import session_sweep)

  @type backend :: atom

  ## Lifecycle

  @doc false
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc """
  Protects `backend` (`:port`, or a name of your own with `module:`, a
  module exporting `bridged_execute(op, args)`), or gives it new options.
  Options: `breaker:` (options of `CircuitBreaker.install/2`; defaults
  threshold 5, timeout 5 000 ms, as a port restart takes at most 5 s),
  `retry:` (options of `RetryPolicy.new/1`; defaults max_attempts 3,
  initial_delay 50, max_delay 1 000), `deadline:` (ms across all attempts;
  default the port's call timeout), `cache:` (`max_entries:`,
  `max_stale_ms:`), `park_writes:` (false), `dlq:` (the queue's server).
  `{:error, {:invalid_argument, _}}` for a bad option.
  """
  @spec install(backend, keyword) :: :ok | {:error, term}
  def install(backend, opts \\ [])

  def install(backend, opts) when is_atom(backend) do
    with {:ok, cfg} <- config(backend, opts) do
      GenServer.call(__MODULE__, {:install, backend, cfg})
    end
  catch
    :exit, _ -> {:error, {:unavailable, :not_running}}
  end

  def install(backend, _opts), do: {:error, {:invalid_argument, {:backend, backend}}}

  @doc "Stops protecting `backend` (its calls go straight through): `:ok` or `{:error, :not_found}`."
  @spec uninstall(backend) :: :ok | {:error, :not_found}
  def uninstall(backend) do
    case :persistent_term.get({__MODULE__, backend}, nil) do
      nil ->
        {:error, :not_found}

      _ ->
        :persistent_term.erase({__MODULE__, backend})
        :ok
    end
  end

  @doc "The breaker protecting `backend`."
  @spec breaker(backend) :: term
  def breaker(backend), do: {:dspex_backend, backend}

  @doc """
  The configuration of `backend`: `{:ok, %{breaker, deadline, park_writes,
  max_stale_ms, max_entries, cached}}` or `{:error, :not_found}`.
  """
  @spec info(backend) :: {:ok, map} | {:error, :not_found}
  def info(backend) do
    case :persistent_term.get({__MODULE__, backend}, nil) do
      nil ->
        {:error, :not_found}

      cfg ->
        {:ok,
         %{
           breaker: cfg.breaker,
           deadline: cfg.deadline,
           park_writes: cfg.park_writes,
           max_stale_ms: cfg.max_stale_ms,
           max_entries: cfg.max_entries,
           cached: :ets.info(cfg.cache, :size)
         }}
    end
  end

  @doc "Forgets every cached value of `backend`."
  @spec clear_cache(backend) :: :ok | {:error, :not_found}
  def clear_cache(backend) do
    case :persistent_term.get({__MODULE__, backend}, nil) do
      nil ->
        {:error, :not_found}

      cfg ->
        :ets.delete_all_objects(cfg.cache)
        :ets.delete_all_objects(cfg.writes)
        :ok
    end
  end

  @doc """
  Runs `fun` with per-process options for the bridged calls it makes:
  `park_writes: true` parks a write refused by an open breaker (or out of
  retries on `:backend_unavailable`) in the dead-letter queue, answered
  `{:error, {:queued, id}}`. Returns `fun`'s result, or
  `{:error, {:invalid_argument, _}}`.

      State.Bridged.with_options([park_writes: true], fn ->
        SessionStore.update_variable(sid, :x, 1)
      end)
  """
  @spec with_options(keyword, (() -> result)) :: result | {:error, term} when result: term
  def with_options(opts, fun) when is_list(opts) and is_function(fun, 0) do
    case opts do
      [park_writes: park] when is_boolean(park) ->
        previous = Process.put(@options_key, park)

        try do
          fun.()
        after
          if previous == nil,
            do: Process.delete(@options_key),
            else: Process.put(@options_key, previous)
        end

      _ ->
        {:error, {:invalid_argument, {:options, opts}}}
    end
  end

  def with_options(opts, fun) when is_list(opts), do: {:error, {:invalid_argument, {:fun, fun}}}
  def with_options(opts, _fun), do: {:error, {:invalid_argument, {:options, opts}}}

  ## Calls

  @doc false
  # The hook: runs `fun` (the backend's own call of `op` with `args`, data
  # both) under the protection of `backend`, or straight when it has none.
  @spec run(backend, String.t(), [term], boolean, (() -> term)) :: term
  def run(backend, op, args, write?, fun) do
    case :persistent_term.get({__MODULE__, backend}, nil) do
      nil -> fun.()
      cfg -> guarded(cfg, op, args, write?, fun, true)
    end
  end

  @doc false
  # A dead letter's write, again, through the breaker (never parked anew).
  @spec replay(backend, String.t(), [term]) :: term
  def replay(backend, op, args) do
    case :persistent_term.get({__MODULE__, backend}, nil) do
      nil ->
        {:error, {:not_installed, backend}}

      cfg ->
        exec = fn -> cfg.module.bridged_execute(op, args) end
        guarded(cfg, op, args, true, exec, false)
    end
  end

  defp guarded(cfg, op, args, write?, fun, park?) do
    case CircuitBreaker.ask(cfg.breaker) do
      :ok ->
        start = System.monotonic_time()
        result = attempts(cfg, op, args, write?, fun)
        ms = System.convert_time_unit(System.monotonic_time() - start, :native, :millisecond)
        CircuitBreaker.record(cfg.breaker, outcome(result), duration_ms: ms)
        done(cfg, {op, args, start}, write?, result, park?)

      {:error, :circuit_open} ->
        now = System.os_time(:millisecond)
        refused(cfg, op, args, write?, park?, [%{error: :circuit_open, at: now}])

      {:error, :not_found} ->
        # An operator removed the breaker: it comes back, closed.
        :ok = CircuitBreaker.install(cfg.breaker, cfg.breaker_opts)
        guarded(cfg, op, args, write?, fun, park?)
    end
  end

  defp outcome({:attempts, result, _tried}), do: outcome(result)
  defp outcome({:error, reason}) when reason in @failures, do: :error
  defp outcome({:error, {:internal_error, _}}), do: :error
  defp outcome(_), do: :ok

  defp attempts(cfg, op, args, write?, fun) do
    policy =
      cond do
        not write? -> cfg.read_policy
        safe_write?(cfg.backend, op, args) -> cfg.safe_write_policy
        true -> cfg.write_policy
      end

    noted = fn _n ->
      case fun.() do
        {:error, reason} = error ->
          Process.put(@attempts_key, [
            %{error: reason, at: System.os_time(:millisecond)} | Process.get(@attempts_key, [])
          ])

          error

        result ->
          result
      end
    end

    result = RetryPolicy.run(policy, noted, budget: cfg.breaker, deadline: cfg.deadline)

    case Process.delete(@attempts_key) do
      nil ->
        result

      tried ->
        tried = Enum.reverse(tried)

        # A retry of a write whose first attempt may have landed: a version
        # mismatch may be that attempt's doing.
        if result == {:error, :version_mismatch} and
             Enum.any?(tried, &(&1.error == :timeout_unknown_outcome)),
           do: {:attempts, {:error, :timeout_unknown_outcome}, tried},
           else: {:attempts, result, tried}
    end
  end

  # `call` is `{op, args, start}` (monotonic native time the call began);
  # `{:attempts, result, tried}`: some attempt failed.
  defp done(cfg, {op, args, _} = call, write?, {:attempts, result, tried}, park?) do
    case result do
      {:error, :backend_unavailable} when write? ->
        if park? and parkable?(cfg, op), do: park(cfg, op, args, tried, result), else: result

      {:error, :timeout_unknown_outcome} ->
        wrote(cfg, args)
        result

      _ ->
        done(cfg, call, write?, result, park?)
    end
  end

  defp done(cfg, {op, args, start}, false, result, _park?) do
    case result do
      {:error, _} -> result
      _ -> cache_put(cfg, op, args, result, start)
    end
  end

  defp done(cfg, {_op, args, _start}, true, result, _park?) do
    if not match?({:error, _}, result), do: wrote(cfg, args)
    result
  end

  defp refused(cfg, op, args, false, _park?, _tried), do: cache_get(cfg, op, args)

  defp refused(cfg, op, args, true, park?, tried) do
    if park? and parkable?(cfg, op),
      do: park(cfg, op, args, tried, {:error, :circuit_open}),
      else: {:error, :circuit_open}
  end

  defp parkable?(cfg, op) do
    (cfg.park_writes or Process.get(@options_key, false)) and
      not (cfg.backend == :port and op in @port_unparkable)
  end

  defp park(cfg, op, args, tried, error) do
    entry = %{
      kind: :write,
      op: op,
      args: Enum.map(args, fn {name, value} -> {name, IO.iodata_to_binary(value)} end),
      backend: cfg.backend,
      breaker: cfg.breaker,
      session_id: session_of(cfg, args),
      attempts: tried
    }

    case DeadLetterQueue.add(entry, server: cfg.dlq) do
      {:ok, id} ->
        {:error, {:queued, id}}

      {:error, reason} ->
        Logger.warning("dspex_bridge: a write could not be parked: #{inspect(reason)}")
        error
    end
  end

  # The session a port command is about: its `session` argument.
  defp session_of(%{backend: :port}, args) do
    with sid when sid != nil <- scope(args),
         {:ok, sid} when is_binary(sid) <- DSPex.Bridge.MsgPack.decode(IO.iodata_to_binary(sid)) do
      sid
    else
      _ -> nil
    end
  end

  defp session_of(_cfg, _args), do: nil

  # Writes that cannot apply twice (see the moduledoc).
  defp safe_write?(:port, "acl_set_rules", _args), do: true

  defp safe_write?(:port, "var_set", args),
    do: IO.iodata_to_binary(Keyword.get(args, :expected_version, <<0xC0>>)) != <<0xC0>>

  defp safe_write?(_backend, _op, _args), do: false

  ## The cache

  # Requests name their arguments (`[session: .., ident: .., ...]`).
  defp scope(args), do: Keyword.get(args, :session)

  # The tables go with this server; a caller racing its restart only
  # loses a cache entry.
  # A value is stamped with the time its read began: a write that ended
  # after that may not be in it.
  defp cache_put(cfg, op, args, result, start) do
    cache_insert(cfg, op, args, result, start)
    result
  end

  defp cache_insert(cfg, op, args, result, start) do
    if :ets.info(cfg.cache, :size) >= cfg.max_entries do
      case :ets.first(cfg.cache) do
        :"$end_of_table" -> :ok
        key -> :ets.delete(cfg.cache, key)
      end
    end

    :ets.insert(cfg.cache, {{op, args}, result, start})
  rescue
    ArgumentError -> false
  end

  # A write went through (or may have): cached reads of its session are older.
  defp wrote(cfg, args) do
    :ets.insert(cfg.writes, {scope(args), System.monotonic_time()})
  rescue
    ArgumentError -> false
  end

  defp cache_get(cfg, op, args) do
    now = System.monotonic_time()

    verdict =
      case lookup(cfg.cache, {op, args}) do
        [] ->
          {:miss, :not_cached}

        [{_, result, at}] ->
          written =
            case lookup(cfg.writes, scope(args)) do
              [{_, w}] -> w
              [] -> nil
            end

          age = System.convert_time_unit(now - at, :native, :millisecond)

          cond do
            age > cfg.max_stale_ms -> {:miss, :too_stale}
            written != nil and written >= at -> {:miss, :written_since}
            true -> {:hit, result, age}
          end
      end

    case verdict do
      {:hit, result, age} ->
        Telemetry.execute(
          [:dspex, :bridge, :cache, :hit],
          %{age_ms: age},
          %{backend: cfg.backend, op: op, age_ms: age, breaker: cfg.breaker}
        )

        result

      {:miss, why} ->
        Telemetry.execute(
          [:dspex, :bridge, :cache, :miss],
          %{system_time: System.system_time()},
          %{backend: cfg.backend, op: op, reason: why, breaker: cfg.breaker}
        )

        {:error, :circuit_open}
    end
  end

  defp lookup(table, key) do
    :ets.lookup(table, key)
  rescue
    ArgumentError -> []
  end

  ## Configuration

  defp config(backend, opts) do
    if is_list(opts) and Keyword.keyword?(opts) do
      case Enum.find(Keyword.keys(opts), &(&1 not in @options)) do
        nil -> build(backend, opts)
        key -> {:error, {:invalid_argument, {:unknown_option, key}}}
      end
    else
      {:error, {:invalid_argument, {:options, opts}}}
    end
  end

  defp build(backend, opts) do
    breaker_opts = Keyword.merge([threshold: 5, timeout: 5_000], Keyword.get(opts, :breaker, []))

    retry =
      Keyword.merge([max_attempts: 3, initial_delay: 50, max_delay: 1_000], opts[:retry] || [])

    cache = Keyword.get(opts, :cache, [])

    deadline =
      Keyword.get(opts, :deadline, Application.get_env(:dspex_bridge, :port_timeout, 5_000))

    module = Keyword.get(opts, :module, if(backend == :port, do: DSPex.Bridge.Backend.Port))

    with %RetryPolicy{} = read <- RetryPolicy.new(retry),
         %RetryPolicy{} = safe <-
           RetryPolicy.new([retry_on: [:timeout_unknown_outcome]] ++ retry),
         :ok <-
           check(
             :cache,
             cache,
             Keyword.keyword?(cache) and Keyword.keys(cache) -- @cache_options == []
           ),
         :ok <- check(:deadline, deadline, is_integer(deadline) and deadline >= 0),
         :ok <- check(:park_writes, opts[:park_writes], opts[:park_writes] in [nil, true, false]),
         :ok <- check(:module, module, is_atom(module) and module != nil),
         max_entries = Keyword.get(cache, :max_entries, 10_000),
         max_stale = Keyword.get(cache, :max_stale_ms, 300_000),
         :ok <- check(:max_entries, max_entries, is_integer(max_entries) and max_entries > 0),
         :ok <- check(:max_stale_ms, max_stale, is_integer(max_stale) and max_stale >= 0),
         :ok <- CircuitBreaker.install(breaker(backend), breaker_opts) do
      {:ok,
       %{
         backend: backend,
         module: module,
         breaker: breaker(backend),
         breaker_opts: breaker_opts,
         read_policy: read,
         write_policy: read,
         safe_write_policy: safe,
         deadline: deadline,
         park_writes: opts[:park_writes] == true,
         dlq: Keyword.get(opts, :dlq, DeadLetterQueue),
         max_entries: max_entries,
         max_stale_ms: max_stale
       }}
    else
      {:error, {:invalid_argument, _}} = error -> error
      {:error, reason} -> {:error, {:invalid_argument, reason}}
    end
  end

  defp check(_key, _value, true), do: :ok
  defp check(key, value, false), do: {:error, {:invalid_argument, {key, value}}}

  ## Server: owns the cache tables

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    config = Keyword.merge(Application.get_env(:dspex_bridge, __MODULE__, []), opts)
    state = %{tables: %{}}

    state =
      case Keyword.get(config, :port, []) do
        false ->
          state

        port_opts ->
          case config(:port, port_opts) do
            {:ok, cfg} ->
              {_reply, state} = put(state, :port, cfg)
              state

            {:error, reason} ->
              raise ArgumentError,
                    "invalid #{inspect(__MODULE__)} :port config: #{inspect(reason)}"
          end
      end

    {:ok, state}
  end

  @impl true
  def handle_call({:install, backend, cfg}, _from, state) do
    {reply, state} = put(state, backend, cfg)
    {:reply, reply, state}
  end

  defp put(state, backend, cfg) do
    {cache, writes} =
      case state.tables do
        %{^backend => tables} ->
          tables

        _ ->
          {:ets.new(__MODULE__.Cache, [
             :set,
             :public,
             read_concurrency: true,
             write_concurrency: true
           ]), :ets.new(__MODULE__.Writes, [:set, :public, write_concurrency: true])}
      end

    :persistent_term.put({__MODULE__, backend}, Map.merge(cfg, %{cache: cache, writes: writes}))
    {:ok, %{state | tables: Map.put(state.tables, backend, {cache, writes})}}
  end

  @impl true
  def terminate(_reason, state) do
    for {backend, _} <- state.tables, do: :persistent_term.erase({__MODULE__, backend})
    :ok
  end
end
