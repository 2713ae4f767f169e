defmodule DSPex.OpsMetricsTest do
  @moduledoc """
  The Prometheus alerting rules (`ops/prometheus/alerts.yml`, and the series
  of their unit tests) and the Grafana dashboard (`ops/grafana/dspex_bridge.json`)
  use only metrics the library exports. A real node (a `:peer` OS process)
  is started the way an operator configures one (`analytics: true`,
  `http_endpoint:`, `backup:`), every event of the telemetry catalogue is
  produced on it through its code path (`test/support/telemetry_emitters/`),
  and its `/metrics` is scraped over HTTP; each metric name in the rules
  and the dashboard must be in the scrape, with the labels they match on.
  """
  use ExUnit.Case, async: false

  alias DSPex.Test.OpsPeer

  @moduletag timeout: 300_000
  @root Path.expand("../..", __DIR__)
  @alerts Path.join(@root, "ops/prometheus/alerts.yml")
  @alerts_test Path.join(@root, "ops/prometheus/alerts_test.yml")
  @dashboard Path.join(@root, "ops/grafana/dspex_bridge.json")

  # Recorded by Prometheus itself for each scrape target, not exported.
  @prometheus_own ~w(up scrape_duration_seconds scrape_samples_scraped)
  # Target labels Prometheus adds to every series.
  @target_labels ~w(instance job)

  setup_all do
    {:ok, _} = Application.ensure_all_started(:inets)
    root = Path.join(System.tmp_dir!(), "dspex-ops-#{System.unique_integer([:positive])}")
    peer = OpsPeer.start()

    on_exit(fn ->
      OpsPeer.stop(peer)
      File.rm_rf(root)
    end)

    env = [
      analytics: [aggregation_interval: 1_000],
      http_endpoint: [port: 0, ip: {127, 0, 0, 1}],
      backup: [dir: Path.join(root, "backups"), interval: 100, sessions: ["ops-backed-up"]]
    ]

    :ok = OpsPeer.boot(peer, env, Path.join(root, "ra"))
    failures = OpsPeer.call(peer, OpsPeer, :produce_everything, ["ops-backed-up"], 240_000)
    {:ok, port} = OpsPeer.call(peer, DSPex.Bridge.Analytics.Endpoint, :port, [])
    %{scrape: scrape(port), emitter_failures: failures}
  end

  defp scrape(port) do
    {:ok, {{_, 200, _}, _headers, body}} =
      :httpc.request(:get, {~c"http://127.0.0.1:#{port}/metrics", []}, [timeout: 10_000],
        body_format: :binary
      )

    # name => label names seen on its samples
    for line <- String.split(body, "\n"),
        line != "" and not String.starts_with?(line, "#"),
        reduce: %{} do
      acc ->
        [_, name, labels] = Regex.run(~r/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\}|)/, line)
        label_names = Regex.scan(~r/([a-zA-Z_][a-zA-Z0-9_]*)="/, labels, capture: :all_but_first)

        Map.update(
          acc,
          name,
          MapSet.new(List.flatten(label_names)),
          &MapSet.union(&1, MapSet.new(List.flatten(label_names)))
        )
    end
  end

  test "every catalogue emitter ran on the node", %{emitter_failures: failures} do
    assert failures == []
  end

  test "the scrape has the engine's, the BEAM's, the queue's, Raft's and Analytics' families",
       %{scrape: scrape} do
    for name <- ~w(dspex_up dspex_core_sessions_created_total dspex_beam_run_queue
                   dspex_dlq_depth dspex_raft_leaderless dspex_analytics_variable_read_count
                   dspex_analytics_backup_round_count) do
      assert Map.has_key?(scrape, name), "#{name} not scraped"
    end
  end

  test "admission refusals are exported by path (DSPexAdmissionRefusing, its panel)",
       %{scrape: scrape} do
    # The rule and the panel aggregate `by (path)`, which check_all/3 does
    # not read as a matcher: the label is checked here.
    assert MapSet.member?(Map.get(scrape, "dspex_admission_refused_total", MapSet.new()), "path"),
           "dspex_admission_refused_total{path} not scraped"

    assert Enum.any?(
             yaml_values(File.read!(@alerts), "expr"),
             &(&1 =~ "dspex_admission_refused_total")
           )

    assert Enum.any?(
             json_strings(File.read!(@dashboard), "expr"),
             &(&1 =~ "dspex_admission_refused_total")
           )
  end

  test "every metric in the alerting rules is exported", %{scrape: scrape} do
    exprs = yaml_values(File.read!(@alerts), "expr")
    assert length(exprs) >= 20
    check_all(exprs, scrape, "ops/prometheus/alerts.yml")
  end

  test "every series in the rules' unit tests is exported", %{scrape: scrape} do
    series = yaml_values(File.read!(@alerts_test), "series")
    assert length(series) >= 20
    check_all(series, scrape, "ops/prometheus/alerts_test.yml")
  end

  test "every metric in the Grafana dashboard is exported", %{scrape: scrape} do
    json = File.read!(@dashboard)
    exprs = json_strings(json, "expr")
    assert length(exprs) >= 30

    # The node selector: label_values(metric, label).
    variables =
      for q <- json_strings(json, "definition"),
          [_, metric, label] <- [Regex.run(~r/^label_values\((\w+),\s*(\w+)\)$/, q)],
          do: "#{metric}{#{label}=\"x\"}"

    assert variables != []
    check_all(exprs ++ variables, scrape, "ops/grafana/dspex_bridge.json")
  end

  test "the metric-name reader finds names, not functions, keywords or labels" do
    assert names_and_labels(
             ~s|sum by (instance) (rate(dspex_a_count{instance=~"$instance",kind="x"}[$__rate_interval])) / ignoring(kind) dspex_b > 4e9 and on(job) predict_linear(dspex_c[1h], 4 * 3600) > bool 2|
           ) == [{"dspex_a_count", ["instance", "kind"]}, {"dspex_b", []}, {"dspex_c", []}]
  end

  defp check_all(exprs, scrape, file) do
    problems =
      for expr <- exprs,
          {name, labels} <- names_and_labels(expr),
          name not in @prometheus_own,
          problem = problem(scrape, name, labels),
          uniq: true,
          do: "#{problem} (in #{inspect(expr)})"

    assert problems == [],
           "#{file} uses what the node does not export:\n" <> Enum.join(problems, "\n")
  end

  defp problem(scrape, name, labels) do
    case Map.fetch(scrape, name) do
      :error ->
        "#{name} is not exported"

      {:ok, exported} ->
        case Enum.reject(labels, &(&1 in @target_labels or MapSet.member?(exported, &1))) do
          [] -> nil
          missing -> "#{name} has no label #{Enum.join(missing, ", ")}"
        end
    end
  end

  # Metric names of a PromQL expression, each with the labels matched on it.
  defp names_and_labels(expr) do
    expr = String.replace(expr, ~r/"(?:[^"\\]|\\.)*"/, ~s(""))

    with_matchers =
      for [_, name, matchers] <- Regex.scan(~r/([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}/, expr),
          do:
            {name,
             Regex.scan(~r/([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)/, matchers, capture: :all_but_first)
             |> List.flatten()}

    bare =
      expr
      |> String.replace(~r/\{[^}]*\}/, " ")
      |> String.replace(~r/\[[^\]]*\]/, " ")
      |> String.replace(~r/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/, " ")
      |> then(&Regex.scan(~r/(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*+(?!\s*\()/, &1))
      |> List.flatten()
      |> Enum.reject(
        &(&1 in ~w(and or unless bool offset by without on ignoring group_left group_right))
      )

    names = Enum.uniq(bare)

    for name <- names do
      labels = for {^name, ls} <- with_matchers, l <- ls, uniq: true, do: l
      {name, labels}
    end
  end

  # The values of `key:` in a YAML file, folded (`key: >`) ones joined.
  defp yaml_values(text, key) do
    lines = String.split(text, "\n")

    {values, _} =
      Enum.reduce(Enum.with_index(lines), {[], nil}, fn {line, i}, {acc, _} ->
        case Regex.run(~r/^(\s*)(?:- )?#{key}:\s*(.*)$/, line) do
          [_, indent, v] when v in [">", "|", ">-", "|-"] ->
            block =
              lines
              |> Enum.drop(i + 1)
              |> Enum.take_while(&(String.trim(&1) == "" or leading(&1) > String.length(indent)))
              |> Enum.map_join(" ", &String.trim/1)

            {[block | acc], nil}

          [_, _indent, v] ->
            {[unquote_yaml(v) | acc], nil}

          nil ->
            {acc, nil}
        end
      end)

    Enum.reverse(values)
  end

  defp leading(line), do: String.length(line) - String.length(String.trim_leading(line))

  defp unquote_yaml("'" <> rest),
    do: rest |> String.trim_trailing("'") |> String.replace("''", "'")

  defp unquote_yaml(~s(") <> rest),
    do: rest |> String.trim_trailing(~s(")) |> String.replace(~s(\\"), ~s("))

  defp unquote_yaml(v), do: v

  # The string values of `"key": "..."` in the dashboard JSON.
  defp json_strings(json, key) do
    for [v] <- Regex.scan(~r/"#{key}":\s*"((?:[^"\\]|\\.)*)"/, json, capture: :all_but_first),
        do: v |> String.replace(~s(\\"), ~s(")) |> String.replace("\\\\", "\\")
  end
end
