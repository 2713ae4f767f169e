defmodule DSPex.ContextBadInputTest do
  # Bad arguments to DSPex.Context and DSPex.Variables: a local context and
  # a bridged one give the same {:error, _} answers (the local state applies
  # the store's rules), and no argument stops a context or loses a variable.
  use ExUnit.Case, async: true

  alias DSPex.{Context, Variables}
  alias DSPex.Bridge.{Error, SessionStore}

  # The same variables in a local and a bridged context.
  defp pair do
    {:ok, local} = Context.start_link()
    {:ok, bridged} = Context.start_link()
    :ok = Context.ensure_bridged(bridged)

    for ctx <- [local, bridged] do
      {:ok, _} = Variables.defvariable(ctx, :a, :integer, 1, constraints: %{max: 10})

      {:ok, _} =
        Variables.defvariable(ctx, :s, :string, "ab",
          constraints: %{"max_length" => 5, enum: ["ab", "cd", :ef]}
        )

      {:ok, _} =
        Variables.defvariable(ctx, :c, :choice, "x", constraints: %{choices: ["x", :y, 1]})

      {:ok, _} =
        Variables.defvariable(ctx, "e", :embedding, [1, 2], constraints: %{dimensions: 2})

      {:ok, _} = Variables.defvariable(ctx, :f, :float, 0.5, constraints: %{min: 0, max: 1})

      {:ok, _} =
        Variables.defvariable(ctx, :m, :module, Foo, constraints: %{allowed_modules: [Foo, "Bar"]})

      {:ok, _} = Variables.defvariable(ctx, :b, :boolean, true)

      {:ok, _} =
        Variables.defvariable(ctx, :t, :tensor, %{shape: [2], data: [1, 2]},
          constraints: %{shape: [2]}
        )
    end

    refute Context.bridged?(local)
    {local, bridged}
  end

  # The contexts are linked to the test process and may be stopping with it.
  defp stop_pair({local, bridged}) do
    for ctx <- [local, bridged] do
      try do
        Context.stop(ctx)
      catch
        :exit, _ -> :ok
      end
    end
  end

  # What can be compared between a local and a bridged context (timestamps
  # differ).
  defp snapshot(ctx) do
    ctx
    |> Variables.list()
    |> Enum.map(&Map.drop(&1, [:created_at, :updated_at]))
  end

  defp normalize([%{id: _} | _] = vars),
    do: Enum.map(vars, &Map.drop(&1, [:created_at, :updated_at]))

  defp normalize(other), do: other

  describe "issue 11 item 3: ensure_bridged and sessions it did not create" do
    test "a second context with the same id leaves the first one's session alone" do
      id = "dup-#{System.unique_integer([:positive])}"
      {:ok, first} = Context.start_link(id: id)
      {:ok, _} = Variables.defvariable(first, :x, :integer, 1)
      :ok = Context.ensure_bridged(first)

      {:ok, second} = Context.start_link(id: id)
      {:ok, _} = Variables.defvariable(second, :y, :integer, 2)
      assert {:error, :already_exists} = Context.ensure_bridged(second)

      assert {:ok, _} = SessionStore.get_session(id)
      assert Variables.get(first, :x) == 1
      refute Context.bridged?(second)
      assert Variables.get(second, :y) == 2
      Context.stop(second)
      Context.stop(first)
    end

    test "bridging that fails halfway keeps the local variables and drops only its own session" do
      id = "half-#{System.unique_integer([:positive])}"
      # One operation admitted: the second variable's registration is refused.
      {:ok, ctx} = Context.start_link(id: id, session_opts: [rate_limit: {1, 1}])
      {:ok, _} = Variables.defvariable(ctx, :x, :integer, 1)
      {:ok, _} = Variables.defvariable(ctx, :y, :integer, 2)

      assert {:error, :rate_limited} = Context.ensure_bridged(ctx)
      refute Context.bridged?(ctx)
      assert {:error, :session_not_found} = SessionStore.get_session(id)
      assert Variables.get_many(ctx, [:x, :y]) == %{x: 1, y: 2}
      Context.stop(ctx)
    end
  end

  describe "issue 11 item 4: the calls that stopped a local context" do
    test "are errors, as on a bridged context, and every variable stays" do
      # The context is linked to this process: a crash must fail the test,
      # not kill it.
      Process.flag(:trap_exit, true)
      {:ok, local} = Context.start_link()
      {:ok, bridged} = Context.start_link()
      :ok = Context.ensure_bridged(bridged)

      for ctx <- [local, bridged] do
        {:ok, _} = Variables.defvariable(ctx, :a, :integer, 1)
      end

      calls = [
        &Variables.defvariable(&1, :b, :integer, 1, constraints: 5),
        &Variables.defvariable(&1, :b, :choice, "a", constraints: %{choices: 5}),
        &Variables.defvariable(&1, :b, :module, Foo, constraints: %{allowed_modules: :x}),
        &Variables.defvariable(&1, :b, :integer, 1, %{constraints: %{}}),
        &Variables.set(&1, :a, 2, :not_a_keyword_list),
        &Variables.update_many(&1, [1])
      ]

      for call <- calls do
        assert {:error, _} = answer = call.(bridged)
        assert call.(local) == answer
        assert Process.alive?(local)
      end

      refute_received {:EXIT, ^local, _}
      assert Variables.get_many(local, [:a, :b]) == %{a: 1}
      # The pattern constraint bridges the context first (see the moduledoc
      # of DSPex.Variables), so the answer is the session's.
      pattern = &Variables.defvariable(&1, :p, :string, "a", constraints: %{pattern: "("})
      assert pattern.(local) == pattern.(bridged)
      assert Variables.get_many(local, [:a, :p]) == %{a: 1}
      Context.stop(local)
      Context.stop(bridged)
    end
  end

  describe "issue 11 item 4: a local context answers bad input as a bridged one" do
    setup do
      pair = pair()
      on_exit(fn -> stop_pair(pair) end)
      %{pair: pair}
    end

    test "bad constraints, options and updates", %{pair: {local, bridged} = pair} do
      calls = [
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, constraints: 5) end,
        fn ctx -> Variables.defvariable(ctx, :n, :choice, "a", constraints: %{choices: 5}) end,
        fn ctx ->
          Variables.defvariable(ctx, :n, :module, Foo, constraints: %{allowed_modules: :x})
        end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, constraints: [max: 3]) end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, constraints: %{min: 2, max: 1}) end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, %{constraints: %{}}) end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, 5) end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, bogus: 1) end,
        fn ctx -> Variables.defvariable(ctx, :n, :integer, 1, metadata: 5) end,
        fn ctx ->
          Variables.defvariable(ctx, :n, :choice, nil, constraints: %{choices: [nil]})
        end,
        fn ctx -> Variables.defvariable(ctx, :a, :integer, 1, constraints: %{max: :x}) end,
        fn ctx -> Variables.update_many(ctx, [1]) end,
        fn ctx -> Variables.update_many(ctx, 5) end,
        fn ctx -> Variables.update_many(ctx, [{:a, 2} | 3]) end,
        fn ctx -> Variables.update_many(ctx, a: 2, nope: 1, s: 5) end,
        fn ctx -> Variables.update_many(ctx, a: 2, a: 3) end,
        fn ctx -> Variables.update_many(ctx, %{a: 2}, metadata: 5) end,
        fn ctx -> Variables.set(ctx, :a, 2, 5) end,
        fn ctx -> Variables.set(ctx, :a, 2, expected_version: :x) end,
        fn ctx -> Variables.set(ctx, :a, 2, metadata: %{expected_version: 7}) end,
        fn ctx -> Variables.set(ctx, :a, self()) end,
        fn ctx -> Variables.set(ctx, :a, 2 ** 64) end,
        fn ctx -> Variables.set(ctx, {:a}, 2) end,
        fn ctx -> Variables.update(ctx, :a, &(&1 + 1), %{}) end,
        fn ctx -> Variables.update(ctx, :a, :not_a_fun) end,
        fn ctx -> Variables.update(ctx, :a, &(&1 + 1), retries: :many) end,
        fn ctx -> Variables.fetch(ctx, 5) end,
        fn ctx -> Variables.delete(ctx, [:a]) end,
        fn ctx -> Variables.get_many(ctx, :a) end,
        fn ctx -> Variables.get_many(ctx, [5, :a, <<255>>]) end,
        fn ctx -> Variables.defderived(ctx, :d, :integer, [:a], & &1, 5) end
      ]

      before = snapshot(local)
      assert before == snapshot(bridged)

      for call <- calls do
        answer = normalize(call.(bridged))
        assert normalize(call.(local)) == answer
        assert Process.alive?(local) and Process.alive?(bridged)
      end

      refute Context.bridged?(local)
      assert snapshot(local) == snapshot(bridged)
      # Every call above is refused, so every variable is as it was.
      assert snapshot(local) == before
      stop_pair(pair)
    end

    test "a pattern constraint gets the session's answer", %{pair: {local, bridged}} do
      for ctx <- [bridged, local] do
        assert {:error, {:invalid_argument, {:bad_constraint, :pattern}}} =
                 Variables.defvariable(ctx, :p, :string, "a", constraints: %{pattern: "("})
      end

      assert Process.alive?(local)
      assert snapshot(local) == snapshot(bridged)
    end

    test "session options get the session's answer", %{pair: {local, bridged}} do
      for opts <- [[principal: 5], [principal: "someone-else"], [lock_token: :x]] do
        answer = Variables.set(bridged, :a, 2, opts)
        assert {:error, _} = answer
        assert Variables.set(local, :a, 2, opts) == answer
      end

      assert Context.bridged?(local)
      assert snapshot(local) == snapshot(bridged)
    end

    test "bang variants raise a named exception", %{pair: {local, bridged}} do
      for ctx <- [local, bridged] do
        assert_raise Error.BridgeError, ~r/bad_options/, fn ->
          Variables.set!(ctx, :a, 2, 5)
        end

        assert_raise Error.BridgeError, fn ->
          Variables.defvariable!(ctx, :n, :integer, 1, constraints: 5)
        end

        assert_raise Error.BridgeError, fn -> Variables.update_many!(ctx, [1]) end
        assert_raise Error.BridgeError, fn -> Variables.update!(ctx, :a, :nope) end
        assert_raise Error.BridgeError, fn -> Variables.get!(ctx, {1}) end
        assert_raise Error.BridgeError, fn -> Variables.delete!(ctx, 5) end

        assert_raise Error.BridgeError, fn ->
          Variables.defderived!(ctx, :d, :integer, [:a], & &1, 5)
        end
      end

      refute Context.bridged?(local)
    end

    test "a call that is not a request does not stop the context", %{pair: {local, _}} do
      before = snapshot(local)
      assert {:error, {:invalid_argument, :unknown_request}} = GenServer.call(local, :garbage)
      assert {:error, {:invalid_argument, :unknown_request}} = Context.local(local, {:nope, 1})
      assert {:error, _} = Context.local(local, {:register, :n, :integer, 1, :not_a_list})
      GenServer.cast(local, :garbage)
      send(local, :garbage)
      assert snapshot(local) == before
    end
  end

  describe "a ctx that names no context" do
    test "exits :noproc, as a call to a dead process does" do
      for ctx <- [5, "x", {:a, :b, :c}, :no_such_context, make_ref()] do
        assert {:noproc, _} = catch_exit(Variables.get(ctx, :a))
        assert {:noproc, _} = catch_exit(Context.session_id(ctx))
      end
    end
  end

  describe "Context.start_link/1 options" do
    test "bad options are errors, not exceptions" do
      for {opts, detail} <- [
            {5, {:bad_options, 5}},
            {%{id: "x"}, {:bad_options, %{id: "x"}}},
            {[bogus: 1], {:unknown_options, [:bogus]}},
            {[id: "a", id: "b"], {:duplicate_options, [:id]}},
            {[id: 5], {:id, 5}},
            {[id: ""], {:id, ""}},
            {[id: <<255>>], {:id, <<255>>}},
            {[id: String.duplicate("x", 256)], {:id, String.duplicate("x", 256)}},
            {[name: "x"], {:name, "x"}},
            {[keep_session: :yes], {:keep_session, :yes}},
            {[session_opts: 5], {:session_opts, 5}},
            {[session_opts: [bogus: 1]], {:session_opts, [bogus: 1]}}
          ] do
        assert Context.start_link(opts) == {:error, {:invalid_argument, detail}}
      end
    end

    test "a session option the store refuses fails the bridging, not the context" do
      {:ok, ctx} = Context.start_link(session_opts: [ttl: "soon", metadata: 5])
      {:ok, _} = Variables.defvariable(ctx, :x, :integer, 1)
      assert {:error, _} = Context.ensure_bridged(ctx)
      refute Context.bridged?(ctx)
      assert Variables.get(ctx, :x) == 1
      Context.stop(ctx)
    end
  end

  describe "property: garbage in, the same answers out" do
    test "local and bridged contexts agree and survive" do
      # A context that crashed must fail the property, not kill the test.
      Process.flag(:trap_exit, true)
      assert :proper.quickcheck(prop_agree(), [:quiet, numtests: 300, max_size: 10]) == true
    end
  end

  # Each case: a fresh local and bridged pair, the same calls on both.
  defp prop_agree do
    :proper.forall(:proper_types.list(call_gen()), fn calls ->
      {local, bridged} = pair = pair()

      try do
        Enum.all?(calls, &same_answer?(&1, local, bridged)) and
          Process.alive?(local) and Process.alive?(bridged) and
          snapshot(local) == snapshot(bridged) and not Context.bridged?(local)
      after
        stop_pair(pair)
      end
    end)
  end

  defp same_answer?(call, local, bridged) do
    answer = run(call, bridged)
    local_answer = run(call, local)
    same = agree?(local_answer, answer) and not match?({:unexpected, _}, answer)

    unless same,
      do: IO.puts("#{inspect(call)}: #{inspect(answer)} bridged, #{inspect(local_answer)} local")

    same
  end

  # The NIF encodes a batch's errors as a map and gives `%{}` when two
  # failed idents have the same text (`:x` and `"x"`): the local answer,
  # which keeps them, is the better one there.
  defp agree?({:error, {:validation_failed, _}}, {:error, {:validation_failed, errors}})
       when errors == %{},
       do: true

  defp agree?(local, bridged), do: local == bridged

  # A call's answer, an exception named by its module (bang variants must
  # raise DSPex.Bridge.Error exceptions); anything else raised or an exit
  # is {:unexpected, _}, which never agrees.
  defp run({fun, args}, ctx) do
    normalize(apply(Variables, fun, [ctx | args]))
  rescue
    e ->
      module = e.__struct__

      if String.starts_with?(inspect(module), "DSPex.Bridge.Error."),
        do: {:raised, module},
        else: {:unexpected, Exception.format(:error, e, __STACKTRACE__)}
  catch
    :exit, reason -> {:unexpected, {:exit, reason}}
  end

  ## Generators

  defp call_gen do
    g = &garbage/0

    :proper_types.oneof([
      call(:defvariable, [name_gen(), type_gen(), value_gen(), register_opts_gen()]),
      call(:defvariable!, [name_gen(), type_gen(), value_gen(), register_opts_gen()]),
      call(:set, [name_gen(), value_gen(), write_opts_gen()]),
      call(:set!, [name_gen(), value_gen(), write_opts_gen()]),
      call(:update, [name_gen(), fun_gen(), update_opts_gen()]),
      call(:update_many, [updates_gen(), many_opts_gen()]),
      call(:update_many!, [updates_gen(), many_opts_gen()]),
      call(:fetch, [name_gen()]),
      call(:get, [name_gen(), g.()]),
      call(:get!, [name_gen()]),
      call(:get_many, [:proper_types.oneof([:proper_types.list(name_gen()), g.()])]),
      call(:exists?, [name_gen()]),
      call(:delete, [name_gen()]),
      call(:list, [])
    ])
  end

  defp call(fun, arg_gens) do
    :proper_types.bind(:proper_types.fixed_list(arg_gens), &{fun, &1}, false)
  end

  defp name_gen do
    :proper_types.frequency([
      {4,
       :proper_types.elements([:a, "a", :s, :c, "e", :e, :f, :m, :b, :t, :new, "new", "var_a_1"])},
      {1, garbage()}
    ])
  end

  defp type_gen do
    :proper_types.frequency([
      {4,
       :proper_types.elements([
         :float,
         :integer,
         :string,
         :boolean,
         :choice,
         :module,
         :embedding,
         :tensor
       ])},
      {1, garbage()}
    ])
  end

  defp fun_gen do
    :proper_types.frequency([
      {4, :proper_types.bind(value_gen(), fn v -> fn _ -> v end end, false)},
      {1, garbage()}
    ])
  end

  defp register_opts_gen do
    opts_gen([
      {:constraints, constraints_gen()},
      {:metadata, meta_gen()},
      {:description, maybe(:proper_unicode.utf8())}
    ])
  end

  defp write_opts_gen do
    opts_gen([{:metadata, meta_gen()}, {:expected_version, version_gen()}])
  end

  defp update_opts_gen,
    do: opts_gen([{:metadata, meta_gen()}, {:retries, maybe(:proper_types.integer(0, 3))}])

  defp many_opts_gen, do: opts_gen([{:metadata, meta_gen()}])

  defp meta_gen do
    maybe(:proper_types.bind(:proper_types.list({garbage(), garbage()}), &Map.new/1, false))
  end

  # Mostly a good value, sometimes nil, sometimes garbage.
  defp maybe(good) do
    :proper_types.frequency([{3, good}, {1, :proper_types.exactly(nil)}, {1, garbage()}])
  end

  # Mostly keyword lists of known keys with garbage values; sometimes a key
  # twice or an unknown one, sometimes not a keyword list at all.
  defp opts_gen(known) do
    pair =
      :proper_types.oneof(
        for {k, v} <- known, do: :proper_types.tuple([:proper_types.exactly(k), v])
      )

    unique =
      :proper_types.bind(:proper_types.list(pair), &Enum.uniq_by(&1, fn {k, _} -> k end), false)

    :proper_types.frequency([
      {12, unique},
      {1, :proper_types.list(pair)},
      {1, :proper_types.exactly(bogus: 1)},
      {1, garbage()}
    ])
  end

  # Values of the variables' types, near their constraints, or garbage.
  defp value_gen do
    :proper_types.frequency([
      {3,
       :proper_types.union([
         :proper_types.integer(-3, 12),
         :proper_types.float(-1.0, 2.0),
         :proper_types.elements([
           "ab",
           "cd",
           "x",
           :y,
           :ef,
           1,
           true,
           "true",
           Foo,
           "Bar",
           "Elixir.Bar"
         ]),
         :proper_types.list(:proper_types.integer(-2, 2)),
         :proper_types.bind(
           :proper_types.list(:proper_types.integer(-2, 4)),
           &%{shape: [length(&1)], data: &1},
           false
         )
       ])},
      {1, garbage()}
    ])
  end

  defp version_gen do
    :proper_types.union([:proper_types.integer(0, 3), :proper_types.exactly(nil), garbage()])
  end

  defp constraints_gen do
    key =
      :proper_types.elements([
        :min,
        :max,
        :min_length,
        :max_length,
        :enum,
        :choices,
        :allowed_modules,
        :dimensions,
        :shape,
        "min",
        "choices",
        :other,
        5,
        nil
      ])

    :proper_types.frequency([
      {4, :proper_types.bind(:proper_types.list({key, value_gen()}), &Map.new/1, false)},
      {1, garbage()}
    ])
  end

  defp updates_gen do
    update =
      :proper_types.frequency([
        {4, :proper_types.tuple([name_gen(), value_gen()])},
        {1, :proper_types.tuple([name_gen(), value_gen(), meta_gen()])},
        {1, garbage()}
      ])

    :proper_types.frequency([
      {3, :proper_types.list(update)},
      {1, :proper_types.bind(:proper_types.list({name_gen(), value_gen()}), &Map.new/1, false)},
      {1, garbage()}
    ])
  end

  defp garbage do
    leaf =
      :proper_types.union([
        :proper_types.integer(-3, 12),
        :proper_types.integer(),
        :proper_types.float(),
        :proper_types.boolean(),
        :proper_types.exactly(nil),
        :proper_types.elements([
          :a,
          :x,
          :y,
          :ef,
          Foo,
          Bar,
          :"Elixir.Bar",
          :shape,
          :data,
          :"",
          "",
          "ab",
          "cd",
          "x",
          "true",
          "shape",
          "data",
          "Foo",
          "(",
          <<255>>,
          <<1::3>>,
          2 ** 64,
          -(2 ** 63) - 1,
          1.0e20,
          3.0,
          [1 | 2],
          self(),
          make_ref(),
          &Function.identity/1
        ]),
        :proper_unicode.utf8()
      ])

    :proper_types.sized(fn size -> tree(leaf, size) end)
  end

  defp tree(leaf, 0), do: leaf

  defp tree(leaf, size) do
    sub = :proper_types.lazy(fn -> tree(leaf, div(size, 3)) end)

    :proper_types.frequency([
      {5, leaf},
      {1, :proper_types.list(sub)},
      {1, :proper_types.bind(:proper_types.list(sub), &List.to_tuple/1, false)},
      {1, :proper_types.bind(:proper_types.list({sub, sub}), &Map.new/1, false)},
      {1,
       :proper_types.bind(
         :proper_types.list(:proper_types.integer(-2, 4)),
         &%{"shape" => [length(&1)], "data" => &1},
         false
       )}
    ])
  end
end
