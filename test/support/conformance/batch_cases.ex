defmodule DSPex.Bridge.Conformance.BatchCases do
  @moduledoc """
  Calls over many variables, run against each backend by
  `DSPex.Bridge.SessionStoreTest`: what concerns the whole call (the
  session id, the principal, the rate limit) is an error of the call, never
  folded into a per-variable answer, and never a crash.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [new_session: 2]

  alias DSPex.Bridge.SessionStore

  conformance "get_variables/3: a bad session id or principal is the call's error", ctx do
    %{sid: sid} = ctx
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)

    for garbage <- [123, <<255>>, nil, {:s}], idents <- [[:x], []] do
      assert {:error, {:invalid_argument, :bad_session_id}} =
               SessionStore.get_variables(garbage, idents),
             "#{inspect(garbage)} #{inspect(idents)}"
    end

    assert {:error, :session_not_found} = SessionStore.get_variables("conf_none", [:x])
    assert {:error, :session_not_found} = SessionStore.get_variables("conf_none", [])

    assert {:error, {:invalid_argument, :bad_principal}} =
             SessionStore.get_variables(sid, [:x], principal: 42)

    assert {:error, {:invalid_argument, {:idents, :x}}} = SessionStore.get_variables(sid, :x)

    # Names that cannot name a variable are missing, as unknown ones are.
    assert {:ok, %{found: %{x: %{value: 1}}, missing: [123, :nope, <<255>>]}} =
             SessionStore.get_variables(sid, [:x, 123, :nope, <<255>>])

    assert {:ok, %{found: found, missing: []}} = SessionStore.get_variables(sid, [])
    assert found == %{}
  end

  conformance "update_variables/3: a bad session id is the call's error", %{sid: sid} do
    for garbage <- [123, <<255>>], updates <- [%{x: 1}, %{}] do
      assert {:error, {:invalid_argument, :bad_session_id}} =
               SessionStore.update_variables(garbage, updates)
    end

    assert {:error, :session_not_found} = SessionStore.update_variables("conf_none", %{x: 1})
    assert {:error, :session_not_found} = SessionStore.update_variables("conf_none", %{})
    assert {:ok, %{}} = SessionStore.update_variables(sid, %{})
  end

  conformance "update_variables/3: malformed updates or metadata are invalid arguments",
              %{sid: sid} do
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)

    for {updates, opts, detail} <- [
          {[{:x, 2, %{}}], [metadata: :not_a_map], :metadata_must_be_a_map},
          {[{:x, 2}], [metadata: [:not, :a, :map]], :metadata_must_be_a_map},
          {%{x: 2}, [metadata: :not_a_map], :metadata_must_be_a_map},
          {[{:x, 2, :meta}], [], {:bad_update, {:x, 2, :meta}}},
          {[:x], [], {:bad_update, :x}},
          {:x, [], {:bad_updates, :x}}
        ],
        atomic <- [true, false] do
      assert {:error, {:invalid_argument, ^detail}} =
               SessionStore.update_variables(sid, updates, [{:atomic, atomic} | opts]),
             "#{inspect(updates)} #{inspect(opts)}"
    end

    assert {:ok, %{version: 0, value: 1}} = SessionStore.get_variable(sid, :x)
  end

  conformance "get_session_diagnostics/2 returns the rate limit's refusal, never crashes",
              ctx do
    # Registration leaves two tokens; diagnostics needs one per variable more.
    sid = new_session(ctx, rate_limit: {1, 22})

    for i <- 1..20 do
      {:ok, _} = SessionStore.register_variable(sid, "v#{i}", :integer, i)
    end

    assert {:error, :rate_limited} = SessionStore.get_session_diagnostics(sid)
  end
end
