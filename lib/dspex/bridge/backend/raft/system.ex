defmodule DSPex.Bridge.Backend.Raft.System do
  @moduledoc """
  The node's Raft runtime: starts ra's `:dspex` system on the configured
  data directory, owns the tables the Raft backend reads, and at boot
  restarts every replicated-session member found on disk (that is how a
  durable session comes back after its VM was killed).

  ra is optional: when its code is not on the path (`scripts/setup.sh`
  fetches it into `.cache/ra`), this process still owns the (empty) tables
  and `available?/0` is false.

  Configuration: `config :dspex_bridge, ra_data_dir: "/var/lib/dspex/ra"`
  (default: `<tmp>/dspex_ra/<node>`; one directory per node, on a disk
  that survives restarts for durable sessions).
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.Backend.Raft.Machine

  @system :dspex
  @sessions :dspex_raft_sessions

  @doc "The ra system name."
  def name, do: @system

  @doc "The table of known replicated sessions: `{sid, cluster, members}`."
  def sessions_table, do: @sessions

  @doc "Whether replicated sessions can be created on this node."
  @spec available?() :: boolean
  def available? do
    :persistent_term.get({__MODULE__, :available}, false)
  end

  @doc "The ra data directory of this node."
  @spec data_dir() :: String.t()
  def data_dir do
    case Application.get_env(:dspex_bridge, :ra_data_dir) do
      nil -> Path.join([System.tmp_dir!(), "dspex_ra", Atom.to_string(node())])
      dir -> Path.join(dir, Atom.to_string(node()))
    end
  end

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(_opts) do
    :ets.new(@sessions, [:named_table, :public, :set, read_concurrency: true])
    :ets.new(Machine.engine_table(), [:named_table, :public, :set, write_concurrency: true])
    # Synchronous: once the application has started, the members on disk
    # are back and `available?/0` is final.
    available =
      with true <- Code.ensure_loaded?(:ra),
           {:ok, _} <- Application.ensure_all_started(:ra),
           :ok <- start_system() do
        true
      else
        other ->
          Logger.debug("dspex: replicated sessions unavailable: #{inspect(other)}")
          false
      end

    if available, do: restart_members()
    :persistent_term.put({__MODULE__, :available}, available)
    {:ok, %{}}
  end

  defp start_system do
    dir = String.to_charlist(data_dir())
    File.mkdir_p!(data_dir())

    config =
      Map.merge(:ra_system.default_config(), %{
        name: @system,
        names: :ra_system.derive_names(@system),
        data_dir: dir,
        wal_data_dir: dir
      })

    case :ra_system.start(config) do
      {:ok, _} -> :ok
      {:error, {:already_started, _}} -> :ok
      other -> other
    end
  end

  # Every member registered on disk is restarted; the ones that answer
  # are registered in the sessions table.
  defp restart_members do
    for {name, _uid} <- :ra_directory.list_registered(@system) do
      id = {name, node()}

      case :ra.restart_server(@system, id) do
        :ok -> :ok
        {:error, {:already_started, _}} -> :ok
        error -> Logger.warning("dspex: could not restart #{inspect(id)}: #{inspect(error)}")
      end

      with {:ok, {_, sid}, _} <- :ra.local_query(id, & &1.sid),
           {:ok, members, _} <- :ra.members({:local, id}) do
        :ets.insert(@sessions, {sid, name, members})
      end
    end
  rescue
    e -> Logger.warning("dspex: restarting replicated sessions: #{Exception.message(e)}")
  end
end
