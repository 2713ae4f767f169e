defmodule DSPex.Bridge.DependencyManager.ComputeTimeoutConfigTest do
  # Changes the application environment, so it runs alone.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{DependencyManager, SessionStore}

  setup do
    sid = "dep_config_#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 1)
    %{sid: sid}
  end

  test "the default deadline is the :compute_timeout config key", %{sid: sid} do
    key = DependencyManager
    old = Application.get_env(:dspex_bridge, key)

    on_exit(fn ->
      if old,
        do: Application.put_env(:dspex_bridge, key, old),
        else: Application.delete_env(:dspex_bridge, key)
    end)

    Application.put_env(:dspex_bridge, key, compute_timeout: 30)

    assert {:error, {:compute_failed, :timeout}} =
             DependencyManager.defderived(sid, :never, :integer, [:a], fn _ ->
               Process.sleep(:infinity)
             end)

    Application.put_env(:dspex_bridge, key, compute_timeout: :soon)

    assert {:error, {:invalid_argument, {:compute_timeout, :soon}}} =
             DependencyManager.defderived(sid, :x, :integer, [:a], & &1.a)

    assert {:error, {:invalid_argument, {:compute_timeout, 0}}} =
             DependencyManager.defderived(sid, :x, :integer, [:a], & &1.a, compute_timeout: 0)
  end
end
