defmodule DSPex.Bridge.Backend.Raft do
  @moduledoc """
  Replicated sessions: each one a Raft group (ra) whose members apply the
  core's commands to their own node's engine (`DSPex.Bridge.Backend.Raft.Machine`).

      {:ok, _} = DSPex.Bridge.SessionStore.create_session("s1", replicas: 3)
      {:ok, 1} = DSPex.Bridge.SessionStore.update_variable("s1", :x, 1)  # on a majority, on disk

  - **Writes** go through the log: the caller's node stamps the time, sends
    the command to the leader (any node may call; ra redirects), and
    answers once a majority has it on disk and the leader has applied it.
    Concurrent writes from one node to one session are committed together
    (`DSPex.Bridge.Backend.Raft.Batcher`): one log entry, one replication
    round and one fsync per batch, each caller answered with its own
    command's reply. Past `raft_timeout` (default 5000 ms) the answer is
    `{:error, :timeout_unknown_outcome}`: the write may or may not have
    happened, and it is never retried on another member behind the
    caller's back (that could apply it twice).
  - **Reads** are served by the leader after it has confirmed its
    leadership (`consistency: :consistent`, the default), by the leader
    without that round (`:leader`), or by this node's member (`:local`,
    possibly stale). The default is chosen per session at creation
    (`create_session(sid, replicas: 3, consistency: :local)`) and per call
    by the SessionStore's reads (`get_variable(sid, :x, consistency: :local)`).
  - **Placement**: the `replicas` members are the connected nodes with the
    highest rendezvous hash of `{sid, node}`, skipping draining nodes. Only
    Raft decides who writes.
  - **Locks**: `DSPex.Bridge.OptimizerCoordinator`'s locks on a replicated
    session's variables are commands in its log (`var_lock/3`): a grant's
    fencing token is its Raft index, the grant moves the variable's fence
    on every member, lease expiry and holder death are commands the leader
    appends. The lower-level `lock_acquire/4`, `lock_release/3` and
    `fenced/5` lock any term, fenced writes checked inside the state machine.
  - **TTL**: `ttl:` counts from the session's last write or the last read
    its leader served; the expiry is a command the leader appends, so every
    member deletes the session at the same point of the log. A `:local`
    read on a follower does not keep a session alive.
  - **Import**: `SessionStore.import_session(snapshot, replicas: n)` makes a
    new group whose first entry is the snapshot; its ttl and rate limit
    carry over.
  - **Telemetry and propagation** run once, in the calling process, as for
    every backend: the state machine emits nothing itself. What has no
    caller (a lock's expiry, a holder's death, a session's expiry) is
    reported once, by a ra effect on the leader: a lock's end to the
    holder's node's `OptimizerCoordinator`, a session's expiry by the
    leader node's sweep (`[:dspex, :bridge, :session, :expired]`).

  ## Overload

  A group's leader is one process: commands past what it can apply wait in
  its mailbox, and their callers until `raft_timeout`. So each node admits
  at most `config :dspex_bridge, raft_max_in_flight: n` (default 64, read
  at each call) commands and queries at once, over all its replicated
  sessions; past that a call returns `{:error, :overloaded}` at once,
  having sent nothing (a write refused so did not happen). What waits at a
  leader is then bounded by the number of nodes times that.

  The limit is the queue a call may find ahead of it: choose it as the
  node's replicated throughput times the latency you accept. The default
  suits a small machine: 2-3.5k replicated ops/s a node on 2 shared cores
  (docs/performance.md) and tens of milliseconds make 64. With 1,024 and
  300 groups, 333 callers a node never reached the limit, calls queued for
  seconds and their callers timed out while the commands still waited.

  Errors: `{:error, :ra_unavailable}` when ra is not on this node's code
  path (see `scripts/setup.sh`); `{:error, {:insufficient_nodes, have, want}}`
  when fewer eligible nodes are connected than `replicas`;
  `{:error, :unavailable}` when no member answers.
  """
  @behaviour DSPex.Bridge.Backend

  alias DSPex.Bridge.Admission
  alias DSPex.Bridge.Backend.Raft.{Batcher, Command, Machine, Snapshot, System}

  @sessions :dspex_raft_sessions
  # Commands and queries this node has in flight at once (see "Overload").
  @gate :dspex_raft
  @default_max_in_flight 64

  @typedoc "A ra server id: `{cluster_name, node}`."
  @type server_id :: {atom, node}

  ## Registry

  @doc "Whether `sid` is a replicated session known on this node."
  @spec owns?(String.t()) :: boolean
  def owns?(sid) do
    :ets.member(@sessions, sid)
  rescue
    ArgumentError -> false
  end

  @doc "Whether any replicated session is known on this node."
  @spec owns_any?() :: boolean
  def owns_any? do
    :ets.first(@sessions) != :"$end_of_table"
  rescue
    ArgumentError -> false
  end

  @doc false
  # Called on every node when a session is created or its members change.
  def register_local(sid, name, members, consistency \\ :consistent) do
    :ets.insert(@sessions, {sid, name, members, consistency})
    :ok
  end

  @doc false
  def unregister_local(sid) do
    case :ets.lookup(@sessions, sid) do
      [{_, name, _, _}] ->
        Batcher.stop(name)
        :ets.delete(@sessions, {:writing, name})
        :ets.delete(@sessions, {:leader, name})

      [] ->
        :ok
    end

    :ets.delete(@sessions, sid)
    :ok
  end

  @doc false
  # Every entry of this node's table (exchanged with nodes that connect).
  def local_entries, do: :ets.match_object(@sessions, {:_, :_, :_, :_})

  @doc false
  def consistency(sid) do
    case entry(sid) do
      {:ok, _, _, consistency} -> consistency
      _ -> :consistent
    end
  end

  @doc "The members of `sid` as this node last learnt them."
  @spec known_members(String.t()) :: {:ok, [server_id]} | {:error, :session_not_found}
  def known_members(sid) do
    case entry(sid) do
      {:ok, _name, ids, _} -> {:ok, ids}
      error -> error
    end
  end

  defp entry(sid) do
    case :ets.lookup(@sessions, sid) do
      [{^sid, name, ids, consistency}] -> {:ok, name, ids, consistency}
      [] -> {:error, :session_not_found}
    end
  rescue
    ArgumentError -> {:error, :session_not_found}
  end

  defp broadcast(fun, args) do
    apply(__MODULE__, fun, args)
    :erpc.multicast(Node.list(), __MODULE__, fun, args)
  end

  ## Membership

  @doc """
  The group's members and leader, asked of the group:
  `{:ok, %{members: [server_id], leader: server_id}}`.
  """
  @spec members(String.t()) :: {:ok, map} | {:error, term}
  def members(sid) do
    with {:ok, name, ids, consistency} <- entry(sid) do
      case :ra.members(ids, timeout()) do
        {:ok, members, leader} ->
          if Enum.sort(members) != Enum.sort(ids),
            do: broadcast(:register_local, [sid, name, members, consistency])

          {:ok, %{members: members, leader: leader}}

        {:timeout, _} ->
          {:error, :timeout}

        {:error, _} ->
          {:error, :unavailable}
      end
    end
  end

  @doc "The node of the group's leader."
  @spec leader_node(String.t()) :: {:ok, node} | {:error, term}
  def leader_node(sid) do
    with {:ok, %{leader: {_, node}}} <- members(sid), do: {:ok, node}
  end

  @doc false
  def cluster_name(sid) do
    hash = :crypto.hash(:sha256, sid) |> Base.url_encode64(padding: false) |> binary_part(0, 22)
    String.to_atom("dspex_" <> hash)
  end

  @doc false
  def machine(sid, consistency \\ :consistent),
    do:
      {:module, Machine,
       %{
         sid: sid,
         consistency: consistency,
         snapshot_every: Application.get_env(:dspex_bridge, :raft_snapshot_every, 4096)
       }}

  @doc """
  The nodes a new group of `replicas` members goes to: the eligible
  connected nodes (ra running, not draining) ranked by the rendezvous hash
  of `{sid, node}`.
  """
  @spec placement(String.t(), pos_integer, [node]) ::
          {:ok, [node]} | {:error, {:insufficient_nodes, non_neg_integer, pos_integer}}
  def placement(sid, replicas, exclude \\ []) do
    candidates = ([node() | Node.list()] -- exclude) -- draining_nodes()

    eligible =
      candidates
      |> :erpc.multicall(System, :available?, [], 2_000)
      |> Enum.zip(candidates)
      |> Enum.flat_map(fn
        {{:ok, true}, n} -> [n]
        _ -> []
      end)
      |> Enum.sort_by(&:crypto.hash(:sha256, [sid, 0, Atom.to_string(&1)]), :desc)

    if length(eligible) >= replicas,
      do: {:ok, Enum.take(eligible, replicas)},
      else: {:error, {:insufficient_nodes, length(eligible), replicas}}
  end

  defp draining_nodes, do: :persistent_term.get({DSPex.Bridge.HAManager, :draining}, [])

  ## Sessions

  @impl true
  def session_create(sid, opts) do
    with :ok <- check_available(),
         :ok <- check_sid(sid),
         {:ok, rate} <- check_rate(opts[:rate_limit]),
         {:ok, ttl} <- check_ttl(opts[:ttl_ms]),
         {:ok, _kind, frame} <- Command.encode(:session_create, [sid, opts]) do
      case start_group(sid, opts, {:create, now_us(), frame, %{rate: rate, ttl_ms: ttl}}) do
        {:ok, :ok} -> :ok
        {:ok, other} -> other
        error -> error
      end
    end
  end

  # A new group for `sid` (placed, started) whose first entry is `first`
  # (a create or an import): `{:ok, reply}` once it is applied.
  defp start_group(sid, opts, first) do
    replicas = opts[:replicas]
    consistency = opts[:consistency] || :consistent

    with :ok <- check_replicas(replicas),
         :ok <- check_consistency(consistency),
         :ok <- if(owns?(sid), do: {:error, :already_exists}, else: :ok),
         {:ok, nodes} <- placement(sid, replicas) do
      name = cluster_name(sid)
      ids = Enum.map(nodes, &{name, &1})

      case start_members(name, machine(sid, consistency), ids) do
        :ok ->
          case append(sid, ids, first) do
            reply when reply == :ok or elem(reply, 0) == :ok ->
              broadcast(:register_local, [sid, name, ids, consistency])
              {:ok, reply}

            {:error, :timeout_unknown_outcome} = unknown ->
              broadcast(:register_local, [sid, name, ids, consistency])
              unknown

            error ->
              _ = :ra.delete_cluster(ids)
              for {name, node} <- ids, do: :erpc.multicast([node], System, :forget_member, [name])
              error
          end

        error ->
          error
      end
    end
  end

  @doc false
  # The ra server config of member `id` (a fresh uid); `members` the group.
  def server_config(name, machine, {_, _} = id, members) do
    uid = :ra.new_uid(Atom.to_string(name))
    # ra writes the machine's snapshot (its release cursor) at most every
    # `snapshot_interval` entries: the same interval as the machine's.
    {:module, _, %{snapshot_every: every}} = machine

    %{
      id: id,
      uid: uid,
      cluster_name: name,
      log_init_args: %{uid: uid, snapshot_interval: every},
      initial_members: members,
      machine: machine
    }
  end

  defp start_members(name, machine, ids) do
    results =
      Enum.map(ids, fn {_, node} = id ->
        try do
          :erpc.call(
            node,
            System,
            :start_member,
            [server_config(name, machine, id, ids)],
            # Starting a member writes to disk twice (fsynced): on a busy
            # machine it may take longer than a write.
            max(timeout(), 10_000)
          )
        catch
          kind, reason -> {:error, {kind, reason}}
        end
      end)

    case Enum.reject(results, &(&1 == :ok)) do
      [] ->
        _ = :ra.trigger_election(hd(ids))
        :ok

      [failure | _] = failures ->
        for {{_, node} = id, :ok} <- Enum.zip(ids, results) do
          :erpc.call(node, :ra, :force_delete_server, [System.name(), id])
          :erpc.call(node, System, :forget_member, [name])
        end

        if Enum.any?(
             failures,
             &match?({:error, e} when e in [:already_exists, :name_in_use], &1)
           ),
           do: {:error, :already_exists},
           else: {:error, {:member_start_failed, failure}}
    end
  end

  @impl true
  def session_delete(sid) do
    with {:ok, _name, ids, _} <- entry(sid),
         :ok <- run(:session_delete, [sid]) do
      _ = :ra.delete_cluster(ids, timeout())
      for {name, node} <- ids, do: :erpc.multicast([node], System, :forget_member, [name])
      broadcast(:unregister_local, [sid])
      :ok
    end
  end

  @impl true
  def session_list,
    do: :ets.select(@sessions, [{{:"$1", :_, :_, :_}, [{:is_binary, :"$1"}], [:"$1"]}])

  # A replicated session expires by a command its leader appends (see
  # `Machine.tick/2`); the leader's node reports it here, once.
  @impl true
  def session_sweep do
    for {{:expired, sid} = key} <- :ets.match_object(@sessions, {{:expired, :_}}),
        :ets.delete(@sessions, key),
        do: sid
  rescue
    ArgumentError -> []
  end

  @doc false
  # Run by the leader's member (a ra effect) once the session's expiry is
  # applied: the group is deleted, every node forgets it, and this node's
  # sweep reports it.
  def expired(sid) do
    _ =
      spawn(fn ->
        with {:ok, ids} <- expired_members(sid) do
          unregister_local(sid)
          _ = :erpc.multicall(Node.list(), __MODULE__, :unregister_local, [sid], timeout())
          _ = :ra.delete_cluster(ids, timeout())
          for {name, node} <- ids, do: :erpc.multicast([node], System, :forget_member, [name])
          # Reported by this node's sweep, once every node has forgotten it.
          :ets.insert(@sessions, {{:expired, sid}})
        end
      end)

    :ok
  end

  # The members as this node knows them, else as its own member does.
  defp expired_members(sid) do
    case entry(sid) do
      {:ok, _name, ids, _} ->
        {:ok, ids}

      _ ->
        case :ra.members({cluster_name(sid), node()}, timeout()) do
          {:ok, ids, _leader} -> {:ok, ids}
          _ -> :error
        end
    end
  end

  @impl true
  def session_import(snapshot, new_id), do: session_import(snapshot, new_id, %{replicas: 1})

  @doc """
  Imports an `export_session/1` snapshot as a new replicated session:
  `opts` as `session_create/2`'s (`replicas:`, `consistency:`). The
  snapshot's ttl and rate limit carry over, enforced by the state machine.
  """
  @spec session_import(binary, String.t() | nil, map) :: {:ok, String.t()} | {:error, term}
  def session_import(snapshot, new_id, opts) do
    with :ok <- check_available(),
         {:ok, %{sid: sid, ttl_ms: ttl, rate_limit: rate}, stripped} <-
           Snapshot.strip(snapshot, new_id),
         :ok <- check_sid(sid),
         {:ok, rate} <- check_rate(rate),
         {:ok, ttl} <- check_ttl(ttl),
         {:ok, _kind, frame} <-
           Command.encode_raw("session_import", snapshot: stripped, session: sid) do
      case start_group(sid, opts, {:create, now_us(), frame, %{rate: rate, ttl_ms: ttl}}) do
        {:ok, {:ok, ^sid}} -> {:ok, sid}
        {:ok, other} -> other
        error -> error
      end
    end
  end

  @doc """
  Reads with an explicit consistency (`:consistent`, `:leader`, `:local`):
  `read("s1", :var_get_value, ["s1", :x, nil], :local)`.
  """
  @spec read(String.t(), atom, list, :consistent | :leader | :local) :: term
  def read(sid, fun, args, consistency) do
    with :ok <- check_consistency(consistency),
         {:ok, _name, ids, _} <- entry(sid),
         {:ok, kind, frame} <- Command.encode(fun, args) do
      # A write is never run as a query (it would change one copy only).
      if kind in [:read, :heavy_read],
        do: query(sid, ids, kind, frame, consistency),
        else: {:error, {:invalid_argument, {:not_a_read, fun}}}
    end
  end

  @doc """
  A write that also answers where it sits in the log:
  `{:ok, reply, %{index: i, term: t, leader: node}}`, or `{:error, reason}`
  when it was not acknowledged. For clients that keep histories (and the
  fault tests' checker).
  """
  @spec write_with_position(String.t(), atom, list) :: {:ok, term, map} | {:error, term}
  def write_with_position(sid, fun, args) do
    with {:ok, _name, ids, _} <- entry(sid),
         {:ok, kind, frame} <- Command.encode(fun, args) do
      case send_command(sid, ids, {:exec_meta, now_us(), kind, frame}) do
        {:ok, {reply, pos}, {_, leader}} -> {:ok, reply, Map.put(pos, :leader, leader)}
        error -> error
      end
    end
  end

  defp run(fun, [sid | _] = args) do
    with {:ok, _name, ids, consistency} <- entry(sid),
         {:ok, kind, frame} <- Command.encode(fun, args) do
      if kind in [:write, :heavy_write],
        do: batched(sid, ids, {:exec, now_us(), kind, frame}),
        else: query(sid, ids, kind, frame, consistency)
    end
  end

  # Writes go to the log in batches with the other writes made meanwhile
  # from this node (`Raft.Batcher`). A write made while no other write of
  # this node to the session is in flight goes straight to the leader (one
  # hop less: a lone writer waits as long as with one entry per write).
  # The count is per node and session; a caller killed mid-write leaves it
  # high, which only sends later writes through the batcher.
  defp batched(sid, [{name, _} | _] = ids, cmd) do
    key = {:writing, name}

    try do
      case :ets.update_counter(@sessions, key, {2, 1}, {key, 0}) do
        1 ->
          append(sid, ids, cmd)

        _ ->
          # A caller waiting in the batch is in flight as much as one
          # waiting at the leader: it takes a place under
          # `raft_max_in_flight` too.
          admitted(sid, fn -> Batcher.write(sid, name, cmd, timeout()) end)
      end
    after
      :ets.update_counter(@sessions, key, {2, -1}, {key, 1})
    end
  end

  ## Locks with fencing tokens

  @doc """
  Takes `lock` in session `sid` for `holder` (a pid is monitored: its death
  releases the lock) with a lease of `lease_ms` (`nil`: no lease). Answers
  `{:ok, token}`, the grant's Raft index (tokens only increase), or
  `{:error, {:locked, holder}}`. The holder asking again renews its lease
  and keeps its token.
  """
  @spec lock_acquire(String.t(), term, term, pos_integer | nil) ::
          {:ok, pos_integer} | {:error, term}
  def lock_acquire(sid, lock, holder, lease_ms \\ 30_000) do
    with {:ok, _name, ids, _} <- entry(sid),
         do: append(sid, ids, {:lock_acquire, now_us(), lock, holder, lease_ms})
  end

  @doc "Releases `lock` if `token` is still its grant: `:ok` or `{:error, :stale_fencing_token}`."
  @spec lock_release(String.t(), term, pos_integer) :: :ok | {:error, term}
  def lock_release(sid, lock, token) do
    with {:ok, _name, ids, _} <- entry(sid), do: append(sid, ids, {:lock_release, lock, token})
  end

  @doc """
  A write (a `DSPex.Bridge.Backend` callback name and its arguments) made
  only while `token` is `lock`'s current grant; else
  `{:error, :stale_fencing_token}`, decided inside the state machine.
  """
  @spec fenced(String.t(), term, pos_integer, atom, list) :: term
  def fenced(sid, lock, token, fun, args) do
    with {:ok, _name, ids, _} <- entry(sid),
         {:ok, kind, frame} <- Command.encode(fun, args) do
      batched(sid, ids, {:fenced, lock, token, now_us(), kind, frame})
    end
  end

  ## Optimizer locks on session variables (`OptimizerCoordinator`)

  @doc false
  # Takes the lock on variable `var` (its id) for `request`
  # (`%{holder: optimizer_id, pid: pid, lease_ms: ms | nil, mode: :abort |
  # :wait, ref: reference | nil}`): `{:ok, :granted | :already_held,
  # token, granted_at_us}`, `{:wait, ref, holder}` (queued: the grant comes
  # as `{:dspex_raft_lock_granted, ref, token, granted_at_us}`), or
  # `{:error, {:lock_held_by, holder}}`. A grant moves the variable's
  # fence on every member: writes without the holder's token or id are
  # refused inside the state machine.
  def var_lock(sid, var, request), do: lock_command(sid, {:var_lock, now_us(), var, request})

  @doc false
  def var_renew(sid, var, holder, lease_ms),
    do: lock_command(sid, {:var_renew, now_us(), var, holder, lease_ms})

  @doc false
  # `{:ok, token, holder, finished?}`, `{:error, :not_lock_owner}` or
  # `{:error, :not_locked}`; `holder` `:any` releases whoever holds it.
  def var_unlock(sid, var, holder), do: lock_command(sid, {:var_unlock, var, holder})

  @doc false
  # A waiter gives up: `:removed`, `{:granted, token}` or `:gone`.
  def var_cancel(sid, var, ref), do: lock_command(sid, {:var_cancel, var, ref})

  @doc false
  # The lock on `var`, as `OptimizerCoordinator.get_lock_info/2` shows it, or nil.
  def var_lock_info(sid, var) do
    with {:ok, _name, ids, consistency} <- entry(sid),
         do: query(sid, ids, {Machine, :var_lock_info, [var]}, consistency)
  end

  defp lock_command(sid, cmd) do
    with {:ok, _name, ids, _} <- entry(sid), do: append(sid, ids, cmd)
  end

  ## Transport

  defp timeout, do: Application.get_env(:dspex_bridge, :raft_timeout, 5_000)

  defp now_us, do: :os.system_time(:microsecond)

  # One server at a time, the last known leader first: on a timeout the
  # outcome is unknown and the command is not sent again elsewhere (the
  # next call starts with another member).
  defp append(sid, ids, cmd) do
    case send_command(sid, ids, cmd) do
      {:ok, reply, _pos} -> reply
      error -> error
    end
  end

  defp send_command(sid, ids, cmd), do: admitted(sid, fn -> send_admitted(ids, cmd) end)

  defp admitted(sid, fun) do
    max = max_in_flight()

    # Held by this process: given back here, or by `Raft.System`'s sweep
    # should this process be killed while it waits.
    case Admission.admit_held(@gate, max) do
      {:ok, place} ->
        try do
          fun.()
        after
          Admission.release_held(@gate, place)
        end

      {:error, :overloaded} = refused ->
        Admission.refused(:raft, max, sid)
        refused
    end
  end

  defp max_in_flight do
    case Application.get_env(:dspex_bridge, :raft_max_in_flight) do
      n when is_integer(n) and n > 0 -> n
      _ -> @default_max_in_flight
    end
  end

  defp send_admitted(ids, cmd) do
    [{name, _} | _] = ids

    Enum.reduce_while(leader_first(name, ids), {:error, :unavailable}, fn id, acc ->
      case :ra.process_command(id, cmd, timeout()) do
        {:ok, reply, leader} ->
          note_leader(name, leader)
          {:halt, {:ok, reply, leader}}

        {:timeout, _} ->
          note_leader(name, next_member(ids, id))
          {:halt, {:error, :timeout_unknown_outcome}}

        {:error, _} ->
          {:cont, acc}
      end
    end)
  end

  defp leader_first(name, ids) do
    case :ets.lookup(@sessions, {:leader, name}) do
      [{_, leader}] -> [leader | List.delete(ids, leader)]
      [] -> ids
    end
  end

  defp note_leader(name, leader), do: :ets.insert(@sessions, {{:leader, name}, leader})

  defp next_member(ids, id) do
    case Enum.drop_while(ids, &(&1 != id)) do
      [_, next | _] -> next
      _ -> hd(ids)
    end
  end

  defp query(sid, ids, kind, frame, consistency),
    do: query(sid, ids, {Machine, :query, [kind, frame]}, consistency)

  defp query(sid, ids, mfa, consistency),
    do: admitted(sid, fn -> query_admitted(ids, mfa, consistency) end)

  defp query_admitted(ids, mfa, consistency) do
    targets =
      case consistency do
        :local -> Enum.sort_by(ids, fn {_, n} -> n != node() end)
        _ -> ids
      end

    Enum.reduce_while(targets, {:error, :unavailable}, fn id, acc ->
      case do_query(consistency, id, mfa) do
        {:ok, reply} -> {:halt, reply}
        {:timeout, _} -> {:halt, {:error, :timeout}}
        {:error, _} -> {:cont, acc}
      end
    end)
  end

  defp do_query(:consistent, id, mfa) do
    case :ra.consistent_query(id, mfa, timeout()) do
      {:ok, reply, _} -> {:ok, reply}
      other -> other
    end
  end

  defp do_query(:leader, id, mfa), do: unwrap(:ra.leader_query(id, mfa, timeout()))
  defp do_query(:local, id, mfa), do: unwrap(:ra.local_query(id, mfa, timeout()))

  defp unwrap({:ok, {_idx_term, reply}, _}), do: {:ok, reply}
  defp unwrap(other), do: other

  defp check_available do
    if System.available?(), do: :ok, else: {:error, :ra_unavailable}
  end

  # The engine checks ids too, but the group's name is made from it first.
  defp check_sid(sid) when is_binary(sid) and byte_size(sid) in 1..255 do
    if String.valid?(sid), do: :ok, else: {:error, {:invalid_argument, :bad_session_id}}
  end

  defp check_sid(_sid), do: {:error, {:invalid_argument, :bad_session_id}}

  defp check_replicas(n) when is_integer(n) and n >= 1 and n <= 7, do: :ok
  defp check_replicas(n), do: {:error, {:invalid_argument, {:replicas, n}}}

  defp check_consistency(c) when c in [:consistent, :leader, :local], do: :ok
  defp check_consistency(c), do: {:error, {:invalid_argument, {:consistency, c}}}

  defp check_ttl(nil), do: {:ok, nil}
  defp check_ttl(ms) when is_integer(ms) and ms > 0 and ms <= 0x7FFFFFFFFFFF, do: {:ok, ms}
  defp check_ttl(ms), do: {:error, {:invalid_argument, {:ttl, ms}}}

  defp check_rate(nil), do: {:ok, nil}

  defp check_rate({ops, burst} = r)
       when is_integer(ops) and ops > 0 and is_integer(burst) and burst > 0,
       do: {:ok, r}

  defp check_rate(%{ops_per_sec: ops, burst: burst}), do: check_rate({ops, burst})
  defp check_rate(other), do: {:error, {:invalid_argument, {:rate_limit, other}}}

  ## Backend callbacks (session-scoped: through the log or a query)

  @impl true
  def session_info(sid) do
    with {:ok, _name, ids, consistency} <- entry(sid),
         {:ok, _kind, frame} <- Command.encode(:session_info, [sid]) do
      query(sid, ids, {Machine, :session_info, [frame]}, consistency)
    end
  end

  @impl true
  def session_memory(sid), do: run(:session_memory, [sid])
  @impl true
  def session_export(sid), do: run(:session_export, [sid])

  @impl true
  def var_register(sid, name, type, initial, opts, principal),
    do: run(:var_register, [sid, name, type, initial, opts, principal])

  @impl true
  def var_get(sid, ident, principal), do: run(:var_get, [sid, ident, principal])
  @impl true
  def var_get_value(sid, ident, principal), do: run(:var_get_value, [sid, ident, principal])
  @impl true
  def var_exists(sid, ident, principal), do: run(:var_exists, [sid, ident, principal])

  @impl true
  def var_set(sid, ident, value, metadata, expected, principal),
    do: run(:var_set, [sid, ident, value, metadata, expected, principal])

  @impl true
  def var_set_many(sid, updates, atomic, principal),
    do: run(:var_set_many, [sid, updates, atomic, principal])

  @impl true
  def var_history(sid, ident, limit, principal),
    do: run(:var_history, [sid, ident, limit, principal])

  @impl true
  def var_rollback(sid, ident, version, principal),
    do: run(:var_rollback, [sid, ident, version, principal])

  @impl true
  def var_delete(sid, ident, principal), do: run(:var_delete, [sid, ident, principal])

  @impl true
  def var_list(sid, pattern, principal),
    do: run(:var_list, [sid, pattern, principal])

  @impl true
  def var_names(sid, pattern, principal),
    do: run(:var_names, [sid, pattern, principal])

  @impl true
  def acl_set_rules(sid, ident, rules, principal),
    do: run(:acl_set_rules, [sid, ident, rules, principal])

  @impl true
  def acl_check(sid, ident, principal, permission),
    do: run(:acl_check, [sid, ident, principal, permission])

  @impl true
  def acl_authorize(sid, ident, principal, permission),
    do: run(:acl_authorize, [sid, ident, principal, permission])

  @impl true
  def acl_authorize_session(sid, principal, permission),
    do: run(:acl_authorize_session, [sid, principal, permission])

  @impl true
  def acl_audit_log(sid, limit), do: run(:acl_audit_log, [sid, limit])

  @impl true
  def graph_add_edge(sid, from, to, type, principal),
    do: run(:graph_add_edge, [sid, from, to, type, principal])

  @impl true
  def graph_remove_edge(sid, from, to, principal),
    do: run(:graph_remove_edge, [sid, from, to, principal])

  @impl true
  def graph_clear(sid, var, principal), do: run(:graph_clear, [sid, var, principal])

  @impl true
  def graph_dependencies(sid, var, transitive, principal),
    do: run(:graph_dependencies, [sid, var, transitive, principal])

  @impl true
  def graph_dependents(sid, var, transitive, principal),
    do: run(:graph_dependents, [sid, var, transitive, principal])

  @impl true
  def graph_update_order(sid, changed, principal),
    do: run(:graph_update_order, [sid, changed, principal])

  @impl true
  def graph_render(sid, format, principal), do: run(:graph_render, [sid, format, principal])

  @impl true
  def graph_info(sid, principal), do: run(:graph_info, [sid, principal])
