defmodule DSPex.Bridge.DirLockTest do
  # Two VMs must never write one queue file (DETS has no locking, and a
  # second writer corrupts it), nor one ra data directory. A real second VM (a `:peer` OS process, not
  # distributed, started in this project's directory as `iex -S mix` beside
  # `mix test` would be) is pointed at this VM's queue directory.
  use ExUnit.Case, async: false

  alias DSPex.Bridge.DeadLetterQueue
  alias DSPex.Test.OpsPeer

  @moduletag :tmp_dir

  setup ctx do
    name = :"dlq_lock_#{System.unique_integer([:positive])}"
    start_supervised!({DeadLetterQueue, name: name, dir: ctx.tmp_dir}, id: name)

    peer = OpsPeer.start()
    on_exit(fn -> OpsPeer.stop(peer) end)
    %{name: name, peer: peer}
  end

  test "a directory in use by another VM is refused there, and this VM's entries stay intact",
       %{name: name, peer: peer, tmp_dir: dir} do
    assert {:ok, id} = DeadLetterQueue.add(entry(1), server: name)

    # The other VM is configured with the same directory: its queue is
    # unavailable (it says so), and writes nothing there.
    # Not linked: `:peer.call` runs in a process that exits when it returns.
    {:ok, _} =
      OpsPeer.call(peer, GenServer, :start, [
        DeadLetterQueue,
        [name: :other, dir: dir],
        [name: :other]
      ])

    assert {:error, {:unavailable, {:in_use, os_pid}}} =
             OpsPeer.call(peer, DeadLetterQueue, :stats, [[server: :other]])

    assert os_pid == System.pid()

    assert {:error, {:unavailable, {:in_use, _}}} =
             OpsPeer.call(peer, DeadLetterQueue, :add, [entry(2), [server: :other]])

    assert {:ok, id2} = DeadLetterQueue.add(entry(3), server: name)
    assert {:ok, entries} = DeadLetterQueue.list(server: name)
    assert Enum.map(entries, & &1.id) |> Enum.sort() == Enum.sort([id, id2])
  end

  test "the default directory gives way to one of the second VM's own", %{peer: peer} do
    :ok = OpsPeer.boot(peer, [], Path.join(System.tmp_dir!(), "dspex-lock-ra-#{System.pid()}"))
    ours = DeadLetterQueue.stats()
    theirs = OpsPeer.call(peer, DeadLetterQueue, :stats, [])

    assert %{available: true} = ours
    assert %{available: true} = theirs
    assert theirs.dir == Path.join(ours.dir, "vm-#{peer.os_pid}")
  end

  test "a lock left by a VM that is gone is taken over", %{tmp_dir: dir} do
    {out, 0} = System.cmd("sh", ["-c", "echo $$"])
    dead = String.trim(out)
    sub = Path.join(dir, "stale")
    File.mkdir_p!(sub)
    File.write!(Path.join(sub, "dead_letters.lock"), dead)

    name = :"dlq_stale_#{System.unique_integer([:positive])}"
    start_supervised!({DeadLetterQueue, name: name, dir: sub}, id: name)

    assert %{available: true} = DeadLetterQueue.stats(server: name)
    assert File.read!(Path.join(sub, "dead_letters.lock")) == System.pid()
  end

  test "a ra data directory in use by this VM leaves replicated sessions unavailable in another",
       %{peer: peer} do
    if DSPex.Bridge.Backend.Raft.System.available?() do
      # The same configured directory and the same node name (both
      # `nonode@nohost`): the same folder, and ours.
      :ok = OpsPeer.boot(peer, [], Application.fetch_env!(:dspex_bridge, :ra_data_dir))
      refute OpsPeer.call(peer, DSPex.Bridge.Backend.Raft.System, :available?, [])

      assert {:error, %{raft: {:error, :ra_unavailable}}} =
               OpsPeer.call(peer, DSPex.Bridge.Health, :ready, [])

      assert {:error, :ra_unavailable} =
               OpsPeer.call(peer, DSPex.Bridge.SessionStore, :create_session, [
                 "in-use",
                 [replicas: 1]
               ])

      # Ours still works.
      sid = "dir-lock-#{System.unique_integer([:positive])}"
      assert {:ok, ^sid} = DSPex.Bridge.SessionStore.create_session(sid, replicas: 1)
      assert {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, :x, :integer, 1)
      DSPex.Bridge.SessionStore.delete_session(sid)
    end
  end

  defp entry(n) do
    %{
      kind: :write,
      op: :set_variable,
      args: ["s#{n}", n],
      backend: :test,
      session_id: "s#{n}",
      attempts: [%{error: :backend_unavailable, at: 1_000 + n}]
    }
  end
end
