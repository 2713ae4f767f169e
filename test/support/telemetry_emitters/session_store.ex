defmodule DSPex.TelemetryEmitters.SessionStore do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  import DSPex.TelemetryEmitters, only: [sid: 1]
  alias DSPex.Bridge.SessionStore

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :session, :created] => fn -> SessionStore.create_session(sid("c")) end,
      [:dspex, :bridge, :session, :deleted] => fn ->
        {:ok, sid} = SessionStore.create_session(sid("d"))
        SessionStore.delete_session(sid)
      end,
      [:dspex, :bridge, :session, :expired] => fn ->
        # Found by one of the sweeper's next rounds (one a second).
        {:ok, _} = SessionStore.create_session(sid("e"), ttl: 1)
      end,
      [:dspex, :bridge, :variable, :registered] => fn -> with_var(fn _ -> :ok end) end,
      [:dspex, :bridge, :variable, :read] => fn ->
        with_var(&SessionStore.get_variable_value(&1, :x))
      end,
      [:dspex, :bridge, :variable, :write] => fn ->
        with_var(&SessionStore.update_variable(&1, :x, 2))
      end,
      [:dspex, :bridge, :variable, :rollback] => fn ->
        with_var(fn sid ->
          :ok = SessionStore.update_variable(sid, :x, 2)
          SessionStore.rollback_variable(sid, :x, 0)
        end)
      end,
      [:dspex, :bridge, :variable, :version_conflict] => fn ->
        with_var(&SessionStore.update_variable(&1, :x, 2, %{expected_version: 7}))
      end
    }
  end

  defp with_var(fun) do
    {:ok, sid} = SessionStore.create_session(sid("v"))
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    fun.(sid)
  end
end
