defmodule DSPex.Bridge.DeadLetterQueue do
  @moduledoc """
  One queue for work that could not be done: writes that exhausted their
  retries (or were parked while their breaker was open, see
  `DSPex.Bridge.State.Bridged`) and failed propagations of derived
  variables (`DSPex.Bridge.DependencyManager`). An operator lists, replays
  and drops what is in it.

      {:ok, entries} = DeadLetterQueue.list(kind: :write, backend: :port)
      {:ok, %{replayed: 3, failed: 0}} = DeadLetterQueue.replay(:all)
      {:ok, 1} = DeadLetterQueue.drop(42, by: "alice", reason: "obsolete")
      %{depth: 0, oldest_age_ms: nil} = DeadLetterQueue.stats()

  ## Entries

  `%{id, kind, op, args, backend, breaker, session_id, attempts,
  first_failure_at, last_failure_at, last_error, meta}`: `kind` is
  `:write` or `:propagation`; `op` and `args` name the operation as data
  (a backend's command name and its arguments; never a function, so entries
  survive a restart); `attempts` is every attempt's `%{error, at}`, oldest
  first; times are wall-clock milliseconds (`System.os_time(:millisecond)`).

  ## Bounds, and no silent loss

  At most `max_entries` (10 000) entries and `max_bytes` (64 MiB, counted as
  `:erlang.external_size/1`) in all, and `max_per_session` (100) per
  session. Past a bound the oldest entries go, each with a
  `[:dspex, :bridge, :dlq, :evicted]` event (`why:` `:max_entries`,
  `:max_bytes`, `:max_per_session`); an entry larger than `max_bytes` by
  itself is refused (`{:error, :too_large}`) and evicts nothing.

  ## Persistence

  Entries are kept in a DETS file, `dead_letters.dets` in `dir`, synced
  after every change, so they survive a restart of the application (and of
  the VM). Configure it:

      config :dspex_bridge, DSPex.Bridge.DeadLetterQueue,
        dir: "/var/lib/my_app/dspex", max_entries: 10_000,
        max_bytes: 64 * 1024 * 1024, max_per_session: 100, replay_rate: 50

  The default `dir` is under `System.tmp_dir!/0`, one per installation
  (`dspex_bridge/<node>/<hash of the app's directory>`): set it in
  production, as a temporary directory may be cleared at boot. The
  directory is made readable by its owner only (entries hold the values
  written). A directory
  that cannot be opened is logged, and the queue then refuses entries with
  `{:error, {:unavailable, reason}}`.

  One VM at a time uses a directory: `dead_letters.lock` there names its
  OS process (DETS has no locking, and two VMs writing one file corrupt
  it). A configured directory in use by another live VM is unavailable
  (`{:unavailable, {:in_use, os_pid}}`); the default one gives way to a
  subdirectory of the second VM's own (`vm-<os pid>`, logged), as happens
  when non-distributed VMs (all `nonode@nohost`) start in one project
  directory. A lock whose process is gone (a VM killed) is taken over.

  ## Replay

  `replay/2` re-runs entries in the calling process, one at a time, at most
  `replay_rate` (50) a second, each through its breaker: refused with
  `{:error, :circuit_open}` while a breaker of the entries is open, and
  stopped if one opens meanwhile. A write entry that succeeds leaves the
  queue; one that fails again stays, with the attempt added. Propagation
  entries are replayed per session by
  `DSPex.Bridge.DependencyManager.replay_dead_letters/2`. One replay runs at
  a time (`{:error, :replay_in_progress}`).

  Drops are audited: each is a `:dropped` event, a `Logger` notice and a
  record in `audit_log/1` (who, why, what), kept in the same file.

  Events (`DSPex.Bridge.Telemetry`): `[:dspex, :bridge, :dlq, :added |
  :replayed | :dropped | :evicted]`. `prometheus_text/0` gives the gauges
  (depth, bytes, oldest age, by kind) that
  `DSPex.Bridge.Analytics.prometheus_text/0` includes.
  """
  use GenServer

  require Logger

  alias DSPex.Bridge.{CircuitBreaker, Options, Telemetry}

  @kinds [:write, :propagation]
  @filters [:kind, :op, :backend, :breaker, :session_id, :ids, :older_than_ms, :limit]
  @max_audit 1_000
  @defaults [
    max_entries: 10_000,
    max_bytes: 64 * 1024 * 1024,
    max_per_session: 100,
    replay_rate: 50
  ]

  @type id :: pos_integer
  @type entry :: map
  @type selector :: id | :all | keyword

  ## Lifecycle

  @doc """
  Starts a queue. Options (defaults from the application config):
  `dir:`, `max_entries:`, `max_bytes:`, `max_per_session:`, `replay_rate:`
  (entries a second), `name:` (default this module). A bad option is
  `{:error, {:invalid_argument, detail}}`, and nothing is started.
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts \\ []) do
    # Checked in the caller: a refusal from `init/1` would also be an exit
    # signal to it.
    with {:ok, opts} <-
           Options.validate(opts, [
             :dir,
             :max_entries,
             :max_bytes,
             :max_per_session,
             :replay_rate,
             :name
           ]),
         :ok <- check_bounds(config(opts)) do
      GenServer.start_link(__MODULE__, opts, name: Keyword.get(opts, :name, __MODULE__))
    end
  end

  @doc "The default directory of the queue's file (see the moduledoc)."
  @spec default_dir() :: Path.t()
  def default_dir do
    hash =
      :crypto.hash(:sha256, Application.app_dir(:dspex_bridge))
      |> Base.encode16(case: :lower)
      |> binary_part(0, 12)

    Path.join([System.tmp_dir!(), "dspex_bridge", to_string(node()), hash])
  end

  ## API

  @doc false
  # Parks an entry: `{:ok, id}`, `{:error, :too_large}`,
  # `{:error, {:invalid_argument, _}}` or `{:error, {:unavailable, _}}`.
  # `entry` needs `kind` and `op`; `args`, `attempts` (`[%{error, at}]`),
  # `backend`, `breaker`, `session_id` and `meta` are optional.
  @spec add(map, keyword) :: {:ok, id} | {:error, term}
  def add(entry, opts \\ [])

  def add(%{kind: kind, op: _} = entry, opts) when kind in @kinds do
    attempts = Map.get(entry, :attempts, [])

    if is_list(attempts) and
         Enum.all?(attempts, &match?(%{error: _, at: at} when is_integer(at), &1)) do
      call(opts, {:add, entry})
    else
      {:error, {:invalid_argument, {:attempts, attempts}}}
    end
  end

  def add(entry, _opts), do: {:error, {:invalid_argument, {:entry, entry}}}

  @doc """
  Entries matching `filter`, oldest first: `kind:`, `op:`, `backend:`,
  `breaker:`, `session_id:`, `ids:` (a list), `older_than_ms:` (first
  failure at least that old), `limit:` (default 100). Also `server:`.
  """
  @spec list(keyword) :: {:ok, [entry]} | {:error, term}
  def list(filter \\ []) do
    with {:ok, filter, opts} <- filter(filter), do: call(opts, {:list, filter})
  end

  @doc "The entry `id`: `{:ok, entry}` or `{:error, :not_found}`."
  @spec get(id, keyword) :: {:ok, entry} | {:error, term}
  def get(id, opts \\ [])
  def get(id, opts) when is_integer(id) and id > 0, do: call(opts, {:get, id})
  def get(id, _opts), do: {:error, {:invalid_argument, {:id, id}}}

  @doc """
  Replays one entry (`id`), the entries matching a filter (as `list/1`,
  without its default limit), or `:all`: `{:ok, %{replayed: n, failed: m,
  stopped: nil | :circuit_open}}`; `{:error, :not_found}` for an unknown
  id; `{:error, :circuit_open}` while a breaker of the entries is open;
  `{:error, :replay_in_progress}`. Options: `rate:` (entries a second,
  default `replay_rate`), `server:`.
  """
  @spec replay(selector, keyword) :: {:ok, map} | {:error, term}
  def replay(selector, opts \\ []) do
    with {:ok, filter, opts} <- selector(selector, opts),
         {:ok, rate} <- rate(opts),
         {:ok, entries, default_rate} <- call(opts, {:begin_replay, filter, self()}) do
      try do
        run_replay(entries, opts, rate || default_rate)
      after
        call(opts, {:end_replay, self()})
      end
    end
  end

  @doc """
  Drops one entry (`id`), the entries matching a filter, or `:all`:
  `{:ok, count}`, or `{:error, :not_found}` for an unknown id. Options
  `by:` (who; default `"unknown"`) and `reason:` go to the audit log.
  """
  @spec drop(selector, keyword) :: {:ok, non_neg_integer} | {:error, term}
  def drop(selector, opts \\ []) do
    with {:ok, filter, opts} <- selector(selector, opts) do
      call(opts, {:drop, filter, Keyword.get(opts, :by, "unknown"), Keyword.get(opts, :reason)})
    end
  end

  @doc """
  `%{depth, bytes, oldest_age_ms (nil when empty), by_kind, added_total,
  replayed_total, dropped_total, evicted_total, max_entries, max_bytes,
  dir, available}` (totals since the queue started).
  """
  @spec stats(keyword) :: map | {:error, term}
  def stats(opts \\ []), do: call(opts, :stats)

  @doc "Drops and replays, newest first (at most 1 000 kept): `{:ok, [record]}`."
  @spec audit_log(keyword) :: {:ok, [map]} | {:error, term}
  def audit_log(opts \\ []), do: call(opts, :audit_log)

  @doc "The queue's gauges in the Prometheus text format (empty while it is not running)."
  @spec prometheus_text(keyword) :: iodata
  def prometheus_text(opts \\ []) do
    case stats(opts) do
      %{} = s ->
        age = if s.oldest_age_ms, do: s.oldest_age_ms / 1000, else: 0

        [
          gauge("dspex_dlq_depth", "Entries in the dead-letter queue, by kind.", [
            {"", s.depth}
            | for({k, n} <- Enum.sort(s.by_kind), do: {~s(kind="#{k}"), n})
          ]),
          gauge("dspex_dlq_bytes", "Bytes held by the dead-letter queue.", [{"", s.bytes}]),
          gauge("dspex_dlq_oldest_age_seconds", "Age of the oldest entry's first failure.", [
            {"", age}
          ]),
          gauge("dspex_dlq_evicted", "Entries evicted since the queue started.", [
            {"", s.evicted_total}
          ])
        ]

      _ ->
        []
    end
  end

  defp gauge(name, help, samples) do
    [
      "# HELP #{name} #{help}\n# TYPE #{name} gauge\n"
      | for({labels, v} <- samples, do: sample(name, labels, v))
    ]
  end

  defp sample(name, "", v), do: "#{name} #{v}\n"
  defp sample(name, labels, v), do: "#{name}{#{labels}} #{v}\n"

  @doc false
  # True when the queue may hold entries of session `sid` (one ETS lookup).
  @spec session?(String.t(), keyword) :: boolean
  def session?(sid, opts \\ []) do
    :ets.member(index_name(server(opts)), {:session, sid})
  rescue
    ArgumentError -> false
  end

  @doc false
  # Removes entries that were handled elsewhere (a propagation replayed by
  # its worker): `:replayed` events, no audit.
  @spec resolve([id], keyword) :: :ok
  def resolve(ids, opts \\ []) do
    case call(opts, {:resolve, ids}) do
      {:error, _} -> :ok
      ok -> ok
    end
  end

  ## Client helpers

  defp server(opts), do: Keyword.get(opts, :server, __MODULE__)

  defp call(opts, msg) do
    GenServer.call(server(opts), msg, 30_000)
  catch
    :exit, {:noproc, _} -> {:error, {:unavailable, :not_running}}
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, reason -> {:error, {:unavailable, reason}}
  end

  defp selector(id, opts) when is_integer(id) and id > 0 and is_list(opts),
    do: {:ok, [ids: [id], strict: true], opts}

  defp selector(:all, opts) when is_list(opts), do: {:ok, [], opts}

  defp selector(filter, opts) when is_list(filter) and is_list(opts) do
    with {:ok, filter, fopts} <- filter(filter, nil), do: {:ok, filter, fopts ++ opts}
  end

  defp selector(selector, opts) when is_list(opts),
    do: {:error, {:invalid_argument, {:selector, selector}}}

  defp selector(_selector, opts), do: {:error, {:invalid_argument, {:options, opts}}}

  # Splits `server:` from the filter and checks the rest.
  defp filter(filter, default_limit \\ 100) do
    if is_list(filter) and Keyword.keyword?(filter) do
      {opts, filter} = Keyword.split(filter, [:server])

      case Enum.find(filter, fn {k, v} -> not valid_filter?(k, v) end) do
        nil ->
          filter =
            if default_limit, do: Keyword.put_new(filter, :limit, default_limit), else: filter

          {:ok, filter, opts}

        {k, v} when k in @filters ->
          {:error, {:invalid_argument, {k, v}}}

        {k, _} ->
          {:error, {:invalid_argument, {:unknown_option, k}}}
      end
    else
      {:error, {:invalid_argument, {:filter, filter}}}
    end
  end

  defp valid_filter?(:kind, k), do: k in @kinds
  defp valid_filter?(:ids, ids), do: is_list(ids) and Enum.all?(ids, &(is_integer(&1) and &1 > 0))
  defp valid_filter?(:older_than_ms, n), do: is_integer(n) and n >= 0
  defp valid_filter?(:limit, n), do: is_integer(n) and n > 0
  defp valid_filter?(k, _v) when k in [:op, :backend, :breaker, :session_id], do: true
  defp valid_filter?(_k, _v), do: false

  defp rate(opts) do
    case Keyword.get(opts, :rate) do
      nil -> {:ok, nil}
      n when is_number(n) and n > 0 -> {:ok, n}
      other -> {:error, {:invalid_argument, {:rate, other}}}
    end
  end

  ## Replay (in the caller)

  defp run_replay(entries, opts, rate) do
    interval = round(1000 / rate)
    {writes, propagations} = Enum.split_with(entries, &(&1.kind == :write))

    acc =
      writes
      |> Enum.with_index()
      |> Enum.reduce_while(%{replayed: 0, failed: 0, stopped: nil}, fn {entry, i}, acc ->
        if i > 0, do: Process.sleep(interval)

        case replay_write(entry) do
          {:error, :circuit_open} ->
            {:halt, %{acc | stopped: :circuit_open}}

          {:error, reason} ->
            call(opts, {:replayed, entry.id, {:error, reason}})
            {:cont, %{acc | failed: acc.failed + 1}}

          _ok ->
            call(opts, {:replayed, entry.id, :ok})
            {:cont, %{acc | replayed: acc.replayed + 1}}
        end
      end)

    acc =
      if acc.stopped do
        acc
      else
        propagations
        |> Enum.map(& &1.session_id)
        |> Enum.uniq()
        |> Enum.reduce(acc, fn sid, acc ->
          case DSPex.Bridge.DependencyManager.replay_dead_letters(sid) do
            {:ok, %{replayed: r, failed: f}} ->
              %{acc | replayed: acc.replayed + r, failed: acc.failed + f}

            {:error, _} ->
              %{acc | failed: acc.failed + 1}
          end
        end)
      end

    {:ok, acc}
  end

  defp replay_write(%{backend: backend, op: op, args: args}),
    do: DSPex.Bridge.State.Bridged.replay(backend, op, args)

  ## Server

  @impl true
  def init(opts) do
    config = config(opts)
    name = Keyword.get(opts, :name, __MODULE__)
    configured = Keyword.get(config, :dir)
    dir = configured || default_dir()

    with :ok <- check_bounds(config) do
      index = :ets.new(index_name(name), [:ordered_set, :protected, :named_table])

      state = %{
        name: name,
        dir: dir,
        # The default directory, in use by another VM, gives way to one of
        # this VM's own (see open/1); a configured one does not.
        default_dir?: configured == nil,
        table: nil,
        index: index,
        max_entries: config[:max_entries],
        max_bytes: config[:max_bytes],
        max_per_session: config[:max_per_session],
        replay_rate: config[:replay_rate],
        next_id: 1,
        audit_seq: 0,
        bytes: 0,
        count: 0,
        replaying: nil,
        totals: %{added: 0, replayed: 0, dropped: 0, evicted: 0},
        error: nil
      }

      {:ok, open(state)}
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  defp config(opts) do
    @defaults
    |> Keyword.merge(Application.get_env(:dspex_bridge, __MODULE__, []))
    |> Keyword.merge(opts)
  end

  defp check_bounds(config) do
    Enum.find_value([:max_entries, :max_bytes, :max_per_session, :replay_rate], :ok, fn key ->
      case config[key] do
        n when is_integer(n) and n > 0 -> nil
        other -> {:error, {:invalid_argument, {key, other}}}
      end
    end)
  end

  defp index_name(name) when is_atom(name), do: :"#{name}.Index"
  defp index_name(_name), do: :"Elixir.DSPex.Bridge.DeadLetterQueue.Index"

  defp open(state) do
    file = Path.join(state.dir, "dead_letters.dets")

    # Entries hold written values: the directory is the owner's only (a
    # directory that is not ours to change keeps its mode).
    with :ok <- File.mkdir_p(state.dir),
         _ <- File.chmod(state.dir, 0o700),
         :ok <- DSPex.Bridge.DirLock.acquire(state.dir, "dead_letters.lock"),
         {:ok, table} <-
           :dets.open_file({__MODULE__, make_ref()},
             file: String.to_charlist(file),
             type: :set,
             auto_save: 1_000
           ) do
      state = %{state | table: table}
      load(state)
    else
      # Two VMs started in one directory (non-distributed nodes share the
      # default's `<node>`): the second gets a queue of its own there.
      {:error, {:in_use, os_pid}} when state.default_dir? ->
        dir = Path.join(state.dir, "vm-" <> System.pid())

        Logger.warning(
          "dspex_bridge: dead-letter queue in #{state.dir} is in use by OS process " <>
            "#{os_pid}; this VM's is #{dir}"
        )

        open(%{state | dir: dir, default_dir?: false})

      {:error, reason} ->
        Logger.error(
          "dspex_bridge: dead-letter queue in #{state.dir} unavailable: #{inspect(reason)}"
        )

        %{state | error: reason}
    end
  end

  # The index (id => what filters and bounds need) from the file.
  defp load(state) do
    state =
      :dets.foldl(
        fn
          {{:entry, id}, entry}, st ->
            size = :erlang.external_size(entry)
            index(st, entry, size)
            %{st | count: st.count + 1, bytes: st.bytes + size, next_id: max(st.next_id, id + 1)}

          {{:meta, :next_id}, n}, st ->
            %{st | next_id: max(st.next_id, n)}

          {{:audit, n}, _}, st ->
            %{st | audit_seq: max(st.audit_seq, n)}

          _, st ->
            st
        end,
        state,
        state.table
      )

    state
  end

  defp index(state, entry, size) do
    :ets.insert(state.index, {entry.id, size, index_key(entry)})

    if entry.session_id != nil do
      :ets.update_counter(
        state.index,
        {:session, entry.session_id},
        1,
        {{:session, entry.session_id}, 0}
      )
    end
  end

  defp unindex(state, id) do
    case :ets.lookup(state.index, id) do
      [{^id, _size, %{session_id: sid}}] when sid != nil ->
        :ets.delete(state.index, id)

        if :ets.update_counter(state.index, {:session, sid}, -1) <= 0,
          do: :ets.delete(state.index, {:session, sid})

      _ ->
        :ets.delete(state.index, id)
    end
  end

  defp index_key(e) do
    %{
      kind: e.kind,
      op: e.op,
      backend: e.backend,
      breaker: e.breaker,
      session_id: e.session_id,
      first_failure_at: e.first_failure_at
    }
  end

  @impl true
  def handle_call(_msg, _from, %{table: nil} = state),
    do: {:reply, {:error, {:unavailable, state.error}}, state}

  def handle_call({:add, entry}, _from, state) do
    now = System.os_time(:millisecond)
    attempts = Map.get(entry, :attempts, [])

    entry = %{
      id: state.next_id,
      kind: entry.kind,
      op: entry.op,
      args: Map.get(entry, :args, []),
      backend: Map.get(entry, :backend),
      breaker: Map.get(entry, :breaker),
      session_id: Map.get(entry, :session_id),
      attempts: attempts,
      first_failure_at: first_at(attempts, now),
      last_failure_at: last_at(attempts, now),
      last_error: last_error(attempts),
      added_at: now,
      meta: Map.get(entry, :meta, %{})
    }

    size = :erlang.external_size(entry)

    if size > state.max_bytes do
      {:reply, {:error, :too_large}, state}
    else
      :ok =
        :dets.insert(state.table, [{{:entry, entry.id}, entry}, {{:meta, :next_id}, entry.id + 1}])

      index(state, entry, size)
      state = %{state | next_id: entry.id + 1, count: state.count + 1, bytes: state.bytes + size}
      state = state |> evict(entry) |> bump(:added)
      # A parked write was acknowledged to its caller: on disk before the
      # reply. Propagation letters are saved within a second (auto_save).
      if entry.kind == :write, do: :dets.sync(state.table)

      Telemetry.execute(
        [:dspex, :bridge, :dlq, :added],
        %{depth: state.count, bytes: state.bytes},
        %{
          id: entry.id,
          kind: entry.kind,
          op: entry.op,
          session_id: entry.session_id,
          reason: entry.last_error
        }
      )

      {:reply, {:ok, entry.id}, state}
    end
  end

  def handle_call({:list, filter}, _from, state) do
    {:reply, {:ok, state |> select(filter) |> Enum.map(&fetch(state, &1))}, state}
  end

  def handle_call({:get, id}, _from, state) do
    case :dets.lookup(state.table, {:entry, id}) do
      [{_, entry}] -> {:reply, {:ok, entry}, state}
      [] -> {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call({:begin_replay, filter, pid}, _from, state) do
    ids = select(state, filter)

    cond do
      state.replaying != nil and Process.alive?(elem(state.replaying, 0)) ->
        {:reply, {:error, :replay_in_progress}, state}

      filter[:strict] && ids == [] ->
        {:reply, {:error, :not_found}, state}

      open_breaker?(state, ids) ->
        {:reply, {:error, :circuit_open}, state}

      true ->
        ref = Process.monitor(pid)
        entries = Enum.map(ids, &fetch(state, &1))
        {:reply, {:ok, entries, state.replay_rate}, %{state | replaying: {pid, ref}}}
    end
  end

  def handle_call({:end_replay, pid}, _from, %{replaying: {pid, ref}} = state) do
    Process.demonitor(ref, [:flush])
    {:reply, :ok, %{state | replaying: nil}}
  end

  def handle_call({:end_replay, _pid}, _from, state), do: {:reply, :ok, state}

  def handle_call({:replayed, id, result}, _from, state) do
    case :dets.lookup(state.table, {:entry, id}) do
      [{_, entry}] ->
        state =
          case result do
            :ok ->
              state |> remove(entry) |> audit(%{action: :replayed, id: id, op: entry.op})

            {:error, reason} ->
              now = System.os_time(:millisecond)

              updated = %{
                entry
                | attempts: entry.attempts ++ [%{error: reason, at: now}],
                  last_failure_at: now,
                  last_error: reason
              }

              old = :erlang.external_size(entry)
              new = :erlang.external_size(updated)
              :ok = :dets.insert(state.table, {{:entry, id}, updated})
              :ets.update_element(state.index, id, {2, new})
              :dets.sync(state.table)
              %{state | bytes: state.bytes - old + new}
          end

        Telemetry.execute(
          [:dspex, :bridge, :dlq, :replayed],
          %{attempts: length(entry.attempts) + 1},
          %{
            id: id,
            kind: entry.kind,
            op: entry.op,
            result: if(result == :ok, do: :ok, else: elem(result, 1))
          }
        )

        {:reply, :ok, bump(state, :replayed)}

      [] ->
        {:reply, :ok, state}
    end
  end

  def handle_call({:resolve, ids}, _from, state) do
    state =
      Enum.reduce(ids, state, fn id, st ->
        case :dets.lookup(st.table, {:entry, id}) do
          [{_, entry}] ->
            Telemetry.execute(
              [:dspex, :bridge, :dlq, :replayed],
              %{attempts: length(entry.attempts)},
              %{id: id, kind: entry.kind, op: entry.op, result: :ok}
            )

            st |> remove(entry) |> bump(:replayed)

          [] ->
            st
        end
      end)

    :dets.sync(state.table)
    {:reply, :ok, state}
  end

  def handle_call({:drop, filter, by, reason}, _from, state) do
    ids = select(state, filter)

    if filter[:strict] && ids == [] do
      {:reply, {:error, :not_found}, state}
    else
      state =
        Enum.reduce(ids, state, fn id, st ->
          entry = fetch(st, id)

          Telemetry.execute(
            [:dspex, :bridge, :dlq, :dropped],
            %{system_time: System.system_time()},
            %{id: id, kind: entry.kind, op: entry.op, by: by, reason: reason}
          )

          # The library's own drops (a closed session's letters) are events
          # and audit records; an operator's are logged too.
          if by != :dspex_bridge do
            Logger.notice(
              "dspex_bridge: dead letter #{id} (#{inspect(entry.op)}) dropped by #{inspect(by)}: #{inspect(reason)}"
            )
          end

          st
          |> remove(entry)
          |> audit(%{action: :dropped, id: id, op: entry.op, by: by, reason: reason, entry: entry})
          |> bump(:dropped)
        end)

      :dets.sync(state.table)
      {:reply, {:ok, length(ids)}, state}
    end
  end

  def handle_call(:stats, _from, state) do
    now = System.os_time(:millisecond)

    {by_kind, oldest} =
      :ets.foldl(
        fn
          {id, _size, %{kind: kind, first_failure_at: at}}, {kinds, oldest} when is_integer(id) ->
            {Map.update(kinds, kind, 1, &(&1 + 1)), earliest(oldest, at)}

          _, acc ->
            acc
        end,
        {%{}, nil},
        state.index
      )

    {:reply,
     %{
       depth: state.count,
       bytes: state.bytes,
       oldest_age_ms: if(oldest, do: max(now - oldest, 0)),
       by_kind: by_kind,
       added_total: state.totals.added,
       replayed_total: state.totals.replayed,
       dropped_total: state.totals.dropped,
       evicted_total: state.totals.evicted,
       max_entries: state.max_entries,
       max_bytes: state.max_bytes,
       dir: state.dir,
       available: true
     }, state}
  end

  def handle_call(:audit_log, _from, state) do
    records =
      state.table
      |> :dets.match_object({{:audit, :_}, :_})
      |> Enum.sort_by(fn {{:audit, n}, _} -> -n end)
      |> Enum.map(&elem(&1, 1))

    {:reply, {:ok, records}, state}
  end

  @impl true
  def handle_info({:DOWN, ref, :process, _pid, _reason}, %{replaying: {_, ref}} = state),
    do: {:noreply, %{state | replaying: nil}}

  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, %{table: table} = state) when table != nil do
    :dets.close(table)
    DSPex.Bridge.DirLock.release(state.dir, "dead_letters.lock")
  end

  def terminate(_reason, _state), do: :ok

  ## Server helpers

  # No oldest yet: any time is the oldest.
  defp earliest(nil, b), do: b
  defp earliest(a, b), do: min(a, b)

  defp first_at([], now), do: now
  defp first_at([%{at: at} | _], _now), do: at
  defp last_at([], now), do: now
  defp last_at(attempts, _now), do: List.last(attempts).at
  defp last_error([]), do: nil
  defp last_error(attempts), do: List.last(attempts).error

  defp fetch(state, id) do
    [{_, entry}] = :dets.lookup(state.table, {:entry, id})
    entry
  end

  defp select(state, filter) do
    now = System.os_time(:millisecond)
    ids = filter[:ids]

    candidates =
      if ids,
        do: Enum.flat_map(Enum.uniq(ids), &:ets.lookup(state.index, &1)),
        else: :ets.select(state.index, [{{:"$1", :_, :_}, [{:is_integer, :"$1"}], [:"$_"]}])

    matched = for {id, _size, key} <- candidates, matches?(key, filter, now), do: id

    matched = Enum.sort(matched)
    if filter[:limit], do: Enum.take(matched, filter[:limit]), else: matched
  end

  defp matches?(key, filter, now) do
    Enum.all?(filter, fn
      {:older_than_ms, ms} -> now - key.first_failure_at >= ms
      {k, v} when k in [:kind, :op, :backend, :breaker, :session_id] -> Map.get(key, k) == v
      _ -> true
    end)
  end

  defp open_breaker?(state, ids) do
    ids
    |> Enum.flat_map(&:ets.lookup(state.index, &1))
    |> Enum.map(fn {_, _, key} -> key.breaker end)
    |> Enum.uniq()
    |> Enum.any?(&(&1 != nil and CircuitBreaker.state(&1) in [:open, :forced_open]))
  end

  defp remove(state, entry) do
    [{_, size, _}] = :ets.lookup(state.index, entry.id)
    :ok = :dets.delete(state.table, {:entry, entry.id})
    unindex(state, entry.id)
    %{state | count: state.count - 1, bytes: state.bytes - size}
  end

  # Oldest first, until the bounds hold again; `added` itself goes last.
  defp evict(state, added) do
    cond do
      added.session_id != nil and session_count(state, added.session_id) > state.max_per_session ->
        state
        |> evict_one(oldest_of_session(state, added.session_id), :max_per_session)
        |> evict(added)

      state.count > state.max_entries ->
        state |> evict_one(oldest(state), :max_entries) |> evict(added)

      state.bytes > state.max_bytes ->
        state |> evict_one(oldest(state), :max_bytes) |> evict(added)

      true ->
        state
    end
  end

  defp session_count(state, sid) do
    case :ets.lookup(state.index, {:session, sid}) do
      [{_, n}] -> n
      [] -> 0
    end
  end

  defp oldest(state), do: :ets.first(state.index)

  defp oldest_of_session(state, sid) do
    [id | _] =
      :ets.select(state.index, [
        {{:"$1", :_, %{session_id: sid}}, [{:is_integer, :"$1"}], [:"$1"]}
      ])
      |> Enum.sort()

    id
  end

  defp evict_one(state, id, why) do
    entry = fetch(state, id)

    Telemetry.execute(
      [:dspex, :bridge, :dlq, :evicted],
      %{system_time: System.system_time()},
      %{id: id, kind: entry.kind, op: entry.op, session_id: entry.session_id, why: why}
    )

    Logger.warning("dspex_bridge: dead letter #{id} (#{inspect(entry.op)}) evicted: #{why}")
    state |> remove(entry) |> bump(:evicted)
  end

  defp bump(state, key), do: %{state | totals: Map.update!(state.totals, key, &(&1 + 1))}

  defp audit(state, record) do
    n = state.audit_seq + 1
    record = Map.put(record, :at, System.os_time(:millisecond))
    :ok = :dets.insert(state.table, {{:audit, n}, record})
    if n > @max_audit, do: :dets.delete(state.table, {:audit, n - @max_audit})
    %{state | audit_seq: n}
  end
end
