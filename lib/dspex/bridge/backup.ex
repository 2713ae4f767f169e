defmodule DSPex.Bridge.Backup do
  @moduledoc """
  Backups of sessions: snapshots written to a directory, periodically for
  the sessions you choose, a bounded number kept per session, and a restore.

      config :dspex_bridge, :backup,
        dir: "/var/lib/dspex/backups",   # required
        interval: :timer.minutes(5),     # ms between rounds (default 5 minutes)
        sessions: "orders-*",            # which sessions (default :all)
        keep: 12                         # files kept per session (default 12)

  With that config the application starts this module's process, which
  snapshots the chosen sessions every `interval`. Without it nothing runs;
  `snapshot_now/2`, `list/1` and `restore/2` work either way:

      {:ok, %{path: path}} = Backup.snapshot_now("orders-1", dir: "/backups")
      {:ok, [%{session_id: "orders-1", path: ^path} | _]} = Backup.list("/backups")
      {:ok, "orders-1-copy"} = Backup.restore(path, as: "orders-1-copy")
      {:ok, "orders-1"} = Backup.restore("/backups", session_id: "orders-1")

  From a shell, `mix dspex.restore DIR_OR_FILE [--as NEW_ID] --node NODE`
  (see `Mix.Tasks.Dspex.Restore`).

  ## Choosing sessions

  `sessions:` is `:all`, a list of session ids, an anchored glob (`*` and
  `?`, as in access rules: `"orders-*"` or `{:glob, "orders-*"}`), a function of one argument (the
  session id) returning `true` for the sessions to back up, or `{module,
  function, args}` called as `apply(module, function, [sid | args])`. It
  picks among the live sessions of each round: a listed session that does
  not exist (yet, or any more) is not a failure. A replicated session
  (`replicas:`) is backed up only by the node that leads it, so every node
  of a cluster can run the same config into a shared directory.

  ## Files

  One file per snapshot, `<name>--<hash>--<UTC time>.dspex-backup`
  (`name` is the session id made safe for a file name, `hash` tells apart
  ids whose safe names are the same, the time sorts the files of a
  session). A file holds a header (session id, time, the snapshot's length
  and SHA-256) and the `SessionStore.export_session/1` snapshot. It is
  written under a temporary name, fsynced, renamed, and the directory is
  fsynced: a VM killed at any moment leaves each backup whole under its
  name, or absent. After each snapshot the oldest files of that session
  beyond `keep` are deleted. Restores check the length and the checksum
  before anything is imported.

  A snapshot is consistent per variable (value, version and history
  together), not across variables: the engine copies the variables one by
  one, so an `update_variables(..., atomic: true)` running meanwhile may be
  in the snapshot for some of its variables and not others. Pause the
  writers (or snapshot from a quiet moment) when that matters.

  ## Restoring

  `restore/2` imports a snapshot through `SessionStore.import_session/2`
  (every value is validated again), under the backup's session id or
  `as:`, on the `backend:` chosen (`:nif` or `:port`; default the
  configured one). A replicated session is restored as a single-node one:
  the Raft backend does not import snapshots yet.

  ## Telemetry

  `[:dspex, :bridge, :backup, :snapshot_taken | :snapshot_failed | :restored
  | :restore_failed]`, in the `DSPex.Bridge.Telemetry` catalogue. With
  `DSPex.Bridge.Analytics` running, snapshots and failures are also counted
  as the metric types `:backup_snapshot` (duration in µs),
  `:backup_failure` and `:backup_round` (sessions per periodic round), so
  Prometheus sees `dspex_analytics_backup_snapshot_count` and friends.
  """
  use GenServer
  require Logger

  alias DSPex.Bridge.{Analytics, HAManager, Options, SessionStore, Telemetry}
  alias DSPex.Bridge.Backup.Archive

  @default_interval :timer.minutes(5)
  @default_keep 12
  # Temporary files older than this are left by a crash and deleted.
  @stale_tmp_seconds 600

  @type selector ::
          :all | [String.t()] | String.t() | (String.t() -> boolean) | {module, atom, list}
  @type snapshot_info :: %{
          session_id: String.t(),
          path: Path.t(),
          bytes: non_neg_integer,
          taken_at: DateTime.t(),
          pruned: non_neg_integer
        }
  @type entry :: %{
          path: Path.t(),
          file_bytes: non_neg_integer,
          session_id: String.t() | nil,
          taken_at: DateTime.t() | nil,
          error: nil | term
        }

  ## Snapshots

  @doc """
  Snapshots `target` now, in the calling process.

  `target` is a session id: the answer is `{:ok, info}` (`session_id`,
  `path`, `bytes` of the file, `taken_at`, `pruned`: older files deleted
  beyond `keep`), or `{:error, reason}`: `:session_not_found`, a write
  failure (`{:write_failed, posix}`), an invalid option. Or a selector
  (`:all`, a list, `{:glob, pattern}`, a function; see the moduledoc; a
  string is always one session id here): the answer is
  `{:ok, %{sid => {:ok, info} | {:error, reason}}}` for the live sessions
  it picks.

  Options: `dir:` (default: the configured one; created if missing),
  `keep:` (files kept per session, default the configured one, else 12).
  Snapshots of one session into one directory take turns.
  """
  @spec snapshot_now(String.t() | selector, keyword) ::
          {:ok, snapshot_info}
          | {:ok, %{String.t() => {:ok, snapshot_info} | {:error, term}}}
          | {:error, term}
  def snapshot_now(target, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:dir, :keep]),
         {:ok, dir} <- dir_option(opts),
         {:ok, keep} <- keep_option(opts) do
      if is_binary(target) do
        snapshot(target, dir, keep)
      else
        with {:ok, select} <- selector(target), do: {:ok, round(select, dir, keep)}
      end
    end
  end

  defp snapshot(sid, dir, keep, missing \\ :fail) do
    started = System.monotonic_time()

    result =
      with :ok <- mkdir(dir),
           {:ok, payload} <- SessionStore.export_session(sid) do
        locked(dir, sid, fn -> write(dir, sid, payload, keep) end)
      end

    duration_us =
      System.convert_time_unit(System.monotonic_time() - started, :native, :microsecond)

    case result do
      {:ok, info} ->
        Telemetry.execute(
          [:dspex, :bridge, :backup, :snapshot_taken],
          %{bytes: info.bytes, duration_us: duration_us, pruned: info.pruned},
          %{session_id: sid, path: info.path}
        )

        _ = Analytics.record_metric(:backup_snapshot, duration_us)
        {:ok, info}

      # A session deleted since the round listed it: nothing to back up.
      {:error, :session_not_found} when missing == :skip ->
        :skip

      {:error, reason} = error ->
        Telemetry.execute(
          [:dspex, :bridge, :backup, :snapshot_failed],
          %{system_time: System.system_time()},
          %{session_id: sid, reason: reason}
        )

        _ = Analytics.record_metric(:backup_failure, 1)
        error
    end
  end

  defp mkdir(dir) do
    case File.mkdir_p(dir) do
      :ok -> :ok
      {:error, reason} -> {:error, {:mkdir_failed, dir, reason}}
    end
  end

  # One writer per (directory, session) in this VM: the time in the name
  # stays unique and pruning never races a write.
  defp locked(dir, sid, fun) do
    :global.trans({{__MODULE__, Path.expand(dir), sid}, self()}, fun, [node()])
  end

  defp write(dir, sid, payload, keep) do
    taken_at = unique_time(dir, sid, System.os_time(:microsecond))
    name = Archive.file_name(sid, taken_at)
    content = Archive.encode(sid, taken_at, payload)

    with :ok <- Archive.write_atomic(dir, Archive.tmp_name(sid), name, content) do
      {:ok,
       %{
         session_id: sid,
         path: Path.join(dir, name),
         bytes: IO.iodata_length(content),
         taken_at: DateTime.from_unix!(taken_at, :microsecond),
         pruned: prune(dir, sid, keep)
       }}
    end
  end

  defp unique_time(dir, sid, us) do
    if File.exists?(Path.join(dir, Archive.file_name(sid, us))),
      do: unique_time(dir, sid, us + 1),
      else: us
  end

  # Deletes the session's files beyond the newest `keep`, and temporary
  # files a crash left (old enough not to be another node's, in a shared
  # directory, being written now).
  defp prune(dir, sid, keep) do
    prefix = Archive.prefix(sid)

    names =
      case File.ls(dir) do
        {:ok, names} -> names
        {:error, _} -> []
      end

    old = System.os_time(:second) - @stale_tmp_seconds

    for name <- names, Archive.tmp_of?(name, sid), mtime(Path.join(dir, name)) < old do
      File.rm(Path.join(dir, name))
    end

    names
    |> Enum.filter(&(String.starts_with?(&1, prefix) and Archive.backup_name?(&1)))
    |> Enum.sort(:desc)
    |> Enum.drop(keep)
    |> Enum.count(&(File.rm(Path.join(dir, &1)) == :ok))
  end

  defp mtime(path) do
    case File.stat(path, time: :posix) do
      {:ok, %File.Stat{mtime: t}} -> t
      _ -> :infinity
    end
  end

  ## Listing

  @doc """
  The backup files in a directory, newest first: `{:ok, [entry]}` with
  `path`, `file_bytes`, `session_id`, `taken_at` (a `DateTime`) and `error`
  (`nil`, or why the file's header cannot be read: such files are listed
  with `session_id: nil`). Only headers are read; `restore/2` checks the
  whole file.

  The argument is the directory, or options: `dir:` (default: the
  configured one), `session_id:` (only that session's files).
  `{:error, {:no_such_directory, dir}}` when it does not exist.
  """
  @spec list(Path.t() | keyword) :: {:ok, [entry]} | {:error, term}
  def list(dir_or_opts \\ [])

  def list(dir) when is_binary(dir), do: list(dir: dir)

  def list(opts) do
    with {:ok, opts} <- Options.validate(opts, [:dir, :session_id]),
         {:ok, dir} <- dir_option(opts),
         {:ok, names} <- ls(dir) do
      entries =
        for name <- names, Archive.backup_name?(name) do
          path = Path.join(dir, name)

          size =
            case File.stat(path) do
              {:ok, %File.Stat{size: size}} -> size
              _ -> 0
            end

          case Archive.read_header(path) do
            {:ok, h} ->
              %{
                path: path,
                file_bytes: size,
                session_id: h.session_id,
                taken_at: to_datetime(h.taken_at),
                error: nil
              }

            {:error, reason} ->
              %{path: path, file_bytes: size, session_id: nil, taken_at: nil, error: reason}
          end
        end

      entries =
        case opts[:session_id] do
          nil -> entries
          sid -> Enum.filter(entries, &(&1.session_id == sid))
        end

      {:ok, Enum.sort_by(entries, &sort_key/1, :desc)}
    end
  end

  defp sort_key(%{taken_at: nil, path: path}), do: {0, path}
  defp sort_key(%{taken_at: t, path: path}), do: {DateTime.to_unix(t, :microsecond), path}

  defp to_datetime(us) do
    case DateTime.from_unix(us, :microsecond) do
      {:ok, dt} -> dt
      {:error, _} -> nil
    end
  end

  defp ls(dir) do
    case File.ls(dir) do
      {:ok, names} -> {:ok, names}
      {:error, :enoent} -> {:error, {:no_such_directory, dir}}
      {:error, :enotdir} -> {:error, {:not_a_directory, dir}}
      {:error, reason} -> {:error, {:read_failed, reason}}
    end
  end

  ## Restoring

  @doc """
  Restores a session from a backup file, or from a directory: the newest
  backup there that passes its checks (of `session_id:`, or of the one
  session the directory holds). Returns `{:ok, session_id}`.

  Options: `as:` the id to restore under (default: the backup's),
  `session_id:` (with a directory: whose newest backup), `backend:`
  (`:nif` or `:port`, as `SessionStore.import_session/2`).

  Errors: `{:no_such_file, path}`, `{:no_such_directory, dir}`,
  `{:corrupt_backup, why}` (`:truncated`, `:checksum_mismatch`,
  `:bad_magic`, `{:trailing_bytes, n}`, ...), `{:no_backup, sid | dir}`,
  `{:ambiguous, session_ids}` (a directory of several sessions without
  `session_id:`), `{:no_valid_backup, [{path, reason}]}`, and what the
  import answers (`:already_exists`, `{:invalid_snapshot, _}`, ...). A
  corrupt newest file in a directory is skipped, with a warning, for the
  one before it.
  """
  @spec restore(Path.t(), keyword) :: {:ok, String.t()} | {:error, term}
  def restore(path, opts \\ [])

  def restore(path, opts) when is_binary(path) do
    with {:ok, opts} <- Options.validate(opts, [:as, :session_id, :backend]),
         :ok <- check_id(:as, opts[:as]),
         :ok <- check_id(:session_id, opts[:session_id]) do
      cond do
        File.dir?(path) -> restore_dir(path, opts)
        String.ends_with?(path, "/") -> {:error, {:no_such_directory, path}}
        true -> restore_file(path, opts)
      end
    end
  end

  def restore(path, _opts), do: Options.bad(:path, path)

  defp check_id(_key, nil), do: :ok
  defp check_id(_key, id) when is_binary(id) and id != "", do: :ok
  defp check_id(key, id), do: Options.bad(key, id)

  defp restore_file(path, opts) do
    case Archive.read_bytes(path) do
      {:ok, bytes} ->
        restore_archive(bytes, path, opts)

      {:error, reason} = error ->
        restore_failed(path, reason)
        error
    end
  end

  @doc false
  # The restore of one file's bytes, read where the file is (`mix
  # dspex.restore --node` reads it on its own host and sends it here).
  # `path` names it in telemetry and errors.
  @spec restore_archive(binary, Path.t(), keyword) :: {:ok, String.t()} | {:error, term}
  def restore_archive(bytes, path, opts) do
    started = System.monotonic_time()

    result =
      with {:ok, opts} <- Options.validate(opts, [:as, :session_id, :backend]),
           {:ok, header, payload} <- Archive.decode(bytes),
           :ok <- same_session(header, opts[:session_id]),
           {:ok, sid} <- import(payload, opts[:as] || header.session_id, opts[:backend]) do
        {:ok, sid, header, byte_size(payload)}
      end

    case result do
      {:ok, sid, header, bytes} ->
        duration_us =
          System.convert_time_unit(System.monotonic_time() - started, :native, :microsecond)

        Telemetry.execute(
          [:dspex, :bridge, :backup, :restored],
          %{bytes: bytes, duration_us: duration_us},
          %{session_id: sid, from: header.session_id, path: path}
        )

        {:ok, sid}

      {:error, reason} = error ->
        restore_failed(path, reason)
        error
    end
  end

  defp same_session(_header, nil), do: :ok
  defp same_session(%{session_id: sid}, sid), do: :ok
  defp same_session(%{session_id: other}, _sid), do: {:error, {:other_session, other}}

  defp import(payload, sid, nil), do: SessionStore.import_session(payload, session_id: sid)

  defp import(payload, sid, backend),
    do: SessionStore.import_session(payload, session_id: sid, backend: backend)

  defp restore_failed(path, reason) do
    Telemetry.execute(
      [:dspex, :bridge, :backup, :restore_failed],
      %{system_time: System.system_time()},
      %{path: path, reason: reason}
    )
  end

  defp restore_dir(dir, opts) do
    with {:ok, entries} <- list(dir: dir),
         {:ok, sid, candidates} <- pick(entries, opts[:session_id], dir) do
      try_newest(candidates, Keyword.put(opts, :session_id, sid), [])
    else
      {:error, reason} = error ->
        restore_failed(dir, reason)
        error
    end
  end

  defp pick(entries, nil, dir) do
    case entries |> Enum.map(& &1.session_id) |> Enum.reject(&is_nil/1) |> Enum.uniq() do
      [] -> {:error, {:no_backup, dir}}
      [sid] -> {:ok, sid, Enum.filter(entries, &(&1.session_id == sid))}
      sids -> {:error, {:ambiguous, Enum.sort(sids)}}
    end
  end

  defp pick(entries, sid, _dir) do
    case Enum.filter(entries, &(&1.session_id == sid)) do
      [] -> {:error, {:no_backup, sid}}
      found -> {:ok, sid, found}
    end
  end

  # Newest first; a file that fails its checks gives way to the one before.
  # Errors of the import itself (the id exists, the engine refuses) stop.
  defp try_newest([], _opts, failures), do: {:error, {:no_valid_backup, Enum.reverse(failures)}}

  defp try_newest([%{path: path} | older], opts, failures) do
    case restore_file(path, opts) do
      {:ok, sid} ->
        {:ok, sid}

      {:error, reason}
      when is_tuple(reason) and elem(reason, 0) in [:corrupt_backup, :read_failed, :no_such_file] ->
        Logger.warning("dspex backup #{path} skipped: #{inspect(reason)}")
        try_newest(older, opts, [{path, reason} | failures])

      error ->
        error
    end
  end

  ## The periodic process

  @doc """
  Starts the periodic backups (the application does when `config
  :dspex_bridge, :backup` is set). Options: `dir:` (required), `interval:`
  (ms, default 5 minutes), `sessions:` (a selector, default `:all`),
  `keep:` (default 12), `name:` (default this module). A bad option is
  `{:error, {:invalid_argument, detail}}` and nothing is started.
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts) do
    with {:ok, opts} <- Options.validate(opts, [:dir, :interval, :sessions, :keep, :name]),
         {:ok, dir} <- required_dir(opts[:dir]),
         {:ok, keep} <- keep_option(opts),
         {:ok, interval} <- interval_option(opts[:interval]),
         {:ok, select} <- selector(Keyword.get(opts, :sessions, :all)) do
      config = %{dir: dir, keep: keep, interval: interval, select: select}
      GenServer.start_link(__MODULE__, config, name: Keyword.get(opts, :name, __MODULE__))
    end
  end

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc """
  What the periodic process is doing: `dir`, `interval`, `keep`, `rounds`
  (finished), `skipped` (ticks that found the previous round still running),
  `running` (a round is under way), `round_pid` (its process, or `nil`;
  killing it ends a hung round, which is then reported as failed) and
  `last_round` (`nil`, or `%{finished_at, taken, failed: [{sid, reason}]}`).
  """
  @spec status(GenServer.server()) :: map
  def status(server \\ __MODULE__), do: GenServer.call(server, :status)

  @impl true
  def init(config) do
    case mkdir(config.dir) do
      :ok ->
        clean_stale_tmp(config.dir)
        schedule(config.interval)

        {:ok, Map.merge(config, %{rounds: 0, skipped: 0, task: nil, last_round: nil})}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  @impl true
  def handle_call(:status, _from, state) do
    {:reply,
     %{
       dir: state.dir,
       interval: state.interval,
       keep: state.keep,
       rounds: state.rounds,
       skipped: state.skipped,
       running: state.task != nil,
       round_pid: state.task && state.task.pid,
       last_round: state.last_round
     }, state}
  end

  @impl true
  def handle_info(:tick, %{task: nil} = state) do
    schedule(state.interval)
    %{dir: dir, keep: keep, select: select} = state
    server = self()
    ref = make_ref()

    # Not linked: a round that crashes is reported, and never takes the
    # server (or, by its restarts, the application's supervisor) down.
    {pid, monitor} = spawn_monitor(fn -> send(server, {ref, round(select, dir, keep)}) end)
    {:noreply, %{state | task: %{ref: ref, pid: pid, monitor: monitor}}}
  end

  def handle_info(:tick, state) do
    schedule(state.interval)
    {:noreply, %{state | skipped: state.skipped + 1}}
  end

  def handle_info({ref, results}, %{task: %{ref: ref, monitor: monitor}} = state) do
    Process.demonitor(monitor, [:flush])

    failed = for {sid, {:error, reason}} <- results, do: {sid, reason}
    taken = map_size(results) - length(failed)
    _ = Analytics.record_metric(:backup_round, map_size(results))

    last = %{finished_at: DateTime.utc_now(), taken: taken, failed: failed}
    {:noreply, %{state | task: nil, rounds: state.rounds + 1, last_round: last}}
  end

  def handle_info({:DOWN, monitor, :process, _, reason}, %{task: %{monitor: monitor}} = state) do
    Logger.error("dspex backup round crashed: #{inspect(reason)}")
    last = %{finished_at: DateTime.utc_now(), taken: 0, failed: [{:round, reason}]}
    {:noreply, %{state | task: nil, rounds: state.rounds + 1, last_round: last}}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, %{task: %{pid: pid}}), do: Process.exit(pid, :kill)
  def terminate(_reason, _state), do: :ok

  defp schedule(interval), do: Process.send_after(self(), :tick, interval)

  defp round(select, dir, keep) do
    for sid <- selected(select),
        result = snapshot(sid, dir, keep, :skip),
        result != :skip,
        into: %{},
        do: {sid, result}
  end

  defp clean_stale_tmp(dir) do
    old = System.os_time(:second) - @stale_tmp_seconds

    case File.ls(dir) do
      {:ok, names} ->
        for "." <> _ = name <- names,
            String.contains?(name, ".tmp-"),
            mtime(Path.join(dir, name)) < old,
            do: File.rm(Path.join(dir, name))

      _ ->
        :ok
    end
  end

  ## Selection

  # Live sessions this node should back up, picked by `select`.
  defp selected(select) do
    sessions =
      case SessionStore.list_sessions() do
        ids when is_list(ids) -> ids
        {:error, {:partial, %{sessions: ids}}} -> ids
      end

    Enum.filter(sessions, &(pick?(select, &1) and owner?(&1)))
  end

  defp pick?(select, sid) do
    select.(sid) == true
  rescue
    e ->
      Logger.warning("dspex backup selector raised for #{inspect(sid)}: #{Exception.message(e)}")
      false
  catch
    kind, reason ->
      Logger.warning("dspex backup selector #{kind} for #{inspect(sid)}: #{inspect(reason)}")
      false
  end

  # A replicated session is backed up by its leader's node only.
  defp owner?(sid) do
    case HAManager.get_session_owner(sid) do
      {:ok, owner} -> owner == node()
      _ -> false
    end
  end

  defp selector(:all), do: {:ok, fn _ -> true end}

  defp selector(ids) when is_list(ids) do
    if ids != [] and Enum.all?(ids, &(is_binary(&1) and &1 != "")),
      do: {:ok, &(&1 in ids)},
      else: Options.bad(:sessions, ids)
  end

  defp selector(glob) when is_binary(glob) and glob != "", do: selector({:glob, glob})

  defp selector({:glob, glob}) when is_binary(glob) and glob != "" do
    regex = "\\A" <> (glob |> Regex.escape() |> glob_wildcards()) <> "\\z"
    {:ok, re} = Regex.compile(regex, "su")
    {:ok, &Regex.match?(re, &1)}
  end

  defp selector(fun) when is_function(fun, 1), do: {:ok, fun}

  defp selector({m, f, args} = mfa) when is_atom(m) and is_atom(f) and is_list(args) do
    if Code.ensure_loaded?(m) and function_exported?(m, f, length(args) + 1),
      do: {:ok, fn sid -> apply(m, f, [sid | args]) end},
      else: Options.bad(:sessions, mfa)
  end

  defp selector(other), do: Options.bad(:sessions, other)

  # Regex.escape/1 turns `*` into `\*` and `?` into `\?`.
  defp glob_wildcards(escaped),
    do: escaped |> String.replace("\\*", ".*") |> String.replace("\\?", ".")

  ## Options

  defp dir_option(opts) do
    case Keyword.fetch(opts, :dir) do
      {:ok, dir} -> required_dir(dir)
      :error -> required_dir(config()[:dir])
    end
  end

  defp required_dir(dir) when is_binary(dir) and dir != "", do: {:ok, dir}
  defp required_dir(dir), do: Options.bad(:dir, dir)

  defp keep_option(opts) do
    case Keyword.get(opts, :keep, config()[:keep] || @default_keep) do
      keep when is_integer(keep) and keep >= 1 and keep <= 100_000 -> {:ok, keep}
      keep -> Options.bad(:keep, keep)
    end
  end

  defp interval_option(nil), do: {:ok, @default_interval}

  defp interval_option(ms) when is_integer(ms) and ms >= 10 and ms <= 366 * 86_400_000,
    do: {:ok, ms}

  defp interval_option(ms), do: Options.bad(:interval, ms)

  defp config do
    case Application.get_env(:dspex_bridge, :backup) do
      opts when is_list(opts) -> opts
      _ -> []
    end
  end
end
