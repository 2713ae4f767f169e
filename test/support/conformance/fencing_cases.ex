defmodule DSPex.Bridge.Conformance.FencingCases do
  @moduledoc """
  Optimizer locks fence a variable's writes on every backend, run against
  each by `DSPex.Bridge.SessionStoreTest`: the lock table lives in the VM
  and moves the fence of the engine holding the session (for a `:port`
  session, with the `var_fence` command).
  """
  use DSPex.Bridge.Conformance.Case

  alias DSPex.Bridge.{OptimizerCoordinator, SessionStore}

  conformance "writes to a locked variable need the holder's token, and a preempted token is stale",
              %{sid: sid} do
    {:ok, _} = SessionStore.register_variable(sid, :t, :float, 0.5)
    first = "fence-a-#{sid}"
    second = "fence-b-#{sid}"
    holder = spawn_link(fn -> Process.sleep(:infinity) end)
    taker = spawn_link(fn -> Process.sleep(:infinity) end)

    assert {:ok, %{optimizer_id: ^first, token: old}} =
             SessionStore.start_optimization(sid, :t, holder, optimizer_id: first)

    assert {:error, {:locked_by, ^first}} = SessionStore.update_variable(sid, :t, 0.6)
    assert :ok = SessionStore.update_variable(sid, :t, 0.6, %{}, lock_token: old)

    assert {:ok, true} = OptimizerCoordinator.report_progress(first, 10, 0.5, %{loss: 1.0})

    assert {:ok, %{optimizer_id: ^second, token: new}} =
             SessionStore.start_optimization(sid, :t, taker,
               optimizer_id: second,
               conflict_resolution: :preempt
             )

    assert new > old

    assert {:error, :stale_lock_token} =
             SessionStore.update_variable(sid, :t, 0.7, %{}, lock_token: old)

    assert {:error, {:locked_by, ^second}} = SessionStore.update_variable(sid, :t, 0.7)
    assert :ok = SessionStore.update_variable(sid, :t, 0.7, %{}, lock_token: new)
    assert {:ok, 0.7} = SessionStore.get_variable_value(sid, :t) |> then(&{:ok, &1})

    assert :ok = SessionStore.stop_optimization(sid, :t)
    assert :ok = SessionStore.update_variable(sid, :t, 0.8)
    Enum.each([holder, taker], &(Process.unlink(&1) && Process.exit(&1, :kill)))
  end

  conformance "variable_exists?/3 answers for names, ids and the caller's rights", %{sid: sid} do
    {:ok, id} = SessionStore.register_variable(sid, :x, :integer, 1)
    assert {:ok, true} = SessionStore.variable_exists?(sid, :x)
    assert {:ok, true} = SessionStore.variable_exists?(sid, "x")
    assert {:ok, true} = SessionStore.variable_exists?(sid, id)
    assert {:ok, false} = SessionStore.variable_exists?(sid, :nope)
    assert {:ok, false} = SessionStore.variable_exists?(sid, <<255>>)

    assert {:error, :access_denied} =
             SessionStore.variable_exists?(sid, :x, principal: "intruder")

    assert {:error, :session_not_found} = SessionStore.variable_exists?("conf_none", :x)
    assert {:error, {:invalid_argument, _}} = SessionStore.variable_exists?(sid, :x, bogus: 1)
  end
end
