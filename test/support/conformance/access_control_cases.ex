defmodule DSPex.Bridge.Conformance.AccessControlCases do
  @moduledoc """
  Access control through `DSPex.Bridge.SessionStore`, run against each
  backend by `DSPex.Bridge.AccessControlTest`: isolation of every store
  operation, rules granting across sessions, conditions, the audit log and
  rate limits.
  """
  use DSPex.Bridge.Conformance.Case

  import DSPex.Bridge.Conformance, only: [new_session: 2, unique_id: 1]

  alias DSPex.Bridge.{AccessControl, SessionStore}
  alias DSPex.TelemetryHelper

  @denied [:dspex, :bridge, :access, :denied]
  @exceeded [:dspex, :bridge, :rate_limit, :exceeded]

  @seed_rules [
    %{session_pattern: :any, permissions: [:read]},
    %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
  ]

  # A session with a private variable and a shared one (the seed's rules).
  defp shared(ctx, opts \\ []) do
    sid = new_session(ctx, opts)
    {:ok, _} = SessionStore.register_variable(sid, :private, :integer, 0)

    {:ok, _} =
      SessionStore.register_variable(sid, :shared, :integer, 0, access_rules: @seed_rules)

    sid
  end

  conformance "another session is refused every operation on a private variable", ctx do
    sid = shared(ctx)
    as = [principal: "intruder"]
    denied = {:error, :access_denied}

    assert ^denied = SessionStore.get_variable(sid, :private, as)
    assert SessionStore.get_variable_value(sid, :private, :nope, as) == :nope
    assert ^denied = SessionStore.update_variable(sid, :private, 1, %{}, as)
    assert ^denied = SessionStore.get_variable_history(sid, :private, 10, as)
    assert ^denied = SessionStore.rollback_variable(sid, :private, 0, as)
    assert ^denied = SessionStore.delete_variable(sid, :private, as)
    assert ^denied = SessionStore.set_variable_permissions(sid, :private, @seed_rules, as)
    assert ^denied = AccessControl.authorize(sid, :private, :observe, as)
    assert ^denied = AccessControl.authorize(sid, :private, :optimize, as)
    assert ^denied = SessionStore.register_variable(sid, :mine, :integer, 1, as)

    assert [%{event: :denied, variable: nil, permission: :write} | _] =
             AccessControl.audit_log(sid)

    assert {:error, {:validation_failed, %{private: :access_denied}}} =
             SessionStore.update_variables(sid, %{private: 1}, Keyword.put(as, :atomic, true))

    assert {:ok, %{private: ^denied}} = SessionStore.update_variables(sid, %{private: 1}, as)

    assert {:ok, %{found: found, missing: [:private]}} =
             SessionStore.get_variables(sid, [:private, :shared], as)

    assert Map.keys(found) == [:shared]
    assert {:ok, [%{name: :shared}]} = SessionStore.list_variables(sid, nil, as)
    assert {:ok, []} = SessionStore.list_variables(sid, "priv*", as)

    # Nothing changed; the session itself still sees everything.
    assert SessionStore.get_variable_value(sid, :private) == 0
    assert {:ok, [_, _]} = SessionStore.list_variables(sid)
    assert {:ok, [_, _]} = SessionStore.list_variables(sid, nil, principal: sid)
  end

  conformance "rules grant across sessions: read for :any, write and optimize for admin_*", ctx do
    sid = shared(ctx)
    assert SessionStore.get_variable_value(sid, :shared, nil, principal: "other") == 0

    assert {:error, :access_denied} =
             SessionStore.update_variable(sid, :shared, 1, %{}, principal: "other")

    assert {:error, :access_denied} =
             SessionStore.update_variable(sid, :shared, 1, %{}, principal: "not_admin_1")

    assert :ok = SessionStore.update_variable(sid, :shared, 2, %{}, principal: "admin_ops")
    assert :ok = AccessControl.authorize(sid, :shared, :optimize, principal: "admin_ops")

    assert {:error, :access_denied} =
             AccessControl.authorize(sid, :shared, :observe, principal: "admin_ops")

    assert SessionStore.get_variable_value(sid, :shared) == 2

    assert {:ok, %{access_rules: rules}} = SessionStore.get_variable(sid, :shared)
    assert [%{session_pattern: :any, permissions: [:read], conditions: %{}}, _] = rules
  end

  conformance "a variable map from the store checks the same in Elixir", ctx do
    sid = shared(ctx)
    {:ok, var} = SessionStore.get_variable(sid, :shared)

    for principal <- ["other", "admin_x", "not_admin_1"],
        perm <- [:read, :write, :observe, :optimize] do
      assert AccessControl.check_permission(var, principal, perm) ==
               SessionStore.check_variable_access(sid, :shared, principal, perm)
    end
  end

  conformance "the owner named in metadata has all; admins may not change rules", ctx do
    sid = ctx.sid

    {:ok, _} =
      SessionStore.register_variable(sid, :v, :integer, 0,
        metadata: %{owner_session: "alice"},
        access_rules: @seed_rules
      )

    assert :ok = SessionStore.update_variable(sid, :v, 5, %{}, principal: "alice")

    assert {:error, :access_denied} =
             SessionStore.set_variable_permissions(sid, :v, [], principal: "admin_ops")

    assert :ok = SessionStore.set_variable_permissions(sid, :v, [], principal: "alice")
    assert {:error, :access_denied} = SessionStore.get_variable(sid, :v, principal: "bob")
  end

  conformance "a rule change takes effect at once (the decision cache is invalidated)", ctx do
    sid = shared(ctx)

    for _ <- 1..3 do
      assert :ok = SessionStore.check_variable_access(sid, :shared, "other", :read)

      assert {:error, :access_denied} =
               SessionStore.check_variable_access(sid, :shared, "other", :write)

      assert SessionStore.get_variable_value(sid, :shared, nil, principal: "other") == 0
    end

    :ok =
      SessionStore.set_variable_permissions(sid, :shared, [
        %{session_pattern: "oth*", permissions: [:write]}
      ])

    assert :ok = SessionStore.check_variable_access(sid, :shared, "other", :write)

    assert {:error, :access_denied} =
             SessionStore.check_variable_access(sid, :shared, "other", :read)

    assert SessionStore.get_variable_value(sid, :shared, :denied, principal: "other") == :denied

    assert {:error, {:invalid_rules, {0, :not_a_map}}} =
             SessionStore.set_variable_permissions(sid, :shared, [:bad])

    assert :ok = SessionStore.check_variable_access(sid, :shared, "other", :write)
  end

  conformance "conditions are checked against the context: option", ctx do
    sid = ctx.sid

    rules = [
      %{session_pattern: "w_*", permissions: [:read, :write], conditions: %{role: "editor"}}
    ]

    {:ok, _} = SessionStore.register_variable(sid, :doc, :string, "a", access_rules: rules)

    assert {:error, :access_denied} =
             SessionStore.update_variable(sid, :doc, "b", %{}, principal: "w_1")

    assert :ok =
             SessionStore.update_variable(sid, :doc, "b", %{},
               principal: "w_1",
               context: %{role: "editor"}
             )

    assert {:error, :access_denied} =
             SessionStore.get_variable(sid, :doc, principal: "w_1", context: %{role: "viewer"})

    assert :ok =
             SessionStore.check_variable_access(sid, :doc, "w_1", :read,
               context: %{"role" => "editor"}
             )

    assert {:error, {:invalid_argument, :context_must_be_a_map}} =
             SessionStore.get_variable(sid, :doc, principal: "w_1", context: [role: "editor"])
  end

  conformance "denials are reported by telemetry and audited in a bounded ring", ctx do
    ref = TelemetryHelper.attach([@denied])
    sid = shared(ctx, audit_size: 3)

    for i <- 1..5 do
      assert {:error, :access_denied} =
               SessionStore.update_variable(sid, :shared, i, %{}, principal: "p#{i}")

      p = "p#{i}"

      assert_receive {@denied, ^ref, _,
                      %{session_id: ^sid, variable: :shared, principal: ^p, permission: :write}}
    end

    SessionStore.get_variable_value(sid, :private, nil, principal: "reader")
    assert_receive {@denied, ^ref, _, %{principal: "reader", permission: :read}}

    log = AccessControl.audit_log(sid)
    assert length(log) == 3
    assert [%{event: :denied, principal: "reader", permission: :read, seq: 6} | _] = log
    assert [%DateTime{} | _] = Enum.map(log, & &1.at)
    assert [%{principal: "p5"}] = AccessControl.audit_log(sid, by: "p5")
    assert [_] = AccessControl.audit_log(sid, limit: 1)

    # Allowed operations leave no entry; rule changes do.
    assert SessionStore.get_variable_value(sid, :shared, nil, principal: "reader") == 0
    :ok = SessionStore.set_variable_permissions(sid, :shared, [])

    assert [%{event: :rules_changed, principal: nil, permission: nil}] =
             AccessControl.audit_log(sid, event: :rules_changed)

    assert AccessControl.audit_log("no_such_session") == []
    assert AccessControl.audit_log(new_session(ctx, audit_size: 0)) == []
  end

  conformance "rules survive export and import", ctx do
    sid = shared(ctx)
    {:ok, snapshot} = SessionStore.export_session(sid)
    copy = unique_id(ctx.backend)
    {:ok, ^copy} = SessionStore.import_session(snapshot, session_id: copy, backend: ctx.backend)
    ExUnit.Callbacks.on_exit(fn -> SessionStore.delete_session(copy) end)

    assert SessionStore.get_variable_value(copy, :shared, nil, principal: "anyone") == 0
    assert :ok = SessionStore.update_variable(copy, :shared, 3, %{}, principal: "admin_z")
    assert {:error, :access_denied} = SessionStore.get_variable(copy, :private, principal: sid)
  end

  conformance "bad principals and rules are refused at the boundary", ctx do
    sid = shared(ctx)

    for bad <- [123, "", String.duplicate("p", 256), <<0xFF>>, {:a, %{}}] do
      assert {:error, {:invalid_argument, _}} =
               SessionStore.get_variable(sid, :shared, principal: bad)
    end

    assert {:error, {:invalid_rules, :not_a_list}} =
             SessionStore.register_variable(sid, :r, :integer, 0, access_rules: %{})

    assert {:error, {:invalid_argument, {:unknown_permission, :admin}}} =
             AccessControl.authorize(sid, :shared, :admin, principal: "x")

    assert {:error, {:invalid_argument, {:unknown_permission, :admin}}} =
             SessionStore.check_variable_access(sid, :shared, "x", :admin)

    assert {:error, :not_found} = SessionStore.check_variable_access(sid, :nope, "x", :read)
    assert {:error, :session_not_found} = SessionStore.set_variable_permissions("nope", :v, [])
  end

  conformance "concurrent readers see either the old or the new rules, never garbage", ctx do
    sid = shared(ctx)
    parent = self()

    readers =
      for i <- 1..8 do
        spawn_link(fn ->
          results =
            for _ <- 1..500 do
              SessionStore.get_variable_value(sid, :shared, :denied, principal: "r#{i}")
            end

          send(parent, {:done, Enum.uniq(results)})
        end)
      end

    for n <- 1..50 do
      rules = if rem(n, 2) == 0, do: @seed_rules, else: []
      :ok = SessionStore.set_variable_permissions(sid, :shared, rules)
    end

    for _ <- readers do
      assert_receive {:done, seen}, 5_000
      assert seen -- [0, :denied] == []
    end
  end

  # Until the session's bucket holds a token again, as `get_session/2`
  # reports it (reading it takes none).
  defp await_token(sid) do
    case SessionStore.get_session(sid) do
      {:ok, %{rate_limit: %{available: n}}} when n >= 1 ->
        :ok

      {:ok, %{rate_limit: %{ops_per_sec: rate}}} ->
        Process.sleep(max(div(1_000, rate * 10), 1))
        await_token(sid)
    end
  end

  conformance "burst, refusal with telemetry, then refill", ctx do
    ref = TelemetryHelper.attach([@exceeded])
    sid = new_session(ctx, rate_limit: {1, 3})
    {:ok, _} = SessionStore.register_variable(sid, :v, :integer, 0)
    assert :ok = SessionStore.update_variable(sid, :v, 1)
    assert SessionStore.get_variable_value(sid, :v) == 1
    assert {:error, :rate_limited} = SessionStore.update_variable(sid, :v, 2)
    assert_receive {@exceeded, ^ref, _, %{session_id: ^sid, variable: :v, principal: nil}}
    assert {:error, :rate_limited} = SessionStore.get_variable(sid, :v)
    assert {:error, :rate_limited} = SessionStore.list_variables(sid)
    assert [%{event: :rate_limited} | _] = AccessControl.audit_log(sid)

    # One token back every second (the engine's clock: wait until its bucket
    # says so, which asking does not spend); questions take none.
    await_token(sid)
    assert {:error, :access_denied} = SessionStore.check_variable_access(sid, :v, "x", :read)
    assert :ok = SessionStore.update_variable(sid, :v, 3)
    assert {:error, :rate_limited} = SessionStore.update_variable(sid, :v, 4)
    assert {:ok, %{rate_limit: %{ops_per_sec: 1, burst: 3}}} = SessionStore.get_session(sid)
  end

  conformance "a batch costs one token per variable", ctx do
    sid = new_session(ctx, rate_limit: {1, 4})
    {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 0)
    {:ok, _} = SessionStore.register_variable(sid, :b, :integer, 0)
    assert :ok = SessionStore.update_variables(sid, %{a: 1, b: 1}, atomic: true)

    assert {:error, :rate_limited} =
             SessionStore.update_variables(sid, %{a: 2, b: 2}, atomic: true)
  end

  conformance "bad limits are refused", ctx do
    for bad <- [{0, 1}, {1, 0}, {-1, 5}, {1.5, 2}, :fast, {1, 2, 3}, {1, 2_000_000}] do
      assert {:error, {:invalid_argument, {:rate_limit, ^bad}}} =
               SessionStore.create_session(unique_id(ctx.backend),
                 rate_limit: bad,
                 backend: ctx.backend
               )
    end

    assert {:error, {:invalid_argument, {:audit_capacity, -1}}} =
             SessionStore.create_session(unique_id(ctx.backend),
               audit_size: -1,
               backend: ctx.backend
             )
  end
end
