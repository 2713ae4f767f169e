Code.require_file("../../bench/chaos/lib/history.ex", __DIR__)
Code.require_file("../../bench/chaos/lib/checker.ex", __DIR__)
Code.require_file("../../bench/chaos/lib/report.ex", __DIR__)

defmodule DSPex.Chaos.CheckerTest do
  # The chaos run's checker on histories made by hand: each violation it
  # exists to find is found, and what is allowed passes.
  use ExUnit.Case, async: true

  alias DSPex.Chaos.{Checker, History, Report}

  @t0 1_700_000_000_000_000

  defp op(fields) do
    Map.merge(
      %{
        path: :nif,
        client: "c1",
        sid: "s",
        epoch: 0,
        op: :write,
        writes: [],
        read: nil,
        start_us: @t0,
        dur_us: 100,
        timeout_ms: 1_000,
        outcome: :ok,
        cache: false
      },
      Map.new(fields)
    )
  end

  defp history(ops, vars \\ [{"s", 0, :x}]) do
    h =
      Enum.reduce(vars, History.new(), fn {sid, e, v}, h -> History.declare(h, sid, e, v, 0) end)

    Enum.reduce(ops, h, &History.record(&2, &1))
  end

  defp write(value, outcome, at \\ 0),
    do: op(writes: [{:x, value}], outcome: outcome, start_us: @t0 + at)

  defp check(h, finals, faults \\ [], extra \\ []), do: Checker.check(h, finals, faults, extra)

  describe "acknowledged writes" do
    test "the last acknowledged value read back passes" do
      h = history([write(1, :ok), write(2, :ok, 10)])
      assert %{ok: true, acked_writes: 2} = check(h, %{{"s", :x} => {:ok, 2}})
    end

    test "a value below the last acknowledged one is a lost write" do
      h = history([write(1, :ok), write(2, :ok, 10)])
      result = check(h, %{{"s", :x} => {:ok, 1}})
      refute result.ok
      assert [%{sid: "s", var: :x, read: 1, acked_max: 2}] = result.violations.lost
    end

    test "the initial value after an acknowledged write is a lost write" do
      h = history([write(5, :ok)])
      assert [%{read: 0}] = check(h, %{{"s", :x} => {:ok, 0}}).violations.lost
    end

    test "a later write of unknown outcome may be what is read back" do
      h = history([write(1, :ok), write(2, {:unknown, :timeout_unknown_outcome}, 10)])

      for read <- [1, 2] do
        assert %{lost: [], phantom: []} = check(h, %{{"s", :x} => {:ok, read}}).violations
      end
    end

    test "an unknown write older than an acknowledged one landing last is a lost write" do
      h = history([write(1, {:unknown, :timeout}), write(2, :ok, 10)])
      assert [%{read: 1, acked_max: 2}] = check(h, %{{"s", :x} => {:ok, 1}}).violations.lost
    end

    test "a refused or failed write read back is a phantom" do
      h = history([write(1, :ok), write(2, {:refused, :version_mismatch}, 10)])
      assert [%{read: 2}] = check(h, %{{"s", :x} => {:ok, 2}}).violations.phantom

      h = history([write(1, {:fail, :circuit_open})])
      assert [%{read: 1}] = check(h, %{{"s", :x} => {:ok, 1}}).violations.phantom
    end

    test "a variable that cannot be read back fails the run" do
      h = history([write(1, :ok)])

      assert [%{read: :circuit_open}] =
               check(h, %{{"s", :x} => {:error, :circuit_open}}).violations.unreadable

      assert [%{read: :not_read}] = check(h, %{}).violations.unreadable
    end

    test "a batch acknowledges each of its writes" do
      vars = [{"s", 0, :a}, {"s", 0, :b}]
      h = history([op(op: :batch, writes: [{:a, 1}, {:b, 2}])], vars)
      assert check(h, %{{"s", :a} => {:ok, 1}, {"s", :b} => {:ok, 2}}).ok

      assert [%{var: :b}] =
               check(h, %{{"s", :a} => {:ok, 1}, {"s", :b} => {:ok, 0}}).violations.lost
    end
  end

  describe "sessions created again (epochs)" do
    setup do
      vars = [{"s", 0, :x}, {"s", 1, :x}]

      ops = [
        write(1, :ok, 0),
        op(writes: [{:x, 2}], outcome: {:fail, :session_not_found}, start_us: @t0 + 2_000_000)
      ]

      h = history(ops, vars) |> History.recreated("s", 1, @t0 + 3_000_000)
      h = History.record(h, op(epoch: 1, writes: [{:x, 3}], start_us: @t0 + 4_000_000))
      %{h: h}
    end

    test "writes that ended with a session a fault destroys by design are counted apart", %{h: h} do
      kill = %{
        name: :port_kill,
        paths: [:nif],
        at_us: @t0 + 1_000_000,
        healed_us: @t0 + 1_100_000,
        until_us: @t0 + 9_000_000,
        ends_sessions: [:nif]
      }

      result = check(h, %{{"s", :x} => {:ok, 3}}, [kill])
      assert result.ok
      assert result.ended_with_session == %{variables: 1, acked_writes: 1}
    end

    test "a session that vanished with no such fault lost its writes", %{h: h} do
      result = check(h, %{{"s", :x} => {:ok, 3}})
      assert [%{epoch: 0, read: {:session_vanished, _}}] = result.violations.lost
    end
  end

  describe "timeouts" do
    test "a call answered after its timeout is late" do
      h = history([op(op: :read, dur_us: 3_000_000, timeout_ms: 1_000)])
      assert [%{op: :read, late: true}] = check(h, %{{"s", :x} => {:ok, 0}}).violations.late
    end

    test "a call answered within its timeout is not" do
      h =
        history([op(op: :read, dur_us: 1_100_000, timeout_ms: 1_000, outcome: {:fail, :timeout})])

      assert check(h, %{{"s", :x} => {:ok, 0}}).violations.late == []
    end

    test "calls that never answered are the runner's to report, and fail the run" do
      h = history([])
      refute check(h, %{{"s", :x} => {:ok, 0}}, [], hung: [%{client: "c1"}]).ok
    end
  end

  describe "reads" do
    test "a read older than an acknowledged write is stale" do
      h = history([write(4, :ok), op(op: :read, read: {:x, 3}, start_us: @t0 + 10)])
      assert [%{stale: true, read: {:x, 3}}] = check(h, %{{"s", :x} => {:ok, 4}}).violations.stale
    end

    test "a read of the last write, or of a later unknown one, is not" do
      h =
        history([
          write(4, :ok),
          op(op: :read, read: {:x, 4}, start_us: @t0 + 10),
          write(5, {:unknown, :timeout}, 20),
          op(op: :read, read: {:x, 5}, start_us: @t0 + 30)
        ])

      assert check(h, %{{"s", :x} => {:ok, 5}}).violations.stale == []
    end
  end

  describe "recovery" do
    defp fault(at),
      do: %{name: :f, paths: [:nif], at_us: at, healed_us: at, until_us: at + 10_000_000}

    test "the first success after the first failure, per session, from the fault's time" do
      at = @t0 + 1_000_000

      h =
        history(
          [
            op(op: :read, start_us: at + 100_000, outcome: {:fail, :backend_unavailable}),
            op(op: :read, start_us: at + 300_000, outcome: {:fail, :circuit_open}),
            # served from the cache: not a recovery
            op(op: :read, start_us: at + 400_000, cache: true),
            op(op: :read, start_us: at + 500_000 - 100),
            op(sid: "t", op: :read, start_us: at + 200_000, outcome: {:fail, :timeout}),
            op(sid: "t", op: :read, start_us: at + 250_000 - 100)
          ],
          []
        )

      [f] = check(h, %{}, [fault(at)]).faults
      assert f.affected_sessions == 2
      assert f.errors == 3
      # the first success after the first error: session "t" at 250 ms
      assert f.recovery_ms == 250.0
      assert f.sessions_recovered_ms_max == 500.0
      assert f.sessions_recovered_ms_p50 == 500.0
      assert f.first_error_ms == 100.1
      assert f.last_error_ms == 300.1
      assert f.unrecovered_in_window == 0
      assert %{"nif:read:fail:circuit_open" => 1} = f.errors_by_reason
    end

    test "errors on other paths in the window are reported as collateral" do
      at = @t0

      h =
        history(
          [op(path: :raft, op: :read, start_us: at + 1, outcome: {:fail, :timeout})],
          []
        )

      assert [%{collateral_errors: %{"raft:read:fail:timeout" => 1}, errors: 0}] =
               check(h, %{}, [fault(at)]).faults
    end

    test "a session still failing when the run stops fails it" do
      h = history([op(op: :read, outcome: {:fail, :timeout})], [])
      assert [%{sid: "s", lane: :data}] = check(h, %{}).violations.unrecovered
    end
  end

  test "latency percentiles come from the quarter-octave histogram" do
    hist = [{History.quarter_octave(10), 98}, {History.quarter_octave(1_000), 2}]
    p50 = Checker.percentile(hist, 0.5)
    p99 = Checker.percentile(hist, 0.99)
    assert p50 >= 10 and p50 < 12
    assert p99 >= 1_000 and p99 < 1_200
  end

  test "an operation's trace line carries its intent, times and outcome" do
    line =
      op(writes: [{:x, 7}], dur_us: 42, outcome: {:unknown, :timeout_unknown_outcome})
      |> History.trace_line()
      |> IO.iodata_to_binary()

    assert line ==
             "nif\tc1\ts\t0\twrite\tx=7\t#{@t0}\t42\t1000\tunknown\ttimeout_unknown_outcome\t\tfalse\n"
  end

  test "the JSON encoder escapes what needs it" do
    json = IO.iodata_to_binary(Report.json(%{a: [1, 2.5, nil, true], b: "q\"\n", c: {:x, "y"}}))
    assert json =~ ~s("b":"q\\"\\n")
    assert json =~ ~s("a":[1,2.5,null,true])
    assert json =~ ~s("c":["x","y"])
  end
end
