defmodule DSPex.Bridge.AnalyticsTest do
  # Analytics is one named server with a global handler: not async.
  use ExUnit.Case, async: false
  import Bitwise

  alias DSPex.Bridge.{Analytics, Native, SessionStore, Telemetry}

  @relative_error 1 / 128

  defp start(opts \\ []) do
    start_supervised!({Analytics, Keyword.merge([aggregation_interval: 100], opts)})
    :ok
  end

  defp now, do: System.os_time(:microsecond)

  defp last_hour(type, agg) do
    {:ok, v} = Analytics.get_metrics(type, now() - 3_600_000_000, now(), agg)
    v
  end

  describe "get_dashboard/0 (seed 002 integration case)" do
    setup do: start()

    test "tracks metrics via telemetry" do
      meta = %{session_id: "test", variable_id: "var1"}
      Telemetry.execute([:dspex, :bridge, :variable, :read], %{duration_us: 150}, meta)
      Telemetry.execute([:dspex, :bridge, :variable, :write], %{duration_us: 500}, meta)
      Telemetry.execute([:dspex, :bridge, :cache, :hit], %{}, meta)

      dashboard = Analytics.get_dashboard()

      assert dashboard.last_minute.variable_reads == 1
      assert dashboard.last_minute.variable_writes == 1
      assert dashboard.last_minute.avg_read_latency == 150.0
      assert dashboard.last_minute.avg_write_latency == 500.0
      assert dashboard.last_minute.cache_hit_rate == 1.0
    end

    test "has exactly the seed's shape" do
      dashboard = Analytics.get_dashboard()

      assert dashboard |> Map.keys() |> Enum.sort() == [:last_hour, :last_minute]

      assert dashboard.last_minute |> Map.keys() |> Enum.sort() ==
               Enum.sort([
                 :variable_reads,
                 :variable_writes,
                 :avg_read_latency,
                 :avg_write_latency,
                 :cache_hit_rate
               ])

      assert dashboard.last_hour |> Map.keys() |> Enum.sort() ==
               Enum.sort([
                 :total_operations,
                 :error_rate,
                 :p95_latency,
                 :active_sessions,
                 :optimization_success_rate
               ])

      assert %{variable_reads: 0, avg_read_latency: nil, cache_hit_rate: +0.0} =
               dashboard.last_minute

      assert %{total_operations: 0, error_rate: +0.0, p95_latency: nil} = dashboard.last_hour
    end

    test "counts events of the real code paths, errors and optimizations" do
      sid = "analytics-#{System.unique_integer([:positive])}"
      {:ok, ^sid} = SessionStore.create_session(sid)
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
      :ok = SessionStore.update_variable(sid, :x, 2)
      assert 2 == SessionStore.get_variable_value(sid, :x)

      assert {:error, {:version_mismatch, _}} =
               SessionStore.update_variable(sid, :x, 3, %{expected_version: 0})

      Telemetry.execute([:dspex, :optimization, :started], %{}, %{})
      Telemetry.execute([:dspex, :optimization, :completed], %{duration_ms: 40}, %{})
      Telemetry.execute([:dspex, :optimization, :started], %{}, %{})
      Telemetry.execute([:dspex, :optimization, :failed], %{}, %{})

      d = Analytics.get_dashboard()
      assert d.last_minute.variable_reads == 1
      assert d.last_minute.variable_writes == 1
      assert d.last_hour.total_operations == 4
      assert d.last_hour.error_rate == 0.25
      assert d.last_hour.optimization_success_rate == 0.5
      assert d.last_hour.active_sessions >= 1
      assert is_float(d.last_hour.p95_latency)
      assert last_hour(:session_created, :count) >= 1
      assert last_hour(:optimization_duration, :max) == 40.0
      SessionStore.delete_session(sid)
    end
  end

  describe "get_metrics/4" do
    setup do: start()

    test "percentiles match a sorted reference on random data; counts are exact" do
      :rand.seed(:exsss, {7, 11, 13})

      values =
        for _ <- 1..20_000 do
          case :rand.uniform(3) do
            1 -> :rand.uniform() * 1_000_000
            2 -> :rand.uniform(5_000)
            3 -> :math.exp(:rand.normal() * 3)
          end
        end

      for v <- values, do: :ok = Analytics.record_metric(:random, v)
      sorted = Enum.sort(values)
      n = length(sorted)

      for {agg, q} <- [p50: 0.5, p95: 0.95, p99: 0.99] do
        want = Enum.at(sorted, max(ceil(q * n), 1) - 1)
        got = last_hour(:random, agg)
        assert abs(got - want) <= want * @relative_error, "#{agg}: want #{want}, got #{got}"
      end

      assert last_hour(:random, :count) == n
      assert last_hour(:random, :min) == hd(sorted) * 1.0
      assert last_hour(:random, :max) == List.last(sorted) * 1.0
      assert_in_delta last_hour(:random, :sum), Enum.sum(values), 1.0e-6 * Enum.sum(values)
      assert_in_delta last_hour(:random, :avg), Enum.sum(values) / n, 1.0e-6 * Enum.sum(values)
    end

    test "derived types merge their sources" do
      :ok = Analytics.record_metric(:variable_read, 100)
      :ok = Analytics.record_metric(:variable_write, 300)
      assert last_hour(:read_latency, :avg) == 100.0
      assert last_hour(:write_latency, :avg) == 300.0
      assert last_hour(:operation_latency, :count) == 2
      assert last_hour(:operation_latency, :avg) == 200.0
    end

    test "accepts DateTimes and string types; empty ranges give nil, counts 0" do
      :ok = Analytics.record_metric("custom.loss", 0.5, %{trial: 1})
      from = DateTime.add(DateTime.utc_now(), -60, :second)
      to = DateTime.add(DateTime.utc_now(), 1, :second)
      assert {:ok, 0.5} = Analytics.get_metrics("custom.loss", from, to, :max)
      assert {:ok, nil} = Analytics.get_metrics(:never_recorded, from, to, :p99)
      assert {:ok, 0} = Analytics.get_metrics(:never_recorded, from, to, :count)
      assert {:ok, 0} = Analytics.get_metrics("custom.loss", 0, 1_000, :count)
    end

    test "bad input is an error, never a crash" do
      assert {:error, {:invalid_argument, _}} = Analytics.record_metric(:x, "12")
      assert {:error, {:invalid_argument, _}} = Analytics.record_metric({:x}, 1)
      assert {:error, {:invalid_argument, _}} = Analytics.record_metric(:x, nil)

      assert {:error, {:invalid_argument, _}} =
               Analytics.record_metric(String.duplicate("n", 300), 1)

      assert {:error, {:invalid_argument, _}} = Analytics.record_metric("", 1)
      assert {:error, {:invalid_argument, _}} = Analytics.get_metrics(:x, 0, 10, :median)
      assert {:error, {:invalid_argument, _}} = Analytics.get_metrics(:x, 10, 0, :avg)
      assert {:error, {:invalid_argument, _}} = Analytics.get_metrics(:x, "yesterday", 0, :avg)
      assert {:error, {:invalid_argument, _}} = Analytics.get_metrics(:x, 0, 10.5, :avg)
      assert {:ok, nil} = Analytics.get_metrics(:x, -1, 1 <<< 62, :avg)
      assert {:error, {:invalid_argument, _}} = Analytics.get_detailed_metrics(:x, 0, 1 <<< 62)
      assert {:error, {:invalid_argument, _}} = Analytics.get_detailed_metrics(:x, :yesterday, 0)
      assert {:ok, %{count: 0, avg: nil, buckets: []}} = Analytics.get_detailed_metrics(:x, 0, 10)
      assert {:error, {:invalid_argument, _}} = Analytics.get_metrics(:x, 0, 1 <<< 64, :avg)
      # Past the limit on distinct types (1024), recording says so.
      results = for i <- 1..1100, do: Analytics.record_metric("t#{i}", 1)
      assert {:error, {:invalid_argument, {:too_many_metrics, 1024}}} = List.last(results)
    end

    test "types of one's own are capped, and the built-in types keep counting past the cap" do
      results = for i <- 1..1024, do: Analytics.record_metric("mine.#{i}", 1)
      assert Enum.all?(results, &(&1 == :ok))

      assert {:error, {:invalid_argument, {:too_many_metrics, 1024}}} =
               Analytics.record_metric("mine.1025", 1)

      # A known type of one's own still records.
      assert :ok = Analytics.record_metric("mine.1", 2)

      meta = %{session_id: "s", variable: :v}
      Telemetry.execute([:dspex, :bridge, :variable, :read], %{duration_us: 7}, meta)
      Telemetry.execute([:dspex, :bridge, :variable, :write], %{duration_us: 9}, meta)
      Telemetry.execute([:dspex, :bridge, :cache, :miss], %{}, meta)
      :ok = Analytics.record_metric(:variable_read, 5)

      assert last_hour(:variable_read, :count) == 2
      assert last_hour(:variable_write, :sum) == 9.0
      assert last_hour(:cache_miss, :count) == 1
      assert Analytics.get_dashboard().last_minute.variable_writes == 1
      # The 1024 types of one's own, the three built-in types above, and any
      # built-in type another part of the running application recorded
      # meanwhile (a built-in type is never refused).
      assert {:ok, %{metrics: n}} = Analytics.stats()
      assert n >= 1024 + 3

      # A reset empties the store; the built-in types keep their room.
      :ok = Analytics.reset()
      for i <- 1..1024, do: :ok = Analytics.record_metric("again.#{i}", 1)
      Telemetry.execute([:dspex, :bridge, :variable, :read], %{duration_us: 7}, meta)
      assert last_hour(:variable_read, :count) == 1
    end

    test "nil, true, false and derived types are refused as names" do
      for bad <- [nil, true, false] do
        assert {:error, {:invalid_argument, {:bad_metric_type, ^bad}}} =
                 Analytics.record_metric(bad, 1)

        assert {:error, {:invalid_argument, {:bad_metric_type, ^bad}}} =
                 Analytics.get_metrics(bad, 0, 1, :avg)

        assert {:error, {:invalid_argument, {:bad_metric_type, ^bad}}} =
                 Analytics.get_detailed_metrics(bad, 0, 1)
      end

      # A derived type is read-only: a sample recorded under it would never be read.
      for derived <- [:read_latency, :write_latency, :operation_latency, :operation_error] do
        assert {:error, {:invalid_argument, {:bad_metric_type, ^derived}}} =
                 Analytics.record_metric(derived, 1)
      end

      assert {:error, {:invalid_argument, {:bad_value, "1"}}} = Analytics.record_metric(:x, "1")
      assert {:ok, %{metrics: 0}} = Analytics.stats()
    end

    test "concurrent recording from many processes loses nothing" do
      1..8
      |> Enum.map(fn p ->
        Task.async(fn -> for i <- 1..5_000, do: :ok = Analytics.record_metric(:conc, p * i) end)
      end)
      |> Task.await_many(30_000)

      assert last_hour(:conc, :count) == 40_000
      assert last_hour(:conc, :sum) == Enum.sum(for p <- 1..8, i <- 1..5_000, do: p * i) * 1.0
    end
  end

  describe "retention" do
    test "old buckets are dropped" do
      start(aggregation_interval: 20, retention_period: 100)
      :ok = Analytics.record_metric(:short_lived, 1)
      assert last_hour(:short_lived, :count) == 1
      assert {:ok, %{buckets: buckets}} = Analytics.stats()
      assert buckets >= 1
      # The server ages buckets every 20 ms on its own timer, with no event:
      # once the retention has passed, one of its rounds drops them.
      assert DSPex.Wait.until(fn -> last_hour(:short_lived, :count) == 0 end)
      assert {:ok, %{buckets: 0}} = Analytics.stats()
    end

    test "start_link answers bad options with an error, and starts nothing" do
      for {opts, detail} <- [
            {[aggregation_interval: 0], {:aggregation_interval, 0}},
            {[aggregation_interval: 1000, retention_period: 10], {:retention_period, 10}},
            {[retention_period: :forever], {:retention_period, :forever}},
            {[aggregation_intreval: 10], {:unknown_options, [:aggregation_intreval]}},
            {:nope, {:bad_options, :nope}}
          ] do
        assert Analytics.start_link(opts) == {:error, {:invalid_argument, detail}}
      end

      refute Analytics.running?()
    end
  end

  describe "when not running" do
    test "queries say so and the dashboard is empty" do
      refute Analytics.running?()
      assert {:error, :not_running} = Analytics.record_metric(:x, 1)
      assert {:error, :not_running} = Analytics.get_metrics(:x, 0, 1, :avg)
      assert {:error, :not_running} = Analytics.get_detailed_metrics(:x, 0, 1)
      assert %{last_minute: %{variable_reads: 0}} = Analytics.get_dashboard()
      assert IO.iodata_to_binary(Analytics.prometheus_text()) =~ "dspex_analytics_running 0"
    end

    test "nothing is attached to the store's events" do
      refute Enum.any?(Telemetry.handlers([:dspex, :bridge, :variable, :read]), fn {id, _, _} ->
               id == {Analytics, :handler}
             end)
    end

    test "stopping detaches the handler" do
      start()
      assert Analytics.running?()
      assert Telemetry.enabled?([:dspex, :bridge, :variable, :read])
      stop_supervised!(Analytics)
      refute Analytics.running?()
      assert Telemetry.handlers([:dspex, :bridge, :variable, :read]) == []
    end
  end

  describe "handler failures" do
    setup do: start()

    test "a failing handler of someone else breaks neither the library nor Analytics" do
      sid = "analytics-fail-#{System.unique_integer([:positive])}"
      {:ok, _} = SessionStore.create_session(sid)
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)

      :ok =
        Telemetry.attach(
          "boom",
          [:dspex, :bridge, :variable, :read],
          fn _, _, _, _ ->
            raise "boom"
          end,
          nil
        )

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          assert 1 == SessionStore.get_variable_value(sid, :x)
          assert 1 == SessionStore.get_variable_value(sid, :x)
          assert DSPex.TelemetryHelper.await_detached([:dspex, :bridge, :variable, :read], "boom")
          Logger.flush()
        end)

      # The failing handler ran, was logged and detached; Analytics counted both.
      assert log =~ "boom"

      assert last_hour(:variable_read, :count) == 2
      SessionStore.delete_session(sid)
      Telemetry.detach("boom")
    end

    test "malformed measurements from other emitters are ignored, the handler stays" do
      read = [:dspex, :bridge, :variable, :read]
      Telemetry.execute(read, %{duration_us: "slow"}, %{})
      Telemetry.execute(read, %{}, :not_a_map)
      Telemetry.execute([:dspex, :optimization, :completed], %{duration_ms: :x}, %{})
      Telemetry.execute([:dspex, :bridge, :propagation, :stop], %{}, %{})
      Telemetry.execute(read, %{duration_us: 10}, %{result: :ok})

      assert Enum.any?(Telemetry.handlers(read), fn {id, _, _} -> id == {Analytics, :handler} end)
      assert last_hour(:variable_read, :count) == 1
      assert last_hour(:optimization_completed, :count) == 1
    end
  end

  describe "propagation" do
    setup do: start()

    test "a pass counts as :propagation, each failure in it as :propagation_error" do
      alias DSPex.Bridge.DependencyManager
      sid = "analytics-prop-#{System.unique_integer([:positive])}"
      {:ok, _} = SessionStore.create_session(sid)
      on_exit(fn -> SessionStore.delete_session(sid) end)
      {:ok, _} = SessionStore.register_variable(sid, :n, :float, 1.0)
      {:ok, _} = DependencyManager.defderived(sid, :inv, :float, [:n], &(1 / &1.n))
      {:ok, _} = DependencyManager.defderived(sid, :half, :float, [:n], &(&1.n * 0.5))
      {:ok, _} = DependencyManager.defderived(sid, :neg, :float, [:n], &(1 / -&1.n))

      :ok = SessionStore.update_variable(sid, :n, 0)
      :ok = DependencyManager.await_propagation(sid)

      assert last_hour(:propagation, :count) == 1
      assert last_hour(:propagation_error, :count) == 2
    end
  end

  describe "get_detailed_metrics/3" do
    setup do: start(aggregation_interval: 1000)

    test "aggregates and buckets between two DateTimes" do
      for v <- [10, 20, 30], do: Analytics.record_metric(:variable_write, v)
      to = DateTime.add(DateTime.utc_now(), 1, :second)
      from = DateTime.add(to, -3600, :second)

      assert {:ok, d} = Analytics.get_detailed_metrics(:variable_write, from, to)
      assert %{type: :variable_write, count: 3, sum: 60.0, avg: 20.0, min: 10.0, max: 30.0} = d
      assert d.p50 == 20.0
      assert [%{start: %DateTime{}, width_ms: 1000} | _] = d.buckets
      assert d.buckets |> Enum.map(& &1.count) |> Enum.sum() == 3

      # A derived type merges its sources bucket by bucket.
      :ok = Analytics.record_metric(:variable_read, 5)
      assert {:ok, ops} = Analytics.get_detailed_metrics(:operation_latency, from, to)
      assert %{count: 4, min: 5.0, max: 30.0} = ops
      assert ops.buckets |> Enum.map(& &1.count) |> Enum.sum() == 4
      assert Enum.map(ops.buckets, & &1.start) == Enum.uniq(Enum.map(ops.buckets, & &1.start))
    end
  end

  describe "prometheus_text/0" do
    setup do: start()

    test "merges the analytics series, the engine's metrics and the BEAM's" do
      sid = "prom-#{System.unique_integer([:positive])}"
      {:ok, _} = SessionStore.create_session(sid)
      {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
      1 = SessionStore.get_variable_value(sid, :x)
      :ok = Analytics.record_metric("weird name-with.dots", 3)
      text = IO.iodata_to_binary(Analytics.prometheus_text())

      assert text =~ "# TYPE dspex_analytics_variable_read summary"
      assert text =~ ~r/dspex_analytics_variable_read_count \d+/
      assert text =~ "dspex_analytics_weird_name_with_dots_count 1"
      assert text =~ ~r/dspex_core_sessions_created_total \d+/
      assert text =~ "dspex_analytics_running 1"
      assert text =~ ~r/dspex_beam_memory_bytes\{kind="total"\} \d+/
      SessionStore.delete_session(sid)
    end

    @tag :promtool
    test "is accepted by promtool check metrics" do
      case System.find_executable("promtool") do
        nil ->
          IO.puts(:stderr, "\nskipped: promtool not found (Debian package `prometheus`)")

        promtool ->
          for v <- 1..50, do: Analytics.record_metric(:variable_read, v)
          {:ok, _} = SessionStore.create_session("promtool-#{System.unique_integer()}")
          Native.session_import("garbage", nil)
          path = Path.join(System.tmp_dir!(), "dspex-metrics-#{System.unique_integer()}.prom")
          File.write!(path, Analytics.prometheus_text())

          {out, status} =
            System.cmd("sh", ["-c", "#{promtool} check metrics < #{path}"], stderr_to_stdout: true)

          File.rm(path)
          assert status == 0, out
      end
    end
  end
end
