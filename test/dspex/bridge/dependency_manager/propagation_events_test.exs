defmodule DSPex.Bridge.DependencyManager.PropagationEventsTest do
  # A propagation pass is a span, as `:telemetry.span/3` makes one: `:start`
  # then `:stop`, paired by `telemetry_span_context`; a failure inside the
  # pass is a `:failed` event carrying the pass's context, and never an
  # `:exception` (which would end the span).
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{DeadLetterQueue, DependencyManager, SessionStore}
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.TelemetryHelper

  @start [:dspex, :bridge, :propagation, :start]
  @stop [:dspex, :bridge, :propagation, :stop]
  @exception [:dspex, :bridge, :propagation, :exception]
  @failed [:dspex, :bridge, :propagation, :failed]

  setup do
    sid = "prop_events_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :n, :float, 1.0)
    %{sid: sid, ref: TelemetryHelper.attach([@start, @stop, @exception, @failed])}
  end

  test "a pass with a failed recomputation: start, failed, stop, one context", %{
    sid: sid,
    ref: ref
  } do
    {:ok, _} = DependencyManager.defderived(sid, :inv, :float, [:n], &(1 / &1.n))
    {:ok, _} = DependencyManager.defderived(sid, :ok, :float, [:n], &(&1.n + 1))
    :ok = SessionStore.update_variable(sid, :n, 0)
    :ok = DependencyManager.await_propagation(sid)

    assert_receive {@start, ^ref, %{system_time: _, monotonic_time: _},
                    %{session_id: ^sid, changed: [:n], telemetry_span_context: ctx}}

    assert is_reference(ctx)

    assert_receive {@failed, ^ref, %{duration: _, monotonic_time: _},
                    %{
                      session_id: ^sid,
                      variable: :inv,
                      kind: :error,
                      reason: %ArithmeticError{},
                      stacktrace: [_ | _],
                      caused_by: [%{variable: :n}],
                      telemetry_span_context: ^ctx
                    }}

    assert_receive {@stop, ^ref, %{recomputed: 1, failed: 1, duration: _},
                    %{session_id: ^sid, changed: [:n], telemetry_span_context: ^ctx}}

    refute_received {@exception, ^ref, _, _}
    # The failure is dead-lettered, in the one queue.
    assert {:ok, [%{op: :recompute, args: [^sid, :inv]}]} =
             DeadLetterQueue.list(kind: :propagation, session_id: sid)
  end

  test "a rejected propagate_change/5 write is a failure outside any pass", %{
    sid: sid,
    ref: ref
  } do
    assert {:error, _} = DependencyManager.propagate_change(sid, :n, "not a float")

    assert_receive {@failed, ^ref, %{duration: _, monotonic_time: _},
                    %{
                      session_id: ^sid,
                      variable: :n,
                      kind: :error,
                      reason: {:write_rejected, _},
                      telemetry_span_context: nil
                    }}

    refute_received {@exception, ^ref, _, _}

    assert {:ok, [%{variable: :n, reason: {:write_rejected, _}}]} =
             DependencyManager.dead_letters(sid)
  end

  test "a worker killed mid-pass: the failure names the pass it ended", %{sid: sid, ref: ref} do
    test = self()
    # Held once: the restarted worker's recomputation goes through.
    once = :atomics.new(1, [])

    {:ok, _} =
      DependencyManager.defderived(sid, :held, :float, [:n], fn %{n: n} ->
        if n == 2.0 and :atomics.compare_exchange(once, 1, 0, 1) == :ok do
          send(test, :holding)
          receive do: (:never -> :ok)
        end

        n
      end)

    worker = Propagator.whereis(sid)
    :ok = SessionStore.update_variable(sid, :n, 2.0)
    assert_receive {@start, ^ref, _, %{session_id: ^sid, telemetry_span_context: ctx}}
    assert_receive :holding
    Process.exit(worker, :kill)

    assert_receive {@failed, ^ref, %{duration: _},
                    %{
                      session_id: ^sid,
                      variable: nil,
                      kind: :exit,
                      reason: {:worker_exit, :killed},
                      caused_by: [],
                      telemetry_span_context: ^ctx
                    }}

    refute_received {@stop, ^ref, _, %{telemetry_span_context: ^ctx}}
    refute_received {@exception, ^ref, _, _}
    :ok = DependencyManager.await_propagation(sid)
    assert SessionStore.get_variable_value(sid, :held) == 2.0
  end
end
