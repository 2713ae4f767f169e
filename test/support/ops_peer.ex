defmodule DSPex.Test.OpsPeer do
  @moduledoc false
  # A `:peer` node (its own BEAM OS process, not distributed, controlled
  # over its standard I/O) for the operations tests, and the code they run
  # on it.
  #
  # For the backup kill -9 test: a writer that
  # writes round after round to every variable of a session (round r sets
  # each variable to r in one atomic batch, so a variable's value is its
  # version), and a collector of the node's `:snapshot_taken` events that
  # the test waits on with `await/3` (one `:peer.call`, answered when the
  # events have happened: no polling).

  alias DSPex.Bridge.{SessionStore, Telemetry}

  @collector :dspex_backup_peer_collector

  @doc "Starts a peer OS process with this project's code (not distributed)."
  def start do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    {:ok, pid, _nonode} = :peer.start(%{connection: :standard_io, args: paths})
    os_pid = :peer.call(pid, :os, :getpid, [])
    %{pid: pid, os_pid: List.to_integer(os_pid)}
  end

  @doc "Starts dspex_bridge on the peer with `env` (`[key: value]`) as its config."
  def boot(peer, env, ra_dir) do
    :ok = call(peer, Application, :put_env, [:logger, :level, :error])
    :ok = call(peer, Application, :put_env, [:dspex_bridge, :ra_data_dir, ra_dir])
    for {k, v} <- env, do: :ok = call(peer, Application, :put_env, [:dspex_bridge, k, v])
    {:ok, _} = call(peer, Application, :ensure_all_started, [:dspex_bridge], 60_000)
    :ok
  end

  def call(peer, m, f, a, timeout \\ 30_000), do: :peer.call(peer.pid, m, f, a, timeout)

  def kill9(peer) do
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(peer.os_pid)])
    :ok
  end

  def stop(peer) do
    :peer.stop(peer.pid)
  catch
    _, _ -> :ok
  end

  ## On the peer

  @doc false
  # A session of `n` integer variables "v1".."vn" at 0, the collector, and
  # the writer (not linked to the caller: `:peer.call` runs in a process
  # that exits when it returns).
  def prepare(sid, n) do
    {:ok, ^sid} = SessionStore.create_session(sid)
    for i <- 1..n, do: {:ok, _} = SessionStore.register_variable(sid, "v#{i}", :integer, 0)

    collector = spawn(fn -> collect(%{round: 0, seen: 0, last: nil, waiting: nil}) end)
    Process.register(collector, @collector)

    :ok =
      Telemetry.attach(
        "backup-peer",
        [:dspex, :bridge, :backup, :snapshot_taken],
        fn _event, _measurements, %{session_id: ^sid, path: path}, _ ->
          send(@collector, {:taken, path})
        end,
        nil
      )

    names = for i <- 1..n, do: "v#{i}"
    spawn(fn -> write(sid, names, 1) end)
    :ok
  end

  defp write(sid, names, round) do
    :ok = SessionStore.update_variables(sid, Enum.map(names, &{&1, round}), atomic: true)
    send(@collector, {:round, round})
    write(sid, names, round + 1)
  end

  @doc false
  # Waits until the writer has finished round `min_round`, then until
  # `snapshots` more snapshots have been taken; answers the path of the
  # last one and the writer's round then.
  def await(min_round, snapshots, timeout) do
    ref = make_ref()
    send(@collector, {:await, self(), ref, min_round, snapshots})

    receive do
      {^ref, answer} -> answer
    after
      timeout -> {:error, :timeout}
    end
  end

  defp collect(state) do
    state =
      receive do
        {:round, r} ->
          arm(%{state | round: r})

        {:taken, path} ->
          %{state | seen: state.seen + 1, last: path}

        {:await, from, ref, min_round, snapshots} ->
          arm(%{state | waiting: {from, ref, min_round, snapshots, nil}})
      end

    collect(answer(state))
  end

  # Once the writer passes `min_round`, snapshots are counted from then on.
  defp arm(%{waiting: {from, ref, min, n, nil}, round: r} = state) when r >= min,
    do: %{state | waiting: {from, ref, min, n, state.seen}}

  defp arm(state), do: state

  defp answer(%{waiting: {from, ref, _min, n, base}} = state)
       when is_integer(base) and state.seen - base >= n do
    send(from, {ref, {:ok, %{last_path: state.last, round: state.round}}})
    %{state | waiting: nil}
  end

  defp answer(state), do: state

  @doc false
  # For the metrics test: every event of the telemetry catalogue through
  # its code path (`DSPex.TelemetryEmitters`), a failed import, a failed
  # backup, and two periodic backup rounds of `backed_up` (the node's
  # config backs it up). Returns the emitters that raised.
  def produce_everything(backed_up) do
    me = self()

    :ok =
      Telemetry.attach(
        "ops-peer-round",
        [:dspex, :bridge, :backup, :snapshot_taken],
        fn
          _, _, %{session_id: ^backed_up}, _ -> send(me, :round_snapshot)
          _, _, _, _ -> :ok
        end,
        nil
      )

    # The engine's sweep counter exists from its first sweep: wait for one
    # (a session that expires at once is removed by the next).
    :ok =
      Telemetry.attach(
        "ops-peer-expired",
        [:dspex, :bridge, :session, :expired],
        fn
          _, _, %{session_id: "ops-expires"}, _ -> send(me, :swept)
          _, _, _, _ -> :ok
        end,
        nil
      )

    {:ok, _} = SessionStore.create_session("ops-expires", ttl: 1)
    {:ok, _} = SessionStore.create_session(backed_up)
    {:error, _} = SessionStore.import_session("not a snapshot")
    {:error, _} = DSPex.Bridge.Backup.snapshot_now("ops-no-such-session")

    failures =
      for {event, {_module, emit}} <- Enum.sort(DSPex.TelemetryEmitters.all()),
          failure = run(emit),
          do: {event, failure}

    receive do
      :swept -> :ok
    after
      30_000 -> raise "no sweep"
    end

    # Only the periodic rounds back this session up. A round starts once
    # the one before is recorded, so after the second snapshot the first
    # round's count is in.
    for _ <- 1..2 do
      receive do
        :round_snapshot -> :ok
      after
        30_000 -> raise "no backup round"
      end
    end

    failures
  end

  defp run(emit) do
    emit.()
    nil
  rescue
    e -> Exception.message(e)
  catch
    kind, reason -> inspect({kind, reason})
  end
end
