defmodule DSPex.Bridge.SessionStoreWatchTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.SessionStore

  setup do
    sid = "watch-#{System.unique_integer([:positive])}"
    {:ok, ^sid} = SessionStore.create_session(sid)
    {:ok, _} = SessionStore.register_variable(sid, :t, :integer, 0)
    %{sid: sid}
  end

  describe "watch_variables/3" do
    test "initial values, then updates in version order", %{sid: sid} do
      {:ok, ref} = SessionStore.watch_variables(sid, [:t], include_initial_values: true)

      assert_receive {:dspex_variable_update, ^ref,
                      %{variable: :t, version: 0, value: 0, update_type: :initial_value}}

      for n <- 1..5, do: :ok = SessionStore.update_variable(sid, :t, n)
      versions = collect(ref, 5)
      assert versions == Enum.sort(versions) and List.last(versions) == 5
      :ok = SessionStore.unwatch(ref)
    end

    test "a watcher that does not read is coalesced, its mailbox bounded", %{sid: sid} do
      {:ok, ref} = SessionStore.watch_variables(sid, ["t"], max_queue: 5)
      for n <- 1..500, do: :ok = SessionStore.update_variable(sid, :t, n)
      # The watch sends while the mailbox has room; the rest waits, merged.
      {:message_queue_len, len} = Process.info(self(), :message_queue_len)
      assert len <= 6
      assert List.last(collect(ref, 500)) == 500
    end

    test "deletes and the session's end", %{sid: sid} do
      {:ok, ref} = SessionStore.watch_variables(sid, [:t])
      :ok = SessionStore.delete_variable(sid, :t)

      assert_receive {:dspex_variable_update, ^ref,
                      %{variable: :t, update_type: :deleted, value: nil}}

      assert_receive {:dspex_watch_ended, ^ref, :variables_deleted}

      {:ok, _} = SessionStore.register_variable(sid, :u, :integer, 0)
      {:ok, ref2} = SessionStore.watch_variables(sid, [:u])
      :ok = SessionStore.delete_session(sid)
      assert_receive {:dspex_watch_ended, ^ref2, :session_deleted}
    end

    test ":observe is checked for the principal", %{sid: sid} do
      assert SessionStore.watch_variables(sid, [:t], principal: "stranger") ==
               {:error, :access_denied}

      :ok =
        SessionStore.set_variable_permissions(sid, :t, [
          %{session_pattern: "stranger", permissions: [:observe]}
        ])

      assert {:ok, _} = SessionStore.watch_variables(sid, [:t], principal: "stranger")
    end

    test "bad input", %{sid: sid} do
      assert {:error, {:invalid_argument, _}} = SessionStore.watch_variables(sid, [])
      assert {:error, {:invalid_argument, _}} = SessionStore.watch_variables(sid, :t)

      assert {:error, {:invalid_argument, _}} =
               SessionStore.watch_variables(sid, [:t], max_queue: 0)

      assert {:error, {:invalid_argument, _}} = SessionStore.watch_variables(sid, [:t], bogus: 1)
      assert {:error, :not_found} = SessionStore.watch_variables(sid, [:ghost])
      assert {:error, _} = SessionStore.watch_variables("no-such-session", [:t])
      assert SessionStore.unwatch(make_ref()) == :ok
      assert SessionStore.unwatch(:nope) == :ok
    end

    test "the watch ends with its watcher", %{sid: sid} do
      parent = self()

      pid =
        spawn(fn ->
          {:ok, ref} = SessionStore.watch_variables(sid, [:t])
          send(parent, {:ref, ref})
          receive do: (:stop -> :ok)
        end)

      assert_receive {:ref, _ref}
      [{_, watch}] = :ets.lookup(:dspex_bridge_watchers, sid)
      mon = Process.monitor(watch)
      send(pid, :stop)
      assert_receive {:DOWN, ^mon, :process, _, :normal}
    end
  end

  defp collect(ref, last, acc \\ []) do
    receive do
      {:dspex_variable_update, ^ref, %{version: v}} ->
        if v >= last, do: Enum.reverse([v | acc]), else: collect(ref, last, [v | acc])
    after
      2_000 -> Enum.reverse(acc)
    end
  end
end
