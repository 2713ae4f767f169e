defmodule DSPex.Chaos.Cluster do
  @moduledoc """
  The three `:peer` nodes of the chaos run (`DSPex.Test.HACluster`: loopback,
  controlled over their standard I/O, so a partition between peers never
  cuts the runner off), held by a process that traps exits: a node killed
  by `kill -9` ends its `:peer` process, which must not take the runner
  with it. The live peers are in a `:persistent_term` the clients read.
  """
  use GenServer

  alias DSPex.Bridge.{Backend.Raft, HAManager}
  alias DSPex.Test.HACluster, as: C

  @key {__MODULE__, :peers}

  def start(names, dir), do: GenServer.start(__MODULE__, {names, dir}, name: __MODULE__)

  @doc "The live peers (`%{pid, node, name, os_pid}`), in a stable order."
  def peers, do: :persistent_term.get(@key, [])

  def peer(node), do: Enum.find(peers(), &(&1.node == node))

  @doc "Takes `node` out of the live peers (after it was killed: its clients find out by their calls failing)."
  def forget(node), do: GenServer.call(__MODULE__, {:forget, node}, 30_000)

  @doc "Starts `node` again on its data directory and connects it."
  def restart(node), do: GenServer.call(__MODULE__, {:restart, node}, 120_000)

  def partition(node) do
    {[p], others} = Enum.split_with(peers(), &(&1.node == node))
    C.partition(p, others)
  end

  def heal(node) do
    {[p], others} = Enum.split_with(peers(), &(&1.node == node))
    C.heal(p, others)
    C.connect_all(peers())
  end

  def stop do
    GenServer.call(__MODULE__, :stop, 60_000)
  catch
    :exit, _ -> :ok
  end

  @doc "The node leading the most of `sids` (asked of the first live peer)."
  def busiest_leader(sids) do
    [p | _] = peers()

    sids
    |> Enum.map(fn sid ->
      case C.call(p, HAManager, :get_session_owner, [sid]) do
        {:ok, node} -> node
        _ -> nil
      end
    end)
    |> Enum.reject(&is_nil/1)
    |> Enum.frequencies()
    |> Enum.max_by(fn {_, n} -> n end, fn -> {p.node, 0} end)
    |> elem(0)
  end

  @doc "Leaders of `sids` per node, as a map."
  def leaders(sids) do
    [p | _] = peers()

    sids
    |> Enum.map(fn sid ->
      case C.call(p, HAManager, :get_session_owner, [sid]) do
        {:ok, node} -> node
        _ -> :none
      end
    end)
    |> Enum.frequencies()
  end

  @doc """
  Waits (up to `timeout` ms) until `peer`'s members of every session in
  `sids` answer: a restarted node has recovered them from disk. There is
  no event for it: polled every 50 ms.
  """
  def await_members(node, sids, timeout \\ 30_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    await(node, sids, deadline)
  end

  defp await(_node, [], _deadline), do: :ok

  defp await(node, [sid | rest] = sids, deadline) do
    ok? =
      case peer(node) do
        nil -> false
        p -> match?({:ok, _}, safe_call(p, Raft, :members, [sid]))
      end

    cond do
      ok? ->
        await(node, rest, deadline)

      System.monotonic_time(:millisecond) > deadline ->
        {:error, {:members_not_recovered, node, sids}}

      true ->
        Process.sleep(50)
        await(node, sids, deadline)
    end
  end

  defp safe_call(p, m, f, a) do
    C.call(p, m, f, a, 5_000)
  catch
    _, reason -> {:error, reason}
  end

  ## Server

  @impl true
  def init({names, dir}) do
    Process.flag(:trap_exit, true)
    :ok = C.ensure_epmd()
    peers = C.start(names, dir)
    :persistent_term.put(@key, peers)
    {:ok, %{dir: dir, all: peers}}
  end

  @impl true
  def handle_call({:forget, node}, _from, state) do
    :persistent_term.put(@key, Enum.reject(peers(), &(&1.node == node)))
    {:reply, :ok, state}
  end

  def handle_call({:restart, node}, _from, state) do
    old = Enum.find(state.all, &(&1.node == node))
    p = C.start_peer(old.name, state.dir)
    all = Enum.map(state.all, &if(&1.node == node, do: p, else: &1))
    live = Enum.filter(all, &(&1.node in [node | Enum.map(peers(), fn q -> q.node end)]))
    C.connect_all(live)
    :persistent_term.put(@key, live)
    {:reply, :ok, %{state | all: all}}
  end

  def handle_call(:stop, _from, state) do
    C.stop(peers())
    :persistent_term.erase(@key)
    {:stop, :normal, :ok, state}
  end

  @impl true
  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}
  def handle_info(_other, state), do: {:noreply, state}
end
