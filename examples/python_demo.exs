# The Python bridge demo (`make demo` runs it after examples/demo.exs):
# the Elixir side starts the gRPC gateway on a free port, creates a session
# with a derived variable, issues a token, and runs examples/python_worker.py,
# a Python optimizer sharing the session.
alias DSPex.Bridge.{DependencyManager, Gateway, SessionStore}

{:ok, _} = Gateway.Supervisor.start_link(port: 0, ip: {127, 0, 0, 1})
{:ok, port} = Gateway.port()
IO.puts("[elixir] gateway listening on 127.0.0.1:#{port}")

sid = "demo-python-#{System.unique_integer([:positive])}"
{:ok, ^sid} = SessionStore.create_session(sid)

{:ok, _} =
  SessionStore.register_variable(sid, :temperature, :float, 0.7,
    constraints: %{min: 0.0, max: 2.0}
  )

# `loss` is computed from `temperature` and recomputed whenever it changes.
{:ok, _} =
  DependencyManager.defderived(sid, :loss, :float, [:temperature], fn %{temperature: t} ->
    Float.round((t - 0.3) * (t - 0.3), 6)
  end)

IO.puts("[elixir] session #{sid}: temperature = 0.7, loss derived from it")
{:ok, token} = Gateway.issue_token(sid, ttl: :timer.minutes(5))

python = Path.expand(".venv/bin/python")
python = if File.exists?(python), do: python, else: "python3"

{_, status} =
  System.cmd(python, ["examples/python_worker.py"],
    env: [
      {"DSPEX_ADDRESS", "127.0.0.1:#{port}"},
      {"DSPEX_SESSION", sid},
      {"DSPEX_TOKEN", token},
      {"PYTHONPATH", Path.expand("python")}
    ],
    into: IO.stream(),
    stderr_to_stdout: true
  )

{:ok, history} = SessionStore.get_variable_history(sid, :temperature)

IO.puts(
  "[elixir] temperature is now #{SessionStore.get_variable_value(sid, :temperature)}; " <>
    "#{length(history)} earlier versions"
)

Gateway.revoke_token(token)
SessionStore.delete_session(sid)
if status != 0, do: System.halt(status)
