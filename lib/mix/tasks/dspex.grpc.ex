defmodule Mix.Tasks.Dspex.Grpc do
  @shortdoc "Runs the gRPC bridge server (BridgeService) until stopped"
  @moduledoc """
  Starts dspex_bridge with its gRPC gateway and blocks until stopped.

      mix dspex.grpc [--port N] [--ip A] [--no-auth] [--tls-cert PEM --tls-key PEM]
                     [--token-for PRINCIPAL] [--token-sessions GLOB,...]

  Options override `config :dspex_bridge, grpc: [...]`. `--port 0` picks a
  free port. Once listening it prints `dspex_bridge grpc listening on IP:PORT`
  on a line of its own. `--no-auth` (loopback only) runs every call as the
  session it names. `--token-for P` issues a bearer token for principal `P`
  (`session` for `:session`) covering `--token-sessions` (default: `P`;
  `*` for any) and prints `dspex_bridge grpc token TOKEN`.

  Stops on end of standard input when `--stop-on-eof` is given (for test
  harnesses), else on Ctrl-C. `--control` (for the Python test suite and
  demos) also reads commands from standard input, one per line, and answers
  each with one line `dspex_bridge reply ANSWER`: `token PRINCIPAL SESSIONS TTL_MS` (SESSIONS a comma
  list or `*`) -> the token; `revoke TOKEN`; `os_pid` -> the gateway's OS
  pid; `set SID NAME JSON_NUMBER` (an Elixir-side write) -> `ok` or the
  error; `delete_session SID`. Anything else answers `error unknown`.
  """
  use Mix.Task

  @switches [
    port: :integer,
    ip: :string,
    no_auth: :boolean,
    tls_cert: :string,
    tls_key: :string,
    token_for: :string,
    token_sessions: :string,
    token_ttl: :integer,
    stop_on_eof: :boolean,
    control: :boolean
  ]

  @impl true
  def run(args) do
    {opts, _, invalid} = OptionParser.parse(args, strict: @switches)
    if invalid != [], do: Mix.raise("mix dspex.grpc: unknown options #{inspect(invalid)}")

    grpc = Application.get_env(:dspex_bridge, :grpc) || []
    grpc = if opts[:port], do: Keyword.put(grpc, :port, opts[:port]), else: grpc
    grpc = if opts[:ip], do: Keyword.put(grpc, :ip, opts[:ip]), else: grpc
    grpc = if opts[:no_auth], do: Keyword.put(grpc, :auth, :none), else: grpc

    grpc =
      case {opts[:tls_cert], opts[:tls_key]} do
        {nil, nil} ->
          grpc

        {c, k} when is_binary(c) and is_binary(k) ->
          Keyword.put(grpc, :tls, certfile: c, keyfile: k)

        _ ->
          Mix.raise("mix dspex.grpc: --tls-cert and --tls-key go together")
      end

    Application.put_env(:dspex_bridge, :grpc, grpc)
    Mix.Task.run("app.start")

    {:ok, port} = DSPex.Bridge.Gateway.port(30_000)
    ip = grpc |> Keyword.get(:ip, "127.0.0.1") |> ip_text()
    IO.puts("dspex_bridge grpc listening on #{ip}:#{port}")

    if principal = opts[:token_for] do
      principal = if principal == "session", do: :session, else: principal

      sessions =
        case opts[:token_sessions] do
          nil -> if principal == :session, do: :any, else: [principal]
          "*" -> :any
          list -> String.split(list, ",", trim: true)
        end

      {:ok, token} =
        DSPex.Bridge.Gateway.issue_token(principal,
          sessions: sessions,
          ttl: opts[:token_ttl] || :timer.hours(24)
        )

      IO.puts("dspex_bridge grpc token #{token}")
    end

    cond do
      opts[:control] ->
        control_loop()

      opts[:stop_on_eof] ->
        # Returns on end of input: the harness went away.
        _ = IO.read(:stdio, :eof)
        System.halt(0)

      true ->
        Process.sleep(:infinity)
    end
  end

  defp control_loop do
    case IO.read(:stdio, :line) do
      line when is_binary(line) ->
        IO.puts("dspex_bridge reply " <> command(String.split(line)))
        control_loop()

      _eof ->
        System.halt(0)
    end
  end

  defp command(["token", principal, sessions, ttl]) do
    principal = if principal == "session", do: :session, else: principal
    sessions = if sessions == "*", do: :any, else: String.split(sessions, ",", trim: true)

    case DSPex.Bridge.Gateway.issue_token(principal,
           sessions: sessions,
           ttl: String.to_integer(ttl)
         ) do
      {:ok, token} -> token
      {:error, reason} -> "error #{inspect(reason)}"
    end
  end

  defp command(["revoke", token]), do: DSPex.Bridge.Gateway.revoke_token(token) && "ok"
  defp command(["os_pid"]), do: to_string(DSPex.Bridge.Gateway.os_pid())

  defp command(["set", sid, name, number]) do
    value =
      case Float.parse(number) do
        {f, ""} -> if String.contains?(number, "."), do: f, else: String.to_integer(number)
        _ -> number
      end

    case DSPex.Bridge.SessionStore.update_variable(sid, name, value) do
      :ok -> "ok"
      {:error, reason} -> "error #{inspect(reason)}"
    end
  end

  defp command(["delete_session", sid]) do
    case DSPex.Bridge.SessionStore.delete_session(sid) do
      :ok -> "ok"
      {:error, reason} -> "error #{inspect(reason)}"
    end
  end

  defp command(_other), do: "error unknown"

  defp ip_text(ip) when is_binary(ip), do: ip
  defp ip_text(ip) when is_tuple(ip), do: to_string(:inet.ntoa(ip))
end
