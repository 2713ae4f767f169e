defmodule DSPex.Chaos.Checker do
  @moduledoc """
  Judges a chaos run from the clients' merged `DSPex.Chaos.History`, the
  values read back after every fault was healed, and the faults injected.

  Violations (any one fails the run):

  - `lost`: a variable read back lower than its highest acknowledged value
    (neither that write nor a later acknowledged one is readable), or a
    session that vanished with acknowledged writes while no fault that
    ends sessions (`ends_sessions: [path]`, the port program's death) was
    injected between the last of them and the client's re-creation;
  - `phantom`: a value read back that was never written, or whose write
    was refused or failed;
  - `unreadable`: no value could be read back after healing;
  - `late`: an operation that answered after its timeout
    (`DSPex.Chaos.History.bound_us/1`), and `hung`: one that never did;
  - `stale`: a read older than a write acknowledged before it began;
  - `unrecovered`: a session whose last operation failed (the clients end
    with one read of each of their sessions, after every fault healed);
  - `replicas`, `derived`: replicas that disagree after healing, derived
    variables that disagree with their inputs; `faults`: a fault that did
    not do what it is for (a breaker that never opened, a crashed handler
    not detached): given by the runner.

  Reported per fault, all from the fault's time: the first error on its
  paths, the recovery (the first success, after that error, on a session
  of those paths that had failed), the last error, and for every session
  that failed the time of its own first success after its first failure
  (median and worst: these depend on how often a client comes back to a
  given session, so they are bounded below by the load's spread), the
  errors in each fault's window by path and reason, and per path the
  operations, outcomes, latency percentiles and errors by reason.
  Acknowledged writes that ended with a session the fault destroyed by
  design (the port program's memory) are counted apart.
  """

  alias DSPex.Chaos.History

  # A write acknowledged just after the kill was sent (the program had not
  # died yet) still died with it.
  @kill_grace_us 1_000_000

  @doc """
  `finals`: `%{{sid, var} => {:ok, value} | {:error, reason}}`, read after
  healing. `faults`: maps with `name`, `paths`, `at_us`, `healed_us`,
  `until_us` (the end of its window) and optionally `ends_sessions`
  (paths whose sessions this fault destroys). `extra`: `hung:`,
  `replicas:`, `derived:` (lists of violations found by the runner),
  `started_us:`, `stopped_us:`.
  """
  @spec check(History.t(), map, [map], keyword) :: map
  def check(%History{} = h, finals, faults, extra \\ []) do
    {judged, ended} = judge_variables(h, finals, faults)
    events = Enum.sort_by(h.events, & &1.stop_us)
    errors = Enum.filter(events, &(&1.kind == :error))

    late = for e <- errors, e.late, do: e
    stale = for e <- errors, e.stale, do: e

    unrecovered = for {{sid, lane}, :bad} <- h.status, do: %{sid: sid, lane: lane}

    violations = %{
      lost: judged.lost,
      phantom: judged.phantom,
      unreadable: judged.unreadable,
      late: late,
      hung: Keyword.get(extra, :hung, []),
      stale: stale,
      unrecovered: unrecovered,
      replicas: Keyword.get(extra, :replicas, []),
      derived: Keyword.get(extra, :derived, []),
      faults: Keyword.get(extra, :faults_failed, [])
    }

    %{
      ok: Enum.all?(violations, fn {_, list} -> list == [] end),
      violations: violations,
      ended_with_session: ended,
      variables: map_size(h.vars),
      acked_writes: h.vars |> Map.values() |> Enum.map(& &1.acked) |> Enum.sum(),
      unknown_writes: h.vars |> Map.values() |> Enum.map(& &1.unknown) |> Enum.sum(),
      ops: h.ops,
      events_dropped: h.dropped,
      faults: Enum.map(faults, &fault_report(&1, events, h)),
      baseline_slowest_ms: baseline(h, Keyword.get(extra, :started_us), faults),
      paths: path_report(h, Keyword.get(extra, :started_us), Keyword.get(extra, :stopped_us))
    }
  end

  ## Acknowledged writes

  defp judge_variables(h, finals, faults) do
    current =
      Enum.reduce(Map.keys(h.vars), %{}, fn {sid, epoch, _}, acc ->
        Map.update(acc, sid, epoch, &max(&1, epoch))
      end)

    init = %{lost: [], phantom: [], unreadable: []}

    Enum.reduce(h.vars, {init, %{variables: 0, acked_writes: 0}}, fn
      {{sid, epoch, var} = key, v}, {judged, ended} ->
        if epoch == Map.fetch!(current, sid) do
          {judge_final(judged, key, v, Map.get(finals, {sid, var})), ended}
        else
          judge_ended(judged, ended, key, v, h.epochs, faults)
        end
    end)
  end

  defp judge_final(judged, key, v, nil), do: add(judged, :unreadable, detail(key, v, :not_read))
  defp judge_final(judged, key, v, {:error, r}), do: add(judged, :unreadable, detail(key, v, r))

  defp judge_final(judged, key, v, {:ok, f}) do
    case verdict(v, f) do
      :ok -> judged
      kind -> add(judged, kind, detail(key, v, f))
    end
  end

  @doc """
  The verdict on a value `f` read back for a variable's summary `v`:
  `:ok`, `:lost` (below the highest acknowledged write) or `:phantom`
  (never written with an acknowledged or unknown outcome).
  """
  @spec verdict(map, term) :: :ok | :lost | :phantom
  def verdict(%{acked_max: nil} = v, f),
    do: if(f == v.initial or f in v.unknown_above, do: :ok, else: :phantom)

  def verdict(%{acked_max: a}, a), do: :ok

  def verdict(%{acked_max: a} = v, f) when is_integer(f) and f > a,
    do: if(f in v.unknown_above, do: :ok, else: :phantom)

  def verdict(_v, _f), do: :lost

  # A variable of an epoch its client ended (it found the session gone and
  # created it again): its acknowledged writes are lost unless a fault that
  # ends such sessions came between the last of them and the re-creation.
  defp judge_ended(judged, ended, _key, %{acked_max: nil}, _epochs, _faults), do: {judged, ended}

  defp judge_ended(judged, ended, {sid, epoch, _} = key, v, epochs, faults) do
    ended_at =
      epochs
      |> Map.get(sid, [])
      |> Enum.find_value(fn {new_epoch, at} -> if new_epoch == epoch + 1, do: at end)

    by_design? =
      ended_at != nil and
        Enum.any?(faults, fn f ->
          f[:ends_sessions] not in [nil, []] and f.at_us >= v.acked_at - @kill_grace_us and
            f.at_us <= ended_at
        end)

    if by_design? do
      {judged, %{variables: ended.variables + 1, acked_writes: ended.acked_writes + v.acked}}
    else
      {add(judged, :lost, detail(key, v, {:session_vanished, ended_at})), ended}
    end
  end

  defp add(judged, kind, item), do: Map.update!(judged, kind, &[item | &1])

  defp detail({sid, epoch, var}, v, read) do
    %{
      sid: sid,
      epoch: epoch,
      var: var,
      read: read,
      acked_max: v.acked_max,
      initial: v.initial,
      unknown_above: Enum.sort(v.unknown_above)
    }
  end

  ## Faults

  defp fault_report(f, events, h) do
    paths = f.paths

    slowest =
      for {{p, sec}, us} <- h.slowest,
          p in paths,
          sec >= div(f.at_us, 1_000_000),
          sec * 1_000_000 < f.until_us,
          reduce: nil,
          do: (max -> if(max == nil or us > max, do: us, else: max))

    in_window = Enum.filter(events, &(&1.stop_us >= f.at_us and &1.stop_us < f.until_us))
    {mine, others} = Enum.split_with(in_window, &(&1.path in paths))
    bad = Enum.filter(mine, &(&1.kind == :error and &1.class in [:fail, :unknown]))

    per_unit =
      bad
      |> Enum.group_by(&{&1.sid, &1.lane})
      |> Enum.map(fn {unit, [first | _] = list} ->
        recovered =
          Enum.find(mine, fn e ->
            e.kind == :recovered and {e.sid, e.lane} == unit and e.stop_us > first.stop_us
          end)

        %{
          unit: unit,
          first_error_us: first.stop_us - f.at_us,
          last_error_us: List.last(list).stop_us - f.at_us,
          recovered_us: recovered && recovered.stop_us - f.at_us
        }
      end)

    recoveries = for u <- per_unit, u.recovered_us != nil, do: u.recovered_us

    # The first success on a session of the fault's paths that had failed.
    first_ok =
      case bad do
        [] ->
          nil

        [first | _] ->
          Enum.find_value(mine, fn e ->
            if e.kind == :recovered and e.stop_us > first.stop_us, do: e.stop_us - f.at_us
          end)
      end

    collateral = for e <- others, e.kind == :error, e.class in [:fail, :unknown], do: e

    %{
      name: f.name,
      paths: paths,
      at_us: f.at_us,
      healed_ms: ms(f.healed_us - f.at_us),
      window_ms: ms(f.until_us - f.at_us),
      note: Map.get(f, :note),
      affected_sessions: length(per_unit),
      errors: length(bad),
      errors_by_reason: count_by(bad, &"#{&1.path}:#{&1.op}:#{&1.class}:#{&1.reason}"),
      first_error_ms: per_unit |> Enum.map(& &1.first_error_us) |> min_or_nil() |> ms(),
      last_error_ms: per_unit |> Enum.map(& &1.last_error_us) |> max_or_nil() |> ms(),
      recovery_ms: ms(first_ok),
      sessions_recovered_ms_p50: recoveries |> median() |> ms(),
      sessions_recovered_ms_max: recoveries |> max_or_nil() |> ms(),
      unrecovered_in_window: length(per_unit) - length(recoveries),
      slowest_call_ms: ms(slowest),
      collateral_errors: count_by(collateral, &"#{&1.path}:#{&1.op}:#{&1.class}:#{&1.reason}")
    }
  end

  # The slowest call of each path before the first fault: what the fault
  # windows' slowest calls compare with.
  defp baseline(_h, nil, _faults), do: %{}
  defp baseline(_h, _started, []), do: %{}

  defp baseline(h, started_us, [first | _]) do
    for {{p, sec}, us} <- h.slowest,
        sec > div(started_us, 1_000_000),
        (sec + 1) * 1_000_000 <= first.at_us,
        reduce: %{} do
      acc -> Map.update(acc, p, ms(us), &max(&1, ms(us)))
    end
  end

  defp count_by(list, key_fun) do
    list |> Enum.frequencies_by(key_fun) |> Enum.sort_by(fn {_, n} -> -n end) |> Map.new()
  end

  defp min_or_nil([]), do: nil
  defp min_or_nil(xs), do: Enum.min(xs)
  defp max_or_nil([]), do: nil
  defp max_or_nil(xs), do: Enum.max(xs)

  defp median([]), do: nil
  defp median(xs), do: xs |> Enum.sort() |> Enum.at(div(length(xs), 2))

  defp ms(nil), do: nil
  defp ms(us), do: Float.round(us / 1_000, 1)

  ## Paths

  defp path_report(h, started_us, stopped_us) do
    seconds =
      if is_integer(started_us) and is_integer(stopped_us) and stopped_us > started_us,
        do: (stopped_us - started_us) / 1_000_000

    paths = h.counts |> Map.keys() |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> Enum.sort()

    Map.new(paths, fn p ->
      counts = for {{^p, op, class, reason}, n} <- h.counts, do: {op, class, reason, n}
      total = for {_, class, _, n} <- counts, class not in [:stale, :cache], do: n
      total = Enum.sum(total)
      by_class = fn c -> counts |> Enum.filter(&(elem(&1, 1) == c)) |> Enum.map(&elem(&1, 3)) end

      errors =
        for {op, class, reason, n} <- counts, class in [:fail, :unknown, :refused, :stale] do
          {"#{op}:#{class}:#{reason}", n}
        end

      hist = for {{^p, b}, n} <- h.latency, do: {b, n}

      {p,
       %{
         ops: total,
         ops_per_s: if(seconds, do: round(total / seconds)),
         ok: Enum.sum(by_class.(:ok)),
         refused: Enum.sum(by_class.(:refused)),
         failed: Enum.sum(by_class.(:fail)),
         unknown: Enum.sum(by_class.(:unknown)),
         from_cache: Enum.sum(by_class.(:cache)),
         errors_by_reason: errors |> Enum.sort_by(fn {_, n} -> -n end) |> Map.new(),
         p50_us: percentile(hist, 0.50),
         p99_us: percentile(hist, 0.99),
         max_us: percentile(hist, 1.0)
       }}
    end)
  end

  @doc "The `q` quantile of a `[{bucket, count}]` latency histogram (the bucket's upper edge, µs)."
  @spec percentile([{non_neg_integer, pos_integer}], float) :: non_neg_integer | nil
  def percentile([], _q), do: nil

  def percentile(hist, q) do
    hist = Enum.sort(hist)
    total = hist |> Enum.map(&elem(&1, 1)) |> Enum.sum()
    rank = max(1, ceil(total * q))

    Enum.reduce_while(hist, 0, fn {b, n}, seen ->
      if seen + n >= rank, do: {:halt, {:bucket, b}}, else: {:cont, seen + n}
    end)
    |> case do
      {:bucket, b} -> round(History.bucket_us(b))
      _ -> nil
    end
  end
end
