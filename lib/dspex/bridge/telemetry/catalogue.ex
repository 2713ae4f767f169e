defmodule DSPex.Bridge.Telemetry.Catalogue do
  # The text is the data: the tables are parsed (at compile time) into
  # `events/0`, which the catalogue test checks against real emitters.
  @text """
  Durations are in microseconds (`duration_us`) unless named `duration`,
  which, as in `:telemetry.span/3`, is in native time units.
  `session_id` is the session operated on; `variable` the identifier as the
  caller gave it.

  ### Sessions and variables (`DSPex.Bridge.SessionStore`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :session, :created]` | `system_time` | `session_id`, `backend` |
  | `[:dspex, :bridge, :session, :deleted]` | `system_time` | `session_id` |
  | `[:dspex, :bridge, :session, :expired]` | `system_time` | `session_id` |
  | `[:dspex, :bridge, :variable, :registered]` | `system_time` | `session_id`, `variable`, `type` |
  | `[:dspex, :bridge, :variable, :read]` | `duration_us` | `session_id`, `variable`, `result` (`:ok` or the error reason) |
  | `[:dspex, :bridge, :variable, :write]` | `duration_us`, `version` | `session_id`, `variable`, `metadata` |
  | `[:dspex, :bridge, :variable, :rollback]` | `version`, `to_version` | `session_id`, `variable` |
  | `[:dspex, :bridge, :variable, :version_conflict]` | `current_version` | `session_id`, `variable`, `expected_version` |
  | `[:dspex, :bridge, :variable, :deleted]` | `system_time` | `session_id`, `variable` |

  `backend` is `:nif` or `:port`.

  A process that set a W3C trace context with `put_trace_context/1` (the
  gRPC gateway does, for the calls that carry a `traceparent`) adds
  `traceparent` to the metadata of every event it emits.

  ### gRPC gateway (`DSPex.Bridge.Gateway`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :gateway, :started]` | `system_time` | `os_pid`, `port` (the port it listens on) |
  | `[:dspex, :bridge, :gateway, :exited]` | `system_time`, `in_flight` (calls and streams that failed with it) | `os_pid`, `status` (exit status, 137 for `kill -9`) |

  ### Port backend (`DSPex.Bridge.Backend.Port`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :port, :started]` | `system_time` | `os_pid` |
  | `[:dspex, :bridge, :port, :exited]` | `system_time`, `in_flight` (calls answered `{:error, :backend_unavailable}`) | `os_pid`, `status` (exit status; 137 for `kill -9`; `nil` when a write found the pipe closed before the status was reaped) |

  ### Overload refusals (`DSPex.Bridge.Backend.Port`, `DSPex.Bridge.Backend.Raft`, `DSPex.Bridge.Gateway`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :admission, :refused]` | `count` (calls refused) | `path` (`:port`, `:raft`, `:grpc`), `limit` (the limit that refused them), `session_id` (`nil` when unknown) |

  One event per refusal (`count: 1`) on the port backend (past `port:
  [max_in_flight: n]`) and on Raft (past `raft_max_in_flight`, or a
  session's write batcher past its 20,000 waiting commands), emitted by
  the refused caller (the batcher's process for the latter) before it gets
  `{:error, :overloaded}`. On `:grpc` the gateway program refuses past the
  gateway's `max_in_flight` itself (`RESOURCE_EXHAUSTED`) and reports the
  refusals every 250 ms at most: one event per report, `count` the
  refusals since the last, `session_id` `nil`. The same counts are the
  `dspex_admission_refused_total{path}` counter of the Prometheus text,
  with or without a handler.

  ### Dependencies (`DSPex.Bridge.DependencyManager`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :dependency, :added]` | `system_time` | `session_id`, `from`, `to`, `type` |
  | `[:dspex, :bridge, :dependency, :removed]` | `count` | `session_id`, `from`, `to` (`nil` for `clear_dependencies/2`, which adds `variable`) |
  | `[:dspex, :bridge, :dependency, :cycle_detected]` | `system_time`, `path_length` | `session_id`, `from`, `to`, `path` (`[from, to, .., from]`) |
  | `[:dspex, :bridge, :propagation, :start]` | `system_time`, `monotonic_time` | `session_id`, `changed` (the variables written), `telemetry_span_context` |
  | `[:dspex, :bridge, :propagation, :stop]` | `duration`, `monotonic_time`, `recomputed`, `failed` | `session_id`, `changed`, `telemetry_span_context` |
  | `[:dspex, :bridge, :propagation, :failed]` | `duration` (of the failed work; 0 for a worker's death), `monotonic_time` | `session_id`, `variable`, `kind`, `reason`, `stacktrace`, `caused_by`, `telemetry_span_context` (the pass's; `nil` outside a pass) |

  A propagation pass is a span, as `:telemetry.span/3` makes one
  (`DSPex.Bridge.Telemetry.span/3`): `:start`, then `:stop`, both with the
  pass's `telemetry_span_context`. Each derived variable whose compute
  function raised, exited or overran its deadline (`kind: :exit, reason:
  :timeout`), or whose result was rejected, is a `:failed` event inside the
  pass (which goes on) carrying that context. So is a write of
  `propagate_change/5` rejected for its value (`reason: {:write_rejected,
  reason}`, context `nil`), and a session's worker that died (`variable:
  nil`, `kind: :exit`, `reason: {:worker_exit, reason}`, the context of the
  pass it ended, or `nil` between passes): that pass has no `:stop`. Each
  failure is also a dead letter (`DSPex.Bridge.DeadLetterQueue`, kind
  `:propagation`). Following span semantics, a pass that itself raised
  would end with `[:dspex, :bridge, :propagation, :exception]` (the start
  metadata with `kind`, `reason`, `stacktrace`) instead of `:stop`; no
  known input makes a pass raise (compute functions run in processes of
  their own), so that event has no row, which would need a code path to
  check it.

  ### Optimizer coordination (`DSPex.Bridge.OptimizerCoordinator`)

  `key` is the lock key: the term given as `var_id`, or `{session_id,
  var_id}` for a session variable. `token` is the grant's fencing token.

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :optimization, :lock_acquired]` | `wait_us` | `key`, `optimizer_id`, `pid`, `token`, `how` (`:immediate`, `:after_wait`, `:preempted`) |
  | `[:dspex, :optimization, :lock_conflict]` | `system_time` | `key`, `optimizer_id` (the requester), `resolution` (`:wait`, `:abort`, `:preempt`) |
  | `[:dspex, :optimization, :lock_released]` | `system_time` | `key`, `optimizer_id`, `token`, `reason` (`:released`, `:owner_down`, `:expired`, `:preempted`) |
  | `[:dspex, :optimization, :preempted]` | `system_time` | `key`, `optimizer_id` (the preempted), `pid`, `token` (its grant), `preempted_by` |
  | `[:dspex, :optimization, :lock_expired]` | `system_time` | `key`, `optimizer_id`, `pid`, `token` |
  | `[:dspex, :optimization, :started]` | `system_time` | `optimizer_id`, `key`, `pid` (its first lock) |
  | `[:dspex, :optimization, :progress]` | `iteration` | `optimizer_id`, `best` (this report is the best so far), `value`, `metrics` |
  | `[:dspex, :optimization, :completed]` | `system_time` (and `duration_us`, from its first lock, when it released its last lock with `release_lock/3` and held it in this node's lock table) | `optimizer_id`, `key` (it released its last lock) |
  | `[:dspex, :optimization, :failed]` | `system_time` | `optimizer_id`, `key`, `reason` (`:owner_down`, `:expired`, `:preempted`: it lost its last lock) |

  `:lock_acquired`, `:lock_conflict`, `:preempted`, `:started` and
  `:completed` are emitted by the calling process; a holder's death or lease
  expiry is reported by the coordinator's process.
  ### Access control (`DSPex.Bridge.AccessControl`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :access, :denied]` | `system_time` | `session_id`, `variable` (as the caller named it; `nil` for a listing), `principal`, `permission` |
  | `[:dspex, :bridge, :rate_limit, :exceeded]` | `system_time` | `session_id`, `variable` (`nil` when the call names none), `principal` |

  Both are emitted in the calling process, for every `SessionStore`
  operation and for `AccessControl.authorize/4`; the same refusals are kept
  in the session's audit log (`AccessControl.audit_log/2`). Questions
  (`check_variable_access/5`, `check_permission/4`) emit nothing.

  ### Resilience (`DSPex.Bridge.CircuitBreaker`, `DSPex.Bridge.RetryPolicy`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :circuit_breaker, :state_change]` | `system_time` | `name`, `from`, `to`, `reason` (`:failures`, `:timeout_elapsed`, `:probe_failed`, `:probes_succeeded`, `:manual`) |
  | `[:dspex, :bridge, :circuit_breaker, :rejected]` | `system_time` | `name`, `state` (`:open`, `:forced_open`, or `:half_open` with every probe permit out) |
  | `[:dspex, :bridge, :retry, :attempt]` | `attempt` (the one about to start, from 2), `delay_ms` | `reason` (the error retried), `breaker`, `budget` |
  | `[:dspex, :bridge, :retry, :exhausted]` | `attempts`, `elapsed_ms` | `reason`, `why` (`:max_attempts`, `:deadline`, `:budget`), `breaker`, `budget` |

  Emitted by the calling process. Nothing is emitted for an admitted ask
  or a successful call; `:rejected` fires for each refused call.

  ### Bridged backends and the dead-letter queue (`DSPex.Bridge.State.Bridged`, `DSPex.Bridge.DeadLetterQueue`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :cache, :hit]` | `age_ms` | `backend`, `op` (the backend's command), `age_ms` (how old the value served is), `breaker` |
  | `[:dspex, :bridge, :cache, :miss]` | `system_time` | `backend`, `op`, `reason` (`:not_cached`, `:too_stale`, `:written_since`), `breaker` |
  | `[:dspex, :bridge, :dlq, :added]` | `depth`, `bytes` | `id`, `kind` (`:write`, `:propagation`), `op`, `session_id`, `reason` (the last error) |
  | `[:dspex, :bridge, :dlq, :replayed]` | `attempts` | `id`, `kind`, `op`, `result` (`:ok` or the error of the replay) |
  | `[:dspex, :bridge, :dlq, :dropped]` | `system_time` | `id`, `kind`, `op`, `by`, `reason` |
  | `[:dspex, :bridge, :dlq, :evicted]` | `system_time` | `id`, `kind`, `op`, `session_id`, `why` (`:max_entries`, `:max_bytes`, `:max_per_session`) |

  Cache events are emitted only for reads refused by an open breaker (a
  hit is served from the cache), never for a read that reached the
  backend. Queue events are emitted by the queue's process.

  ### Backups (`DSPex.Bridge.Backup`)

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:dspex, :bridge, :backup, :snapshot_taken]` | `bytes` (of the file), `duration_us`, `pruned` (older files deleted) | `session_id`, `path` |
  | `[:dspex, :bridge, :backup, :snapshot_failed]` | `system_time` | `session_id`, `reason` |
  | `[:dspex, :bridge, :backup, :restored]` | `bytes` (of the snapshot), `duration_us` | `session_id` (restored as), `from` (the backup's session id), `path` |
  | `[:dspex, :bridge, :backup, :restore_failed]` | `system_time` | `path` (the file or directory), `reason` |

  Emitted by the process that called `snapshot_now/2` or `restore/2`, or
  by the periodic round's task. A round skips sessions deleted since it
  listed them, without an event.

  ### Observability (`DSPex.Bridge.Analytics`)

  Analytics emits no events of its own: it consumes the events of this
  catalogue (its moduledoc maps each to a metric type). The Rust engine
  does not emit telemetry either: its warnings and errors reach `Logger`
  through `DSPex.Bridge.NativeLog`, and its counters and histograms the
  Prometheus text of `DSPex.Bridge.Analytics.prometheus_text/0`.

  Every row of the tables above is checked by
  `test/dspex/bridge/telemetry_catalogue_test.exs` (through `events/0`), which runs a code path
  emitting the event and checks its measurement and metadata keys: a
  component that adds events adds their code paths in
  `test/support/telemetry_emitters/`.
  """

  @moduledoc """
             Every event dspex_bridge emits, with its measurements and metadata. The
             dispatcher is `DSPex.Bridge.Telemetry`.

             """ <> @text

  # `a`, `b` (`:ok` or ...) -> [:a, :b]: backticked names outside parentheses.
  keys = fn cell ->
    cell
    |> String.replace(~r/\([^)]*\)/, "")
    |> then(&Regex.scan(~r/`([a-z_][a-z0-9_]*)`/, &1, capture: :all_but_first))
    |> Enum.map(fn [k] -> String.to_atom(k) end)
  end

  @events (for "| `[:" <> _ = line <- String.split(@text, "\n") do
             [event, measurements, metadata] =
               line
               |> String.trim()
               |> String.trim("|")
               |> String.split(" | ")
               |> Enum.map(&String.trim/1)

             {event, []} = event |> String.trim("`") |> Code.eval_string()
             %{event: event, measurements: keys.(measurements), metadata: keys.(metadata)}
           end)

  @type entry :: %{event: [atom, ...], measurements: [atom], metadata: [atom]}

  @doc """
  The catalogue as data: each event with the measurement and metadata keys
  it always carries (the names in its row, notes in parentheses left out).
  """
  @spec events() :: [entry]
  def events, do: @events

  @doc "The catalogue's tables and notes, as markdown."
  @spec markdown() :: String.t()
  def markdown, do: @text
end
