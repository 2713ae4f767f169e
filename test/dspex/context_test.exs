defmodule DSPex.ContextTest do
  use ExUnit.Case, async: true

  alias DSPex.{Context, Variables}
  alias DSPex.Bridge.{Error, SessionStore}

  setup do
    {:ok, ctx} = Context.start_link()
    on_exit(fn -> if Process.alive?(ctx), do: Context.stop(ctx) end)
    %{ctx: ctx}
  end

  # Every case runs on a local context and on a bridged one: the API and its
  # return shapes are the same.
  for mode <- [:local, :bridged] do
    describe "#{mode} context" do
      setup %{ctx: ctx} do
        if unquote(mode) == :bridged, do: :ok = Context.ensure_bridged(ctx)
        :ok
      end

      test "defvariable, get, set, update", %{ctx: ctx} do
        assert {:ok, _id} =
                 Variables.defvariable(ctx, :temperature, :float, 0.7,
                   constraints: %{min: 0.0, max: 2.0}
                 )

        assert Variables.get(ctx, :temperature) == 0.7
        assert :ok = Variables.set(ctx, :temperature, 1)
        assert Variables.get(ctx, :temperature) === 1.0
        assert :ok = Variables.update(ctx, :temperature, &(&1 / 2))
        assert Variables.get(ctx, :temperature) == 0.5
        assert Variables.get(ctx, :missing, :dflt) == :dflt
        assert {:error, :already_exists} = Variables.defvariable(ctx, :temperature, :float, 0.1)
      end

      test "errors have the engine's shapes", %{ctx: ctx} do
        {:ok, _} = Variables.defvariable(ctx, :n, :integer, 1, constraints: %{max: 10})

        assert {:error, {:constraint_violation, {:above_max, 10.0}}} = Variables.set(ctx, :n, 11)

        assert {:error, {:invalid_value, {:expected, :integer}}} = Variables.set(ctx, :n, "x")
        assert {:error, :not_found} = Variables.set(ctx, :nope, 1)

        assert {:error, {:invalid_argument, {:unknown_type, :bogus}}} =
                 Variables.defvariable(ctx, :b, :bogus, 1)

        assert {:error, {:version_mismatch, 0}} = Variables.set(ctx, :n, 2, expected_version: 3)
      end

      test "bang variants raise named exceptions", %{ctx: ctx} do
        id = Variables.defvariable!(ctx, :s, :string, "a", constraints: %{max_length: 3})
        assert is_binary(id)
        assert :ok = Variables.set!(ctx, :s, "abc")
        assert Variables.get!(ctx, :s) == "abc"

        assert_raise Error.ConstraintViolation, ~r/max_length/, fn ->
          Variables.set!(ctx, :s, "abcd")
        end

        assert_raise Error.VariableNotFound, fn -> Variables.get!(ctx, :nope) end
        assert_raise Error.InvalidValue, fn -> Variables.update!(ctx, :s, fn _ -> 1 end) end
        assert :ok = Variables.delete!(ctx, :s)
        assert_raise Error.VariableNotFound, fn -> Variables.delete!(ctx, :s) end
      end

      test "get_many, update_many (atomic), list, exists?, delete", %{ctx: ctx} do
        {:ok, _} = Variables.defvariable(ctx, :a, :integer, 1)
        {:ok, _} = Variables.defvariable(ctx, :b, :integer, 2)
        assert Variables.get_many(ctx, [:a, :b, :c]) == %{a: 1, b: 2}

        assert {:error, {:validation_failed, %{b: {:invalid_value, _}}}} =
                 Variables.update_many(ctx, %{a: 10, b: "x"})

        assert Variables.get_many(ctx, [:a, :b]) == %{a: 1, b: 2}
        assert :ok = Variables.update_many(ctx, %{a: 10, b: 20})
        assert Variables.get_many(ctx, [:a, :b]) == %{a: 10, b: 20}
        assert [%{name: :a, value: 10}, %{name: :b, value: 20}] = Variables.list(ctx)
        assert Variables.exists?(ctx, :a)
        assert :ok = Variables.delete(ctx, :a)
        refute Variables.exists?(ctx, :a)
        assert {:error, :not_found} = Variables.delete(ctx, :a)
      end

      test "concurrent updates lose nothing", %{ctx: ctx} do
        {:ok, _} = Variables.defvariable(ctx, :counter, :integer, 0)

        1..4
        |> Enum.map(fn _ ->
          Task.async(fn ->
            for _ <- 1..50, do: :ok = Variables.update(ctx, :counter, &(&1 + 1), retries: 1_000)
          end)
        end)
        |> Enum.each(&Task.await(&1, 30_000))

        assert Variables.get(ctx, :counter) == 200
      end
    end
  end

  describe "ensure_bridged/1" do
    test "moves variables with their types, constraints and values", %{ctx: ctx} do
      {:ok, _} =
        Variables.defvariable(ctx, :t, :float, 0.5,
          constraints: %{max: 1.0},
          description: "temp"
        )

      :ok = Variables.set(ctx, :t, 0.75)
      refute Context.bridged?(ctx)
      assert {:error, :not_bridged} = Context.session_id(ctx)
      assert :ok = Context.ensure_bridged(ctx)
      assert :ok = Context.ensure_bridged(ctx)
      assert {:ok, sid} = Context.session_id(ctx)
      assert sid == Context.get_id(ctx)
      # Seed 002 reads the session id from the context's state.
      assert %{id: ^sid} = :sys.get_state(ctx)
      assert {:ok, %{id: ^sid}} = SessionStore.get_session(sid)

      assert {:ok, %{value: 0.75, type: :float, description: "temp"}} =
               SessionStore.get_variable(sid, :t)

      assert {:error, {:constraint_violation, _}} = Variables.set(ctx, :t, 1.5)
      :ok = Variables.set(ctx, :t, 0.25)
      assert {:ok, [%{value: 0.75}]} = SessionStore.get_variable_history(sid, :t)
    end

    test "the session goes when the context stops", %{ctx: ctx} do
      deleted = [:dspex, :bridge, :session, :deleted]
      ref = DSPex.TelemetryHelper.attach([deleted])
      :ok = Context.ensure_bridged(ctx)
      {:ok, sid} = Context.session_id(ctx)
      Context.stop(ctx)
      assert_receive {^deleted, ^ref, _, %{session_id: ^sid}}
      assert SessionStore.get_session(sid) == {:error, :session_not_found}
    end

    test "an id of 255 bytes is the session's id" do
      id = String.duplicate("i", 254) <> "#{rem(System.unique_integer([:positive]), 10)}"
      {:ok, ctx} = Context.start_link(id: id)
      assert :ok = Context.ensure_bridged(ctx)
      assert {:ok, ^id} = Context.session_id(ctx)
      assert Context.get_id(ctx) == id
      Context.stop(ctx)
    end

    test "keep_session: true keeps it" do
      {:ok, ctx} = Context.start_link(keep_session: true)
      :ok = Context.ensure_bridged(ctx)
      {:ok, sid} = Context.session_id(ctx)
      Context.stop(ctx)
      # The registry forgets the context and, in the same callback, would
      # delete its session: once it has forgotten it and finished that
      # callback, the session is either gone or kept for good.
      assert DSPex.Wait.until(fn -> Context.Registry.lookup(ctx) == {:local, ctx} end)
      _ = :sys.get_state(Context.Registry)
      assert {:ok, _} = SessionStore.get_session(sid)
      SessionStore.delete_session(sid)
    end
  end
end
