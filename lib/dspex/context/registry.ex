defmodule DSPex.Context.Registry do
  @moduledoc false
  # Which contexts are bridged, to which session: an ETS table read from the
  # caller's process, so bridged `DSPex.Variables` calls skip the context
  # process. Monitors bridged contexts and deletes their sessions when they
  # stop (unless asked to keep them).
  use GenServer

  alias DSPex.Bridge.SessionStore

  @table __MODULE__

  def start_link(_opts), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc "`{:bridged, session_id}` or `{:local, pid}` for a context."
  def lookup(ctx) do
    pid = resolve(ctx)

    case :ets.lookup(@table, pid) do
      [{^pid, sid}] -> {:bridged, sid}
      [] -> {:local, pid}
    end
  end

  def bridge(pid, sid, keep_session) do
    GenServer.call(__MODULE__, {:bridge, pid, sid, keep_session})
  end

  defp resolve(pid) when is_pid(pid), do: pid

  # Anything that names no live process exits as a call to it would.
  defp resolve(name) when is_atom(name) or is_tuple(name) do
    case GenServer.whereis(name) do
      pid when is_pid(pid) -> pid
      _ -> exit({:noproc, {__MODULE__, :lookup, [name]}})
    end
  rescue
    FunctionClauseError -> exit({:noproc, {__MODULE__, :lookup, [name]}})
  end

  defp resolve(name), do: exit({:noproc, {__MODULE__, :lookup, [name]}})

  @impl true
  def init(nil) do
    :ets.new(@table, [:named_table, :protected, :set, read_concurrency: true])
    {:ok, %{}}
  end

  @impl true
  def handle_call({:bridge, pid, sid, keep_session}, _from, monitors) do
    ref = Process.monitor(pid)
    :ets.insert(@table, {pid, sid})
    {:reply, :ok, Map.put(monitors, ref, {pid, sid, keep_session})}
  end

  @impl true
  def handle_info({:DOWN, ref, :process, _pid, _reason}, monitors) do
    case Map.pop(monitors, ref) do
      {{pid, sid, keep_session}, monitors} ->
        :ets.delete(@table, pid)
        unless keep_session, do: SessionStore.delete_session(sid)
        {:noreply, monitors}

      {nil, monitors} ->
        {:noreply, monitors}
    end
  end

  def handle_info(_message, monitors), do: {:noreply, monitors}
end
