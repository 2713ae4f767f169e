defmodule DSPex.Bridge.HA.ReplicatedSessionTest do
  # A `replicas: 1` session in this VM through the public API: the same
  # answers as a NIF session, served through the Raft log.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.SessionStore

  @moduletag :ha

  setup_all do
    if DSPex.Bridge.Backend.Raft.System.available?(),
      do: :ok,
      else: {:skip, "ra is not on the code path (scripts/setup.sh fetches it into .cache/ra)"}
  end

  setup do
    sid = "repl-#{System.unique_integer([:positive])}"
    on_exit(fn -> SessionStore.delete_session(sid) end)
    %{sid: sid}
  end

  test "writes and reads go through the log", %{sid: sid} do
    assert {:ok, ^sid} = SessionStore.create_session(sid, replicas: 1)
    assert {:ok, :raft} = SessionStore.backend(sid)
    assert {:error, :already_exists} = SessionStore.create_session(sid)
    assert {:error, :already_exists} = SessionStore.create_session(sid, replicas: 1)
    assert {:ok, _} = SessionStore.register_variable(sid, :t, :float, 0.5)
    assert :ok = SessionStore.update_variable(sid, :t, 0.7)
    assert 0.7 = SessionStore.get_variable_value(sid, :t)
    assert {:error, _} = SessionStore.update_variable(sid, :t, "hot")
    assert 0.7 = SessionStore.get_variable_value(sid, :t)
    assert sid in SessionStore.list_sessions()
    assert :ok = SessionStore.delete_session(sid)
    assert {:error, :session_not_found} = SessionStore.backend(sid)
  end

  test "bad replica options are invalid arguments", %{sid: sid} do
    assert {:error, {:invalid_argument, {:replicas, 0}}} =
             SessionStore.create_session(sid, replicas: 0)

    assert {:error, {:invalid_argument, {:replicas, :three}}} =
             SessionStore.create_session(sid, replicas: :three)

    assert {:error, {:invalid_argument, {:consistency, :eventual}}} =
             SessionStore.create_session(sid, replicas: 1, consistency: :eventual)

    assert {:error, {:insufficient_nodes, 1, 3}} = SessionStore.create_session(sid, replicas: 3)
    assert {:error, :session_not_found} = SessionStore.backend(sid)

    for bad <- [123, <<255>>, "", String.duplicate("a", 256)] do
      assert {:error, {:invalid_argument, :bad_session_id}} =
               SessionStore.create_session(bad, replicas: 1)
    end
  end

  test "sessions without replicas: stay on the NIF", %{sid: sid} do
    assert {:ok, ^sid} = SessionStore.create_session(sid)
    assert {:ok, :nif} = SessionStore.backend(sid)
  end
end
