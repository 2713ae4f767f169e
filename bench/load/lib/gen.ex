defmodule DSPexLoad.Gen do
  @moduledoc false
  # The open-loop generator: long-lived caller processes (by default one per
  # session, like independent clients), each given an equal share of the
  # arrival rate. Arrivals are released on 1 ms ticks (absolute timers, so
  # no drift): a caller's arrivals due at tick k have tick k as their
  # intended start, and their latency is measured from it, so time spent
  # waiting behind a slow call is counted (no coordinated omission). A
  # caller has one request outstanding; arrivals older than the timeout are
  # not sent and count as unanswered, so a stalled system cannot make the
  # driver's backlog grow without bound.
  #
  # Profiles are lists of segments {from_ms, to_ms, rate_from, rate_to}
  # (ops/s over all callers, linear within a segment).

  alias DSPexLoad.{Stats, Workload}

  @ns_per_ms 1_000_000

  def rate_at([{from, to, r0, r1} | rest], t) do
    cond do
      t < from -> 0.0
      t < to -> r0 + (r1 - r0) * (t - from) / max(to - from, 1)
      true -> rate_at(rest, t)
    end
  end

  def rate_at([], _t), do: 0.0

  def length_ms(profile), do: profile |> Enum.map(&elem(&1, 1)) |> Enum.max(fn -> 0 end)

  def expected_ops(profile) do
    Enum.reduce(profile, 0.0, fn {a, b, r0, r1}, acc -> acc + (r0 + r1) / 2 * (b - a) / 1000 end)
  end

  ## Callers

  # Starts one caller per group of sessions. Returns the pids.
  def start_callers(groups, prefill) do
    for {sessions, id} <- Enum.with_index(groups) do
      spawn(fn -> caller(Workload.caller_state(sessions, prefill, id)) end)
    end
  end

  # Runs `profile` on every caller, starting at monotonic ms `t0_ms`, with
  # `timeout_ms` as the answer deadline. Returns when all are done. `null`:
  # the same arrivals, picked, timed and recorded but not called.
  def run(pids, profile, t0_ms, timeout_ms, null \\ false) do
    w = length(pids)
    ref = make_ref()
    for pid <- pids, do: send(pid, {:run, self(), ref, profile, w, t0_ms, timeout_ms, null})
    for _ <- pids, do: receive(do: ({^ref, :done} -> :ok))
    :ok
  end

  # Closed loop for `ms`: every caller calls as fast as it is answered
  # (latency = service time). Measures what the path can serve.
  # `null: true` runs the driver alone (each op picked, timed and recorded,
  # but not called): the driver's own ceiling on this machine.
  def run_closed(pids, ms, null \\ false) do
    ref = make_ref()
    deadline = :erlang.monotonic_time(:millisecond) + ms
    for pid <- pids, do: send(pid, {:closed, self(), ref, deadline, null})
    for _ <- pids, do: receive(do: ({^ref, :done} -> :ok))
    :ok
  end

  def verify(pids) do
    ref = make_ref()
    for pid <- pids, do: send(pid, {:verify, self(), ref})

    Enum.reduce(pids, %{checked: 0, lost: 0, examples: []}, fn _, acc ->
      receive do
        {^ref, r} ->
          %{
            checked: acc.checked + r.checked,
            lost: acc.lost + r.lost,
            examples: Enum.take(r.examples ++ acc.examples, 10)
          }
      end
    end)
  end

  def stop(pids), do: Enum.each(pids, &send(&1, :exit))

  defp caller(st) do
    receive do
      {:run, from, ref, profile, w, t0_ms, timeout_ms, null} ->
        indices = Map.new(Workload.ops(), &{&1, Stats.op_index(&1)})

        ctx = %{
          profile: profile,
          w: w,
          t0_ms: t0_ms,
          t0: t0_ms * @ns_per_ms,
          end_ms: length_ms(profile),
          timeout: timeout_ms * @ns_per_ms,
          idx: indices,
          null: null
        }

        # Callers start at different ticks within the first millisecond's
        # worth of arrivals, so they do not all wake together.
        st = tick(st, ctx, 0, :rand.uniform())
        send(from, {ref, :done})
        caller(st)

      {:closed, from, ref, deadline, null} ->
        indices = Map.new(Workload.ops(), &{&1, Stats.op_index(&1)})
        st = closed(st, indices, deadline, null)
        send(from, {ref, :done})
        caller(st)

      {:verify, from, ref} ->
        send(from, {ref, Workload.verify(st)})
        caller(st)

      :exit ->
        :ok
    end
  end

  defp closed(st, idx, deadline, null) do
    if :erlang.monotonic_time(:millisecond) >= deadline do
      st
    else
      op = Workload.pick(:rand.uniform(100))
      i = Map.fetch!(idx, op)
      start = :erlang.monotonic_time(:nanosecond)
      {class, reason, st} = if null, do: Workload.null(op, st), else: Workload.run(op, st)
      took = :erlang.monotonic_time(:nanosecond) - start
      Stats.record(i, class, took)
      if class != :ok, do: Stats.reason(i, class, reason)
      # A refused client backs off (1 ms, doubling to 64 ms while refused)
      # instead of spinning on refusals.
      backoff = Process.get(:dspex_load_backoff, 0)

      if class == :refused do
        pause = min(max(backoff * 2, 1), 64)
        Process.put(:dspex_load_backoff, pause)
        Process.sleep(pause)
      else
        if backoff > 0, do: Process.put(:dspex_load_backoff, 0)
      end

      closed(st, idx, deadline, null)
    end
  end

  defp tick(st, ctx, k, _carry) when k >= ctx.end_ms, do: st

  defp tick(st, ctx, k, carry) do
    per_tick = rate_at(ctx.profile, k) / ctx.w / 1000
    carry = carry + per_tick

    if carry < 1.0 do
      # Skip to the tick of the next arrival at this rate (at most 100 ms on).
      jump =
        if per_tick > 0,
          do: min(max(ceil((1.0 - carry) / per_tick), 1), 100),
          else: 100

      tick(st, ctx, k + jump, carry + (jump - 1) * per_tick)
    else
      n = trunc(carry)
      wait_until(ctx.t0_ms + k)
      st = burst(st, ctx, n, ctx.t0 + k * @ns_per_ms)
      tick(st, ctx, k + 1, carry - n)
    end
  end

  defp wait_until(ms) do
    if :erlang.monotonic_time(:millisecond) < ms do
      ref = :erlang.start_timer(ms, self(), :tick, abs: true)

      receive do
        {:timeout, ^ref, :tick} -> :ok
      end
    end

    :ok
  end

  defp burst(st, _ctx, 0, _intended), do: st

  defp burst(st, ctx, n, intended) do
    op = Workload.pick(:rand.uniform(100))
    i = Map.fetch!(ctx.idx, op)
    start = :erlang.monotonic_time(:nanosecond)

    st =
      if start - intended > ctx.timeout do
        # Too late to be worth sending: its caller would have given up.
        Stats.record(i, :unanswered, 0)
        st
      else
        {class, reason, st} = if ctx.null, do: Workload.null(op, st), else: Workload.run(op, st)
        took = :erlang.monotonic_time(:nanosecond) - intended

        cond do
          took > ctx.timeout ->
            Stats.record(i, :unanswered, took)
            Stats.reason(i, :unanswered, {class, reason})

          class == :ok ->
            Stats.record(i, :ok, took)

          true ->
            Stats.record(i, class, took)
            Stats.reason(i, class, reason)

            if class == :refused,
              do: Stats.refusal_service(i, :erlang.monotonic_time(:nanosecond) - start)
        end

        st
      end

    burst(st, ctx, n - 1, intended)
  end
end
