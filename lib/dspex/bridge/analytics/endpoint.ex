defmodule DSPex.Bridge.Analytics.Endpoint do
  @moduledoc """
  An optional HTTP endpoint on OTP's own `:gen_tcp` (no dependencies):

  | path | answer |
  | --- | --- |
  | `GET /metrics` | `200`, `DSPex.Bridge.Analytics.prometheus_text/0` (`text/plain; version=0.0.4`) |
  | `GET /health/live` | `200 ok` while the VM runs |
  | `GET /health/ready` | `200` when `DSPex.Bridge.Health.ready/0` passes, else `503`; the body lists each check |

  Other paths answer `404`, other methods `405`. Each connection is served
  by its own process and closed after one response (`connection: close`).
  Hostile or broken clients get a status line, never a silent close, and
  cannot exhaust the node:

  | what | answer |
  | --- | --- |
  | request line over 8 KiB | `414` |
  | request line and headers over 8 KiB together, or over 64 header lines | `431` |
  | a body over 8 KiB, or of unknown length (`transfer-encoding`) | `413` (smaller bodies are read past) |
  | bytes that are not an HTTP/1.x request, a bad `content-length` | `400` |
  | a request not complete within `:read_timeout` of the connect | `408` |
  | a connection while `:max_connections` are being served | `503` with `retry-after: 1`, answered and closed by the acceptor without a process |

  Responses are sent within 5 s or the connection is dropped. After its
  response a connection reads (and drops) what the client still sends, up to
  64 KiB or 1 s, before closing, so the client reads the answer rather than
  a reset.

  Off by default. Turn it on in config (the application then starts it):

      config :dspex_bridge, :http_endpoint, port: 9568, ip: {127, 0, 0, 1}

  or start it yourself: `DSPex.Bridge.Analytics.Endpoint.start_link(port: 0)`
  (port 0 picks a free port; `port/1` tells which).
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.{Analytics, Health, Options}

  @max_head_bytes 8192
  @max_headers 64
  @max_body_bytes 8192
  @send_timeout 5_000
  @linger_ms 1_000
  @linger_bytes 65_536

  @doc """
  Starts listening. Options:
  - `:port` (required, 0..65535);
  - `:ip` (default `{127, 0, 0, 1}`; `{0, 0, 0, 0}` for every interface);
  - `:max_connections`: connections served at once (default 100); more are
    answered `503`;
  - `:read_timeout`: ms a client has, from its connect, to send its whole
    request (default 5000); then it is answered `408`;
  - `:name` (default this module).

  A bad option is `{:error, {:invalid_argument, detail}}` (`{:bad_options,
  opts}`, `{:unknown_options, keys}`, `{:duplicate_options, keys}` or `{key,
  value}`; a missing `:port` is `{:port, nil}`), and nothing is started.
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts) do
    with {:ok, opts} <-
           Options.validate(opts, [:port, :ip, :max_connections, :read_timeout, :name]),
         {:ok, config} <- config(opts) do
      GenServer.start_link(__MODULE__, config, name: Keyword.get(opts, :name, __MODULE__))
    end
  end

  defp config(opts) do
    port = Keyword.get(opts, :port)
    ip = Keyword.get(opts, :ip, {127, 0, 0, 1})
    max = Keyword.get(opts, :max_connections, 100)
    read_timeout = Keyword.get(opts, :read_timeout, 5_000)

    cond do
      not (is_integer(port) and port in 0..65_535) ->
        Options.bad(:port, port)

      not (is_tuple(ip) and tuple_size(ip) in [4, 8]) ->
        Options.bad(:ip, ip)

      not (is_integer(max) and max > 0) ->
        Options.bad(:max_connections, max)

      not (is_integer(read_timeout) and read_timeout > 0) ->
        Options.bad(:read_timeout, read_timeout)

      true ->
        {:ok, %{port: port, ip: ip, max_connections: max, read_timeout: read_timeout}}
    end
  end

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "The port the endpoint listens on."
  @spec port(GenServer.server()) :: {:ok, :inet.port_number()}
  def port(server \\ __MODULE__), do: GenServer.call(server, :port)

  @doc """
  The connections being served now and the cap:
  `%{connections: n, max_connections: max}`.
  """
  @spec info(GenServer.server()) :: %{connections: non_neg_integer, max_connections: pos_integer}
  def info(server \\ __MODULE__), do: GenServer.call(server, :info)

  # The server owns the listening socket and the connection processes
  # (linked: they die with it); an acceptor process blocks in accept and
  # asks the server to admit each connection, so the count is exact.
  @impl true
  def init(config) do
    Process.flag(:trap_exit, true)

    opts =
      [:binary, packet: :raw, active: false, reuseaddr: true, ip: config.ip, backlog: 128] ++
        [send_timeout: @send_timeout, send_timeout_close: true]

    case :gen_tcp.listen(config.port, opts) do
      {:ok, listen} ->
        {:ok, actual} = :inet.port(listen)
        server = self()
        acceptor = spawn_link(fn -> accept_loop(listen, server) end)

        {:ok,
         %{listen: listen, port: actual, acceptor: acceptor, conns: MapSet.new(), config: config}}

      {:error, reason} ->
        {:stop, {:listen_failed, reason}}
    end
  end

  @impl true
  def handle_call(:port, _from, state), do: {:reply, {:ok, state.port}, state}

  def handle_call(:info, _from, state) do
    {:reply,
     %{connections: MapSet.size(state.conns), max_connections: state.config.max_connections},
     state}
  end

  def handle_call(:admit, _from, state) do
    if MapSet.size(state.conns) >= state.config.max_connections do
      {:reply, :full, state}
    else
      read_timeout = state.config.read_timeout

      pid =
        spawn_link(fn ->
          receive do
            {:go, socket} -> serve(socket, read_timeout)
          after
            @send_timeout -> :ok
          end
        end)

      {:reply, {:ok, pid}, %{state | conns: MapSet.put(state.conns, pid)}}
    end
  end

  @impl true
  def handle_info({:EXIT, pid, reason}, %{acceptor: pid} = state), do: {:stop, reason, state}

  def handle_info({:EXIT, pid, _reason}, state),
    do: {:noreply, %{state | conns: MapSet.delete(state.conns, pid)}}

  def handle_info(_msg, state), do: {:noreply, state}

  defp accept_loop(listen, server) do
    case :gen_tcp.accept(listen) do
      {:ok, socket} ->
        case GenServer.call(server, :admit) do
          {:ok, pid} -> hand_over(socket, pid)
          :full -> reject(socket)
        end

        accept_loop(listen, server)

      {:error, :closed} ->
        :ok

      {:error, reason} ->
        Logger.warning("DSPex.Bridge.Analytics.Endpoint accept failed: #{inspect(reason)}")
        # Out of descriptors and the like: back off instead of spinning.
        Process.sleep(100)
        accept_loop(listen, server)
    end
  end

  defp hand_over(socket, pid) do
    case :gen_tcp.controlling_process(socket, pid) do
      :ok ->
        send(pid, {:go, socket})

      {:error, _} ->
        :gen_tcp.close(socket)
        Process.exit(pid, :kill)
    end
  end

  # Over the cap: answered here, without a process. What the client already
  # sent is read first, so the close does not reset the answer away.
  defp reject(socket) do
    _ = :gen_tcp.send(socket, reply(503, "text/plain", "busy\n", nil, ["retry-after: 1\r\n"]))
    _ = :gen_tcp.shutdown(socket, :write)
    _ = :gen_tcp.recv(socket, 0, 0)
    :gen_tcp.close(socket)
  end

  @doc false
  def serve(socket, read_timeout) do
    deadline = System.monotonic_time(:millisecond) + read_timeout

    response =
      case read_request(socket, deadline, "") do
        {:ok, method, path} -> route(method, path)
        {:error, :closed} -> nil
        {:error, status} -> error_reply(status)
      end

    if response, do: :gen_tcp.send(socket, response)
    linger_close(socket)
  end

  # Reads until the head (request line and headers) is complete and within
  # the limits. A body is not used: linger_close/1 reads past it.
  defp read_request(socket, deadline, buffer) do
    case parse_head(buffer) do
      :more ->
        with {:ok, data} <- recv(socket, deadline),
             do: read_request(socket, deadline, buffer <> data)

      result ->
        result
    end
  end

  defp recv(socket, deadline) do
    case deadline - System.monotonic_time(:millisecond) do
      left when left <= 0 ->
        {:error, 408}

      left ->
        case :gen_tcp.recv(socket, 0, left) do
          {:ok, data} -> {:ok, data}
          {:error, :timeout} -> {:error, 408}
          {:error, _closed} -> {:error, :closed}
        end
    end
  end

  defp parse_head(buffer) do
    case :erlang.decode_packet(:http_bin, buffer, []) do
      {:ok, {:http_request, method, {:abs_path, target}, {1, _}}, rest} ->
        line = byte_size(buffer) - byte_size(rest)

        if line > @max_head_bytes do
          {:error, 414}
        else
          [path | _] = String.split(target, "?", parts: 2)

          with {:ok, _body_length} <- parse_headers(rest, line, 0, 0),
               do: {:ok, method, path}
        end

      {:more, _} when byte_size(buffer) > @max_head_bytes ->
        # A request line this long is 414; anything else this long is noise.
        if Regex.match?(~r/\A[A-Z]{1,16} \//, buffer), do: {:error, 414}, else: {:error, 400}

      {:more, _} ->
        :more

      # http_error, a response, an absolute URI, another HTTP version.
      {:ok, _other, _rest} ->
        {:error, 400}

      {:error, _} ->
        {:error, 400}
    end
  end

  defp parse_headers(buffer, used, count, body_length) do
    case :erlang.decode_packet(:httph_bin, buffer, []) do
      {:ok, :http_eoh, _body} ->
        if used + 2 > @max_head_bytes, do: {:error, 431}, else: {:ok, body_length}

      {:ok, {:http_header, _, name, _, value}, rest} ->
        used = used + byte_size(buffer) - byte_size(rest)

        if used > @max_head_bytes or count >= @max_headers do
          {:error, 431}
        else
          with {:ok, n} <- body_length(name, value, body_length),
               do: parse_headers(rest, used, count + 1, n)
        end

      {:more, _} ->
        if used + byte_size(buffer) > @max_head_bytes, do: {:error, 431}, else: :more

      {:ok, {:http_error, _}, _rest} ->
        {:error, 400}

      {:error, _} ->
        {:error, 400}
    end
  end

  defp body_length(:"Content-Length", value, _acc) do
    case Integer.parse(value) do
      {n, ""} when n > @max_body_bytes -> {:error, 413}
      {n, ""} when n >= 0 -> {:ok, n}
      _ -> {:error, 400}
    end
  end

  # A chunked body has no length to check against the limit. (Known header
  # names come decoded as atoms, whatever their case.)
  defp body_length(:"Transfer-Encoding", _value, _acc), do: {:error, 413}
  defp body_length(_name, _value, acc), do: {:ok, acc}

  defp linger_close(socket) do
    _ = :gen_tcp.shutdown(socket, :write)
    drain(socket, System.monotonic_time(:millisecond) + @linger_ms, @linger_bytes)
    :gen_tcp.close(socket)
  end

  defp drain(socket, deadline, left) when left > 0 do
    timeout = deadline - System.monotonic_time(:millisecond)

    with true <- timeout > 0,
         {:ok, data} <- :gen_tcp.recv(socket, 0, timeout) do
      drain(socket, deadline, left - byte_size(data))
    else
      _ -> :ok
    end
  end

  defp drain(_socket, _deadline, _left), do: :ok

  defp route(method, path) when method in [:GET, :HEAD] do
    {status, type, body} =
      case path do
        "/metrics" -> {200, "text/plain; version=0.0.4; charset=utf-8", metrics_text()}
        "/health/live" -> {200, "text/plain", "ok\n"}
        "/health/ready" -> ready()
        _ -> {404, "text/plain", "not found\n"}
      end

    reply(status, type, if(method == :HEAD, do: "", else: body), IO.iodata_length(body))
  end

  defp route(_method, _path), do: reply(405, "text/plain", "method not allowed\n")

  defp metrics_text do
    [Analytics.prometheus_text(), DSPex.Bridge.HAManager.prometheus_text()]
  rescue
    e -> "# metrics unavailable: #{Exception.message(e) |> String.replace("\n", " ")}\n"
  end

  defp ready do
    {status, checks} =
      case Health.ready() do
        {:ok, checks} -> {200, checks}
        {:error, checks} -> {503, checks}
      end

    lines = for {name, result} <- Enum.sort(checks), do: "#{name}: #{format_check(result)}\n"
    {status, "text/plain", [if(status == 200, do: "ready\n", else: "not ready\n") | lines]}
  end

  defp format_check(:ok), do: "ok"
  defp format_check(:not_configured), do: "not configured"
  defp format_check({:error, reason}), do: "error #{inspect(reason)}"

  defp error_reply(status),
    do: reply(status, "text/plain", String.downcase(reason(status)) <> "\n")

  defp reply(status, type, body, length \\ nil, extra_headers \\ []) do
    length = length || IO.iodata_length(body)

    [
      "HTTP/1.1 #{status} #{reason(status)}\r\n",
      "content-type: #{type}\r\ncontent-length: #{length}\r\nconnection: close\r\n",
      extra_headers,
      "\r\n",
      body
    ]
  end

  defp reason(200), do: "OK"
  defp reason(400), do: "Bad Request"
  defp reason(404), do: "Not Found"
  defp reason(405), do: "Method Not Allowed"
  defp reason(408), do: "Request Timeout"
  defp reason(413), do: "Content Too Large"
  defp reason(414), do: "URI Too Long"
  defp reason(431), do: "Request Header Fields Too Large"
  defp reason(503), do: "Service Unavailable"
end
