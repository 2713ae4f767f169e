defmodule DSPex.Bridge.DeadLetterQueueTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{CircuitBreaker, DeadLetterQueue}
  alias DSPex.TelemetryHelper

  @moduletag :tmp_dir

  defp start(ctx, opts \\ []) do
    name = :"dlq_test_#{System.unique_integer([:positive])}"
    opts = Keyword.merge([name: name, dir: ctx.tmp_dir], opts)
    pid = start_supervised!({DeadLetterQueue, opts}, id: name, restart: :temporary)
    {name, pid}
  end

  defp write(op, n, extra \\ %{}) do
    Map.merge(
      %{
        kind: :write,
        op: op,
        args: ["s#{n}", n],
        backend: :test,
        session_id: "s#{n}",
        attempts: [
          %{error: :backend_unavailable, at: 1_000 + n},
          %{error: :circuit_open, at: 2_000 + n}
        ]
      },
      extra
    )
  end

  test "an entry keeps its operation, arguments, every attempt, first and last failure", ctx do
    {q, _} = start(ctx)
    assert {:ok, id} = DeadLetterQueue.add(write("var_set", 1), server: q)

    assert {:ok, e} = DeadLetterQueue.get(id, server: q)
    assert %{op: "var_set", args: ["s1", 1], kind: :write, session_id: "s1"} = e
    assert [%{error: :backend_unavailable}, %{error: :circuit_open}] = e.attempts
    assert {e.first_failure_at, e.last_failure_at, e.last_error} == {1_001, 2_001, :circuit_open}
  end

  test "list filters; stats count depth, bytes and the oldest age", ctx do
    {q, _} = start(ctx)
    {:ok, a} = DeadLetterQueue.add(write("var_set", 1), server: q)
    {:ok, b} = DeadLetterQueue.add(write("acl_set_rules", 2), server: q)

    {:ok, c} =
      DeadLetterQueue.add(%{kind: :propagation, op: :recompute, session_id: "s1"}, server: q)

    ids = fn filter ->
      {:ok, l} = DeadLetterQueue.list([server: q] ++ filter)
      Enum.map(l, & &1.id)
    end

    assert ids.([]) == [a, b, c]
    assert ids.(kind: :write) == [a, b]
    assert ids.(op: "acl_set_rules") == [b]
    assert ids.(session_id: "s1") == [a, c]
    assert ids.(limit: 1) == [a]
    assert ids.(ids: [c, a]) == [a, c]
    # The writes failed first at 1 s after the epoch: decades ago.
    assert ids.(older_than_ms: 3_600_000) == [a, b]

    s = DeadLetterQueue.stats(server: q)
    assert %{depth: 3, by_kind: %{write: 2, propagation: 1}, added_total: 3} = s
    assert s.bytes > 0
    assert s.oldest_age_ms > 1_000_000_000
  end

  test "bad input is a clear error", ctx do
    {q, _} = start(ctx)
    assert {:error, {:invalid_argument, {:entry, %{}}}} = DeadLetterQueue.add(%{}, server: q)

    assert {:error, {:invalid_argument, {:attempts, [:x]}}} =
             DeadLetterQueue.add(%{kind: :write, op: "x", attempts: [:x]}, server: q)

    assert {:error, {:invalid_argument, {:unknown_option, :colour}}} =
             DeadLetterQueue.list(colour: :red, server: q)

    assert {:error, {:invalid_argument, {:kind, :other}}} =
             DeadLetterQueue.list(kind: :other, server: q)

    assert {:error, {:invalid_argument, {:id, -1}}} = DeadLetterQueue.get(-1, server: q)
    assert {:error, :not_found} = DeadLetterQueue.get(12_345, server: q)
    assert {:error, :not_found} = DeadLetterQueue.replay(12_345, server: q)
    assert {:error, :not_found} = DeadLetterQueue.drop(12_345, server: q)

    assert {:error, {:invalid_argument, {:selector, "x"}}} =
             DeadLetterQueue.replay("x", server: q)

    assert {:error, {:invalid_argument, {:rate, 0}}} =
             DeadLetterQueue.replay(:all, server: q, rate: 0)

    assert {:error, {:unavailable, :not_running}} = DeadLetterQueue.list(server: :no_such_dlq)
    # Answered, without an exit signal to the caller (which does not trap
    # exits), and nothing started.
    assert {:error, {:invalid_argument, {:max_entries, 0}}} =
             DeadLetterQueue.start_link(name: :dlq_bad, dir: ctx.tmp_dir, max_entries: 0)

    assert {:error, {:invalid_argument, {:unknown_options, [:max_entrys]}}} =
             DeadLetterQueue.start_link(name: :dlq_bad, dir: ctx.tmp_dir, max_entrys: 1)

    refute Process.whereis(:dlq_bad)
  end

  test "it survives a restart, and ids are never given twice", ctx do
    {q, pid} = start(ctx)
    # Entries hold written values: the directory is the owner's only.
    assert File.stat!(ctx.tmp_dir).mode |> Bitwise.band(0o077) == 0
    {:ok, a} = DeadLetterQueue.add(write("var_set", 1), server: q)
    {:ok, b} = DeadLetterQueue.add(write("var_set", 2), server: q)
    {:ok, 1} = DeadLetterQueue.drop(b, server: q, by: "test")
    GenServer.stop(pid)

    {q, _} = start(ctx)
    assert {:ok, [%{id: ^a, op: "var_set", attempts: [_, _]}]} = DeadLetterQueue.list(server: q)
    assert {:ok, c} = DeadLetterQueue.add(write("var_set", 3), server: q)
    assert c > b
    assert {:ok, [%{action: :dropped, id: ^b, by: "test"}]} = DeadLetterQueue.audit_log(server: q)
  end

  test "past max_entries, max_bytes or max_per_session the oldest go, each with an event", ctx do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :dlq, :evicted]])
    {q, _} = start(ctx, max_entries: 2, max_per_session: 2)
    {:ok, a} = DeadLetterQueue.add(write("var_set", 1), server: q)
    {:ok, b} = DeadLetterQueue.add(write("var_set", 2), server: q)
    {:ok, c} = DeadLetterQueue.add(write("var_set", 3), server: q)
    assert_receive {_, ^ref, _, %{id: ^a, why: :max_entries}}
    assert {:ok, [%{id: ^b}, %{id: ^c}]} = DeadLetterQueue.list(server: q)

    {:ok, d} = DeadLetterQueue.add(write("var_set", 3), server: q)
    {:ok, _} = DeadLetterQueue.add(write("var_set", 3), server: q)
    assert_receive {_, ^ref, _, %{id: ^b, why: :max_entries}}
    assert_receive {_, ^ref, _, %{id: ^c, why: :max_per_session}}
    refute_received {_, ^ref, _, %{id: ^d}}
    assert %{depth: 2, evicted_total: 3} = DeadLetterQueue.stats(server: q)

    {small, _} = start(ctx, dir: Path.join(ctx.tmp_dir, "small"), max_bytes: 600)
    {:ok, x} = DeadLetterQueue.add(write("var_set", 1), server: small)
    {:ok, _} = DeadLetterQueue.add(write("var_set", 2), server: small)
    assert_receive {_, ^ref, _, %{id: ^x, why: :max_bytes}}
    big = write("var_set", 1, %{args: [:binary.copy("x", 1_000)]})
    assert {:error, :too_large} = DeadLetterQueue.add(big, server: small)
  end

  test "drop is audited: an event, a record with who and why; by filter and :all", ctx do
    ref = TelemetryHelper.attach([[:dspex, :bridge, :dlq, :dropped]])
    {q, _} = start(ctx)
    {:ok, a} = DeadLetterQueue.add(write("var_set", 1), server: q)
    {:ok, _} = DeadLetterQueue.add(write("var_set", 2), server: q)
    {:ok, _} = DeadLetterQueue.add(write("acl_set_rules", 3), server: q)

    assert {:ok, 1} = DeadLetterQueue.drop(a, server: q, by: "alice", reason: "obsolete")
    assert_receive {_, ^ref, _, %{id: ^a, by: "alice", reason: "obsolete", op: "var_set"}}
    assert {:ok, 1} = DeadLetterQueue.drop([op: "var_set"], server: q, by: "bob")
    assert {:ok, 1} = DeadLetterQueue.drop(:all, server: q)
    assert %{depth: 0, dropped_total: 3, oldest_age_ms: nil} = DeadLetterQueue.stats(server: q)

    assert {:ok, [%{by: "unknown"}, %{by: "bob"}, %{by: "alice", entry: %{id: ^a}}]} =
             DeadLetterQueue.audit_log(server: q)
  end

  test "replay is refused while an entry's breaker is open", ctx do
    {q, _} = start(ctx)
    breaker = {:dlq_test, System.unique_integer([:positive])}
    :ok = CircuitBreaker.install(breaker)
    :ok = CircuitBreaker.force_open(breaker)
    {:ok, id} = DeadLetterQueue.add(write("var_set", 1, %{breaker: breaker}), server: q)

    assert {:error, :circuit_open} = DeadLetterQueue.replay(id, server: q)
    assert {:error, :circuit_open} = DeadLetterQueue.replay(:all, server: q)
    assert {:ok, [%{id: ^id}]} = DeadLetterQueue.list(server: q)
    CircuitBreaker.remove(breaker)
  end

  test "gauges in the Prometheus text", ctx do
    {q, _} = start(ctx)
    {:ok, _} = DeadLetterQueue.add(write("var_set", 1), server: q)
    text = q |> then(&DeadLetterQueue.prometheus_text(server: &1)) |> IO.iodata_to_binary()
    assert text =~ "# TYPE dspex_dlq_depth gauge\ndspex_dlq_depth 1\n"
    assert text =~ ~s(dspex_dlq_depth{kind="write"} 1\n)
    assert text =~ "dspex_dlq_oldest_age_seconds "
    assert text =~ "dspex_dlq_bytes "
    assert DeadLetterQueue.prometheus_text(server: :no_such_dlq) == []
  end

  test "a directory that cannot be used: entries refused, nothing crashes", ctx do
    file = Path.join(ctx.tmp_dir, "a_file")
    File.write!(file, "")
    {q, _} = start(ctx, dir: Path.join(file, "sub"))
    assert {:error, {:unavailable, _}} = DeadLetterQueue.add(write("var_set", 1), server: q)
    assert {:error, {:unavailable, _}} = DeadLetterQueue.list(server: q)
  end
end
