defmodule DSPex.Bridge.AtomsTest do
  # Not async: it counts the VM's atoms, which other tests loading modules
  # or making atoms at the same time would move.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{Conformance, SessionStore}

  # Atoms are never collected: no read may turn data into one. Each test
  # feeds far more fresh names than this through the engine.
  @slack 200

  defp atom_count, do: :erlang.system_info(:atom_count)

  # A prefix no atom in the VM starts with.
  defp fresh_prefix, do: "zq" <> Base.encode16(:crypto.strong_rand_bytes(6), case: :lower)

  defp new_session(backend) do
    sid = "atoms-#{backend}-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid, backend: backend)
    on_exit(fn -> SessionStore.delete_session(sid) end)
    sid
  end

  describe "access rule conditions" do
    for backend <- Conformance.backends() do
      test "#{backend}: string condition keys stay strings on every read" do
        sid = new_session(unquote(backend))
        {:ok, _} = SessionStore.register_variable(sid, :x, :float, 1.0)
        prefix = fresh_prefix()
        before = atom_count()

        for round <- 1..100 do
          conditions = Map.new(1..16, &{"#{prefix}_#{round}_#{&1}", &1})
          rule = %{session_pattern: :any, permissions: [:read], conditions: conditions}
          assert :ok = SessionStore.set_variable_permissions(sid, :x, [rule])

          assert {:ok, %{access_rules: [%{conditions: ^conditions}]}} =
                   SessionStore.get_variable(sid, :x)

          assert {:ok, [%{access_rules: [%{conditions: ^conditions}]}]} =
                   SessionStore.list_variables(sid)
        end

        assert {:ok, _snapshot} = SessionStore.export_session(sid)
        assert atom_count() - before < @slack
      end
    end
  end

  describe "snapshots" do
    # Turns every string `name` of the snapshot into an atom extension
    # (MessagePack ext type 1) of the same name, as an export from a VM that
    # had those atoms would write it. Safe outside tuples: MessagePack
    # containers count elements, not bytes.
    defp as_atoms(snapshot, names) do
      Enum.reduce(names, snapshot, fn name, bin ->
        n = byte_size(name)
        true = n < 32
        :binary.replace(bin, <<0xA0 + n, name::binary>>, <<0xC7, n, 1, name::binary>>, [:global])
      end)
    end

    test "nif: atom names never seen by the VM come back as binaries" do
      sid = new_session(:nif)
      prefix = fresh_prefix()
      names = for i <- 1..1_000, do: "#{prefix}_#{i}"
      var_names = Enum.take(names, 50)
      metadata = Map.new(Enum.drop(names, 50), &{&1, &1})

      for name <- var_names do
        {:ok, _} = SessionStore.register_variable(sid, name, :float, 1.0, metadata: metadata)
      end

      {:ok, snapshot} = SessionStore.export_session(sid)
      poisoned = as_atoms(snapshot, names)
      assert byte_size(poisoned) > byte_size(snapshot)
      before = atom_count()

      for round <- 1..3 do
        assert {:ok, copy} = SessionStore.import_session(poisoned, session_id: "#{sid}-#{round}")
        on_exit(fn -> SessionStore.delete_session(copy) end)
        assert {:ok, vars} = SessionStore.list_variables(copy)
        assert length(vars) == 50

        for name <- var_names do
          assert {:ok, %{name: ^name, metadata: ^metadata}} =
                   SessionStore.get_variable(copy, name)

          assert {:ok, _} = SessionStore.get_variable_history(copy, name)
        end

        assert {:ok, %{variables: [_ | _]}} = SessionStore.get_session_diagnostics(copy)
        assert {:ok, _} = SessionStore.export_session(copy)
      end

      assert atom_count() - before < @slack
    end
  end
end
