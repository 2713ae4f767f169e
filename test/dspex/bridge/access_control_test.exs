defmodule DSPex.Bridge.AccessControlTest do
  use ExUnit.Case, async: true

  use DSPex.Bridge.Conformance,
    cases: [DSPex.Bridge.Conformance.AccessControlCases, DSPex.Bridge.Conformance.SessionAclCases]

  alias DSPex.Bridge.{AccessControl, SessionStore}

  doctest AccessControl

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

    # One evaluation: check_permission/4 on a map decides as the store does
    # on the same rules, conditions compared as Elixir's `==` all the way
    # down, and a rule with an unknown permission (which the store refuses)
    # grants nothing.
    test "decides as the store does on the same rules and contexts" do
      sid = session()
      rules = [%{session_pattern: "u*", permissions: [:read], conditions: %{tags: [1, {2}]}}]
      {:ok, _} = SessionStore.register_variable(sid, :v, :integer, 7, access_rules: rules)
      map = %{metadata: %{}, access_rules: rules}

      for context <- [%{tags: [1.0, {2.0}]}, %{tags: [1, {2}]}, %{tags: [1, 2]}, %{}] do
        store =
          case SessionStore.get_variable_value(sid, :v, nil, principal: "u1", context: context) do
            7 -> :ok
            nil -> {:error, :access_denied}
          end

        assert AccessControl.check_permission(map, "u1", :read, context) == store,
               inspect(context)
      end

      assert :ok = AccessControl.check_permission(map, "u1", :read, %{tags: [1.0, {2.0}]})

      unknown = %{
        metadata: %{},
        access_rules: [%{session_pattern: :any, permissions: [:read, :fly]}]
      }

      assert {:error, {:invalid_rules, _}} = AccessControl.validate_rules(unknown.access_rules)
      assert {:error, :access_denied} = AccessControl.check_permission(unknown, "u1", :read)
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
