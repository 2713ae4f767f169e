defmodule DSPex.Bridge.HAManager do
  @moduledoc """
  High availability of sessions across the nodes of an Erlang cluster, on
  Raft (see `DSPex.Bridge.Backend.Raft`).

      {:ok, "s1"} = DSPex.Bridge.SessionStore.create_session("s1", replicas: 3)
      {:ok, node} = DSPex.Bridge.HAManager.get_session_owner("s1")   # the leader's node
      :ok = DSPex.Bridge.HAManager.migrate_session("s1", :"b@host")

  Rolling upgrade of one node (seed 002's playbook):

      :ok = HAManager.start_draining(node())
      :ok = HAManager.await_drainage(timeout: 60_000)
      # ... stop, upgrade, restart the node ...
      :ok = HAManager.stop_draining(node())

  Draining moves every leadership off the node, and every replica to a
  connected node that is not a member yet when there is one (with as many
  nodes as replicas there is none: the follower stays, and catches up from
  the log when the node comes back). Draining nodes get no new members.

  Membership comes from Erlang distribution (`:net_kernel.monitor_nodes/1`):
  a node that connects learns the cluster's replicated sessions and draining
  nodes. Who writes is decided by Raft alone: failover is an election.
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.Backend.{Raft, Router}
  alias DSPex.Bridge.Backend.Raft.Membership

  @draining {__MODULE__, :draining}

  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc """
  Registers a session for HA tracking. A replicated session is registered
  on every node when it is created; this checks it exists: `:ok` or
  `{:error, :session_not_found}`. `metadata` is accepted for seed 002's API.
  """
  @spec register_session(String.t(), map) :: :ok | {:error, term}
  def register_session(sid, _metadata \\ %{}) do
    case get_session_owner(sid) do
      {:ok, _} -> :ok
      error -> error
    end
  end

  @doc """
  The node that owns `sid`: the Raft leader's node for a replicated
  session, the node holding it otherwise. `{:error, :session_not_found}`.
  """
  @spec get_session_owner(String.t()) :: {:ok, node} | {:error, term}
  def get_session_owner(sid) when is_binary(sid) do
    cond do
      Raft.owns?(sid) ->
        Raft.leader_node(sid)

      Router.kind_of(sid) != nil ->
        {:ok, node()}

      true ->
        Node.list()
        |> :erpc.multicall(Router, :kind_of, [sid], 2_000)
        |> Enum.zip(Node.list())
        |> Enum.find_value({:error, :session_not_found}, fn
          {{:ok, kind}, n} when kind != nil -> {:ok, n}
          _ -> nil
        end)
    end
  end

  def get_session_owner(_), do: {:error, {:invalid_argument, :bad_session_id}}

  @doc """
  Moves the session's leadership to `target_node`: a member already, or
  added as one (started, joined, caught up from the log or a snapshot),
  made leader, and the old leader's member removed. No acknowledged write
  is lost: each step is a Raft membership change or an election.
  `{:error, :not_owner}` for a session that is not replicated;
  `{:error, {:transfer_failed, reason}}`.
  """
  @spec migrate_session(String.t(), node) :: :ok | {:error, term}
  def migrate_session(sid, target_node) when is_atom(target_node) do
    cond do
      not Raft.owns?(sid) -> {:error, :not_owner}
      target_node not in [node() | Node.list()] -> {:error, {:transfer_failed, :nodedown}}
      true -> Membership.migrate(sid, target_node)
    end
  end

  @doc "Marks `node` as draining, on every connected node, and starts moving its work off."
  @spec start_draining(node) :: :ok
  def start_draining(node \\ node()) do
    set_draining(node, true)
    Task.start(fn -> drain(node) end)
    :ok
  end

  @doc "Ends the draining of `node`: it gets new members again."
  @spec stop_draining(node) :: :ok
  def stop_draining(node \\ node()), do: set_draining(node, false)

  @doc """
  Waits until no replicated session has its leader on a draining node, and
  no replica there that could move: `:ok`, or
  `{:error, {:timeout, [session_id]}}` past `timeout:` (default 60,000 ms).
  """
  @spec await_drainage(keyword) :: :ok | {:error, term}
  def await_drainage(opts \\ []) do
    deadline = System.monotonic_time(:millisecond) + Keyword.get(opts, :timeout, 60_000)
    await_drained(deadline)
  end

  defp await_drained(deadline) do
    case Enum.flat_map(draining(), &pending/1) do
      [] ->
        :ok

      pending ->
        if System.monotonic_time(:millisecond) > deadline do
          {:error, {:timeout, Enum.uniq(pending)}}
        else
          Enum.each(draining(), &drain/1)
          Process.sleep(50)
          await_drained(deadline)
        end
    end
  end

  @doc "The nodes draining now."
  @spec draining() :: [node]
  def draining, do: :persistent_term.get(@draining, [])

  @doc """
  The cluster as this node sees it: `%{nodes: [node], draining: [node],
  sessions: n, leaders: %{session_id => node | nil}}`.
  """
  @spec cluster_status() :: map
  def cluster_status do
    sessions = Raft.session_list()

    leaders =
      Map.new(sessions, fn sid ->
        case Raft.leader_node(sid) do
          {:ok, n} -> {sid, n}
          _ -> {sid, nil}
        end
      end)

    %{
      nodes: Enum.sort([node() | Node.list()]),
      draining: draining(),
      sessions: length(sessions),
      leaders: leaders
    }
  end

  @doc """
  The readiness check of replicated sessions (see `DSPex.Bridge.Health`):
  `:not_configured`, `:ok`, `{:error, {:raft_no_leader, session_ids}}`, or
  `{:error, :ra_unavailable}` when this node is configured for them
  (`config :dspex_bridge, ra_data_dir:`) and ra could not start here (its
  directory in use by another VM, a bad `ra_system:` setting): its
  durable sessions are not being served. Local lookups only (ra's
  leaderboard), no message.
  """
  @spec health() :: :ok | :not_configured | {:error, term}
  def health do
    if Application.get_env(:dspex_bridge, :ra_data_dir) != nil and Code.ensure_loaded?(:ra) and
         not DSPex.Bridge.Backend.Raft.System.available?(),
       do: {:error, :ra_unavailable},
       else: group_health()
  end

  defp group_health do
    case local_groups() do
      [] ->
        :not_configured

      groups ->
        case for(
               {sid, name} <- groups,
               :ra_leaderboard.lookup_leader(name) == :undefined,
               do: sid
             ) do
          [] -> :ok
          sids -> {:error, {:raft_no_leader, Enum.sort(sids)}}
        end
    end
  rescue
    _ -> {:error, :ra_unavailable}
  end

  @doc """
  Prometheus text of this node's replicated sessions:
  `dspex_raft_sessions` (groups with a member here),
  `dspex_raft_leaders` (of which this node leads),
  `dspex_raft_leaderless` (with no known leader) and
  `dspex_raft_draining` (1 when this node is draining).
  """
  @spec prometheus_text() :: iodata
  def prometheus_text do
    groups = local_groups()

    leaders =
      Enum.map(groups, fn {_, name} ->
        if Raft.System.available?(), do: :ra_leaderboard.lookup_leader(name), else: :undefined
      end)

    gauge = fn name, help, value ->
      [
        "# HELP ",
        name,
        " ",
        help,
        "\n# TYPE ",
        name,
        " gauge\n",
        name,
        " ",
        to_string(value),
        "\n"
      ]
    end

    [
      gauge.(
        "dspex_raft_sessions",
        "Replicated sessions with a member on this node.",
        length(groups)
      ),
      gauge.(
        "dspex_raft_leaders",
        "Replicated sessions this node leads.",
        Enum.count(leaders, &match?({_, n} when n == node(), &1))
      ),
      gauge.(
        "dspex_raft_leaderless",
        "Replicated sessions with no known leader.",
        Enum.count(leaders, &(&1 == :undefined))
      ),
      gauge.(
        "dspex_raft_draining",
        "1 when this node is draining.",
        if(node() in draining(), do: 1, else: 0)
      )
    ]
  end

  # {sid, cluster} of the groups with a member on this node.
  defp local_groups do
    for {sid, name, members, _} <- Raft.local_entries(),
        {name, node()} in members,
        do: {sid, name}
  end

  ## Draining

  # Sessions whose leader is on `node`, or whose replica there could move.
  defp pending(node) do
    for sid <- Raft.session_list(),
        {:ok, %{members: members, leader: {_, leader}}} <- [Raft.members(sid)],
        member_nodes = Enum.map(members, &elem(&1, 1)),
        leader == node or (node in member_nodes and spare(sid, member_nodes) != nil),
        do: sid
  end

  defp spare(sid, member_nodes) do
    case Raft.placement(sid, 1, member_nodes) do
      {:ok, [n]} -> n
      _ -> nil
    end
  end

  defp drain(node) do
    for sid <- pending(node), {:ok, %{members: members, leader: leader}} <- [Raft.members(sid)] do
      member_nodes = Enum.map(members, &elem(&1, 1))
      {name, _} = leader

      case spare(sid, member_nodes) do
        nil ->
          case Enum.find(member_nodes, &(&1 != node)) do
            nil -> :ok
            other -> Membership.transfer(sid, leader, {name, other})
          end

        to ->
          Membership.replace(sid, {name, node}, to)
      end
    end

    :ok
  rescue
    e -> Logger.warning("dspex: draining #{node}: #{Exception.message(e)}")
  end

  ## Cluster membership

  defp set_draining(node, on?) do
    nodes = [node() | Node.list()]
    _ = :erpc.multicall(nodes, GenServer, :call, [__MODULE__, {:draining, node, on?}], 5_000)
    :ok
  end

  @reconnect_ms 1_000

  @impl true
  def init(_opts) do
    :ok = :net_kernel.monitor_nodes(true)
    {:ok, %{lost: MapSet.new(), timer: nil}}
  end

  @impl true
  def handle_call({:draining, node, on?}, _from, state) do
    list = List.delete(draining(), node)
    :persistent_term.put(@draining, if(on?, do: Enum.sort([node | list]), else: list))
    {:reply, :ok, state}
  end

  @impl true
  def handle_info({:nodeup, node}, state) do
    # Tell the newcomer what this node knows; it does the same for us.
    entries = Raft.local_entries()
    drains = draining()

    _ =
      Task.start(fn ->
        try do
          :erpc.call(node, __MODULE__, :learn, [entries, drains], 5_000)
        catch
          _, _ -> :ok
        end
      end)

    {:noreply, state}
  end

  # ra sends without auto-connecting (a paused or partitioned node must not
  # be dialled on every message), so a node that was lost is dialled here,
  # once a second, while some replicated session still has a member on it.
  def handle_info({:nodedown, node}, state) do
    {:noreply, schedule_reconnect(%{state | lost: MapSet.put(state.lost, node)})}
  end

  def handle_info(:reconnect, state) do
    wanted = member_nodes()

    lost =
      state.lost
      |> Enum.filter(&(&1 in wanted and &1 not in Node.list()))
      |> Enum.reject(&Node.connect/1)
      |> MapSet.new()

    {:noreply, schedule_reconnect(%{state | lost: lost, timer: nil})}
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp schedule_reconnect(%{timer: nil} = state) do
    if MapSet.size(state.lost) > 0,
      do: %{state | timer: Process.send_after(self(), :reconnect, @reconnect_ms)},
      else: state
  end

  defp schedule_reconnect(state), do: state

  defp member_nodes do
    for {_sid, _name, members, _} <- Raft.local_entries(), {_, n} <- members, uniq: true, do: n
  end

  @doc false
  def learn(entries, drains) do
    for {sid, name, members, consistency} <- entries,
        not Raft.owns?(sid),
        do: Raft.register_local(sid, name, members, consistency)

    :persistent_term.put(@draining, Enum.sort(Enum.uniq(draining() ++ drains)))
    :ok
  end
end
