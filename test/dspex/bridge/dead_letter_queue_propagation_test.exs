defmodule DSPex.Bridge.DeadLetterQueuePropagationTest do
  @moduledoc "Failed propagations live in the one dead-letter queue."
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{DeadLetterQueue, DependencyManager, SessionStore}

  setup do
    sid = "dlq_propagation_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :n, :float, 1.0)
    {:ok, _} = DependencyManager.defderived(sid, :inv, :float, [:n], &(1 / &1.n))
    :ok = SessionStore.update_variable(sid, :n, 0)
    :ok = DependencyManager.await_propagation(sid)
    %{sid: sid}
  end

  test "a failed recomputation is a queue entry; the session's view is a filter of it", %{
    sid: sid
  } do
    assert {:ok, [%{variable: :inv, id: 1, dlq_id: dlq_id, reason: %ArithmeticError{}}]} =
             DependencyManager.dead_letters(sid)

    assert {:ok, [entry]} = DeadLetterQueue.list(kind: :propagation, session_id: sid)
    assert %{id: ^dlq_id, op: :recompute, args: [^sid, :inv]} = entry
    assert [%{error: %ArithmeticError{}, at: at}] = entry.attempts
    assert entry.first_failure_at == at
  end

  test "replayed from the queue, per session, once the input is fixed", %{sid: sid} do
    {:ok, [%{dlq_id: dlq_id}]} = DependencyManager.dead_letters(sid)
    :ok = SessionStore.update_variable(sid, :n, 4.0)
    :ok = DependencyManager.await_propagation(sid)

    assert {:ok, %{replayed: 1, failed: 0}} = DeadLetterQueue.replay(dlq_id)
    assert {:ok, []} = DependencyManager.dead_letters(sid)
    assert {:error, :not_found} = DeadLetterQueue.get(dlq_id)
    assert SessionStore.get_variable_value(sid, :inv) == 0.25
  end

  test "a closed session's letters leave the queue, audited", %{sid: sid} do
    ref = DSPex.TelemetryHelper.attach([[:dspex, :bridge, :dlq, :dropped]])
    {:ok, [%{dlq_id: dlq_id}]} = DependencyManager.dead_letters(sid)
    :ok = SessionStore.delete_session(sid)
    # The session's worker stops, then its letters go.
    assert_receive {_, ^ref, _, %{id: ^dlq_id, by: :dspex_bridge, reason: :session_closed}}, 5_000
    assert {:error, :not_found} = DeadLetterQueue.get(dlq_id)
    {:ok, audit} = DeadLetterQueue.audit_log()

    assert Enum.any?(
             audit,
             &match?(%{id: ^dlq_id, action: :dropped, reason: :session_closed}, &1)
           )
  end
end
