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
  end
end
