defmodule DSPex.Bridge.OptimizerCoordinator.Events do
  @moduledoc false
  # The coordinator's telemetry (the "Optimizer coordination" table of
  # `DSPex.Bridge.Telemetry.Catalogue`), and the preemption notice sent to
  # a preempted holder.

  alias DSPex.Bridge.Telemetry

  require Telemetry

  @lock_acquired [:dspex, :optimization, :lock_acquired]
  @lock_released [:dspex, :optimization, :lock_released]
  @started [:dspex, :optimization, :started]
  @completed [:dspex, :optimization, :completed]
  @failed [:dspex, :optimization, :failed]

  ## Telemetry
  #
  # Events are built only when a handler may see them: the uncontended
  # acquire/release cycle costs less than the clock reads they need.

  def emit(event, build) do
    if Telemetry.enabled?(event) do
      {measurements, metadata} = build.()
      Telemetry.execute(event, measurements, metadata)
    end

    :ok
  end

  def now, do: %{system_time: System.system_time()}

  # What an acquire will report: the start time when `:lock_acquired` is
  # observed, and whether `:started` is.
  def start_time do
    {Telemetry.observed?(@lock_acquired) && System.monotonic_time(),
     Telemetry.observed?(@started)}
  end

  def acquired(key, optimizer_id, pid, token, started, how, {start, started?}) do
    if start do
      Telemetry.execute(@lock_acquired, %{wait_us: Telemetry.since_us(start)}, %{
        key: key,
        optimizer_id: optimizer_id,
        pid: pid,
        token: token,
        how: how
      })
    end

    if started and started? do
      Telemetry.execute(@started, now(), %{optimizer_id: optimizer_id, key: key, pid: pid})
    end
  end

  def conflict_event(key, optimizer_id, mode) do
    emit([:dspex, :optimization, :lock_conflict], fn ->
      {now(), %{key: key, optimizer_id: optimizer_id, resolution: mode}}
    end)
  end

  def preempted(var_id, key, {previous, pid, token, finished}, by) do
    if is_pid(pid), do: send(pid, {:optimization_preempted, var_id})

    emit([:dspex, :optimization, :preempted], fn ->
      {now(), %{key: key, optimizer_id: previous, pid: pid, token: token, preempted_by: by}}
    end)

    ended(key, previous, token, finished, :preempted)
  end

  # When the optimization `optimizer_id` started (µs since the epoch, from
  # the lock table), asked before a release that may end it, so that
  # `:completed` can carry its `duration_us`; nil when `:completed` is not
  # observed (no NIF call then) or the optimizer holds no lock here. The
  # NIF answers nil for any term it holds no lock for, and raises nothing.
  def started_at(optimizer_id) do
    if Telemetry.observed?(@completed) do
      case DSPex.Bridge.Native.lock_status(optimizer_id) do
        %{started_at: us} when is_integer(us) -> us
        _ -> nil
      end
    end
  end

  # A holder lost its lock: `:lock_released`, and when it held no other
  # lock `:completed` (released) or `:failed` (anything else). `started_at`
  # (see `started_at/1`) adds `duration_us` to `:completed`.
  def ended(key, optimizer_id, token, finished, reason, started_at \\ nil) do
    {over, over?} =
      if reason == :released,
        do: {@completed, Telemetry.observed?(@completed)},
        else: {@failed, Telemetry.observed?(@failed)}

    released? = Telemetry.observed?(@lock_released)

    if released? do
      Telemetry.execute(@lock_released, now(), %{
        key: key,
        optimizer_id: optimizer_id,
        token: token,
        reason: reason
      })
    end

    cond do
      not (finished and over?) ->
        :ok

      reason == :released ->
        Telemetry.execute(over, completed_measurements(started_at), %{
          optimizer_id: optimizer_id,
          key: key
        })

      true ->
        Telemetry.execute(over, now(), %{optimizer_id: optimizer_id, key: key, reason: reason})
    end

    :ok
  end

  defp completed_measurements(nil), do: now()

  defp completed_measurements(started_at) do
    now = System.system_time()
    us = System.convert_time_unit(now, :native, :microsecond)
    %{system_time: now, duration_us: max(us - started_at, 0)}
  end
end
