defmodule DSPex.Bridge.RetryPolicy do
  @moduledoc """
  Retries with exponential backoff and full jitter, a deadline across all
  attempts, an optional circuit breaker and a retry budget.

      policy = RetryPolicy.new(max_attempts: 4, initial_delay: 100, max_delay: 2_000)

      RetryPolicy.run(policy, fn -> Port.call(req) end,
        breaker: :port_backend, deadline: 5_000, budget: :port_backend)

  ## The schedule

  `max_attempts` (5) counts the first call. The wait before attempt `n + 1`
  is drawn from `delay(n) = min(max_delay, initial_delay * multiplier^(n-1))`
  (defaults 1 000 ms, 32 000 ms, 2.0): with `jitter: :full` (the default)
  uniformly in `[0, delay(n)]`, with `:equal` in `[delay(n) / 2, delay(n)]`,
  with `:none` exactly `delay(n)`. Full jitter spreads a crowd of retrying
  clients best (AWS's backoff study); `delays/1` shows a draw.

  ## What is retried

  Only transient errors: an `{:error, reason}` result whose reason (or the
  tag of a tagged reason) is `:timeout` or `:backend_unavailable`;
  `:circuit_open` while a `deadline:` remains (without one it returns at
  once); and what `retry_on:` adds (a list of reasons, or a function of the
  reason returning true). Permanent errors return at once, whatever
  `retry_on` says: `:invalid_value`, `:invalid_argument`, `:access_denied`,
  `:version_mismatch`, `:constraint_violation`, `:validation_failed`,
  `:not_found`, `:session_not_found`, `:already_exists`, `:too_large`. Any
  other error is not retried unless `retry_on` names it. A raise, exit or
  throw is not retried: it is counted by the breaker and re-raised.

  ## Options of `run/3`

  - `breaker: name`: each attempt asks the breaker first (an open breaker
    stops the retries: `{:error, :circuit_open}`), and the breaker is told
    the outcome of the logical call once, not of each attempt.
  - `deadline: ms`: no attempt starts, and no wait is begun, that would end
    past `ms` from the start.
  - `budget: name`: retries under this name may be at most a fraction of
    its calls plus a floor per second (a token bucket in the engine;
    defaults 20% plus 10 a second, at most 100 saved up; see
    `configure_budget/2`), so retries cannot multiply an outage.
  - `sleep:` (a fun of milliseconds) and `clock:` (a fun returning
    monotonic milliseconds), for tests.

  Events (`DSPex.Bridge.Telemetry`): `[:dspex, :bridge, :retry, :attempt]`
  before each retry, `[:dspex, :bridge, :retry, :exhausted]` when a
  transient error is returned because attempts, deadline or budget ran out.
  """

  alias DSPex.Bridge.{CircuitBreaker, Native, Options, Telemetry}

  defstruct max_attempts: 5,
            initial_delay: 1_000,
            max_delay: 32_000,
            multiplier: 2.0,
            jitter: :full,
            retry_on: []

  @type t :: %__MODULE__{
          max_attempts: pos_integer,
          initial_delay: non_neg_integer,
          max_delay: non_neg_integer,
          multiplier: number,
          jitter: :full | :equal | :none,
          retry_on: [term] | (term -> boolean)
        }

  @max_attempts 100
  @policy_keys [:max_attempts, :initial_delay, :max_delay, :multiplier, :jitter, :retry_on]
  @run_keys [:breaker, :deadline, :budget, :sleep, :clock]
  @transient [:timeout, :backend_unavailable]
  @permanent [
    :invalid_value,
    :invalid_argument,
    :access_denied,
    :version_mismatch,
    :constraint_violation,
    :validation_failed,
    :not_found,
    :session_not_found,
    :already_exists,
    :too_large
  ]

  @doc """
  A policy, or `{:error, {:invalid_argument, {option, value}}}`.

      iex> DSPex.Bridge.RetryPolicy.new(max_attempts: 3, jitter: :none) |> DSPex.Bridge.RetryPolicy.delays()
      [1000, 2000]
      iex> DSPex.Bridge.RetryPolicy.new(max_attempts: 0)
      {:error, {:invalid_argument, {:max_attempts, 0}}}
  """
  @spec new(keyword) :: t | {:error, {:invalid_argument, term}}
  def new(opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @policy_keys) do
      Enum.reduce_while(opts, %__MODULE__{}, fn {key, value}, policy ->
        case check(key, value) do
          :ok -> {:cont, Map.put(policy, key, value)}
          {:error, _} = error -> {:halt, error}
        end
      end)
      |> check_delays()
    end
  end

  defp check(:max_attempts, n) when is_integer(n) and n in 1..@max_attempts, do: :ok
  defp check(:initial_delay, n) when is_integer(n) and n >= 0, do: :ok
  defp check(:max_delay, n) when is_integer(n) and n >= 0, do: :ok
  defp check(:multiplier, m) when is_number(m) and m >= 1, do: :ok
  defp check(:jitter, j) when j in [:full, :equal, :none], do: :ok
  defp check(:retry_on, r) when is_list(r) or is_function(r, 1), do: :ok

  defp check(key, value), do: Options.bad(key, value)

  defp check_delays(%__MODULE__{initial_delay: i, max_delay: m}) when i > m,
    do: {:error, {:invalid_argument, {:max_delay, m}}}

  defp check_delays(policy), do: policy

  @doc """
  The waits (ms) before attempts 2..max_attempts, jittered as the policy
  says: one draw of the schedule `run/3` would use.

      iex> DSPex.Bridge.RetryPolicy.delays(DSPex.Bridge.RetryPolicy.new(max_attempts: 1))
      []
  """
  @spec delays(t) :: [non_neg_integer]
  def delays(%__MODULE__{} = policy) do
    policy |> base_delays() |> Enum.map(&jitter(&1, policy.jitter))
  end

  @doc false
  # The un-jittered schedule: delay(n) for n in 1..max_attempts-1.
  def base_delays(%__MODULE__{max_attempts: n}) when n <= 1, do: []

  def base_delays(%__MODULE__{} = p) do
    Enum.scan(1..(p.max_attempts - 1), p.initial_delay, fn
      1, _ -> min(p.initial_delay, p.max_delay)
      _, prev -> min(round(prev * p.multiplier), p.max_delay)
    end)
  end

  defp jitter(d, :none), do: d
  defp jitter(d, :full), do: :rand.uniform(d + 1) - 1

  defp jitter(d, :equal) do
    half = div(d, 2)
    half + :rand.uniform(d - half + 1) - 1
  end

  defp delay(policy, n) do
    base = policy |> Map.put(:max_attempts, n + 1) |> base_delays() |> List.last()
    jitter(base, policy.jitter)
  end

  @doc """
  Runs `fun` (arity 0, or 1 to receive the attempt number from 1) until it
  succeeds, fails permanently, or retries run out; returns its last result.
  `policy` is a `t:t/0` or the options of `new/1`. Bad arguments return
  `{:error, {:invalid_argument, _}}`; an unknown `breaker:` returns
  `{:error, :not_found}` without running `fun`.
  """
  @spec run(t | keyword | {:error, term}, (() -> term) | (pos_integer -> term), keyword) :: term
  def run(policy, fun, opts \\ [])

  def run({:error, _} = error, _fun, _opts), do: error

  def run(opts, fun, run_opts) when is_list(opts), do: run(new(opts), fun, run_opts)

  def run(%__MODULE__{} = policy, fun, opts)
      when (is_function(fun, 0) or is_function(fun, 1)) and is_list(opts) do
    with {:ok, ctx} <- context(policy, opts) do
      if ctx.budget != nil, do: Native.breaker_budget_deposit(ctx.budget)
      attempt(ctx, fun, 1, false, false)
    end
  end

  def run(%__MODULE__{}, fun, opts) when is_list(opts),
    do: {:error, {:invalid_argument, {:fun, fun}}}

  def run(%__MODULE__{}, _fun, opts), do: Options.validate(opts, @run_keys)
  def run(policy, _fun, _opts), do: {:error, {:invalid_argument, {:policy, policy}}}

  defp context(policy, opts) do
    sleep = Keyword.get(opts, :sleep, &Process.sleep/1)
    clock = Keyword.get(opts, :clock, fn -> System.monotonic_time(:millisecond) end)
    deadline = Keyword.get(opts, :deadline)

    cond do
      match?({:error, _}, checked = Options.validate(opts, @run_keys)) ->
        checked

      not is_function(sleep, 1) ->
        {:error, {:invalid_argument, {:sleep, sleep}}}

      not is_function(clock, 0) ->
        {:error, {:invalid_argument, {:clock, clock}}}

      not (deadline == nil or (is_integer(deadline) and deadline >= 0)) ->
        {:error, {:invalid_argument, {:deadline, deadline}}}

      true ->
        start = clock.()

        {:ok,
         %{
           policy: policy,
           breaker: Keyword.get(opts, :breaker),
           budget: Keyword.get(opts, :budget),
           sleep: sleep,
           clock: clock,
           start: start,
           deadline_at: deadline && start + deadline
         }}
    end
  end

  # `probe?`: this logical call holds the breaker's half-open permit (asking
  # again would be refused); `ran?`: some attempt ran, so the breaker is owed
  # one report.
  defp attempt(ctx, fun, n, probe?, ran?) do
    gate =
      cond do
        ctx.breaker == nil -> :ok
        probe? -> :probe
        true -> CircuitBreaker.__ask__(ctx.breaker)
      end

    case gate do
      {:error, :not_found} = error ->
        error

      {:error, :circuit_open} = error ->
        retry_or_give_up(ctx, fun, n, error, probe?, ran?)

      admitted ->
        probe? = admitted == :probe

        case invoke(ctx, fun, n) do
          {:error, reason} = error ->
            if retried?(reason, ctx),
              do: retry_or_give_up(ctx, fun, n, error, probe?, true),
              else: report(ctx, :error, true, error)

          result ->
            report(ctx, :ok, true, result)
        end
    end
  end

  defp invoke(ctx, fun, n) do
    if is_function(fun, 1), do: fun.(n), else: fun.()
  catch
    kind, reason ->
      report(ctx, :error, true, nil)
      :erlang.raise(kind, reason, __STACKTRACE__)
  end

  defp retry_or_give_up(ctx, fun, n, {:error, reason} = error, probe?, ran?) do
    delay = if n < ctx.policy.max_attempts, do: delay(ctx.policy, n), else: 0
    now = ctx.clock.()

    why =
      cond do
        n >= ctx.policy.max_attempts -> :max_attempts
        ctx.deadline_at != nil and now + delay >= ctx.deadline_at -> :deadline
        reason == :circuit_open and ctx.deadline_at == nil -> :circuit_open
        ctx.budget != nil and not Native.breaker_budget_withdraw(ctx.budget) -> :budget
        true -> nil
      end

    if why do
      if why != :circuit_open do
        Telemetry.execute(
          [:dspex, :bridge, :retry, :exhausted],
          %{attempts: n, elapsed_ms: now - ctx.start},
          %{reason: reason, why: why, breaker: ctx.breaker, budget: ctx.budget}
        )
      end

      report(ctx, :error, ran?, error)
    else
      Telemetry.execute(
        [:dspex, :bridge, :retry, :attempt],
        %{attempt: n + 1, delay_ms: delay},
        %{reason: reason, breaker: ctx.breaker, budget: ctx.budget}
      )

      ctx.sleep.(delay)
      attempt(ctx, fun, n + 1, probe?, ran?)
    end
  end

  defp report(%{breaker: nil}, _outcome, _ran?, result), do: result
  defp report(_ctx, _outcome, false, result), do: result

  defp report(ctx, outcome, true, result) do
    CircuitBreaker.record(ctx.breaker, outcome)
    result
  end

  @doc """
  Whether `reason` would be retried by `policy` (without a deadline, so
  `:circuit_open` is not).

      iex> DSPex.Bridge.RetryPolicy.transient?(DSPex.Bridge.RetryPolicy.new(), :timeout)
      true
      iex> DSPex.Bridge.RetryPolicy.transient?(DSPex.Bridge.RetryPolicy.new(retry_on: [:busy]), {:busy, 3})
      true
      iex> DSPex.Bridge.RetryPolicy.transient?(DSPex.Bridge.RetryPolicy.new(retry_on: [:access_denied]), :access_denied)
      false
  """
  @spec transient?(t, term) :: boolean
  def transient?(%__MODULE__{} = policy, reason),
    do: retried?(reason, %{policy: policy, deadline_at: nil})

  defp retried?(reason, ctx) do
    kind = kind(reason)
    retry_on = ctx.policy.retry_on

    cond do
      kind in @permanent -> false
      kind == :circuit_open -> ctx.deadline_at != nil
      kind in @transient -> true
      is_list(retry_on) -> kind in retry_on or reason in retry_on
      true -> retry_on.(reason) == true
    end
  end

  defp kind(reason) when is_tuple(reason) and tuple_size(reason) > 0, do: elem(reason, 0)
  defp kind(reason), do: reason

  @doc """
  Sets the retry budget `name`: `ratio:` of calls (0.2), `min_per_second:`
  retries a second whatever the balance (10), `max_tokens:` saved up (100).
  Its balance starts empty. A budget first named in `run/3` gets the
  defaults.
  """
  @spec configure_budget(term, keyword) :: :ok | {:error, {:invalid_argument, term}}
  def configure_budget(name, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:ratio, :min_per_second, :max_tokens]) do
      Native.breaker_budget_configure(
        name,
        float(Keyword.get(opts, :ratio, 0.2)),
        Keyword.get(opts, :min_per_second, 10),
        Keyword.get(opts, :max_tokens, 100)
      )
    end
  end

  defp float(n) when is_integer(n), do: n * 1.0
  defp float(n), do: n

  @doc """
  `%{ratio, min_per_second, max_tokens, balance, allowed, denied}` of the
  budget `name`, or `{:error, :not_found}`.
  """
  @spec budget_info(term) :: map | {:error, :not_found}
  def budget_info(name), do: Native.breaker_budget_info(name)
end
