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
  (a folder per node is made inside it; on a disk that survives restarts
  for durable sessions). Default: `<tmp>/dspex_ra/<hash of the working
  directory>/<node>`, so two projects on one machine never share a WAL.
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.Backend.Raft.Machine

  @system :dspex
  @sessions :dspex_raft_sessions
  @sweep_every 1_000

  @doc "The ra system name."
  def name, do: @system

  @doc "The table of known replicated sessions: `{sid, cluster, members}`."
  def sessions_table, do: @sessions

  @doc false
  # The supervisor of this node's write batchers (`Raft.Batcher`), one per
  # replicated session written from here, started on demand.
  def batchers, do: DSPex.Bridge.Backend.Raft.Batchers

  @doc "Whether replicated sessions can be created on this node."
  @spec available?() :: boolean
  def available? do
    :persistent_term.get({__MODULE__, :available}, false)
  end

  @doc "The ra data directory of this node."
  @spec data_dir() :: String.t()
  def data_dir, do: :persistent_term.get({__MODULE__, :data_dir}, nil) || configured_dir()

  defp configured_dir do
    case Application.get_env(:dspex_bridge, :ra_data_dir) do
      nil -> Path.join([System.tmp_dir!(), "dspex_ra", cwd_hash(), Atom.to_string(node())])
      dir -> Path.join(dir, Atom.to_string(node()))
    end
  end

  defp cwd_hash do
    :crypto.hash(:sha256, File.cwd!()) |> Base.url_encode64(padding: false) |> binary_part(0, 12)
  end

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(_opts) do
    # The node's admission counter for Raft calls (`Backend.Raft`, "Overload").
    :ok = DSPex.Bridge.Admission.ensure_holders(:dspex_raft)
    schedule_sweep()
    :ets.new(@sessions, [:named_table, :public, :set, read_concurrency: true])
    :ets.new(Machine.engine_table(), [:named_table, :public, :set, write_concurrency: true])
    :ok = start_batchers()
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

  # The places of callers killed while admitted come back (`Admission.sweep/1`).
  @impl true
  def handle_info(:sweep, state) do
    _ = DSPex.Bridge.Admission.sweep(:dspex_raft)
    schedule_sweep()
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp schedule_sweep, do: Process.send_after(self(), :sweep, @sweep_every)

  # Linked: it stops with this process, and its batchers with it (after a
  # crash of this process, the old one may still be stopping).
  defp start_batchers do
    case DynamicSupervisor.start_link(name: batchers(), strategy: :one_for_one) do
      {:ok, _} ->
        :ok

      {:error, {:already_started, old}} ->
        ref = Process.monitor(old)

        receive do
          {:DOWN, ^ref, _, _, _} -> start_batchers()
        after
          5_000 -> {:error, :batchers_still_running}
        end
    end
  end

  defp start_system do
    with {:ok, path} <- claim_dir() do
      :persistent_term.put({__MODULE__, :data_dir}, path)
      start_system(path)
    end
  end

  # One VM at a time writes a data directory (`DSPex.Bridge.DirLock`):
  # the default, in use by another VM (non-distributed VMs in one project
  # directory are all `nonode@nohost`), gives way to a subdirectory of this
  # VM's own; a configured one in use leaves replicated sessions
  # unavailable here.
  defp claim_dir do
    base = configured_dir()
    File.mkdir_p!(base)

    case DSPex.Bridge.DirLock.acquire(base, "dspex.lock") do
      :ok ->
        {:ok, base}

      {:error, {:in_use, os_pid}} = error ->
        if Application.get_env(:dspex_bridge, :ra_data_dir) do
          Logger.error("dspex: ra data directory #{base} is in use by OS process #{os_pid}")
          error
        else
          own = Path.join(base, "vm-" <> System.pid())
          File.mkdir_p!(own)

          Logger.warning(
            "dspex: ra data directory #{base} is in use by OS process #{os_pid}; this VM's is #{own}"
          )

          with :ok <- DSPex.Bridge.DirLock.acquire(own, "dspex.lock"), do: {:ok, own}
        end

      error ->
        error
    end
  end

  defp start_system(path) do
    with {:ok, settings} <- ra_settings(Application.get_env(:dspex_bridge, :ra_system, %{})) do
      dir = String.to_charlist(path)

      # The WAL is opened with O_SYNC unless configured otherwise: each of
      # its batched write(2) calls returns once the data is on disk, as
      # durable as ra's default write-then-fdatasync and one system call and
      # one dirty-scheduler wake-up fewer per batch (16 writers on 3 local
      # nodes: 10.8k writes/s against 8.3k, medians of 6, bench/ha_bench.exs).
      config =
        :ra_system.default_config()
        |> Map.put(:wal_write_strategy, :o_sync)
        |> Map.merge(settings)
        |> Map.merge(%{
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
    else
      {:error, {:bad_ra_system, why}} = error ->
        Logger.error("dspex: config :dspex_bridge, ra_system: #{why}")
        error
    end
  end

  # ra's system settings (ra 2.2: the keys of `:ra_system.default_config/0`)
  # and what each one takes. The name and the directories are this node's.
  @ra_settings %{
    wal_write_strategy: [:default, :o_sync, :sync_after_notify],
    wal_sync_method: [:datasync, :sync],
    wal_compute_checksums: :boolean,
    wal_garbage_collect: :boolean,
    wal_pre_allocate: :boolean,
    segment_compute_checksums: :boolean,
    wal_max_batch_size: :pos_integer,
    wal_max_entries: :pos_integer_or_undefined,
    wal_max_size_bytes: :pos_integer,
    segment_max_entries: :pos_integer
  }

  @doc false
  # `config :dspex_bridge, ra_system: %{...}` (or a keyword list), checked
  # before ra sees it: a bad setting leaves replicated sessions unavailable
  # on this node with an error naming it, instead of crashing the
  # application at boot inside ra.
  @spec ra_settings(term) :: {:ok, map} | {:error, {:bad_ra_system, String.t()}}
  def ra_settings(settings) when is_map(settings), do: ra_settings(Map.to_list(settings))

  def ra_settings(settings) when is_list(settings) do
    Enum.reduce_while(settings, {:ok, %{}}, fn
      {key, value}, {:ok, acc} when is_map_key(@ra_settings, key) ->
        if ra_setting?(Map.fetch!(@ra_settings, key), value),
          do: {:cont, {:ok, Map.put(acc, key, value)}},
          else: {:halt, bad_ra_system("#{inspect(key)} cannot be #{inspect(value)}")}

      {key, _}, _ when key in [:name, :names, :data_dir, :wal_data_dir] ->
        {:halt, bad_ra_system("#{inspect(key)} is set by dspex (see :ra_data_dir)")}

      {key, _}, _ when is_atom(key) ->
        {:halt, bad_ra_system("unknown setting #{inspect(key)}")}

      other, _ ->
        {:halt, bad_ra_system("not a {setting, value} pair: #{inspect(other)}")}
    end)
  end

  def ra_settings(other), do: bad_ra_system("not a map or keyword list: #{inspect(other)}")

  defp bad_ra_system(why), do: {:error, {:bad_ra_system, why}}

  defp ra_setting?(choices, value) when is_list(choices), do: value in choices
  defp ra_setting?(:boolean, value), do: is_boolean(value)
  defp ra_setting?(:pos_integer, value), do: is_integer(value) and value > 0
  defp ra_setting?(:pos_integer_or_undefined, :undefined), do: true
  defp ra_setting?(:pos_integer_or_undefined, value), do: ra_setting?(:pos_integer, value)

  @doc """
  Starts a member on this node from its ra server config, after writing
  the config to this node's data directory (fsynced): ra's own name
  directory is a dets file that a kill -9 can leave without its last
  entries, and a member this node cannot name after a crash could not be
  restarted.
  """
  @spec start_member(map) :: :ok | {:error, term}
  def start_member(%{id: {name, _}} = config) do
    path = member_path(name)
    File.mkdir_p!(Path.dirname(path))
    tmp = path <> ".tmp"
    {:ok, fd} = :file.open(tmp, [:write, :raw, :binary])
    :ok = :file.write(fd, :erlang.term_to_binary(config))
    :ok = :file.sync(fd)
    :ok = :file.close(fd)
    :ok = :file.rename(tmp, path)

    case :ra.start_server(@system, config) do
      :ok -> :ok
      {:error, {:already_started, _}} -> :ok
      error -> error
    end
  end

  @doc "Forgets a member removed from its group (its ra data is deleted by ra)."
  @spec forget_member(atom) :: :ok
  def forget_member(name) do
    _ = File.rm(member_path(name))
    :ok
  end

  defp member_path(name), do: Path.join([data_dir(), "dspex_members", Atom.to_string(name)])

  # Every member this node recorded is restarted (ra recovers its log and
  # snapshot from the data directory), then registered in the sessions table.
  defp restart_members do
    for file <- Path.wildcard(Path.join([data_dir(), "dspex_members", "*"])),
        not String.ends_with?(file, ".tmp"),
        {:ok, bin} <- [File.read(file)] do
      %{id: {name, _}} = config = :erlang.binary_to_term(bin)
      config = %{config | id: {name, node()}}
      id = config.id

      case :ra.restart_server(@system, id) do
        :ok -> :ok
        {:error, {:already_started, _}} -> :ok
        {:error, :name_not_registered} -> :ra.start_server(@system, config)
        error -> Logger.warning("dspex: could not restart #{inspect(id)}: #{inspect(error)}")
      end

      # A restarted member answers queries once its group has a leader,
      # which needs the other members' nodes: learn its session meanwhile.
      Task.start(fn -> register_member(id, 120) end)
    end
  rescue
    e -> Logger.warning("dspex: restarting replicated sessions: #{Exception.message(e)}")
  end

  defp register_member(_id, 0), do: :ok

  defp register_member({name, _} = id, tries) do
    with {:ok, {_, {sid, consistency}}, _} <-
           :ra.local_query(id, &{&1.sid, &1.consistency}, 1_000),
         {:ok, members, _} <- :ra.members({:local, id}, 1_000) do
      # Every connected node learns it (a node without a member forwards).
      DSPex.Bridge.Backend.Raft.register_local(sid, name, members, consistency)

      :erpc.multicast(Node.list(), DSPex.Bridge.Backend.Raft, :register_local, [
        sid,
        name,
        members,
        consistency
      ])
    else
      _ ->
        Process.sleep(500)
        register_member(id, tries - 1)
    end
  catch
    _, _ ->
      Process.sleep(500)
      register_member(id, tries - 1)
  end
end
