defmodule DSPex.Chaos.History do
  @moduledoc """
  One client's history of its operations, folded as each one completes so
  that a run of hours stays small: what the checker needs, and nothing per
  successful operation beyond counters.

  An operation is a map:

      %{path: :nif | :port | :raft | :grpc, client: "nif-1", sid: "s1",
        epoch: 0, op: :read | :write | :cas | :batch | :lock_acquire |
        :lock_release | :derived | :recreate, writes: [{var, value}],
        read: {var, value} | nil, start_us: os_time_us, dur_us: 42,
        timeout_ms: 1_000, outcome: outcome, cache: false}

  `outcome` is `:ok`, `{:refused, reason}` (the system answered and did
  not apply it: a version mismatch, a lock held), `{:fail, reason}` (an
  error; a write was not applied) or `{:unknown, reason}` (no answer in
  time, or the connection went: a write may or may not have applied).
  `cache: true` marks a read answered from the last-known-value cache
  while a breaker was open.

  Each client writes only its own variables, with values that increase
  with every write it issues, so one number per variable (the highest
  acknowledged value) and the unknown writes above it are enough to judge
  the value read back after healing.

  Kept per variable `{sid, epoch, var}`: the highest acknowledged value
  and when it was acknowledged, the values of unknown outcome above it,
  and counts. Kept as events (each a map): every operation that failed or
  whose outcome is unknown, every one that took longer than its timeout,
  every read older than an acknowledged write, and the first success on a
  session after a failure on it (what recovery times are measured from).
  Counted: outcomes by path, operation and reason; latency by path (a
  histogram of quarter octaves); operations per second by path, and the
  slowest operation of each second by path.
  """

  @max_events 500_000

  defstruct vars: %{},
            events: [],
            n_events: 0,
            dropped: 0,
            counts: %{},
            latency: %{},
            timeline: %{},
            slowest: %{},
            status: %{},
            epochs: %{},
            ops: 0

  @type var_key :: {String.t(), non_neg_integer, term}
  @type t :: %__MODULE__{}

  @doc "An empty history."
  @spec new() :: t
  def new, do: %__MODULE__{}

  @doc """
  Declares a variable the client owns, with the value it was registered
  with (the value read back is judged against it when no write of it was
  acknowledged).
  """
  @spec declare(t, String.t(), non_neg_integer, term, integer) :: t
  def declare(h, sid, epoch, var, initial) do
    entry = %{
      initial: initial,
      acked_max: nil,
      acked_at: nil,
      unknown_above: [],
      acked: 0,
      unknown: 0,
      failed: 0
    }

    %{h | vars: Map.put_new(h.vars, {sid, epoch, var}, entry)}
  end

  @doc """
  Records that the client found `sid` gone (its backend lost it) and
  created it again as `new_epoch` at `at_us`: the variables of the older
  epoch are judged as of that moment.
  """
  @spec recreated(t, String.t(), non_neg_integer, integer) :: t
  def recreated(h, sid, new_epoch, at_us) do
    %{h | epochs: Map.update(h.epochs, sid, [{new_epoch, at_us}], &[{new_epoch, at_us} | &1])}
  end

  @doc "The class of an outcome: `:ok`, `:refused`, `:fail` or `:unknown`."
  @spec class(term) :: :ok | :refused | :fail | :unknown
  def class(:ok), do: :ok
  def class({:refused, _}), do: :refused
  def class({:fail, _}), do: :fail
  def class({:unknown, _}), do: :unknown

  @doc "A short name for a reason, for counting: the atom, or a tuple's first atom."
  @spec reason_name(term) :: String.t()
  def reason_name(nil), do: "-"
  def reason_name(r) when is_atom(r), do: Atom.to_string(r)
  def reason_name(r) when is_binary(r), do: r
  def reason_name({r, _}) when is_atom(r), do: Atom.to_string(r)
  def reason_name({r, _, _}) when is_atom(r), do: Atom.to_string(r)
  def reason_name(r), do: inspect(r, limit: 3)

  defp reason({_, r}), do: r
  defp reason(:ok), do: nil

  @doc "The longest an operation may take: its timeout plus a quarter, at least 500 ms more."
  @spec bound_us(pos_integer) :: pos_integer
  def bound_us(timeout_ms), do: (timeout_ms + max(500, div(timeout_ms, 4))) * 1_000

  @doc "Folds one completed operation into the history."
  @spec record(t, map) :: t
  def record(h, op) do
    class = class(op.outcome)
    stop = op.start_us + op.dur_us
    late? = op.dur_us > bound_us(op.timeout_ms)
    stale? = class == :ok and stale_read?(h, op)
    lane = if op.op == :derived, do: :derived, else: :data
    unit = {op.sid, lane}
    cache? = Map.get(op, :cache, false)

    h = %{
      h
      | ops: h.ops + 1,
        counts: bump(h.counts, {op.path, op.op, class, reason_name(reason(op.outcome))}),
        latency: bump(h.latency, {op.path, quarter_octave(op.dur_us)}),
        timeline: bump(h.timeline, {op.path, div(stop, 1_000_000), class}),
        slowest:
          Map.update(h.slowest, {op.path, div(stop, 1_000_000)}, op.dur_us, &max(&1, op.dur_us))
    }

    h = Enum.reduce(op.writes, h, &apply_write(&2, op, &1, class, stop))
    h = if stale?, do: bump_counts(h, {op.path, :read, :stale, "stale_read"}), else: h
    h = if cache?, do: bump_counts(h, {op.path, op.op, :cache, "cache_hit"}), else: h

    bad? = class in [:fail, :unknown]
    was_bad? = Map.get(h.status, unit) == :bad

    cond do
      bad? or late? or stale? ->
        h = if bad?, do: %{h | status: Map.put(h.status, unit, :bad)}, else: h
        event(h, op, class, stop, late?, stale?, lane, :error)

      was_bad? and not cache? ->
        h = %{h | status: Map.put(h.status, unit, :good)}
        event(h, op, class, stop, false, false, lane, :recovered)

      true ->
        h
    end
  end

  defp stale_read?(h, %{read: {var, value}} = op) when is_integer(value) do
    case Map.get(h.vars, {op.sid, op.epoch, var}) do
      %{acked_max: max} when is_integer(max) -> value < max
      _ -> false
    end
  end

  defp stale_read?(_h, _op), do: false

  defp apply_write(h, op, {var, value}, class, stop) do
    key = {op.sid, op.epoch, var}

    case Map.get(h.vars, key) do
      nil ->
        h

      v ->
        v =
          case class do
            :ok ->
              if v.acked_max == nil or value > v.acked_max do
                %{
                  v
                  | acked_max: value,
                    acked_at: stop,
                    acked: v.acked + 1,
                    unknown_above: Enum.filter(v.unknown_above, &(&1 > value))
                }
              else
                %{v | acked: v.acked + 1}
              end

            :unknown ->
              %{v | unknown: v.unknown + 1, unknown_above: [value | v.unknown_above]}

            _ ->
              %{v | failed: v.failed + 1}
          end

        %{h | vars: Map.put(h.vars, key, v)}
    end
  end

  defp event(h, _op, _class, _stop, _late?, _stale?, _lane, _kind)
       when h.n_events >= @max_events,
       do: %{h | dropped: h.dropped + 1}

  defp event(h, op, class, stop, late?, stale?, lane, kind) do
    e = %{
      kind: kind,
      path: op.path,
      client: op.client,
      sid: op.sid,
      lane: lane,
      op: op.op,
      start_us: op.start_us,
      stop_us: stop,
      dur_us: op.dur_us,
      timeout_ms: op.timeout_ms,
      class: class,
      reason: reason_name(reason(op.outcome)),
      late: late?,
      stale: stale?,
      read: op.read
    }

    %{h | events: [e | h.events], n_events: h.n_events + 1}
  end

  defp bump(map, key), do: Map.update(map, key, 1, &(&1 + 1))
  defp bump_counts(h, key), do: %{h | counts: bump(h.counts, key)}

  @doc "The latency bucket of `us`: quarter octaves (about 19% wide)."
  @spec quarter_octave(non_neg_integer) :: non_neg_integer
  def quarter_octave(us) when us <= 1, do: 0
  def quarter_octave(us), do: trunc(:math.log2(us) * 4)

  @doc "The upper edge, in microseconds, of a latency bucket."
  @spec bucket_us(non_neg_integer) :: float
  def bucket_us(b), do: :math.pow(2, (b + 1) / 4)

  @doc """
  One operation as a line of tab-separated fields (the raw trace of
  `--trace`): path, client, sid, epoch, op, writes (`var=value,...`),
  start_us, dur_us, timeout_ms, class, reason, read (`var=value`), cache.
  """
  @spec trace_line(map) :: iodata
  def trace_line(op) do
    pairs = fn list -> Enum.map_join(list, ",", fn {k, v} -> "#{k}=#{inspect(v)}" end) end

    Enum.map_intersperse(
      [
        op.path,
        op.client,
        op.sid,
        op.epoch,
        op.op,
        pairs.(op.writes),
        op.start_us,
        op.dur_us,
        op.timeout_ms,
        class(op.outcome),
        reason_name(reason(op.outcome)),
        pairs.(List.wrap(op.read)),
        Map.get(op, :cache, false)
      ],
      "\t",
      &to_string/1
    ) ++ ["\n"]
  end

  @doc "Several clients' histories as one (their variables are disjoint)."
  @spec merge([t]) :: t
  def merge(histories) do
    Enum.reduce(histories, new(), fn h, acc ->
      %{
        acc
        | vars: Map.merge(acc.vars, h.vars),
          events: h.events ++ acc.events,
          n_events: acc.n_events + h.n_events,
          dropped: acc.dropped + h.dropped,
          counts: Map.merge(acc.counts, h.counts, fn _, a, b -> a + b end),
          latency: Map.merge(acc.latency, h.latency, fn _, a, b -> a + b end),
          timeline: Map.merge(acc.timeline, h.timeline, fn _, a, b -> a + b end),
          slowest: Map.merge(acc.slowest, h.slowest, fn _, a, b -> max(a, b) end),
          status: Map.merge(acc.status, h.status),
          epochs: Map.merge(acc.epochs, h.epochs, fn _, a, b -> a ++ b end),
          ops: acc.ops + h.ops
      }
    end)
  end
end
