defmodule DSPex.Bridge.Gateway do
  @moduledoc """
  The gRPC gateway: `snakepit.bridge.BridgeService` for Python workers.

      # config/runtime.exs
      config :dspex_bridge, grpc: [port: 50051, ip: {127, 0, 0, 1}]

      {:ok, token} = DSPex.Bridge.Gateway.issue_token("tuning-1", ttl: :timer.hours(8))
      # python: SessionContext("127.0.0.1:50051", "tuning-1", token=token)

  The gateway is a Rust program (`native/dspex_grpc`, tonic) in its own OS
  process, an Erlang port of this server. It decodes each call against the
  service's `.proto`, forwards it here, and encodes the answer; it holds no
  state. Each call runs in a short-lived process of its own, which calls the
  public API (`SessionStore`, `DependencyManager`, `OptimizerCoordinator`,
  `AccessControl`) with the token's principal, so ACL, rate limits,
  telemetry, propagation, fencing and audit are those of an Elixir caller.

  If the program dies (even `kill -9`), only the calls in flight fail (their
  clients see `UNAVAILABLE`); this server starts another after a backoff
  (doubling from `min_restart_delay_ms`, default 10, to `max_restart_delay_ms`,
  default 5000) and never exits for it. Sessions are untouched.

  ## Options (`config :dspex_bridge, grpc: [...]`)

  - `port:` (default 50051; `0` picks a free one, see `port/0`), `ip:` (a
    tuple or string, default `{127, 0, 0, 1}`);
  - `auth:` `:token` (default) or `:none`. `:none` runs every call as the
    session it names, is refused unless `ip` is a loopback address, and says
    so in a warning: it is for development on one machine only;
  - `tls: [certfile: path, keyfile: path]` (PEM; rustls);
  - `max_message_bytes:` each way (default 4 MiB), `max_concurrency:` calls
    in flight per connection (64), `max_streams:` HTTP/2 streams per
    connection (128), `stream_window:` watch updates sent ahead of the
    client (16), `max_in_flight:` calls running at once over all connections
    (1024; beyond it `RESOURCE_EXHAUSTED`, refused by the program itself so
    this server's mailbox never holds more), `max_watch_streams:` watch
    streams open at once (1024).

  ## Tokens

  Every call carries `authorization: Bearer <token>`. `issue_token/2` makes
  one for a principal (the session on whose behalf calls are made; a token
  whose principal is the session a call names acts as that session itself)
  and the sessions it may name. A missing, unknown, revoked or expired
  token gets `UNAUTHENTICATED`; a session the token does not cover
  `PERMISSION_DENIED`. `revoke_token/1` takes effect on the next call and
  ends the token's watch streams.
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.{Admission, Telemetry}
  alias DSPex.Bridge.Gateway.{Handler, Tokens, WatchStream}

  @capture_handler "dspex_bridge-gateway-capture"

  ## API

  @doc """
  Issues a bearer token for `principal` (a session id, or `:session`: act as
  whichever session the call names). Options: `ttl:` milliseconds (default
  one hour), `sessions:` the session ids (anchored globs, `*` and `?`) the
  token may name, or `:any` (default: `[principal]`; for `:session`, none
  until given). `{:error, :not_running}` when the gateway is not started.

      {:ok, token} = DSPex.Bridge.Gateway.issue_token("s1", ttl: 60_000)
  """
  @spec issue_token(String.t() | :session, keyword) :: {:ok, String.t()} | {:error, term}
  def issue_token(principal, opts \\ []), do: Tokens.issue(principal, opts)

  @doc "Revokes a token: its next call is refused and its watch streams end. Always `:ok`."
  @spec revoke_token(String.t()) :: :ok
  def revoke_token(token), do: Tokens.revoke(token)

  @doc """
  The port the gateway listens on, once it does: `{:ok, port}`, or
  `{:error, :not_running}` (not configured, or not listening within
  `timeout` ms).
  """
  @spec port(timeout) :: {:ok, :inet.port_number()} | {:error, :not_running}
  def port(timeout \\ 5_000) do
    GenServer.call(__MODULE__, :port, timeout)
  catch
    :exit, _ -> {:error, :not_running}
  end

  @doc "The OS pid of the gateway program, or `nil` while it restarts."
  @spec os_pid() :: non_neg_integer | nil
  def os_pid do
    GenServer.call(__MODULE__, :os_pid)
  catch
    :exit, _ -> nil
  end

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc false
  # Validates the options; raises ArgumentError on a bad one.
  def config(opts) do
    opts = Keyword.new(opts)
    ip = ip(Keyword.get(opts, :ip, {127, 0, 0, 1}))
    auth = Keyword.get(opts, :auth, :token)

    unless auth in [:token, :none],
      do: raise(ArgumentError, "grpc auth: must be :token or :none, got #{inspect(auth)}")

    if auth == :none and not loopback?(ip),
      do:
        raise(
          ArgumentError,
          "grpc auth: :none is only allowed on a loopback ip, not #{:inet.ntoa(ip)}"
        )

    port = Keyword.get(opts, :port, 50051)

    unless is_integer(port) and port in 0..65_535,
      do: raise(ArgumentError, "grpc port: #{inspect(port)}")

    %{
      ip: ip,
      port: port,
      auth: auth,
      tls: tls(Keyword.get(opts, :tls)),
      limits: limits(opts),
      stream_window: positive!(:stream_window, Keyword.get(opts, :stream_window, 16)),
      max_in_flight: positive!(:max_in_flight, Keyword.get(opts, :max_in_flight, 1024)),
      max_watch_streams:
        positive!(:max_watch_streams, Keyword.get(opts, :max_watch_streams, 1024)),
      min_delay: positive!(:min_restart_delay_ms, Keyword.get(opts, :min_restart_delay_ms, 10)),
      max_delay: positive!(:max_restart_delay_ms, Keyword.get(opts, :max_restart_delay_ms, 5_000))
    }
  end

  defp limits(opts) do
    for key <- [:max_message_bytes, :max_concurrency, :max_streams, :stream_window],
        n = opts[key],
        n != nil,
        into: %{},
        do: {key, positive!(key, n)}
  end

  defp ip(t) when is_tuple(t), do: t

  defp ip(s) when is_binary(s) do
    case :inet.parse_address(String.to_charlist(s)) do
      {:ok, t} -> t
      _ -> raise ArgumentError, "grpc ip: #{inspect(s)}"
    end
  end

  defp ip(other), do: raise(ArgumentError, "grpc ip: #{inspect(other)}")

  defp loopback?({127, _, _, _}), do: true
  defp loopback?({0, 0, 0, 0, 0, 0, 0, 1}), do: true
  defp loopback?(_), do: false

  defp tls(nil), do: nil

  defp tls(opts) when is_list(opts) do
    cert = opts[:certfile]
    key = opts[:keyfile]

    unless is_binary(cert) and is_binary(key),
      do: raise(ArgumentError, "grpc tls: needs certfile: and keyfile:")

    %{certfile: cert, keyfile: key}
  end

  defp positive!(_key, n) when is_integer(n) and n > 0, do: n
  defp positive!(key, n), do: raise(ArgumentError, "grpc #{key}: #{inspect(n)}")

  defp executable, do: Path.join(:code.priv_dir(:dspex_bridge), "native/dspex_grpc")

  defp args(config) do
    base = ["--ip", to_string(:inet.ntoa(config.ip)), "--port", Integer.to_string(config.port)]

    tls =
      case config.tls do
        nil -> []
        %{certfile: c, keyfile: k} -> ["--tls-cert", c, "--tls-key", k]
      end

    limits =
      for {key, n} <- config.limits,
          do: ["--" <> String.replace(Atom.to_string(key), "_", "-"), Integer.to_string(n)]

    # The program refuses calls past max_in_flight itself, before they reach
    # this server's mailbox; the check in `frame_in/2` is the second line.
    in_flight = ["--max-in-flight", Integer.to_string(config.max_in_flight)]

    base ++ tls ++ List.flatten(limits) ++ in_flight
  end

  ## Server

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    config = config(opts)

    if config.auth == :none do
      Logger.warning(
        "dspex_bridge: the gRPC gateway runs WITHOUT authentication (auth: :none) on " <>
          "#{:inet.ntoa(config.ip)}: every call acts as the session it names. Development only."
      )
    end

    Telemetry.detach(@capture_handler)

    :ok =
      Telemetry.attach_many(
        @capture_handler,
        [[:dspex, :bridge, :variable, :write], [:dspex, :bridge, :variable, :rollback]],
        &Handler.capture_event/4,
        nil
      )

    state = %{
      config: config,
      path: executable(),
      port: nil,
      os_pid: nil,
      bound: nil,
      waiting: [],
      started_at: nil,
      deaths: 0,
      calls: %{},
      streams: %{},
      monitors: %{}
    }

    if File.exists?(state.path) do
      {:ok, spawn_program(state)}
    else
      {:stop, {:missing, state.path}}
    end
  end

  defp spawn_program(state) do
    port =
      Port.open({:spawn_executable, state.path}, [
        :binary,
        {:packet, 4},
        :exit_status,
        args: args(state.config)
      ])

    os_pid =
      case Port.info(port, :os_pid) do
        {:os_pid, p} -> p
        nil -> nil
      end

    %{state | port: port, os_pid: os_pid, started_at: System.monotonic_time(:millisecond)}
  rescue
    e in [ErlangError, ArgumentError] ->
      Logger.warning("dspex_bridge: cannot start the gRPC gateway: #{Exception.message(e)}")
      schedule_restart(state)
  end

  defp schedule_restart(state) do
    lived =
      if state.started_at, do: System.monotonic_time(:millisecond) - state.started_at, else: 0

    deaths = if lived >= state.config.max_delay, do: 1, else: state.deaths + 1

    delay =
      min(state.config.max_delay, state.config.min_delay * Bitwise.bsl(1, min(deaths - 1, 32)))

    Logger.warning("dspex_bridge: gRPC gateway down (#{deaths} in a row); restart in #{delay} ms")
    Process.send_after(self(), :restart, delay)
    %{state | port: nil, os_pid: nil, bound: nil, started_at: nil, deaths: deaths}
  end

  @impl true
  def handle_call(:port, from, %{bound: nil} = state),
    do: {:noreply, %{state | waiting: [from | state.waiting]}}

  def handle_call(:port, _from, state), do: {:reply, {:ok, state.bound}, state}
  def handle_call(:os_pid, _from, state), do: {:reply, state.os_pid, state}

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port} = state) do
    case decode_frame(frame) do
      {:ok, message} ->
        {:noreply, frame_in(message, state)}

      :error ->
        Logger.warning("dspex_bridge: unreadable frame from the gRPC gateway; ignored")
        {:noreply, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state),
    do: {:noreply, program_down(state, status)}

  def handle_info({:EXIT, port, _reason}, %{port: port} = state),
    do: {:noreply, program_down(state, nil)}

  def handle_info(:restart, %{port: nil} = state), do: {:noreply, spawn_program(state)}

  def handle_info({:DOWN, mon, :process, _pid, _}, state) do
    case Map.pop(state.monitors, mon) do
      {nil, _} ->
        {:noreply, state}

      {{kind, id}, monitors} ->
        {:noreply, Map.update!(%{state | monitors: monitors}, kind, &Map.delete(&1, id))}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    Telemetry.detach(@capture_handler)
    if state.port, do: close(state.port)
  end

  defp close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end

  defp program_down(state, status) do
    in_flight = map_size(state.calls) + map_size(state.streams)
    for {_id, pid} <- state.streams, do: send(pid, :dspex_link_down)

    Telemetry.execute(
      [:dspex, :bridge, :gateway, :exited],
      %{system_time: System.system_time(), in_flight: in_flight},
      %{os_pid: state.os_pid, status: status}
    )

    schedule_restart(state)
  end

  # Frames from the program (see native/dspex_grpc/src/link.rs).
  defp frame_in(["hello", bound], state) when is_integer(bound) do
    for from <- state.waiting, do: GenServer.reply(from, {:ok, bound})

    Logger.info(
      "dspex_bridge: gRPC gateway listening on #{:inet.ntoa(state.config.ip)}:#{bound}" <>
        if(state.config.tls, do: " (TLS)", else: "")
    )

    Telemetry.execute(
      [:dspex, :bridge, :gateway, :started],
      %{system_time: System.system_time()},
      %{os_pid: state.os_pid, port: bound}
    )

    # A restart listens on the same port (`port: 0` picked it the first time),
    # so clients reconnect to the address they know.
    %{state | bound: bound, waiting: [], config: %{state.config | port: bound}}
  end

  defp frame_in(["call", id, method, req, meta], state)
       when is_integer(id) and is_binary(method) and is_map(meta) do
    if map_size(state.calls) >= state.config.max_in_flight do
      reply(state.port, id, {:status, :resource_exhausted, "too many calls in flight", "busy"})
      Admission.refused(:grpc, state.config.max_in_flight, nil)
      state
    else
      port = state.port
      config = state.config
      {pid, mon} = spawn_monitor(fn -> run_call(port, id, method, req, meta, config) end)

      %{
        state
        | calls: Map.put(state.calls, id, pid),
          monitors: Map.put(state.monitors, mon, {:calls, id})
      }
    end
  end

  defp frame_in(["stream", id, method, req, meta], state)
       when is_integer(id) and is_binary(method) and is_map(meta) do
    if map_size(state.streams) >= state.config.max_watch_streams do
      reply(state.port, id, {:status, :resource_exhausted, "too many watch streams", "busy"})
      state
    else
      port = state.port
      config = state.config
      {pid, mon} = spawn_monitor(fn -> WatchStream.run(port, id, method, req, meta, config) end)

      %{
        state
        | streams: Map.put(state.streams, id, pid),
          monitors: Map.put(state.monitors, mon, {:streams, id})
      }
    end
  end

  # The calls the program refused past max_in_flight since its last report.
  defp frame_in(["refused", n], state) when is_integer(n) and n > 0 do
    Admission.refused(:grpc, state.config.max_in_flight, nil, n)
    state
  end

  defp frame_in(["credit", id, n], state) when is_integer(n) do
    if pid = state.streams[id], do: send(pid, {:dspex_credit, n})
    state
  end

  defp frame_in(["cancel", id], state) do
    if pid = state.streams[id], do: send(pid, :dspex_cancel)
    state
  end

  defp frame_in(_other, state) do
    Logger.warning("dspex_bridge: unexpected frame from the gRPC gateway; ignored")
    state
  end

  defp run_call(port, id, method, req, meta, config) do
    answer =
      try do
        case Handler.context(meta, config) do
          {:ok, ctx} -> Handler.call(method, req, ctx)
          status -> status
        end
      rescue
        e ->
          Logger.error(
            "dspex_bridge: gRPC #{method} failed: " <> Exception.format(:error, e, __STACKTRACE__)
          )

          {:status, :internal, "internal error", "internal"}
      catch
        kind, reason ->
          Logger.error("dspex_bridge: gRPC #{method} failed: #{inspect({kind, reason})}")
          {:status, :internal, "internal error", "internal"}
      end

    reply(port, id, answer)
  end

  @doc false
  # Sends an answer to the program; a closed port (it died meanwhile) is
  # the caller's UNAVAILABLE, not an error here.
  def reply(port, id, {:reply, response}), do: send_frame(port, ["reply", id, response])

  def reply(port, id, {:status, code, message, name}),
    do: send_frame(port, ["status", id, DSPex.Bridge.Gateway.Wire.code(code), message, name])

  def reply(port, id, {:item, message}), do: send_frame(port, ["item", id, message])
  def reply(port, id, :end), do: send_frame(port, ["end", id])

  # Frames are Erlang terms (the program's `etf` module): decoded and
  # encoded by the VM's own C code, several times cheaper per call than a
  # MessagePack codec in Elixir. `:safe`: a frame never creates an atom.
  defp decode_frame(frame) do
    {:ok, :erlang.binary_to_term(frame, [:safe])}
  rescue
    ArgumentError -> :error
  end

  # Every answer is a term of strings, numbers, nil/true/false, lists and
  # maps (what `Wire` builds). Anything else (a tuple, a pid, an integer
  # past 64 bits) cannot be read by the program, which fails that call with
  # INTERNAL "bad reply" (the id is read first) and logs why.
  defp send_frame(port, frame) do
    command(port, :erlang.term_to_binary(frame))
  end

  defp command(port, iodata) do
    Port.command(port, iodata)
    :ok
  rescue
    ArgumentError -> :ok
  end
end
