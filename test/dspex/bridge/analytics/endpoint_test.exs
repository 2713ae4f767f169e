defmodule DSPex.Bridge.Analytics.EndpointTest do
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{Analytics, Health}
  alias DSPex.Bridge.Analytics.Endpoint

  setup_all do
    {:ok, _} = Application.ensure_all_started(:inets)
    :ok
  end

  setup do
    start_supervised!({Endpoint, port: 0, name: :test_endpoint})
    {:ok, port} = Endpoint.port(:test_endpoint)
    %{base: "http://127.0.0.1:#{port}"}
  end

  defp get(url, method \\ :get) do
    request = if method == :post, do: {url, [], ~c"text/plain", ""}, else: {url, []}

    {:ok, {{_, status, _}, headers, body}} =
      :httpc.request(method, request, [timeout: 5_000], body_format: :binary)

    {status, Map.new(headers, fn {k, v} -> {to_string(k), to_string(v)} end), body}
  end

  test "GET /health/live answers 200 over real HTTP", %{base: base} do
    assert {200, _, "ok\n"} = get(~c"#{base}/health/live")
  end

  test "GET /health/ready answers 200 with each check", %{base: base} do
    assert {:ok, %{nif: :ok, store: :ok, port: :not_configured}} = Health.ready()
    assert {200, _, body} = get(~c"#{base}/health/ready")
    assert body =~ "ready\n"
    assert body =~ "nif: ok"
    assert body =~ "store: ok"
    assert body =~ "port: not configured"
  end

  test "with the port as default backend, ready asks the port program", %{base: base} do
    Application.put_env(:dspex_bridge, :backend, :port)

    try do
      assert {:ok, %{port: :ok}} = Health.ready()
      assert {200, _, body} = get(~c"#{base}/health/ready")
      assert body =~ "port: ok"

      # The port server stopped: not ready, 503.
      sup = DSPex.Bridge.Backend.Port.Supervisor
      :ok = Supervisor.terminate_child(sup, DSPex.Bridge.Backend.Port)
      assert {:error, %{port: {:error, _}}} = Health.ready(timeout: 200)
      assert {503, _, body} = get(~c"#{base}/health/ready")
      assert body =~ "port: error"
      {:ok, _} = Supervisor.restart_child(sup, DSPex.Bridge.Backend.Port)
      assert {:ok, _} = Health.ready()

      # The port program killed: ready again once its supervisor restarts it.
      os_pid = DSPex.Bridge.Backend.Port.os_pid()
      System.cmd("kill", ["-9", to_string(os_pid)])
      assert wait_until(fn -> match?({:ok, _}, Health.ready()) end)
    after
      Application.delete_env(:dspex_bridge, :backend)
    end
  end

  test "GET /health/ready answers 503 when the store is down", %{base: base} do
    sup = Process.whereis(DSPex.Bridge.Supervisor)
    :ok = Supervisor.terminate_child(sup, DSPex.Bridge.SessionStore)

    try do
      assert {503, _, body} = get(~c"#{base}/health/ready")
      assert body =~ "not ready"
      assert body =~ "store: error :session_store_not_running"
    after
      {:ok, _} = Supervisor.restart_child(sup, DSPex.Bridge.SessionStore)
    end
  end

  test "GET /metrics serves the Prometheus text", %{base: base} do
    start_supervised!(Analytics)
    :ok = Analytics.record_metric(:variable_read, 42)
    assert {200, headers, body} = get(~c"#{base}/metrics?debug=1")
    assert headers["content-type"] =~ "text/plain; version=0.0.4"
    assert String.to_integer(headers["content-length"]) == byte_size(body)
    assert body =~ "dspex_analytics_variable_read_count 1"
    assert body =~ "dspex_up 1"
  end

  test "unknown paths, other methods and garbage get clean errors", %{base: base} do
    assert {404, _, _} = get(~c"#{base}/nope")
    assert {405, _, _} = get(~c"#{base}/metrics", :post)
    {:ok, port} = Endpoint.port(:test_endpoint)
    {:ok, socket} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
    :ok = :gen_tcp.send(socket, "NOT HTTP AT ALL\r\n\r\n")
    assert {:ok, "HTTP/1.1 400" <> _} = :gen_tcp.recv(socket, 0, 5_000)
    :gen_tcp.close(socket)
    # Still serving.
    assert {200, _, _} = get(~c"#{base}/health/live")
  end

  test "many concurrent scrapes", %{base: base} do
    1..20
    |> Enum.map(fn _ -> Task.async(fn -> get(~c"#{base}/metrics") end) end)
    |> Task.await_many(20_000)
    |> Enum.each(fn result -> assert {200, _, _} = result end)
  end

  defp wait_until(fun, tries \\ 50) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(100) && wait_until(fun, tries - 1)
    end
  end

  test "start_link validates its options" do
    assert_raise ArgumentError, fn -> Endpoint.start_link(port: -1) end
    assert_raise ArgumentError, fn -> Endpoint.start_link(port: 80, ip: "localhost") end
  end
end
