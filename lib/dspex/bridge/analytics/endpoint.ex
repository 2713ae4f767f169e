defmodule DSPex.Bridge.Analytics.Endpoint do
  @moduledoc """
  An optional HTTP endpoint on OTP's own `:gen_tcp` (no dependencies):

  | path | answer |
  | --- | --- |
  | `GET /metrics` | `200`, `DSPex.Bridge.Analytics.prometheus_text/0` (`text/plain; version=0.0.4`) |
  | `GET /health/live` | `200 ok` while the VM runs |
  | `GET /health/ready` | `200` when `DSPex.Bridge.Health.ready/0` passes, else `503`; the body lists each check |

  Other paths answer `404`, other methods `405`. Each connection is served
  by its own process and closed after one response; a request line and
  headers must arrive within 5 s and be at most 8 KiB.

  Off by default. Turn it on in config (the application then starts it):

      config :dspex_bridge, :http_endpoint, port: 9568, ip: {127, 0, 0, 1}

  or start it yourself: `DSPex.Bridge.Analytics.Endpoint.start_link(port: 0)`
  (port 0 picks a free port; `port/1` tells which).
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.{Analytics, Health}

  @recv_timeout 5_000
  @max_headers 64

  @doc """
  Starts listening. Options: `:port` (required, 0..65535), `:ip` (default
  `{127, 0, 0, 1}`; `{0, 0, 0, 0}` for every interface), `:name` (default
  this module). Raises `ArgumentError` on a bad option.
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts) do
    port = Keyword.get(opts, :port)
    ip = Keyword.get(opts, :ip, {127, 0, 0, 1})

    unless is_integer(port) and port in 0..65_535,
      do: raise(ArgumentError, ":port must be an integer in 0..65535, got: #{inspect(port)}")

    unless is_tuple(ip) and tuple_size(ip) in [4, 8],
      do: raise(ArgumentError, ":ip must be an address tuple, got: #{inspect(ip)}")

    GenServer.start_link(__MODULE__, {port, ip}, name: Keyword.get(opts, :name, __MODULE__))
  end

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "The port the endpoint listens on."
  @spec port(GenServer.server()) :: {:ok, :inet.port_number()}
  def port(server \\ __MODULE__), do: GenServer.call(server, :port)

  @impl true
  def init({port, ip}) do
    opts =
      [:binary, packet: :http_bin, packet_size: 8192, active: false] ++
        [reuseaddr: true, ip: ip, backlog: 128]

    case :gen_tcp.listen(port, opts) do
      {:ok, listen} ->
        {:ok, actual} = :inet.port(listen)
        acceptor = spawn_link(fn -> accept_loop(listen) end)
        {:ok, %{listen: listen, port: actual, acceptor: acceptor}}

      {:error, reason} ->
        {:stop, {:listen_failed, reason}}
    end
  end

  @impl true
  def handle_call(:port, _from, state), do: {:reply, {:ok, state.port}, state}

  defp accept_loop(listen) do
    case :gen_tcp.accept(listen) do
      {:ok, socket} ->
        pid = spawn(fn -> receive(do: (:go -> serve(socket))) end)

        case :gen_tcp.controlling_process(socket, pid) do
          :ok ->
            send(pid, :go)

          {:error, _} ->
            :gen_tcp.close(socket)
            Process.exit(pid, :kill)
        end

        accept_loop(listen)

      {:error, :closed} ->
        :ok

      {:error, reason} ->
        Logger.warning("DSPex.Bridge.Analytics.Endpoint accept failed: #{inspect(reason)}")
        # Out of descriptors and the like: back off instead of spinning.
        Process.sleep(100)
        accept_loop(listen)
    end
  end

  @doc false
  def serve(socket) do
    response =
      case read_request(socket) do
        {:ok, method, path} -> route(method, path)
        {:error, :timeout} -> nil
        {:error, _} -> reply(400, "text/plain", "bad request\n")
      end

    if response, do: :gen_tcp.send(socket, response)
    :gen_tcp.close(socket)
  end

  defp read_request(socket) do
    with {:ok, {:http_request, method, {:abs_path, target}, _version}} <-
           :gen_tcp.recv(socket, 0, @recv_timeout),
         :ok <- skip_headers(socket, @max_headers) do
      [path | _] = String.split(target, "?", parts: 2)
      {:ok, method, path}
    else
      {:ok, other} -> {:error, {:unexpected, other}}
      {:error, reason} -> {:error, reason}
    end
  end

  defp skip_headers(_socket, 0), do: {:error, :too_many_headers}

  defp skip_headers(socket, left) do
    case :gen_tcp.recv(socket, 0, @recv_timeout) do
      {:ok, :http_eoh} -> :ok
      {:ok, {:http_header, _, _, _, _}} -> skip_headers(socket, left - 1)
      {:ok, other} -> {:error, {:unexpected, other}}
      {:error, reason} -> {:error, reason}
    end
  end

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
    Analytics.prometheus_text()
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

  defp reply(status, type, body, length \\ nil) do
    length = length || IO.iodata_length(body)

    [
      "HTTP/1.1 #{status} #{reason(status)}\r\n",
      "content-type: #{type}\r\ncontent-length: #{length}\r\nconnection: close\r\n\r\n",
      body
    ]
  end

  defp reason(200), do: "OK"
  defp reason(400), do: "Bad Request"
  defp reason(404), do: "Not Found"
  defp reason(405), do: "Method Not Allowed"
  defp reason(503), do: "Service Unavailable"
end
