defmodule DSPex.TelemetryEmitters.AccessControl do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  import DSPex.TelemetryEmitters, only: [sid: 1]
  alias DSPex.Bridge.SessionStore

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :access, :denied] => fn ->
        {:ok, sid} = SessionStore.create_session(sid("acl"))
        {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
        SessionStore.update_variable(sid, :x, 2, %{}, principal: "intruder")
      end,
      [:dspex, :bridge, :rate_limit, :exceeded] => fn ->
        {:ok, sid} = SessionStore.create_session(sid("rl"), rate_limit: {1, 1})
        {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
        SessionStore.get_variable_value(sid, :x)
      end
    }
  end
end
