defmodule DSPex.Bridge.Analytics do
  @moduledoc """
  Performance analytics: aggregates of the library's telemetry over time,
  a dashboard, and a Prometheus exposition.

      {:ok, _pid} = DSPex.Bridge.Analytics.start_link(aggregation_interval: 1_000)
      # ... reads and writes happen anywhere in the VM ...
      DSPex.Bridge.Analytics.get_dashboard().last_minute.avg_read_latency
      #=> 41.5
      {:ok, p99} = DSPex.Bridge.Analytics.get_metrics(:variable_read, from, to, :p99)

  Started, it attaches one handler to the events in the table below, so
  events count whoever emits them (`DSPex.Bridge.Telemetry.execute/3` or
  `:telemetry.execute/3`). The handler runs in the emitting process and
  records straight into the Rust store (one NIF call, no message to this
  server); this process only ages buckets every `aggregation_interval`.
  While Analytics is not started nothing is attached, so the store's hot
  paths do not even read the clock for it.

  ## Storage

  Samples are not stored one by one. Each metric type has time buckets of
  `aggregation_interval` ms holding an exact count, sum, min and max and a
  log-linear histogram (64 cells per power of two: quantiles within 0.8% of
  the exact ranked value). Buckets older than 15 minutes are merged into
  one-minute buckets, and buckets older than `retention_period` are
  dropped. Memory depends on the number of metric types and the retention,
  not on the event rate (see `bench/analytics_bench.exs`). A query merges
  the buckets overlapping `[from, to]`, so its time resolution is one bucket.

  ## Metric types fed by events

  | event | metric type | value |
  | --- | --- | --- |
  | `[:dspex, :bridge, :variable, :read]` | `:variable_read` (and `:read_error` unless `result: :ok`) | `duration_us` (1) |
  | `[:dspex, :bridge, :variable, :write]` | `:variable_write` | `duration_us` |
  | `[:dspex, :bridge, :variable, :version_conflict]` | `:version_conflict` | 1 |
  | `[:dspex, :bridge, :variable, :rollback]` | `:variable_rollback` | 1 |
  | `[:dspex, :bridge, :session, :created \\| :deleted \\| :expired]` | `:session_created`, `:session_deleted`, `:session_expired` | 1 |
  | `[:dspex, :bridge, :cache, :hit \\| :miss]` | `:cache_hit`, `:cache_miss` | 1 |
  | `[:dspex, :bridge, :access, :denied]` | `:access_denied` | 1 |
  | `[:dspex, :bridge, :rate_limit, :exceeded]` | `:rate_limited` | 1 |
  | `[:dspex, :bridge, :dependency, :cycle_detected]` | `:cycle_detected` | 1 |
  | `[:dspex, :bridge, :propagation, :stop \\| :failed]` | `:propagation`, `:propagation_error` | `duration` in µs |
  | `[:dspex, :bridge, :circuit_breaker, :state_change \\| :rejected]` | `:circuit_breaker_state_change`, `:circuit_breaker_rejected` | 1 |
  | `[:dspex, :optimization, :started \\| :completed \\| :failed]` | `:optimization_started`, `:optimization_completed`, `:optimization_failed` | 1 |
  | `[:dspex, :optimization, :completed]` | `:optimization_duration` (ms) | `duration_ms`, or `duration_us` / 1000 (the coordinator's: from the optimizer's first lock to its last release) |
  | `[:dspex, :optimization, :lock_conflict \\| :preempted]` | `:lock_conflict`, `:lock_preempted` | 1 |

  Cache events come from `DSPex.Bridge.State.Bridged` (reads refused by
  an open breaker); they make the dashboard's `cache_hit_rate`.

  Derived types, merged at query time: `:read_latency` is `:variable_read`,
  `:write_latency` is `:variable_write`, `:operation_latency` is both,
  `:operation_error` is `:read_error`, `:version_conflict`, `:access_denied`
  and `:rate_limited` together; they are read-only (`record_metric/3`
  refuses them). Any other atom or string is a type of your own for
  `record_metric/3`, except `nil`, `true` and `false` (almost always a
  missing value, not a name). At most 1024 types of your own exist; the
  built-in types above have room of their own, so yours never stop the
  library's own counting.

  ## Dashboard

  See `get_dashboard/0`. Rates are `0.0` when nothing was counted;
  latencies are `nil` when no sample fell in the window.
  """
  use GenServer

  alias DSPex.Bridge.{Native, Options, Telemetry}

  @type metric_type :: atom | String.t()
  @type aggregation :: :avg | :sum | :min | :max | :count | :p50 | :p95 | :p99
  @type time :: integer | DateTime.t()

  @key {__MODULE__, :metrics}
  @handler_id {__MODULE__, :handler}
  @aggregations [:avg, :sum, :min, :max, :count, :p50, :p95, :p99]

  # event => [{metric, measurement key | :one}]
  @event_metrics %{
    [:dspex, :bridge, :variable, :read] => [variable_read: :duration_us],
    [:dspex, :bridge, :variable, :write] => [variable_write: :duration_us],
    [:dspex, :bridge, :variable, :version_conflict] => [version_conflict: :one],
    [:dspex, :bridge, :variable, :rollback] => [variable_rollback: :one],
    [:dspex, :bridge, :session, :created] => [session_created: :one],
    [:dspex, :bridge, :session, :deleted] => [session_deleted: :one],
    [:dspex, :bridge, :session, :expired] => [session_expired: :one],
    [:dspex, :bridge, :cache, :hit] => [cache_hit: :one],
    [:dspex, :bridge, :cache, :miss] => [cache_miss: :one],
    [:dspex, :bridge, :access, :denied] => [access_denied: :one],
    [:dspex, :bridge, :rate_limit, :exceeded] => [rate_limited: :one],
    [:dspex, :bridge, :dependency, :cycle_detected] => [cycle_detected: :one],
    [:dspex, :bridge, :propagation, :stop] => [propagation: :duration],
    [:dspex, :bridge, :propagation, :failed] => [propagation_error: :duration],
    [:dspex, :bridge, :circuit_breaker, :state_change] => [circuit_breaker_state_change: :one],
    [:dspex, :bridge, :circuit_breaker, :rejected] => [circuit_breaker_rejected: :one],
    [:dspex, :optimization, :started] => [optimization_started: :one],
    [:dspex, :optimization, :completed] => [
      optimization_completed: :one,
      optimization_duration: :duration_ms
    ],
    [:dspex, :optimization, :failed] => [optimization_failed: :one],
    [:dspex, :optimization, :lock_conflict] => [lock_conflict: :one],
    [:dspex, :optimization, :preempted] => [lock_preempted: :one]
  }

  # The types the handler records into: reserved in the store, outside the
  # cap on types of the caller's own.
  @builtin_types @event_metrics
                 |> Map.values()
                 |> Enum.flat_map(&Keyword.keys/1)
                 |> Kernel.++([:read_error])
                 |> Enum.uniq()

  @derived %{
    read_latency: [:variable_read],
    write_latency: [:variable_write],
    operation_latency: [:variable_read, :variable_write],
    operation_error: [:read_error, :version_conflict, :access_denied, :rate_limited]
  }

  @minute_us 60_000_000
  @max_us 9_223_372_036_854_775_808
  @hour_us 3_600_000_000

  ## Lifecycle

  @doc """
  Starts the analytics server (one per node, registered as this module).

  Options:
  - `:aggregation_interval` — bucket width in ms (default 1000); also how
    often buckets are aged.
  - `:retention_period` — how long data is kept, in ms (default 24 hours).

  A bad option is `{:error, {:invalid_argument, detail}}` (as everywhere in
  the public API: `{:bad_options, opts}`, `{:unknown_options, keys}`,
  `{:duplicate_options, keys}` or `{key, value}`), and nothing is started.
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts \\ []) do
    with {:ok, opts} <- validate_opts(opts),
         do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)
  end

  @doc false
  def child_spec(opts) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "The events Analytics attaches to."
  @spec events() :: [Telemetry.event()]
  def events, do: Map.keys(@event_metrics)

  @doc "True while Analytics is started."
  @spec running?() :: boolean
  def running?, do: :persistent_term.get(@key, nil) != nil

  ## Recording and queries

  @doc """
  Records one sample of `metric_type` now. `metadata` is accepted for
  compatibility and not stored: per-sample rows are what this module avoids.
  Returns `{:error, :not_running}` when Analytics is not started,
  `{:error, {:invalid_argument, {:bad_metric_type, type}}}` for `nil`,
  `true`, `false`, a derived type or a non-atom non-string,
  `{:error, {:invalid_argument, {:bad_value, value}}}` for a non-number, and
  `{:error, {:invalid_argument, {:too_many_metrics, 1024}}}` for a new type
  of your own past the cap (built-in types are always recorded).

      :ok = DSPex.Bridge.Analytics.record_metric(:model_loss, 0.25)
  """
  @spec record_metric(metric_type, number, map) :: :ok | {:error, term}
  def record_metric(metric_type, value, metadata \\ %{})

  def record_metric(metric_type, _value, _metadata) when is_map_key(@derived, metric_type) do
    {:error, {:invalid_argument, {:bad_metric_type, metric_type}}}
  end

  def record_metric(metric_type, value, _metadata) do
    with {:ok, type} <- metric_type(metric_type),
         {:ok, value} <- metric_value(value),
         {:ok, ref} <- fetch_metrics() do
      Native.metrics_record(ref, type, value)
    end
  end

  @doc """
  Aggregates `metric_type` over `[from, to]` (µs since the Unix epoch, as
  `System.os_time(:microsecond)`, or `DateTime`s). Returns `{:ok, nil}` when
  no sample fell in the range (a `:count` is then `0`).

      {:ok, p95} = Analytics.get_metrics(:read_latency, now - 60_000_000, now, :p95)
  """
  @spec get_metrics(metric_type, time, time, aggregation) ::
          {:ok, number | nil} | {:error, term}
  def get_metrics(metric_type, from, to, aggregation \\ :avg) do
    with {:ok, type} <- metric_type(metric_type),
         {:ok, ref} <- fetch_metrics(),
         {:ok, from, to} <- range(from, to),
         {:ok, agg} <- aggregation(aggregation),
         {:ok, [value]} <- Native.metrics_query(ref, names(type), from, to, [agg]) do
      {:ok, value}
    end
  end

  @doc """
  The dashboard, in the shape of seed 002:

      %{
        last_minute: %{variable_reads: 1, variable_writes: 1, avg_read_latency: 150.0,
                       avg_write_latency: 500.0, cache_hit_rate: 1.0},
        last_hour: %{total_operations: 2, error_rate: 0.0, p95_latency: 500.0,
                     active_sessions: 0, optimization_success_rate: 0.0}
      }

  Latencies are in µs. `total_operations` counts reads, writes and started
  optimizations; `error_rate` is `:operation_error` over those;
  `active_sessions` is the number of live sessions now. Without Analytics
  running every count is 0 and every latency `nil`.
  """
  @spec get_dashboard() :: %{last_minute: map, last_hour: map}
  def get_dashboard do
    now = System.os_time(:microsecond)
    minute = now - @minute_us
    hour = now - @hour_us
    q = fn names, from, aggs -> query(names, from, now, aggs) end

    [reads, avg_read] = q.([:variable_read], minute, [:count, :avg])
    [writes, avg_write] = q.([:variable_write], minute, [:count, :avg])
    [hits] = q.([:cache_hit], minute, [:count])
    [misses] = q.([:cache_miss], minute, [:count])
    [ops, p95] = q.([:variable_read, :variable_write], hour, [:count, :p95])
    [started] = q.([:optimization_started], hour, [:count])
    [errors] = q.(@derived.operation_error, hour, [:count])
    [completed] = q.([:optimization_completed], hour, [:count])
    [failed] = q.([:optimization_failed], hour, [:count])
    total = ops + started

    %{
      last_minute: %{
        variable_reads: reads,
        variable_writes: writes,
        avg_read_latency: avg_read,
        avg_write_latency: avg_write,
        cache_hit_rate: rate(hits, hits + misses)
      },
      last_hour: %{
        total_operations: total,
        error_rate: min(rate(errors, total), 1.0),
        p95_latency: p95,
        active_sessions: active_sessions(),
        optimization_success_rate: rate(completed, completed + failed)
      }
    }
  end

  @doc """
  Everything known about `metric_type` between two `DateTime`s (or µs
  timestamps): the aggregates over the whole range and each bucket.

      {:ok, %{count: 120, avg: 48.2, p99: 130.0, buckets: [%{start: ~U[...], count: 2, ...} | _]}} =
        Analytics.get_detailed_metrics(:variable_write, DateTime.add(DateTime.utc_now(), -3600), DateTime.utc_now())
  """
  @spec get_detailed_metrics(metric_type, time, time) :: {:ok, map} | {:error, term}
  def get_detailed_metrics(metric_type, from, to) do
    with {:ok, _type} <- metric_type(metric_type),
         {:ok, ref} <- fetch_metrics(),
         {:ok, from_us, to_us} <- range(from, to),
         {:ok, from_dt} <- to_datetime(from_us),
         {:ok, to_dt} <- to_datetime(to_us),
         names = names(metric_type),
         {:ok, values} <- Native.metrics_query(ref, names, from_us, to_us, @aggregations),
         {:ok, buckets} <- buckets(ref, names, from_us, to_us) do
      summary = @aggregations |> Enum.zip(values) |> Map.new()
      {:ok, Map.merge(summary, %{type: metric_type, from: from_dt, to: to_dt, buckets: buckets})}
    end
  end

  @doc """
  The Prometheus text exposition (format 0.0.4) of everything observable:
  each analytics metric type as a summary named `dspex_analytics_<type>`
  (quantiles over the last minute, lifetime `_sum` and `_count`), the Rust
  engine's own counters and histograms (`dspex_core_*`), the BEAM side
  (`dspex_*`: live sessions, VM memory, processes, run queue, overload
  refusals by path as `dspex_admission_refused_total{path}`) and the
  dead-letter queue's gauges (`dspex_dlq_*`, `DSPex.Bridge.DeadLetterQueue`). Works without
  Analytics started (then without the `dspex_analytics_*` families).
  """
  @spec prometheus_text() :: iodata
  def prometheus_text do
    native = Native.metrics_prometheus(metrics(), "dspex_analytics_", now(), @minute_us)
    [beam_metrics_text(), native]
  end

  # The BEAM side of the exposition: gauges read now.
  defp beam_metrics_text do
    memory = :erlang.memory()

    [
      gauge("dspex_up", "1 while the library runs.", [{"", 1}]),
      gauge("dspex_analytics_running", "1 while Analytics is started.", [
        {"", if(running?(), do: 1, else: 0)}
      ]),
      gauge("dspex_sessions", "Live sessions in the store.", [{"", active_sessions()}]),
      gauge("dspex_native_memory_bytes", "Bytes held by the Rust engine.", [
        {"", native_memory()}
      ]),
      gauge(
        "dspex_beam_memory_bytes",
        "VM memory by kind (erlang:memory/0).",
        for(
          k <- [:total, :processes, :binary, :ets, :atom, :code],
          do: {~s(kind="#{k}"), memory[k]}
        )
      ),
      gauge("dspex_beam_processes", "Processes in the VM.", [
        {"", :erlang.system_info(:process_count)}
      ]),
      gauge("dspex_beam_run_queue", "Processes ready to run, all schedulers.", [
        {"", :erlang.statistics(:total_run_queue_lengths)}
      ]),
      "# HELP dspex_native_log_dropped_total Engine log records dropped on a full queue.\n",
      "# TYPE dspex_native_log_dropped_total counter\n",
      "dspex_native_log_dropped_total #{native_log_dropped()}\n",
      refused_text(),
      DSPex.Bridge.DeadLetterQueue.prometheus_text()
    ]
  end

  # Refusals of every admission gate (`DSPex.Bridge.Admission`), counted
  # whether Analytics runs or not.
  defp refused_text do
    counts = DSPex.Bridge.Admission.refused_counts()

    [
      "# HELP dspex_admission_refused_total Calls refused for overload " <>
        "({:error, :overloaded}; RESOURCE_EXHAUSTED on gRPC), by path.\n",
      "# TYPE dspex_admission_refused_total counter\n"
      | for(
          path <- [:port, :raft, :grpc],
          do: sample_line("dspex_admission_refused_total", ~s(path="#{path}"), counts[path])
        )
    ]
  end

  defp gauge(name, help, samples) do
    [
      "# HELP #{name} #{help}\n# TYPE #{name} gauge\n"
      | for({labels, v} <- samples, do: sample_line(name, labels, v))
    ]
  end

  defp sample_line(name, "", v), do: "#{name} #{v}\n"
  defp sample_line(name, labels, v), do: "#{name}{#{labels}} #{v}\n"

  defp native_memory do
    DSPex.Bridge.Backend.Native.memory()
  rescue
    _ -> 0
  end

  defp native_log_dropped do
    Native.log_dropped()
  rescue
    _ -> 0
  end

  @doc "Size of the store: `%{metrics: n, buckets: n, bytes: n, late_samples: n}`."
  @spec stats() :: {:ok, map} | {:error, :not_running}
  def stats do
    with {:ok, ref} <- fetch_metrics(), do: {:ok, Native.metrics_stats(ref)}
  end

  @doc "Forgets every sample (for tests and operators)."
  @spec reset() :: :ok | {:error, :not_running}
  def reset do
    with {:ok, ref} <- fetch_metrics(), do: Native.metrics_reset(ref)
  end

  ## Telemetry handler

  @doc false
  # Runs in the emitting process. Never raises: a raising handler would be
  # detached, and Analytics would silently stop counting.
  def handle_event([:dspex, :bridge, :variable, :read], measurements, metadata, ref) do
    record(ref, :variable_read, measurements[:duration_us])

    case metadata do
      %{result: :ok} -> :ok
      %{result: _error} -> record(ref, :read_error, 1)
      _ -> :ok
    end
  end

  def handle_event(event, measurements, _metadata, ref) do
    for {metric, key} <- Map.get(@event_metrics, event, []) do
      case key do
        :one -> record(ref, metric, 1)
        :duration -> record(ref, metric, native_to_us(measurements[:duration]))
        :duration_ms -> record(ref, metric, milliseconds(measurements))
        key -> record(ref, metric, measurements[key])
      end
    end

    :ok
  end

  # An optimization's duration in ms: the seed's `duration_ms`, or the
  # coordinator's `duration_us`.
  defp milliseconds(%{duration_ms: ms}), do: ms
  defp milliseconds(%{duration_us: us}) when is_number(us), do: us / 1000
  defp milliseconds(_), do: nil

  defp record(ref, metric, value) when is_number(value) do
    Native.metrics_record(ref, metric, value)
  rescue
    _ -> :ok
  end

  defp record(_ref, _metric, _value), do: :ok

  defp native_to_us(d) when is_integer(d), do: System.convert_time_unit(d, :native, :microsecond)
  defp native_to_us(_), do: nil

  ## GenServer

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    interval = opts[:aggregation_interval]

    case Native.metrics_new(interval * 1000, opts[:retention_period] * 1000) do
      {:ok, ref} ->
        :ok = Native.metrics_reserve(ref, @builtin_types)
        :persistent_term.put(@key, ref)
        _ = Telemetry.detach(@handler_id)
        :ok = Telemetry.attach_many(@handler_id, events(), &__MODULE__.handle_event/4, ref)
        Process.send_after(self(), :maintain, interval)
        {:ok, %{ref: ref, interval: interval}}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  @impl true
  def handle_info(:maintain, state) do
    Native.metrics_maintain(state.ref, now())
    Process.send_after(self(), :maintain, state.interval)
    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, _state) do
    _ = Telemetry.detach(@handler_id)
    :persistent_term.erase(@key)
    :ok
  end

  ## Helpers

  defp validate_opts(opts) do
    with {:ok, opts} <- Options.validate(opts, [:aggregation_interval, :retention_period]) do
      interval = Keyword.get(opts, :aggregation_interval, 1_000)
      retention = Keyword.get(opts, :retention_period, 86_400_000)

      cond do
        not (is_integer(interval) and interval > 0) ->
          Options.bad(:aggregation_interval, interval)

        # At least one bucket is kept.
        not (is_integer(retention) and retention >= interval) ->
          Options.bad(:retention_period, retention)

        true ->
          {:ok, [aggregation_interval: interval, retention_period: retention]}
      end
    end
  end

  defp metrics, do: :persistent_term.get(@key, nil)

  defp fetch_metrics do
    case metrics() do
      nil -> {:error, :not_running}
      ref -> {:ok, ref}
    end
  end

  defp now, do: System.os_time(:microsecond)

  defp names(type), do: Map.get(@derived, type, [type])

  # `nil`, `true` and `false` are atoms, but as a metric name they are
  # almost always a value that was missing.
  defp metric_type(type) when type in [nil, true, false],
    do: {:error, {:invalid_argument, {:bad_metric_type, type}}}

  defp metric_type(type) when is_atom(type) or is_binary(type), do: {:ok, type}
  defp metric_type(type), do: {:error, {:invalid_argument, {:bad_metric_type, type}}}

  defp metric_value(v) when is_number(v), do: {:ok, v}
  defp metric_value(v), do: {:error, {:invalid_argument, {:bad_value, v}}}

  defp query(names, from, to, aggs) do
    with ref when ref != nil <- metrics(),
         {:ok, values} <- Native.metrics_query(ref, names, from, to, aggs) do
      values
    else
      _ ->
        Enum.map(aggs, fn
          :count -> 0
          _ -> nil
        end)
    end
  end

  defp buckets(ref, names, from, to) do
    with {:ok, buckets} <- Native.metrics_buckets(ref, names, from, to) do
      {:ok, Enum.map(buckets, &bucket_map/1)}
    end
  end

  defp bucket_map({start, width, count, sum, min, max}) do
    %{
      start: DateTime.from_unix!(start, :microsecond),
      width_ms: div(width, 1000),
      count: count,
      sum: sum,
      avg: if(count > 0, do: sum / count),
      min: min,
      max: max
    }
  end

  defp range(from, to) do
    with {:ok, from} <- to_us(from), {:ok, to} <- to_us(to) do
      if from <= to, do: {:ok, from, to}, else: {:error, {:invalid_argument, :from_after_to}}
    end
  end

  defp to_datetime(us) do
    case DateTime.from_unix(us, :microsecond) do
      {:ok, dt} -> {:ok, dt}
      {:error, _} -> {:error, {:invalid_argument, {:bad_time, us}}}
    end
  end

  defp to_us(%DateTime{} = dt), do: {:ok, DateTime.to_unix(dt, :microsecond)}
  defp to_us(t) when is_integer(t) and t >= -@max_us and t < @max_us, do: {:ok, t}
  defp to_us(t), do: {:error, {:invalid_argument, {:bad_time, t}}}

  defp aggregation(a) when a in @aggregations, do: {:ok, a}
  defp aggregation(a), do: {:error, {:invalid_argument, {:bad_aggregation, a}}}

  defp rate(_n, 0), do: 0.0
  defp rate(n, total), do: n / total

  defp active_sessions do
    length(DSPex.Bridge.SessionStore.list_sessions())
  rescue
    _ -> 0
  catch
    _, _ -> 0
  end
end
