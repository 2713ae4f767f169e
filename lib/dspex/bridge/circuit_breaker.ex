defmodule DSPex.Bridge.CircuitBreaker do
  @moduledoc """
  Circuit breakers: stop calling a dependency that keeps failing, probe it
  after a while, and resume when it answers again.

      :ok = CircuitBreaker.install(:port_backend, strategy: :consecutive)

      case CircuitBreaker.call(:port_backend, fn -> Port.call(req) end, timeout: 5_000) do
        {:error, :circuit_open} -> serve_from_cache()
        result -> result
      end

  Or ask and report yourself:

      with :ok <- CircuitBreaker.ask(:port_backend) do
        result = do_work()
        CircuitBreaker.record(:port_backend, if(match?({:ok, _}, result), do: :ok, else: :error))
        result
      end

  ## Named breakers

  A named breaker's state lives in the Rust engine, one registry per VM,
  shared by every process. `ask/1` is one NIF call: on a closed breaker a
  lock-free lookup and one atomic load, with no GenServer, no clock read and
  no shared counter bumped, so it scales with schedulers. Names are any
  term; atoms are the fastest.

  Strategies (`install/2`):

  - `strategy: :consecutive` (the default): opens on the `threshold`-th
    failure in a row (5; a success resets the count), stays open `timeout`
    ms (60 000).
  - `strategy: :rate`: opens when at least `failure_rate` (0.5) of the last
    `window` (10) outcomes failed, once `minimum_calls` (10) are in; stays
    open `timeout` ms (30 000).

  Then it is half-open: up to `half_open_probes` (1) calls at a time go
  through as probes; `half_open_successes` (3) probe successes in a row
  close it, a probe failure reopens it for another `timeout`. A probe's
  permit belongs to the process that asked: if that process dies, the
  engine (which monitors it) hands the permit back; if it does not report
  within `probe_lease_ms` (10 000), the permit is handed back at the next
  ask and its late report ignored. So a breaker never sticks half-open.
  While half-open, a report counts only from a permit holder; while open,
  reports are ignored.

  With `slow_call_ms: ms`, a success that took at least `ms` counts as a
  failure (`call/3` measures it; `record/3` takes `duration_ms:`).

  `force_open/1` rejects everything until `reset/1`; `disable/1` admits
  everything and counts nothing. Installing again with the same options is
  a no-op; with other options, the breaker takes them and keeps its state
  (open stays open until the same time; a half-open breaker probes again
  under the new rules).

  Telemetry: `[:dspex, :bridge, :circuit_breaker, :state_change]` and
  `[:dspex, :bridge, :circuit_breaker, :rejected]`, emitted by the process
  whose call caused them (see `DSPex.Bridge.Telemetry`). Nothing is
  emitted for an admitted ask. An open breaker becomes half-open lazily, at
  the first ask after its open time; `state/1` and `info/1` show the
  effective state (`:half_open` once the open time is up).

  ## Seed 002's functional breaker

  `new/2`, `record_success/1`, `record_failure/1` and `should_attempt?/1`
  are seed 002's struct, kept as written: a value a single process threads
  through its own state. Note, as written, it never enters `:half_open` by
  itself: once the timeout has passed `should_attempt?/1` is true again,
  but the state stays `:open`. Shared breakers should be named.

      iex> b = DSPex.Bridge.CircuitBreaker.new(2, 1_000)
      iex> b = b |> DSPex.Bridge.CircuitBreaker.record_failure() |> DSPex.Bridge.CircuitBreaker.record_failure()
      iex> {b.state, DSPex.Bridge.CircuitBreaker.should_attempt?(b)}
      {:open, false}
  """

  alias DSPex.Bridge.{Native, Options, Telemetry}

  # ---- seed 002's functional breaker, kept as written ----

  defstruct [
    # :closed, :open, :half_open
    :state,
    :failure_count,
    :success_count,
    :last_failure,
    :threshold,
    :timeout
  ]

  @type t :: %__MODULE__{}

  @doc "Seed 002: a closed breaker opening after `threshold` failures for `timeout` ms."
  @spec new(pos_integer, pos_integer) :: t
  def new(threshold \\ 5, timeout \\ 60_000) do
    %__MODULE__{
      state: :closed,
      failure_count: 0,
      success_count: 0,
      threshold: threshold,
      timeout: timeout
    }
  end

  @doc "Seed 002: records a success."
  @spec record_success(t) :: t
  def record_success(breaker) do
    case breaker.state do
      :half_open ->
        if breaker.success_count + 1 >= 3 do
          # Enough successes, close circuit
          %{breaker | state: :closed, failure_count: 0, success_count: 0}
        else
          %{breaker | success_count: breaker.success_count + 1}
        end

      _ ->
        %{breaker | failure_count: 0}
    end
  end

  @doc "Seed 002: records a failure."
  @spec record_failure(t) :: t
  def record_failure(breaker) do
    new_count = breaker.failure_count + 1

    if new_count >= breaker.threshold do
      %{
        breaker
        | state: :open,
          failure_count: new_count,
          last_failure: System.monotonic_time(:millisecond)
      }
    else
      %{breaker | failure_count: new_count}
    end
  end

  @doc "Seed 002: whether a call may go ahead."
  @spec should_attempt?(t) :: boolean
  def should_attempt?(breaker) do
    case breaker.state do
      :closed ->
        true

      :half_open ->
        true

      :open ->
        # Check if timeout has passed
        now = System.monotonic_time(:millisecond)

        if now - breaker.last_failure > breaker.timeout do
          # Try half-open
          true
        else
          false
        end
    end
  end

  # ---- named breakers ----

  @type name :: term
  @type state :: :closed | :open | :half_open | :forced_open | :disabled

  @options [
    :strategy,
    :threshold,
    :window,
    :failure_rate,
    :minimum_calls,
    :timeout,
    :half_open_successes,
    :half_open_probes,
    :slow_call_ms,
    :probe_lease_ms
  ]

  @doc """
  Creates the breaker `name`, or gives an existing one new options
  (keeping its state). Options: `strategy:` `:consecutive` (`threshold:`
  5, `timeout:` 60 000) or `:rate` (`window:` 10 (at most 56),
  `failure_rate:` 0.5, `minimum_calls:` 10, `timeout:` 30 000); both take
  `half_open_successes:` 3, `half_open_probes:` 1, `slow_call_ms:` nil and
  `probe_lease_ms:` 10 000. Times are milliseconds.

  Returns `:ok`, or `{:error, {:invalid_argument, {option, value}}}` (an
  option of the other strategy is invalid too).

      iex> DSPex.Bridge.CircuitBreaker.install(:doc_breaker, threshold: 3)
      :ok
      iex> DSPex.Bridge.CircuitBreaker.install(:doc_breaker, threshold: 0)
      {:error, {:invalid_argument, {:threshold, 0}}}
  """
  @spec install(name, keyword) :: :ok | {:error, term}
  def install(name, opts \\ []) do
    with {:ok, opts} <- options(opts),
         {:ok, _how} <- Native.breaker_install(name, opts) do
      :ok
    end
  end

  defp options(opts) do
    with {:ok, opts} <- Options.validate(opts, @options), do: {:ok, Map.new(opts)}
  end

  @doc """
  May a call go ahead? `:ok`, then report its outcome with `record/2`;
  `{:error, :circuit_open}` while open, forced open, or half-open with every
  probe permit out; `{:error, :not_found}` for an unknown breaker.
  """
  @spec ask(name) :: :ok | {:error, :circuit_open | :not_found}
  def ask(name) do
    case Native.breaker_ask(name) do
      :ok -> :ok
      other -> asked(name, other)
    end
  end

  @doc false
  # As `ask/1`, but says `:probe` when the caller now holds a half-open
  # permit (it must report once, and not ask again before it has).
  def __ask__(name) do
    case Native.breaker_ask(name) do
      :ok -> :ok
      :probe -> :probe
      {:probe, _} = changed -> asked(name, changed) && :probe
      other -> asked(name, other)
    end
  end

  defp asked(_name, :probe), do: :ok

  defp asked(name, {:probe, {:changed, from, to}}) do
    state_change(name, from, to, :timeout_elapsed)
    :ok
  end

  defp asked(name, {:rejected, state}) do
    Telemetry.execute(
      [:dspex, :bridge, :circuit_breaker, :rejected],
      %{system_time: System.system_time()},
      %{name: name, state: state}
    )

    {:error, :circuit_open}
  end

  defp asked(_name, {:error, _} = error), do: error

  @doc """
  Reports the outcome of a call `ask/1` admitted: `:ok` or `:error`.
  Option `duration_ms:` lets `slow_call_ms` count a slow success as a
  failure. Returns `:ok`, `{:error, :not_found}` or
  `{:error, {:invalid_argument, _}}`.
  """
  @spec record(name, :ok | :error, keyword) :: :ok | {:error, term}
  def record(name, outcome, opts \\ []) do
    case Options.validate(opts, [:duration_ms]) do
      {:ok, opts} -> name |> Native.breaker_record(outcome, opts[:duration_ms]) |> recorded(name)
      error -> error
    end
  end

  defp recorded(:ok, _name), do: :ok

  defp recorded({:changed, from, to}, name) do
    reason =
      case {from, to} do
        {:closed, :open} -> :failures
        {:half_open, :open} -> :probe_failed
        {:half_open, :closed} -> :probes_succeeded
      end

    state_change(name, from, to, reason)
    :ok
  end

  defp recorded({:error, _} = error, _name), do: error

  @doc """
  Runs `fun` (arity 0) through the breaker: `{:error, :circuit_open}`
  without running it when the breaker refuses, else `fun`'s result. A raise,
  exit or throw (re-raised after it is counted), an `{:error, _}` result,
  or running past `timeout:` ms (then `{:error, :timeout}`, the fun's
  process killed) counts as a failure; anything else as a success.

  `fun` runs in the caller, unless `timeout:` is given: then in a process
  of its own, linked to the caller.

      iex> DSPex.Bridge.CircuitBreaker.install(:doc_call)
      iex> DSPex.Bridge.CircuitBreaker.call(:doc_call, fn -> {:ok, 42} end)
      {:ok, 42}
  """
  @spec call(name, (() -> result), keyword) :: result | {:error, :circuit_open | :timeout | term}
        when result: term
  def call(name, fun, opts \\ [])

  def call(name, fun, opts) when is_function(fun, 0) and is_list(opts) do
    case Options.validate(opts, [:timeout]) do
      {:ok, opts} -> call_within(name, fun, Keyword.get(opts, :timeout))
      error -> error
    end
  end

  def call(_name, fun, opts) when is_list(opts),
    do: {:error, {:invalid_argument, {:fun, fun}}}

  def call(_name, _fun, opts), do: Options.validate(opts, [:timeout])

  defp call_within(name, fun, timeout) do
    case timeout do
      t when t == nil or t == :infinity or (is_integer(t) and t >= 0) ->
        case ask(name) do
          :ok -> run(name, fun, if(t == :infinity, do: nil, else: t))
          error -> error
        end

      t ->
        {:error, {:invalid_argument, {:timeout, t}}}
    end
  end

  defp run(name, fun, nil) do
    start = System.monotonic_time()

    try do
      fun.()
    catch
      kind, reason ->
        report(name, :error, start)
        :erlang.raise(kind, reason, __STACKTRACE__)
    else
      {:error, _} = error ->
        report(name, :error, start)
        error

      result ->
        report(name, :ok, start)
        result
    end
  end

  defp run(name, fun, timeout) do
    start = System.monotonic_time()
    caller = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        result =
          try do
            {:ok, fun.()}
          catch
            kind, reason -> {:caught, kind, reason, __STACKTRACE__}
          end

        send(caller, {ref, result})
      end)

    receive do
      {^ref, {:ok, {:error, _} = error}} ->
        report(name, :error, start)
        error

      {^ref, {:ok, result}} ->
        report(name, :ok, start)
        result

      {^ref, {:caught, kind, reason, stack}} ->
        report(name, :error, start)
        :erlang.raise(kind, reason, stack)
    after
      timeout ->
        Process.unlink(pid)
        Process.exit(pid, :kill)
        # It may have answered just before it died.
        receive do
          {^ref, _} -> :ok
        after
          0 -> :ok
        end

        report(name, :error, start)
        {:error, :timeout}
    end
  end

  defp report(name, outcome, start) do
    ms = System.convert_time_unit(System.monotonic_time() - start, :native, :millisecond)
    record(name, outcome, duration_ms: ms)
  end

  @doc """
  The breaker's effective state (`:half_open` once an open breaker's time
  is up, before the first probe asks), or `{:error, :not_found}`.
  """
  @spec state(name) :: state | {:error, :not_found}
  def state(name), do: Native.breaker_state(name)

  @doc "Closes the breaker and clears its counters and probe permits."
  @spec reset(name) :: :ok | {:error, :not_found}
  def reset(name), do: set(name, :closed)

  @doc "Rejects every call until `reset/1` (an operator's isolate switch)."
  @spec force_open(name) :: :ok | {:error, :not_found}
  def force_open(name), do: set(name, :forced_open)

  @doc "Admits every call and counts nothing, until `reset/1`."
  @spec disable(name) :: :ok | {:error, :not_found}
  def disable(name), do: set(name, :disabled)

  defp set(name, to) do
    case Native.breaker_set(name, to) do
      {:changed, from, to} ->
        state_change(name, from, to, :manual)
        :ok

      other ->
        other
    end
  end

  @doc "Removes the breaker: `:ok` or `{:error, :not_found}`."
  @spec remove(name) :: :ok | {:error, :not_found}
  def remove(name), do: Native.breaker_remove(name)

  @doc "The names of every installed breaker."
  @spec list() :: [name]
  def list, do: Native.breaker_list()

  @doc """
  A snapshot: `%{name, state, config, failures (consecutive strategy),
  window_calls, window_failures (rate strategy), retry_in_ms (while open),
  opened_at, changed_at, probes_in_use, half_open_successes,
  rejected_total, opened_total}`, or `{:error, :not_found}`. Times are
  milliseconds of the engine's monotonic clock.
  """
  @spec info(name) :: map | {:error, :not_found}
  def info(name), do: Native.breaker_info(name)

  @doc false
  # Tests only: moves this breaker's clock `ms` forward.
  def __advance_clock__(name, ms), do: Native.breaker_advance(name, ms)

  defp state_change(name, from, to, reason) do
    Telemetry.execute(
      [:dspex, :bridge, :circuit_breaker, :state_change],
      %{system_time: System.system_time()},
      %{name: name, from: from, to: to, reason: reason}
    )
  end
end
