defmodule DSPex.Bridge.AccessControlTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{AccessControl, SessionStore}
  alias DSPex.TelemetryHelper

  doctest AccessControl

  @denied [:dspex, :bridge, :access, :denied]
  @exceeded [:dspex, :bridge, :rate_limit, :exceeded]

  @seed_rules [
    %{session_pattern: :any, permissions: [:read]},
    %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
  ]

  defp unique(prefix), do: "#{prefix}_#{System.unique_integer([:positive])}"

  defp session(opts \\ []) do
    sid = unique("acl")
    {:ok, ^sid} = SessionStore.create_session(sid, opts)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  # A session with a private variable and a shared one (the seed's rules).
  defp shared_session(opts \\ []) do
    sid = session(opts)
    {:ok, _} = SessionStore.register_variable(sid, :private, :integer, 0)

    {:ok, _} =
      SessionStore.register_variable(sid, :shared, :integer, 0, access_rules: @seed_rules)

    sid
  end

  describe "check_permission/4 (seed cases)" do
    setup do
      %{
        variable: %{
          id: "var_123",
          metadata: %{owner_session: "owner_session"},
          access_rules: @seed_rules
        }
      }
    end

    test "the owner has every permission", %{variable: v} do
      for perm <- [:read, :write, :observe, :optimize] do
        assert :ok = AccessControl.check_permission(v, "owner_session", perm)
      end
    end

    test "others may only read", %{variable: v} do
      assert :ok = AccessControl.check_permission(v, "other_session", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "other_session", :write)

      assert {:error, :access_denied} =
               AccessControl.check_permission(v, "other_session", :observe)
    end

    test "admin_* writes and optimizes; not_admin_1 does not", %{variable: v} do
      assert :ok = AccessControl.check_permission(v, "admin_user", :write)
      assert :ok = AccessControl.check_permission(v, "admin_user", :optimize)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "not_admin_1", :write)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "xadmin_1", :optimize)
    end

    test "created_by is the owner when owner_session is absent" do
      v = %{metadata: %{created_by: "maker"}, access_rules: []}
      assert :ok = AccessControl.check_permission(v, "maker", :write)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "other", :read)
    end

    test "default deny without rules or metadata" do
      assert {:error, :access_denied} = AccessControl.check_permission(%{}, "x", :read)
      v = %{metadata: %{}, access_rules: nil}
      assert {:error, :access_denied} = AccessControl.check_permission(v, "x", :read)
    end
  end

  describe "check_permission/4 patterns and conditions" do
    defp one(pattern, perms \\ [:read], conditions \\ %{}) do
      %{
        metadata: %{},
        access_rules: [%{session_pattern: pattern, permissions: perms, conditions: conditions}]
      }
    end

    test "? matches exactly one character" do
      v = one("user_?")
      assert :ok = AccessControl.check_permission(v, "user_1", :read)
      assert :ok = AccessControl.check_permission(v, "user_é", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "user_", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(v, "user_12", :read)
    end

    test "regex metacharacters are literal" do
      assert :ok = AccessControl.check_permission(one("a.b*"), "a.bcd", :read)

      assert {:error, :access_denied} =
               AccessControl.check_permission(one("a.b*"), "axbcd", :read)

      assert :ok = AccessControl.check_permission(one("x+y"), "x+y", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(one("x+y"), "xxy", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(one("(a|b)"), "a", :read)
      assert {:error, :access_denied} = AccessControl.check_permission(one("^a$"), "a", :read)
    end

    test "patterns are anchored at both ends" do
      assert {:error, :access_denied} =
               AccessControl.check_permission(one("*_admin"), "x_admins", :read)

      assert :ok = AccessControl.check_permission(one("*_admin"), "x_admin", :read)
      assert :ok = AccessControl.check_permission(one("a*b*c"), "aXbYc", :read)

      assert {:error, :access_denied} =
               AccessControl.check_permission(one("a*b*c"), "aXbYcd", :read)
    end

    test "conditions must all equal the context" do
      v = one(:any, [:write], %{role: "editor", level: 2})

      assert :ok = AccessControl.check_permission(v, "s", :write, %{role: "editor", level: 2.0})

      assert {:error, :access_denied} =
               AccessControl.check_permission(v, "s", :write, %{role: "editor", level: 3})

      assert {:error, :access_denied} =
               AccessControl.check_permission(v, "s", :write, %{role: "editor"})

      assert {:error, :access_denied} = AccessControl.check_permission(v, "s", :write)
    end

    test "malformed rules grant nothing; string keys are understood" do
      bad = %{metadata: %{}, access_rules: [:junk, %{session_pattern: 1, permissions: [:read]}]}
      assert {:error, :access_denied} = AccessControl.check_permission(bad, "s", :read)

      strings = %{
        metadata: %{},
        access_rules: [%{"session_pattern" => "s*", "permissions" => ["read"]}]
      }

      assert :ok = AccessControl.check_permission(strings, "sx", :read)
    end

    test "bad arguments are errors, not crashes" do
      assert {:error, {:invalid_argument, {:unknown_permission, :delete}}} =
               AccessControl.check_permission(%{}, "s", :delete)

      assert {:error, {:invalid_argument, {:variable, nil}}} =
               AccessControl.check_permission(nil, "s", :read)

      assert {:error, {:invalid_argument, {:session_id, :s}}} =
               AccessControl.check_permission(%{}, :s, :read)
    end
  end

  describe "validate_rules/1" do
    test "accepts the seed's rules and canonical ones" do
      assert :ok = AccessControl.validate_rules(@seed_rules)
      assert :ok = AccessControl.validate_rules([])

      assert :ok =
               AccessControl.validate_rules([
                 %{session_pattern: "a?", permissions: [:observe], conditions: %{team: "x"}}
               ])
    end

    test "rejects with a reason that names the rule" do
      reject = fn rules ->
        assert {:error, {:invalid_rules, detail}} = AccessControl.validate_rules(rules)
        detail
      end

      assert {0, {:invalid_permission, :invalid_perm}} =
               reject.([%{session_pattern: :any, permissions: [:invalid_perm]}])

      assert :not_a_list = reject.(%{session_pattern: :any})
      assert {1, :not_a_map} = reject.([hd(@seed_rules), :rule])
      assert {0, :missing_session_pattern} = reject.([%{permissions: [:read]}])
      assert {0, :missing_permissions} = reject.([%{session_pattern: :any}])

      assert {0, {:unknown_key, :permission}} =
               reject.([%{session_pattern: :any, permission: [:read]}])

      assert {0, {:invalid_session_pattern, ""}} =
               reject.([%{session_pattern: "", permissions: []}])

      assert {0, {:invalid_session_pattern, :all}} =
               reject.([%{session_pattern: :all, permissions: []}])

      assert {0, {:permissions_not_a_list, :read}} =
               reject.([%{session_pattern: :any, permissions: :read}])

      assert {0, {:conditions_not_a_map, []}} =
               reject.([%{session_pattern: :any, permissions: [], conditions: []}])

      assert {:too_many_rules, 64} = reject.(List.duplicate(hd(@seed_rules), 65))
      long = String.duplicate("a", 256)

      assert {0, {:invalid_session_pattern, ^long}} =
               reject.([%{session_pattern: long, permissions: []}])

      assert {:too_large, _} =
               reject.([
                 %{
                   session_pattern: :any,
                   permissions: [],
                   conditions: %{k: String.duplicate("x", 100_000)}
                 }
               ])

      assert {:unsupported_term, _} = reject.([%{session_pattern: self(), permissions: []}])
    end
  end

  describe "filter_accessible_variables/3" do
    test "keeps what the principal may do, in order" do
      vars = [
        %{id: 1, metadata: %{owner_session: "me"}, access_rules: []},
        %{id: 2, metadata: %{}, access_rules: @seed_rules},
        %{id: 3, metadata: %{}, access_rules: []}
      ]

      assert [1, 2] = vars |> AccessControl.filter_accessible_variables("me", :read) |> ids()
      assert [1] = vars |> AccessControl.filter_accessible_variables("me", :write) |> ids()
      assert [2] = vars |> AccessControl.filter_accessible_variables("admin_1", :write) |> ids()
    end

    defp ids(vars), do: Enum.map(vars, & &1.id)
  end

  describe "enforcement in SessionStore" do
    test "another session is refused every operation on a private variable" do
      sid = shared_session()
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

    test "rules grant across sessions: read for :any, write and optimize for admin_*" do
      sid = shared_session()
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

    test "a variable map from the store checks the same in Elixir" do
      sid = shared_session()
      {:ok, var} = SessionStore.get_variable(sid, :shared)

      for principal <- ["other", "admin_x", "not_admin_1"],
          perm <- [:read, :write, :observe, :optimize] do
        assert AccessControl.check_permission(var, principal, perm) ==
                 SessionStore.check_variable_access(sid, :shared, principal, perm)
      end
    end

    test "the owner named in metadata has all; admins may not change rules" do
      sid = session()

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

    test "a rule change takes effect at once (the decision cache is invalidated)" do
      sid = shared_session()

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

    test "conditions are checked against the context: option" do
      sid = session()

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

    test "denials are reported by telemetry and audited in a bounded ring" do
      ref = TelemetryHelper.attach([@denied])
      sid = shared_session(audit_size: 3)

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
      assert [%{principal: "p5"}] = AccessControl.audit_log(sid, principal: "p5")
      assert [_] = AccessControl.audit_log(sid, limit: 1)

      # Allowed operations leave no entry; rule changes do.
      assert SessionStore.get_variable_value(sid, :shared, nil, principal: "reader") == 0
      :ok = SessionStore.set_variable_permissions(sid, :shared, [])

      assert [%{event: :rules_changed, principal: nil, permission: nil}] =
               AccessControl.audit_log(sid, event: :rules_changed)

      assert AccessControl.audit_log("no_such_session") == []
      assert AccessControl.audit_log(session(audit_size: 0)) == []
    end

    test "rules survive export and import" do
      sid = shared_session()
      {:ok, snapshot} = SessionStore.export_session(sid)
      copy = unique("copy")
      {:ok, ^copy} = SessionStore.import_session(snapshot, session_id: copy)
      on_exit(fn -> SessionStore.delete_session(copy) end)

      assert SessionStore.get_variable_value(copy, :shared, nil, principal: "anyone") == 0
      assert :ok = SessionStore.update_variable(copy, :shared, 3, %{}, principal: "admin_z")
      assert {:error, :access_denied} = SessionStore.get_variable(copy, :private, principal: sid)
    end

    test "bad principals and rules are refused at the boundary" do
      sid = shared_session()

      for bad <- [123, "", String.duplicate("p", 256), <<0xFF>>, {:a, %{}}] do
        assert {:error, {:invalid_argument, _}} =
                 SessionStore.get_variable(sid, :shared, principal: bad)
      end

      assert {:error, {:invalid_rules, :not_a_list}} =
               SessionStore.register_variable(sid, :r, :integer, 0, access_rules: %{})

      assert {:error, {:invalid_argument, {:unknown_permission, :admin}}} =
               SessionStore.check_variable_access(sid, :shared, "x", :admin)

      assert {:error, :not_found} = SessionStore.check_variable_access(sid, :nope, "x", :read)
      assert {:error, :session_not_found} = SessionStore.set_variable_permissions("nope", :v, [])
    end

    test "concurrent readers see either the old or the new rules, never garbage" do
      sid = shared_session()
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
  end

  describe "rate limits" do
    test "burst, refusal with telemetry, then refill" do
      ref = TelemetryHelper.attach([@exceeded])
      sid = session(rate_limit: {20, 3})
      {:ok, _} = SessionStore.register_variable(sid, :v, :integer, 0)
      assert :ok = SessionStore.update_variable(sid, :v, 1)
      assert SessionStore.get_variable_value(sid, :v) == 1
      assert {:error, :rate_limited} = SessionStore.update_variable(sid, :v, 2)
      assert_receive {@exceeded, ^ref, _, %{session_id: ^sid, variable: :v, principal: nil}}
      assert {:error, :rate_limited} = SessionStore.get_variable(sid, :v)
      assert {:error, :rate_limited} = SessionStore.list_variables(sid)
      assert [%{event: :rate_limited} | _] = AccessControl.audit_log(sid)

      # One token back every 50 ms; questions take none.
      Process.sleep(60)
      assert {:error, :access_denied} = SessionStore.check_variable_access(sid, :v, "x", :read)
      assert :ok = SessionStore.update_variable(sid, :v, 3)
      assert {:error, :rate_limited} = SessionStore.update_variable(sid, :v, 4)
      assert {:ok, %{rate_limit: %{ops_per_sec: 20, burst: 3}}} = SessionStore.get_session(sid)
    end

    test "a batch costs one token per variable" do
      sid = session(rate_limit: {1, 4})
      {:ok, _} = SessionStore.register_variable(sid, :a, :integer, 0)
      {:ok, _} = SessionStore.register_variable(sid, :b, :integer, 0)
      assert :ok = SessionStore.update_variables(sid, %{a: 1, b: 1}, atomic: true)

      assert {:error, :rate_limited} =
               SessionStore.update_variables(sid, %{a: 2, b: 2}, atomic: true)
    end

    test "bad limits are refused" do
      for bad <- [{0, 1}, {1, 0}, {-1, 5}, {1.5, 2}, :fast, {1, 2, 3}, {1, 2_000_000}] do
        assert {:error, {:invalid_argument, {:rate_limit, ^bad}}} =
                 SessionStore.create_session(unique("rl"), rate_limit: bad)
      end

      assert {:error, {:invalid_argument, {:audit_capacity, -1}}} =
               SessionStore.create_session(unique("au"), audit_size: -1)
    end
  end

  describe "properties" do
    test "session patterns agree with a reference glob matcher" do
      pattern = :proper_types.non_empty(:proper_types.list(:proper_types.elements(~c"ab*?.+é")))
      text = :proper_types.list(:proper_types.elements(~c"ab.+é"))

      prop =
        :proper.forall({pattern, text}, fn {p, t} ->
          variable = %{access_rules: [%{session_pattern: to_string(p), permissions: [:read]}]}
          granted = AccessControl.check_permission(variable, to_string(t), :read) == :ok
          granted == reference(p, t)
        end)

      assert :proper.quickcheck(prop, [:quiet, numtests: 2_000]) == true
    end

    test "check_permission/4 on a map agrees with the engine's decision" do
      sid = session()
      chars = :proper_types.elements(~c"ab*?.")
      pattern = :proper_types.oneof([:any, :proper_types.non_empty(:proper_types.list(chars))])
      perms = :proper_types.list(:proper_types.elements([:read, :write, :observe, :optimize]))

      conditions =
        :proper_types.list({:proper_types.elements([:k, :l]), :proper_types.range(0, 2)})

      rule = {pattern, perms, conditions}
      principal = :proper_types.non_empty(:proper_types.list(:proper_types.elements(~c"ab.")))
      ask = {principal, :proper_types.elements([:read, :write, :observe, :optimize]), conditions}
      owner = :proper_types.oneof([nil, principal])

      gen = {:proper_types.resize(6, :proper_types.list(rule)), owner, :proper_types.list(ask)}

      prop =
        :proper.forall(gen, fn {rules, owner, asks} ->
          rules =
            Enum.map(rules, fn {p, ps, cs} ->
              %{
                session_pattern: if(p == :any, do: :any, else: to_string(p)),
                permissions: ps,
                conditions: Map.new(cs)
              }
            end)

          metadata = if owner, do: %{owner_session: to_string(owner)}, else: %{}
          name = "v#{System.unique_integer([:positive])}"

          {:ok, _} =
            SessionStore.register_variable(sid, name, :integer, 0,
              metadata: metadata,
              access_rules: rules
            )

          {:ok, var} = SessionStore.get_variable(sid, name)

          Enum.all?(asks, fn {who, perm, ctx} ->
            who = to_string(who)
            ctx = Map.new(ctx)

            AccessControl.check_permission(var, who, perm, ctx) ==
              SessionStore.check_variable_access(sid, name, who, perm, context: ctx)
          end)
        end)

      assert :proper.quickcheck(prop, [:quiet, numtests: 300]) == true
    end
  end

  # A plain recursive glob matcher on charlists: obviously right, slow.
  defp reference([], t), do: t == []
  defp reference([?* | p], t), do: Enum.any?(0..length(t), &reference(p, Enum.drop(t, &1)))
  defp reference([?? | p], [_ | t]), do: reference(p, t)
  defp reference([?? | _], []), do: false
  defp reference([c | p], [c | t]), do: reference(p, t)
  defp reference(_, _), do: false
end
