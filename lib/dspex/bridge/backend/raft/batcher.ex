defmodule DSPex.Bridge.Backend.Raft.Batcher do
  @moduledoc false
  # Group commit of one replicated session's writes on this node: the
  # writes that callers make while earlier ones are in flight go to the log
  # together, as one `{:batch, commands}` entry, so 16 concurrent writers
  # cost one log entry, one replication round and one fsync per batch, not
  # one per write. Each caller still answers only once its own command is
  # committed on a majority and applied: the batch's applied notification
  # carries one reply per command, in order.
  #
  # Transport: batches go to the leader with `:ra.pipeline_command/4` (an
  # asynchronous append with a correlation; ra sends `{:applied, ...}` once
  # the entry is applied on the leader, or `{:rejected, {:not_leader, ...}}`
  # from a follower, which appended nothing). While the leader is not known
  # (start, after a failure), a batch goes through `:ra.process_command/3`
  # in a helper process, which follows redirects and waits for an election.
  #
  # Outcomes, as for a single write: a batch that ra rejected is resent (it
  # was not appended); one whose leader died or that timed out is answered
  # `{:error, :timeout_unknown_outcome}` (it may have been appended) and is
  # never resent. A batch whose leader process did not exist when it was
  # sent (`:noproc`) was not delivered and goes through the helper.
  #
  # Bounds: at most `@max_batch` commands per batch and `@max_inflight`
  # batches in flight (`config :dspex_bridge, raft_batches_in_flight: n`,
  # read when the batcher starts). With 16 closed-loop writers on 3 local
  # nodes, 2 in flight made every write wait for one of two alternating
  # rounds: 9.8k writes/s; 4 gave 10.9k, 6 and 8 11.5k (medians of 3,
  # bench/ha_bench.exs, quiet machine). More batches in flight cost nothing
  # when there are fewer writers: a batch is sent as soon as a write waits.
  # Callers block until answered, so what waits here is bounded by the
  # number of calling processes, and past `@max_queued` waiting commands a
  # caller gets `{:error, :overloaded}`.
  use GenServer

  alias DSPex.Bridge.Backend.Raft.System

  @max_batch 512
  @max_inflight 8
  @max_queued 20_000

  @sessions :dspex_raft_sessions

  @doc false
  def start_link({sid, name}), do: GenServer.start_link(__MODULE__, {sid, name})

  def child_spec(arg),
    do: %{id: __MODULE__, start: {__MODULE__, :start_link, [arg]}, restart: :temporary}

  @doc """
  Appends `cmd` (a command the machine handles inside a batch) to the log of
  the group `name` (session `sid`) with the other writes made meanwhile;
  the command's reply once it is applied, or `{:error, reason}`.
  """
  def write(sid, name, cmd, timeout), do: write(sid, name, cmd, timeout, 2)

  defp write(_sid, _name, _cmd, _timeout, 0), do: {:error, :unavailable}

  defp write(sid, name, cmd, timeout, tries) do
    case batcher(sid, name) do
      {:ok, pid} ->
        # The alias is dropped with the monitor: a reply arriving after a
        # timeout never reaches the caller's mailbox.
        ref = :erlang.monitor(:process, pid, alias: :demonitor)
        send(pid, {:write, ref, cmd})

        receive do
          {^ref, reply} ->
            Process.demonitor(ref, [:flush])
            reply

          # Not delivered (it had stopped): start another and send again.
          {:DOWN, ^ref, _, _, reason} when reason in [:noproc, :normal] ->
            forget(name, pid)
            write(sid, name, cmd, timeout, tries - 1)

          {:DOWN, ^ref, _, _, _} ->
            forget(name, pid)
            {:error, :timeout_unknown_outcome}
        after
          # The batcher answers every write by `timeout` (its own timer);
          # this only guards against a batcher that stopped answering.
          2 * timeout + 1_000 ->
            Process.demonitor(ref, [:flush])
            {:error, :timeout_unknown_outcome}
        end

      {:error, _} = error ->
        error
    end
  end

  @doc "Stops the batcher of group `name` on this node, if any."
  def stop(name) do
    case :ets.lookup(@sessions, {:batcher, name}) do
      [{_, pid}] ->
        forget(name, pid)
        send(pid, :stop)
        :ok

      [] ->
        :ok
    end
  rescue
    ArgumentError -> :ok
  end

  defp batcher(sid, name) do
    case :ets.lookup(@sessions, {:batcher, name}) do
      [{_, pid}] ->
        {:ok, pid}

      [] ->
        if :ets.member(@sessions, sid), do: start(sid, name), else: {:error, :session_not_found}
    end
  rescue
    ArgumentError -> {:error, :unavailable}
  end

  defp start(sid, name) do
    case DynamicSupervisor.start_child(System.batchers(), {__MODULE__, {sid, name}}) do
      {:ok, pid} -> {:ok, pid}
      # Another caller started one first.
      :ignore -> batcher(sid, name)
      {:error, _} -> {:error, :unavailable}
    end
  catch
    :exit, _ -> {:error, :unavailable}
  end

  defp forget(name, pid), do: :ets.delete_object(@sessions, {{:batcher, name}, pid})

  ## The process

  @impl true
  def init({sid, name}) do
    if :ets.insert_new(@sessions, {{:batcher, name}, self()}) do
      {:ok,
       %{
         sid: sid,
         name: name,
         # The leader batches are pipelined to, and its monitor.
         leader: nil,
         mon: nil,
         # corr => %{callers: [ref], cmds: [cmd], via: server_id | :call, timer: ref}
         inflight: %{},
         # Commands waiting for a batch, newest first, and how many.
         queued: [],
         n: 0,
         next: 0,
         max_inflight: Application.get_env(:dspex_bridge, :raft_batches_in_flight, @max_inflight)
       }}
    else
      :ignore
    end
  end

  @impl true
  def handle_info({:write, ref, cmd}, state) do
    state
    |> enqueue(ref, cmd)
    |> drain_mailbox(@max_batch)
    |> flush()
    |> noreply()
  end

  def handle_info({:ra_event, from, {:applied, replies}}, state) do
    state = Enum.reduce(replies, state, &applied(&1, from, &2))
    noreply(flush(state))
  end

  # A follower appended nothing: send the batch to the leader it names.
  def handle_info({:ra_event, _from, {:rejected, {:not_leader, hint, corr}}}, state) do
    case Map.pop(state.inflight, corr) do
      {nil, _} ->
        noreply(state)

      {batch, inflight} ->
        state = %{state | inflight: inflight}
        state = if hint, do: lead(state, hint), else: unlead(state)
        noreply(flush(dispatch(state, corr, batch)))
    end
  end

  def handle_info({:DOWN, mon, :process, _, reason}, %{mon: mon} = state) do
    leader = state.leader
    state = %{state | leader: nil, mon: nil}

    # What was pipelined to the dead leader: not delivered if it did not
    # exist (resent through the helper), else of unknown outcome.
    {lost, kept} = Enum.split_with(state.inflight, fn {_, b} -> b.via == leader end)
    state = %{state | inflight: Map.new(kept)}

    state =
      Enum.reduce(lost, state, fn {corr, batch}, st ->
        if reason == :noproc do
          dispatch(st, corr, batch)
        else
          cancel(batch.timer)
          answer_all(batch.callers, {:error, :timeout_unknown_outcome})
          st
        end
      end)

    noreply(flush(state))
  end

  # The helper's answer for a batch sent with process_command.
  def handle_info({:called, corr, result}, state) do
    case Map.pop(state.inflight, corr) do
      {nil, _} ->
        noreply(state)

      {batch, inflight} ->
        cancel(batch.timer)
        state = %{state | inflight: inflight}

        state =
          case result do
            {:ok, replies, leader} when is_list(replies) ->
              answer_each(batch.callers, replies)
              lead(state, leader)

            {:ok, {:error, :bad_command}, _leader} ->
              one_by_one(state, batch)
              state

            {:error, _} = error ->
              answer_all(batch.callers, error)
              state
          end

        noreply(flush(state))
    end
  end

  def handle_info({:timeout, corr}, state) do
    case Map.pop(state.inflight, corr) do
      {nil, _} ->
        noreply(state)

      {batch, inflight} ->
        answer_all(batch.callers, {:error, :timeout_unknown_outcome})
        # The leader may be gone: the next batch finds it again.
        noreply(flush(unlead(%{state | inflight: inflight})))
    end
  end

  def handle_info(:stop, state) do
    # Whatever is in flight is answered as unknown; what waits was not sent.
    for {_, b} <- state.inflight, do: answer_all(b.callers, {:error, :timeout_unknown_outcome})
    for {ref, _} <- state.queued, do: send(ref, {ref, {:error, :session_not_found}})
    {:stop, :normal, state}
  end

  def handle_info(_other, state), do: noreply(state)

  defp noreply(state), do: {:noreply, state}

  defp enqueue(%{n: n} = state, ref, _cmd) when n >= @max_queued do
    send(ref, {ref, {:error, :overloaded}})
    DSPex.Bridge.Admission.refused(:raft, @max_queued, state.sid)
    state
  end

  defp enqueue(state, ref, cmd),
    do: %{state | queued: [{ref, cmd} | state.queued], n: state.n + 1}

  # The writes already waiting in the mailbox join the next batch.
  defp drain_mailbox(state, 0), do: state

  defp drain_mailbox(state, k) do
    receive do
      {:write, ref, cmd} -> drain_mailbox(enqueue(state, ref, cmd), k - 1)
    after
      0 -> state
    end
  end

  defp flush(%{n: 0} = state), do: state

  defp flush(state) do
    if map_size(state.inflight) >= state.max_inflight do
      state
    else
      {batch, rest} = state.queued |> Enum.reverse() |> Enum.split(@max_batch)
      {callers, cmds} = Enum.unzip(batch)
      state = %{state | queued: Enum.reverse(rest), n: length(rest)}
      flush(send_batch(state, callers, cmds))
    end
  end

  defp send_batch(state, callers, cmds) do
    corr = state.next
    timer = Process.send_after(self(), {:timeout, corr}, timeout())
    batch = %{callers: callers, cmds: cmds, via: nil, timer: timer}
    dispatch(%{state | next: corr + 1}, corr, batch)
  end

  # To the leader, pipelined, when it is known and its node connected;
  # else through the helper. A batch keeps its correlation and its timer
  # when it is sent again (after a rejection it was not appended).
  defp dispatch(state, corr, batch) do
    case state.leader do
      {_, node} = leader when node == node() ->
        pipeline(state, leader, corr, batch)

      {_, node} = leader ->
        if node in Node.list(),
          do: pipeline(state, leader, corr, batch),
          else: call(unlead(state), corr, batch)

      nil ->
        call(state, corr, batch)
    end
  end

  defp pipeline(state, leader, corr, batch) do
    :ok = :ra.pipeline_command(leader, {:batch, batch.cmds}, corr, :normal)
    %{state | inflight: Map.put(state.inflight, corr, %{batch | via: leader})}
  end

  # Through process_command, in a helper: it follows redirects and waits
  # for an election, which a pipelined command to a follower that knows no
  # leader would not (ra drops it).
  defp call(state, corr, batch) do
    me = self()

    ids =
      case :ets.lookup(@sessions, state.sid) do
        [{_, _, ids, _}] -> ids
        [] -> []
      end

    cmd = {:batch, batch.cmds}
    spawn(fn -> send(me, {:called, corr, call_members(ids, cmd)}) end)
    %{state | inflight: Map.put(state.inflight, corr, %{batch | via: :call})}
  end

  # One member at a time, the last known leader first; on a timeout the
  # outcome is unknown and the batch is not sent again elsewhere.
  defp call_members([], _cmd), do: {:error, :unavailable}

  defp call_members([{name, _} | _] = ids, cmd) do
    ordered =
      case :ets.lookup(@sessions, {:leader, name}) do
        [{_, leader}] -> [leader | List.delete(ids, leader)]
        [] -> ids
      end

    Enum.reduce_while(ordered, {:error, :unavailable}, fn id, acc ->
      case :ra.process_command(id, cmd, timeout()) do
        {:ok, reply, leader} ->
          :ets.insert(@sessions, {{:leader, name}, leader})
          {:halt, {:ok, reply, leader}}

        {:timeout, _} ->
          {:halt, {:error, :timeout_unknown_outcome}}

        {:error, _} ->
          {:cont, acc}
      end
    end)
  catch
    _, _ -> {:error, :unavailable}
  end

  defp applied({corr, reply}, from, state) do
    case Map.pop(state.inflight, corr) do
      {nil, _} ->
        state

      {batch, inflight} ->
        cancel(batch.timer)

        case reply do
          replies when is_list(replies) -> answer_each(batch.callers, replies)
          {:error, :bad_command} -> one_by_one(state, batch)
          other -> answer_all(batch.callers, other)
        end

        lead(%{state | inflight: inflight}, from)
    end
  end

  defp lead(%{leader: leader} = state, leader), do: state

  defp lead(state, {name, _} = leader) do
    state = unlead(state)
    :ets.insert(@sessions, {{:leader, name}, leader})
    %{state | leader: leader, mon: Process.monitor(leader)}
  end

  defp lead(state, _), do: unlead(state)

  defp unlead(%{mon: nil} = state), do: %{state | leader: nil}

  defp unlead(state) do
    Process.demonitor(state.mon, [:flush])
    %{state | leader: nil, mon: nil}
  end

  # A leader running the first version of the machine (a rolling upgrade
  # under way) knows no batch: it applied nothing, so each command is sent
  # on its own, as that version's writes were.
  defp one_by_one(state, batch) do
    ids =
      case :ets.lookup(@sessions, state.sid) do
        [{_, _, ids, _}] -> ids
        [] -> []
      end

    spawn(fn ->
      for {ref, cmd} <- Enum.zip(batch.callers, batch.cmds) do
        reply =
          case call_members(ids, cmd) do
            {:ok, reply, _leader} -> reply
            error -> error
          end

        send(ref, {ref, reply})
      end
    end)

    :ok
  end

  defp answer_each([ref | refs], [reply | replies]) do
    send(ref, {ref, reply})
    answer_each(refs, replies)
  end

  defp answer_each(refs, []), do: answer_all(refs, {:error, {:internal_error, :short_batch}})
  defp answer_each([], _), do: :ok

  defp answer_all(refs, reply), do: Enum.each(refs, &send(&1, {&1, reply}))

  defp cancel(timer), do: Process.cancel_timer(timer, async: true, info: false)

  defp timeout, do: Application.get_env(:dspex_bridge, :raft_timeout, 5_000)
end
