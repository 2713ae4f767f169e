defmodule DSPex.TelemetryEmitters.Dependencies do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{DependencyManager, SessionStore}
  alias DSPex.TelemetryEmitters

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :dependency, :added] => fn -> with_vars(&added/1) end,
      [:dspex, :bridge, :dependency, :removed] => fn -> with_vars(&removed/1) end,
      [:dspex, :bridge, :dependency, :cycle_detected] => fn -> with_vars(&cycle/1) end,
      [:dspex, :bridge, :propagation, :start] => fn -> with_vars(&propagate/1) end,
      [:dspex, :bridge, :propagation, :stop] => fn -> with_vars(&propagate/1) end,
      [:dspex, :bridge, :propagation, :failed] => fn -> with_vars(&raise_in_compute/1) end
    }
  end

  defp with_vars(fun) do
    sid = TelemetryEmitters.sid("telemetry-deps")
    {:ok, ^sid} = SessionStore.create_session(sid)
    for v <- [:a, :b], do: {:ok, _} = SessionStore.register_variable(sid, v, :integer, 1)
    fun.(sid)
    SessionStore.delete_session(sid)
  end

  defp added(sid), do: :ok = DependencyManager.add_dependency(sid, :a, :b)

  defp removed(sid) do
    added(sid)
    :ok = DependencyManager.remove_dependency(sid, :a, :b)
  end

  defp cycle(sid) do
    added(sid)
    {:error, :would_create_cycle} = DependencyManager.add_dependency(sid, :b, :a)
  end

  defp propagate(sid) do
    {:ok, _} = DependencyManager.defderived(sid, :c, :integer, [:a], &(&1.a + 1))
    :ok = SessionStore.update_variable(sid, :a, 2)
    :ok = DependencyManager.await_propagation(sid)
  end

  defp raise_in_compute(sid) do
    {:ok, _} = DependencyManager.defderived(sid, :c, :integer, [:a], &div(10, &1.a))
    :ok = SessionStore.update_variable(sid, :a, 0)
    :ok = DependencyManager.await_propagation(sid)
  end
end
