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
      assert DSPex.Wait.until(fn -> match?({:ok, _}, Health.ready()) end)
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

  test "start_link answers bad options with an error, and starts nothing" do
    for {opts, detail} <- [
          {[port: -1], {:port, -1}},
          {[], {:port, nil}},
          {[port: 80, ip: "localhost"], {:ip, "localhost"}},
          {[port: 0, max_connections: 0], {:max_connections, 0}},
          {[port: 0, read_timeout: :never], {:read_timeout, :never}},
          {[port: 0, prot: 1], {:unknown_options, [:prot]}},
          {[port: 0, port: 1], {:duplicate_options, [:port]}},
          {[port: 0, name: :bad_endpoint, max_connections: -1], {:max_connections, -1}},
          {:nope, {:bad_options, :nope}}
        ] do
      assert Endpoint.start_link(opts) == {:error, {:invalid_argument, detail}}
    end

    refute Process.whereis(:bad_endpoint)
  end

  describe "hostile clients (raw :gen_tcp)" do
    test "an oversized request line gets 414, with connection: close" do
      port = port()
      response = exchange(port, ["GET /", String.duplicate("a", 20_000), " HTTP/1.1\r\n\r\n"])
      assert "HTTP/1.1 414 " <> _ = response
      assert response =~ "connection: close\r\n"
    end

    test "oversized headers get 431: too many bytes, or too many lines" do
      port = port()
      big = for i <- 1..100, do: "x-filler-#{i}: #{String.duplicate("v", 100)}\r\n"
      assert "HTTP/1.1 431 " <> _ = exchange(port, ["GET /metrics HTTP/1.1\r\n", big, "\r\n"])
      many = for i <- 1..100, do: "x-#{i}: v\r\n"
      assert "HTTP/1.1 431 " <> _ = exchange(port, ["GET /metrics HTTP/1.1\r\n", many, "\r\n"])
    end

    test "a body too large (or of unknown length) gets 413, a bad length 400" do
      port = port()
      head = "GET /health/live HTTP/1.1\r\nhost: x\r\n"
      body = String.duplicate("b", 30_000)
      assert "HTTP/1.1 413 " <> _ = exchange(port, [head, "content-length: 30000\r\n\r\n", body])

      assert "HTTP/1.1 413 " <> _ =
               exchange(port, [head, "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"])

      assert "HTTP/1.1 400 " <> _ = exchange(port, [head, "content-length: lots\r\n\r\n"])
      # A small body is read past and ignored.
      assert "HTTP/1.1 200 " <> _ = exchange(port, [head, "content-length: 5\r\n\r\nhello"])
    end

    test "garbage bytes get 400" do
      port = port()
      :rand.seed(:exsss, {1, 2, 3})
      noise = for _ <- 1..4_000, into: <<>>, do: <<:rand.uniform(256) - 1>>
      assert "HTTP/1.1 400 " <> _ = exchange(port, [noise])
      # Noise with no line end, past the head limit: 400 as well.
      assert "HTTP/1.1 400 " <> _ = exchange(port, [String.duplicate(<<0, 1, 2>>, 5_000)])
      assert "HTTP/1.1 400 " <> _ = exchange(port, ["GET http://elsewhere/ HTTP/1.1\r\n\r\n"])
      assert "HTTP/1.1 400 " <> _ = exchange(port, ["HTTP/1.1 200 OK\r\n\r\n"])
      assert {200, _, _} = get(~c"http://127.0.0.1:#{port}/health/live")
    end

    test "a client too slow to send its request gets 408" do
      start_supervised!({Endpoint, port: 0, name: :slow_endpoint, read_timeout: 300},
        id: :slow_endpoint
      )

      {:ok, port} = Endpoint.port(:slow_endpoint)
      {:ok, socket} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
      :ok = :gen_tcp.send(socket, "GET /metrics HTTP/1.1\r\nhost: x")
      assert "HTTP/1.1 408 " <> _ = recv_all(socket)
      # A client that sends nothing at all is answered the same.
      {:ok, idle} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
      assert "HTTP/1.1 408 " <> _ = recv_all(idle)
    end

    test "past max_connections, connections get 503 and the endpoint stays bounded" do
      max = 4
      name = :capped_endpoint

      start_supervised!(
        {Endpoint, port: 0, name: name, max_connections: max, read_timeout: 60_000},
        id: name
      )

      {:ok, port} = Endpoint.port(name)

      # Hogs: connections that never finish their request.
      hogs =
        for _ <- 1..max do
          {:ok, s} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
          :ok = :gen_tcp.send(s, "GET /metrics HTTP/1.1\r\n")
          s
        end

      assert DSPex.Wait.until(fn -> Endpoint.info(name).connections == max end)
      ports_before = length(:erlang.ports())
      procs_before = :erlang.system_info(:process_count)

      extra = 30

      clients =
        for _ <- 1..extra do
          {:ok, s} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
          s
        end

      for s <- clients do
        response = recv_all(s)
        assert "HTTP/1.1 503 " <> _ = response
        assert response =~ "connection: close\r\n"
      end

      # Only the clients' own sockets were added: the endpoint kept none of
      # the refused connections, and started no process for them.
      assert length(:erlang.ports()) - ports_before <= extra + 2
      assert :erlang.system_info(:process_count) - procs_before <= 2
      assert Endpoint.info(name) == %{connections: max, max_connections: max}

      Enum.each(clients, &:gen_tcp.close/1)
      Enum.each(hogs, &:gen_tcp.close/1)

      # The hogs gone, their slots are free again.
      assert DSPex.Wait.until(fn -> Endpoint.info(name).connections == 0 end)
      assert "HTTP/1.1 200 " <> _ = exchange(port, ["GET /health/live HTTP/1.1\r\n\r\n"])
    end
  end

  defp port do
    {:ok, port} = Endpoint.port(:test_endpoint)
    port
  end

  # Sends the whole request, then reads until the server closes.
  defp exchange(port, request) do
    {:ok, socket} = :gen_tcp.connect(~c"127.0.0.1", port, [:binary, active: false])
    :ok = :gen_tcp.send(socket, request)
    recv_all(socket)
  end

  defp recv_all(socket, acc \\ "") do
    case :gen_tcp.recv(socket, 0, 5_000) do
      {:ok, data} -> recv_all(socket, acc <> data)
      {:error, :closed} -> :gen_tcp.close(socket) && acc
      {:error, reason} -> :gen_tcp.close(socket) && {:error, reason, acc}
    end
  end
end