end

defmodule DSPex.Bridge.Backend.Raft.Membership do
  @moduledoc false
  # Live membership changes of one group: the moves behind
  # HAManager.migrate_session/2 and draining. Each step is a Raft
  # operation; no acknowledged write depends on anything done here.

  alias DSPex.Bridge.Backend.Raft
  alias DSPex.Bridge.Backend.Raft.System

  @catch_up_ms 10_000

  defp timeout, do: Application.get_env(:dspex_bridge, :raft_timeout, 5_000)

  @doc false
  # Makes `target` the group's leader: a member already, or added (started,
  # joined, caught up) and then led; the member on the old leader's node is
  # then removed when `remove_old?`.
  def migrate(sid, target, remove_old? \\ true) do
    with {:ok, %{members: members, leader: {name, from} = leader}} <- Raft.members(sid) do
      target_id = {name, target}

      cond do
        from == target ->
          :ok

        target_id in members ->
          transfer(sid, leader, target_id)

        true ->
          with :ok <- add(sid, leader, target_id, members),
               :ok <- transfer(sid, leader, target_id) do
            if remove_old?, do: remove(sid, target_id, leader), else: :ok
          end
      end
    end
  end

  @doc false
  # Moves the member on `from` to `to` (not a member yet), keeping the leader
  # off `from`.
  def replace(sid, {name, _} = from_id, to) do
    with {:ok, %{members: members, leader: leader}} <- Raft.members(sid),
         :ok <- add(sid, leader, {name, to}, members) do
      if leader == from_id do
        with :ok <- transfer(sid, leader, {name, to}), do: remove(sid, {name, to}, from_id)
      else
        remove(sid, leader, from_id)
      end
    end
  end

  @doc false
  def transfer(sid, leader, target_id) do
    case :ra.transfer_leadership(leader, target_id) do
      r when r in [:ok, :already_leader] -> await(fn -> led_by?(sid, target_id) end)
      {:error, reason} -> {:error, {:transfer_failed, reason}}
      {:timeout, _} -> {:error, {:transfer_failed, :timeout}}
    end
  end

  defp led_by?(sid, id), do: match?({:ok, %{leader: ^id}}, Raft.members(sid))

  defp add(sid, leader, {name, node} = id, members) do
    config =
      Raft.server_config(name, Raft.machine(sid, Raft.consistency(sid)), id, members ++ [id])

    with :ok <- start_server(node, config),
         {:ok, _, _} <- :ra.add_member(leader, id, timeout()) |> ok3(),
         {:ok, {_, goal}, _} <- :ra.local_query(leader, & &1.applied) do
      await(fn ->
        # Short: a member receiving a snapshot does not answer queries
        # until it has it (the next try will).
        match?({:ok, {_, n}, _} when n >= goal, :ra.local_query(id, & &1.applied, 250))
      end)
    else
      {:error, reason} -> {:error, {:transfer_failed, reason}}
      other -> {:error, {:transfer_failed, other}}
    end
  end

  defp start_server(node, config) do
    case :erpc.call(node, System, :start_member, [config], timeout()) do
      :ok -> :ok
      other -> {:error, other}
    end
  catch
    kind, reason -> {:error, {kind, reason}}
  end

  defp remove(sid, via, {_, node} = id) do
    case :ra.remove_member(via, id, timeout()) |> ok3() do
      {:ok, _, _} ->
        _ =
          try do
            :erpc.call(node, :ra, :force_delete_server, [System.name(), id], timeout())
            :erpc.call(node, System, :forget_member, [elem(id, 0)], timeout())
          catch
            _, _ -> :ok
          end

        _ = Raft.members(sid)
        :ok

      other ->
        {:error, {:transfer_failed, other}}
    end
  end

  defp ok3({:ok, _, _} = ok), do: ok
  defp ok3({:error, :already_member}), do: {:ok, nil, nil}
  defp ok3({:error, :not_member}), do: {:ok, nil, nil}
  defp ok3(other), do: other

  defp await(check, waited \\ 0) do
    cond do
      check.() -> :ok
      waited >= @catch_up_ms -> {:error, {:transfer_failed, :timeout}}
      true -> Process.sleep(10) && await(check, waited + 10)
    end
  end
end
