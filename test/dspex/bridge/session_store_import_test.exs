defmodule DSPex.Bridge.SessionStoreImportTest do
  # Not async: it checks that nothing at all was created, which other tests
  # creating sessions at the same time would blur.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.SessionStore

  describe "import_session/2" do
    test "garbage is rejected and creates nothing" do
      before = SessionStore.list_sessions()

      garbage = [
        "",
        "garbage",
        <<0xDD, 0xFF, 0xFF, 0xFF, 0xFF>>,
        :crypto.strong_rand_bytes(1024),
        # a valid MessagePack map with the wrong fields
        <<0x81, 0xA1, ?a, 0x01>>
      ]

      for backend <- DSPex.Bridge.Conformance.backends(), bin <- garbage do
        assert {:error, {:invalid_snapshot, msg}} =
                 SessionStore.import_session(bin, backend: backend)

        assert is_binary(msg)
      end

      assert {:error, {:invalid_snapshot, _}} = SessionStore.import_session(:not_a_binary)
      assert SessionStore.list_sessions() == before
    end

    # Sets every `field` integer of the snapshot to `value` (timestamps are
    # 64-bit integers in it: a marker byte and 8 bytes).
    defp poison(snapshot, field, value) do
      [head | rest] =
        :binary.split(snapshot, <<0xA0 + byte_size(field), field::binary>>, [:global])

      key = <<0xA0 + byte_size(field), field::binary>>

      Enum.reduce(rest, head, fn <<marker, _::64, tail::binary>>, acc ->
        true = marker in [0xCF, 0xD3]
        <<acc::binary, key::binary, 0xD3, value::signed-64, tail::binary>>
      end)
    end

    test "a snapshot with out-of-range timestamps is refused and creates nothing" do
      for backend <- DSPex.Bridge.Conformance.backends() do
        sid = "import-ts-#{backend}-#{System.unique_integer([:positive])}"
        {:ok, ^sid} = SessionStore.create_session(sid, backend: backend)
        {:ok, _} = SessionStore.register_variable(sid, :x, :float, 1.0)
        :ok = SessionStore.update_variable(sid, :x, 2.0)
        :ok = SessionStore.update_variable(sid, :x, 3.0)
        {:ok, snapshot} = SessionStore.export_session(sid)
        before = SessionStore.list_sessions()

        for field <- ["created_at", "updated_at"], value <- [Bitwise.bsl(1, 62), -1] do
          poisoned = poison(snapshot, field, value)
          assert byte_size(poisoned) == byte_size(snapshot)

          assert {:error, {:invalid_snapshot, msg}} =
                   SessionStore.import_session(poisoned,
                     session_id: sid <> "-bad",
                     backend: backend
                   )

          assert msg =~ "out of range"
        end

        assert SessionStore.list_sessions() == before

        # The untouched snapshot imports, and every read of it works.
        assert {:ok, copy} =
                 SessionStore.import_session(snapshot, session_id: sid <> "-ok", backend: backend)

        assert {:ok, %{version: 2}} = SessionStore.get_variable(copy, :x)
        assert {:ok, [_]} = SessionStore.list_variables(copy)
        assert {:ok, [_, _]} = SessionStore.get_variable_history(copy, :x)
        assert {:ok, %{variables: [_]}} = SessionStore.get_session_diagnostics(copy)

        for id <- [sid, copy], do: :ok = SessionStore.delete_session(id)
      end
    end
  end
end
