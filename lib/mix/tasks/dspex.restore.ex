defmodule Mix.Tasks.Dspex.Restore do
  @shortdoc "Restores a session from a backup into a running node, or checks backups"
  @moduledoc """
  Restores a session from a `DSPex.Bridge.Backup` file or directory into a
  running node, or checks backups without restoring.

      mix dspex.restore DIR_OR_FILE [--as NEW_ID] [--session SID] [--backend nif|port]
                        [--node NODE] [--cookie COOKIE]
      mix dspex.restore DIR_OR_FILE --check [--session SID]
      mix dspex.restore DIR --list

  - With `--node`, the backup is read and checked here (length, SHA-256),
    then sent to `NODE` (a running VM with dspex_bridge started), which
    imports it (`DSPex.Bridge.Backup`'s restore, with its checks and
    telemetry). A directory restores the newest good backup of `--session`
    (or of the one session the directory holds); a corrupt newest file is
    reported and the one before it used. `--as` restores under another id
    (the backup's id must otherwise be free on the node). The task's own
    VM joins the cluster as a hidden node named `dspex_restore_<pid>`,
    short or long names as `NODE` is written, with `--cookie` or
    `~/.erlang.cookie`.
  - `--check` reads and checks every backup (a file, or all in the
    directory, or those of `--session`), prints one line each
    (`ok SID TIME BYTES PATH` or `bad REASON PATH`) and fails if any is bad.
  - `--list` prints the directory's backups, newest first (headers only).

  A restore needs `--node` (default: the `DSPEX_NODE` environment
  variable): in the task's own VM the session would be gone when the task
  exits, so `mix dspex.restore DIR_OR_FILE [--as NEW_ID]` restores into
  `$DSPEX_NODE`. Prints `restored SID from PATH` and exits 0, or
  fails with the reason (exit status 1).
  """
  use Mix.Task

  alias DSPex.Bridge.Backup
  alias DSPex.Bridge.Backup.Archive

  @switches [
    as: :string,
    session: :string,
    backend: :string,
    node: :string,
    cookie: :string,
    check: :boolean,
    list: :boolean
  ]

  @impl true
  def run(args) do
    {opts, positional, invalid} = OptionParser.parse(args, strict: @switches)
    if invalid != [], do: fail("unknown options #{inspect(invalid)}")

    path =
      case positional do
        [path] -> path
        _ -> fail("expected one DIR_OR_FILE, got #{inspect(positional)}")
      end

    # The code and config, not the application: nothing here needs the engine.
    Mix.Task.run("app.config")

    opts = Keyword.put_new_lazy(opts, :node, fn -> System.get_env("DSPEX_NODE") end)

    cond do
      opts[:list] -> list(path, opts)
      opts[:check] -> check(path, opts)
      opts[:node] not in [nil, ""] -> restore(path, opts)
      true -> fail("give --node NODE (or DSPEX_NODE) to restore into (or --check, --list)")
    end
  end

  defp list(path, opts) do
    case Backup.list(dir: path, session_id: opts[:session]) do
      {:ok, entries} ->
        for e <- entries do
          if e.error,
            do: Mix.shell().info("bad #{inspect(e.error)} #{e.path}"),
            else:
              Mix.shell().info(
                "#{e.session_id} #{DateTime.to_iso8601(e.taken_at)} #{e.file_bytes} #{e.path}"
              )
        end

        :ok

      {:error, reason} ->
        fail(inspect(reason))
    end
  end

  defp check(path, opts) do
    paths =
      cond do
        File.dir?(path) ->
          case Backup.list(dir: path, session_id: opts[:session]) do
            {:ok, entries} -> Enum.map(entries, & &1.path)
            {:error, reason} -> fail(inspect(reason))
          end

        File.exists?(path) ->
          [path]

        true ->
          fail(inspect({:no_such_file, path}))
      end

    if paths == [], do: fail("no backups in #{path}")
    check_paths(paths)
  end

  defp check_paths(paths) do
    bad =
      Enum.count(paths, fn p ->
        case Archive.read(p) do
          {:ok, h, payload} ->
            at =
              case DateTime.from_unix(h.taken_at, :microsecond) do
                {:ok, dt} -> DateTime.to_iso8601(dt)
                {:error, _} -> Integer.to_string(h.taken_at)
              end

            Mix.shell().info("ok #{h.session_id} #{at} #{byte_size(payload)} #{p}")
            false

          {:error, reason} ->
            Mix.shell().info("bad #{inspect(reason)} #{p}")
            true
        end
      end)

    if bad > 0, do: fail("#{bad} of #{length(paths)} backups failed their checks")
    :ok
  end

  defp restore(path, opts) do
    node = String.to_atom(opts[:node])
    connect(node, opts[:cookie])

    restore_opts =
      [as: opts[:as], backend: backend(opts[:backend])]
      |> Enum.reject(fn {_, v} -> is_nil(v) end)

    candidates =
      if File.dir?(path),
        do: candidates(path, opts[:session]),
        else: [path]

    case restore_first(node, candidates, restore_opts, []) do
      {:ok, sid, from} ->
        Mix.shell().info("restored #{sid} from #{from}")
        :ok

      {:error, reason} ->
        fail(inspect(reason))
    end
  end

  defp candidates(dir, session) do
    with {:ok, entries} <- Backup.list(dir: dir),
         good = Enum.reject(entries, & &1.error),
         {:ok, sid} <- one_session(good, session, dir) do
      for e <- good, e.session_id == sid, do: e.path
    else
      {:error, reason} -> fail(inspect(reason))
    end
  end

  defp one_session(entries, nil, dir) do
    case entries |> Enum.map(& &1.session_id) |> Enum.uniq() do
      [] -> {:error, {:no_backup, dir}}
      [sid] -> {:ok, sid}
      sids -> {:error, {:ambiguous, Enum.sort(sids)}}
    end
  end

  defp one_session(entries, sid, _dir) do
    if Enum.any?(entries, &(&1.session_id == sid)),
      do: {:ok, sid},
      else: {:error, {:no_backup, sid}}
  end

  # Newest first: a file that fails its checks here gives way to the one
  # before it; what the node answers is final.
  defp restore_first(_node, [], _opts, failures),
    do: {:error, {:no_valid_backup, Enum.reverse(failures)}}

  defp restore_first(node, [path | older], opts, failures) do
    with {:ok, bytes} <- Archive.read_bytes(path),
         {:ok, _header, _payload} <- Archive.decode(bytes) do
      case :erpc.call(node, Backup, :restore_archive, [bytes, path, opts], 120_000) do
        {:ok, sid} -> {:ok, sid, path}
        {:error, _} = error -> error
      end
    else
      {:error, reason} ->
        Mix.shell().error("skipped #{path}: #{inspect(reason)}")
        restore_first(node, older, opts, [{path, reason} | failures])
    end
  catch
    :error, {:erpc, reason} -> {:error, {:rpc_failed, node, reason}}
  end

  defp backend(nil), do: nil
  defp backend("nif"), do: :nif
  defp backend("port"), do: :port
  defp backend(other), do: fail("--backend is nif or port, not #{inspect(other)}")

  defp connect(node, cookie) do
    long? = node |> Atom.to_string() |> String.split("@") |> List.last() |> String.contains?(".")
    name = :"dspex_restore_#{System.pid()}"

    case Node.start(name, if(long?, do: :longnames, else: :shortnames), 15_000) do
      {:ok, _} -> :ok
      {:error, {:already_started, _}} -> :ok
      {:error, reason} -> fail("cannot start distribution: #{inspect(reason)} (is epmd running?)")
    end

    :erlang.set_cookie(node, (cookie && String.to_atom(cookie)) || :erlang.get_cookie())
    # Hidden: the task's VM is not a member the cluster should count.
    case :net_kernel.hidden_connect_node(node) do
      true -> :ok
      _ -> fail("cannot connect to #{node} (name, cookie, and the node running?)")
    end
  end

  defp fail(message), do: Mix.raise("mix dspex.restore: " <> message)
end
