defmodule DSPex.Bridge.DependencyManager.Table do
  @moduledoc """
  What a session's propagation must not lose when its worker dies, in one
  ETS table owned by this long-lived process: the definitions of derived
  variables (compute functions included), their status, the dead letters,
  the changes waiting to be propagated and the callers waiting for them.

  The worker (`DSPex.Bridge.DependencyManager.Propagator`) is a cache over
  this table: a restarted worker reads its definitions back. This process
  also watches every worker and makes a death visible: a dead letter, a
  `[:dspex, :bridge, :propagation, :failed]` event with `variable: nil`,
  `reason: {:worker_exit, reason}` and the `telemetry_span_context` of the
  pass it ended (`nil` between passes), and the `restarts` count of
  `DSPex.Bridge.DependencyManager.derived_status/3`.

  Keys start with the session id (an ordered set, so a session's keys are
  one range):

  | key | value |
  | --- | --- |
  | `{sid, :def, key}` | a definition (`key` is the name as a string) |
  | `{sid, :id, id}` | the key of the definition whose variable has id `id` |
  | `{sid, :status, key}` | `status, error, computed_at` (three fields; the time in µs since the epoch) |
  | `{sid, :gen}` | bumped by every change to the definitions |
  | `{sid, :changed, ident}` | the latest version written to `ident`, not yet propagated |
  | `{sid, :wake}` | set while a wake-up message is on its way to the worker |
  | `{sid, :waiter, alias}` | `:sync` or `:replay`: a caller waiting for the worker |
  | `{sid, :letter_seq}` | the last dead-letter id given (the letters are in `DSPex.Bridge.DeadLetterQueue`) |
  | `{sid, :restarts}` | how many times the worker died and was restarted |
  | `{sid, :computing}` | the worker's latest computation, killed if the worker dies |
  | `{sid, :pass}` | `{worker, telemetry_span_context}` of the pass running now |
  | `{sid, :closed}` | the session is gone; its worker stops |

  A second table, a bag (hashed: one lookup is cheaper than in the ordered
  set), holds `{{sid, input}, id}`: `input` (an input's name or id, as a
  string) is an input of the definition whose variable has id `id`. It is
  what a write checks before it tells the worker anything (`feeds?/2`): a
  write to a variable that is no definition's input cannot cause a
  recomputation (a derived variable is recomputed only when one of its
  declared inputs changed), so it costs what a write in a session without
  derived variables costs. The rows are written by `put_def/2` before the
  definition is visible, and removed by `delete_def/2` with it.

  Writers coalesce: a write overwrites its variable's `:changed` entry and
  sends a wake-up only when none is on its way, so a worker's mailbox holds
  at most one, however many writes arrive while it computes.
  """
  use GenServer

  require Logger

  alias DSPex.Bridge.DeadLetterQueue
  alias DSPex.Bridge.DependencyManager.Propagator

  @table __MODULE__
  @feeds DSPex.Bridge.DependencyManager.Table.Feeds

  @doc false
  def start_link(_opts \\ []), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @doc false
  # Called by a worker when it starts: report its death. A call, so a worker
  # killed right after it started is watched already.
  @spec watch(pid, String.t()) :: :ok
  def watch(pid, sid), do: GenServer.call(__MODULE__, {:watch, pid, sid})

  ## Definitions

  @spec defs(String.t()) :: [map]
  def defs(sid), do: :ets.select(@table, [{{{sid, :def, :_}, :"$1"}, [], [:"$1"]}])

  @spec gen(String.t()) :: non_neg_integer
  def gen(sid), do: lookup({sid, :gen}, 0)

  @doc "The definition named `ident` (a name, in either form, or the variable's id)."
  @spec find(String.t(), term) :: map | nil
  def find(sid, ident) do
    key = to_string(ident)

    case lookup({sid, :def, key}, nil) do
      nil ->
        case lookup({sid, :id, key}, nil) do
          nil -> nil
          key -> lookup({sid, :def, key}, nil)
        end

      d ->
        d
    end
  end

  @doc """
  Records the definition `d`, fresh now, with its rows in the feeds table
  (one per key in `d.feeds`: the name and the id of each input, as strings).
  """
  @spec put_def(String.t(), map) :: :ok
  def put_def(sid, d) do
    # A definition this one replaces (its variable deleted and registered
    # again before the deletion reached delete_def/2): its rows go, it is
    # gone. Rows are keyed by the variable's id, so this removes nothing of
    # `d`'s own.
    with %{id: old_id} = old when old_id != d.id <- lookup({sid, :def, d.key}, nil),
         do: delete_feeds(sid, old)

    :ets.insert(@feeds, for(key <- feeds(d), do: {{sid, key}, d.id}))

    :ets.insert(@table, [
      {{sid, :def, d.key}, d},
      {{sid, :id, d.id}, d.key},
      {{sid, :status, d.key}, :fresh, nil, now()}
    ])

    bump(sid)
  end

  @doc "Forgets `d`, unless its key now holds another definition."
  @spec delete_def(String.t(), map) :: :ok
  def delete_def(sid, d) do
    if :ets.select_delete(@table, [{{{sid, :def, d.key}, %{id: d.id}}, [], [true]}]) > 0 do
      :ets.delete(@table, {sid, :id, d.id})
      :ets.delete(@table, {sid, :status, d.key})
      delete_feeds(sid, d)
      bump(sid)
    end

    :ok
  end

  defp feeds(d), do: Map.get(d, :feeds, d.input_keys)

  defp delete_feeds(sid, d) do
    for key <- feeds(d), do: :ets.delete_object(@feeds, {{sid, key}, d.id})
    :ok
  end

  @doc """
  Whether a write to `ident` (a variable's name or id) can cause a
  recomputation: `ident` is an input of a definition. One hashed lookup.
  """
  @spec feeds?(String.t(), atom | String.t()) :: boolean
  def feeds?(sid, ident) when is_atom(ident),
    do: :ets.member(@feeds, {sid, :erlang.atom_to_binary(ident, :utf8)})

  def feeds?(sid, ident) when is_binary(ident), do: :ets.member(@feeds, {sid, ident})
  def feeds?(sid, ident), do: :ets.member(@feeds, {sid, to_string(ident)})

  defp bump(sid) do
    :ets.update_counter(@table, {sid, :gen}, 1, {{sid, :gen}, 0})
    :ok
  end

  @doc "`%{status: :fresh | :stale, error, computed_at}` of the definition `key`, or `nil`."
  @spec status(String.t(), String.t()) :: map | nil
  def status(sid, key) do
    case :ets.lookup(@table, {sid, :status, key}) do
      [{_, status, error, at}] ->
        %{status: status, error: error, computed_at: at && DateTime.from_unix!(at, :microsecond)}

      [] ->
        nil
    end
  end

  # The status row exists exactly while its definition does (`put_def/2`,
  # `delete_def/2`), so updating it in place cannot resurrect a deleted one;
  # and in place it is one table operation on the hot path.

  @doc "The definition `key` was computed now."
  @spec fresh(String.t(), String.t()) :: :ok
  def fresh(sid, key) do
    :ets.update_element(@table, {sid, :status, key}, [{2, :fresh}, {3, nil}, {4, now()}])
    :ok
  end

  @doc "The definition `key` failed with `error`; its last computation time stays."
  @spec stale(String.t(), String.t(), term) :: :ok
  def stale(sid, key, error) do
    :ets.update_element(@table, {sid, :status, key}, [{2, :stale}, {3, error}])
    :ok
  end

  # DateTime.utc_now/0's clock, kept as an integer: the conversion is paid
  # by the readers (derived_status/3), not by every recomputation.
  defp now, do: System.os_time(:microsecond)

  ## Changes, wake-ups and waiters

  @spec mark_changed(String.t(), term, term) :: true
  def mark_changed(sid, ident, version),
    do: :ets.insert(@table, {{sid, :changed, ident}, version})

  @doc "`mark_changed/3` of several `{ident, version}` writes, in one table operation."
  @spec mark_all_changed(String.t(), [{term, term}]) :: true
  # A batch names a variable once (the engine refuses it twice), so no two
  # objects inserted here share a key.
  def mark_all_changed(sid, changes),
    do:
      :ets.insert(@table, for({ident, version} <- changes, do: {{sid, :changed, ident}, version}))

  @doc "The changes waiting, `[{ident, version}]`, taken out of the table."
  @spec take_changes(String.t()) :: [{term, term}]
  def take_changes(sid) do
    @table
    |> :ets.select([{{{sid, :changed, :"$1"}, :_}, [], [:"$1"]}])
    |> Enum.flat_map(fn ident ->
      for {{_, _, ident}, version} <- :ets.take(@table, {sid, :changed, ident}),
          do: {ident, version}
    end)
  end

  @doc "Raises the wake-up flag; `true` when it was down (so the caller sends the wake-up)."
  @spec raise_flag(String.t()) :: boolean
  def raise_flag(sid), do: :ets.insert_new(@table, {{sid, :wake}, true})

  @spec lower_flag(String.t()) :: true
  def lower_flag(sid), do: :ets.delete(@table, {sid, :wake})

  @spec add_waiter(String.t(), reference, :sync | :replay) :: true
  def add_waiter(sid, alias, kind), do: :ets.insert(@table, {{sid, :waiter, alias}, kind})

  @doc "Removes a waiter; `false` when the worker has taken it already."
  @spec remove_waiter(String.t(), reference) :: boolean
  def remove_waiter(sid, alias), do: :ets.take(@table, {sid, :waiter, alias}) != []

  @spec take_waiters(String.t()) :: [{reference, :sync | :replay}]
  def take_waiters(sid) do
    @table
    |> :ets.select([{{{sid, :waiter, :"$1"}, :_}, [], [:"$1"]}])
    |> Enum.flat_map(fn alias ->
      for {{_, _, alias}, kind} <- :ets.take(@table, {sid, :waiter, alias}), do: {alias, kind}
    end)
  end

  @doc false
  # The computation the worker runs now (overwritten by the next one): the
  # worker's death kills it.
  @spec computing(String.t(), pid) :: true
  def computing(sid, pid), do: :ets.insert(@table, {{sid, :computing}, {self(), pid}})

  @doc false
  # The `telemetry_span_context` of the pass the worker runs now, for the
  # report of its death.
  @spec pass_started(String.t(), reference) :: true
  def pass_started(sid, context), do: :ets.insert(@table, {{sid, :pass}, {self(), context}})

  @spec pass_ended(String.t()) :: true
  def pass_ended(sid), do: :ets.delete(@table, {sid, :pass})

  ## Dead letters

  # Kept in DSPex.Bridge.DeadLetterQueue (kind `:propagation`), the one
  # queue for failed work; this table only numbers them per session. The
  # session's view shows the letters of this VM's life: a session does not
  # outlive the VM, the queue's entries do.

  @doc """
  Records a dead letter (`%{variable, reason, caused_by}`) in the
  dead-letter queue, which keeps the last 100 of a session (its
  `max_per_session`; older ones are evicted, with an event).
  """
  @spec add_letter(String.t(), map) :: :ok
  def add_letter(sid, letter) do
    id = :ets.update_counter(@table, {sid, :letter_seq}, 1, {{sid, :letter_seq}, 0})
    letter = Map.merge(letter, %{id: id, at: DateTime.utc_now()})

    entry = %{
      kind: :propagation,
      op: if(letter.variable == nil, do: :worker_exit, else: :recompute),
      args: [sid, letter.variable],
      session_id: sid,
      attempts: [%{error: letter.reason, at: System.os_time(:millisecond)}],
      meta: %{letter: letter, vm: vm()}
    }

    case DeadLetterQueue.add(entry) do
      {:ok, _} ->
        :ok

      {:error, reason} ->
        Logger.warning("dspex_bridge: dead letter of #{sid} lost: #{inspect(reason)}")
    end

    :ok
  end

  @doc "The dead letters, oldest first (each with its queue id, `dlq_id`)."
  @spec letters(String.t()) :: [map]
  def letters(sid) do
    if DeadLetterQueue.session?(sid) do
      case DeadLetterQueue.list(kind: :propagation, session_id: sid, limit: 1_000_000) do
        {:ok, entries} ->
          vm = vm()

          for %{meta: %{letter: letter, vm: ^vm}, id: dlq_id} <- entries,
              do: Map.put(letter, :dlq_id, dlq_id)

        {:error, _} ->
          []
      end
    else
      []
    end
  end

  @spec last_letter_id(String.t()) :: non_neg_integer
  def last_letter_id(sid), do: lookup({sid, :letter_seq}, 0)

  @doc "Takes letters out of the queue: they were replayed."
  @spec delete_letters(String.t(), [pos_integer]) :: :ok
  def delete_letters(_sid, []), do: :ok

  def delete_letters(sid, ids) do
    dlq_ids = for %{id: id, dlq_id: dlq_id} <- letters(sid), id in ids, do: dlq_id
    DeadLetterQueue.resolve(dlq_ids)
  end

  defp vm, do: {System.pid(), :erlang.system_info(:start_time)}

  ## The session and its worker

  @spec restarts(String.t()) :: non_neg_integer
  def restarts(sid), do: lookup({sid, :restarts}, 0)

  @spec close(String.t()) :: true
  def close(sid), do: :ets.insert(@table, {{sid, :closed}, true})

  @spec closed?(String.t()) :: boolean
  def closed?(sid), do: :ets.member(@table, {sid, :closed})

  @doc "Forgets everything about the session."
  @spec drop(String.t()) :: :ok
  def drop(sid) do
    # Every row of the feeds table is a definition's (put_def/2 removes
    # those of a definition it replaces), so these are all the session's.
    for d <- defs(sid), key <- feeds(d), do: :ets.delete(@feeds, {sid, key})

    :ets.select_delete(@table, [
      {{{sid, :_}, :_}, [], [true]},
      {{{sid, :_, :_}, :_}, [], [true]},
      {{{sid, :status, :_}, :_, :_, :_}, [], [true]}
    ])

    # Its letters go with it (audited, as every drop).
    if DeadLetterQueue.session?(sid) do
      DeadLetterQueue.drop([kind: :propagation, session_id: sid],
        by: :dspex_bridge,
        reason: :session_closed
      )
    end

    :ok
  end

  defp lookup(key, default) do
    case :ets.lookup(@table, key) do
      [{_, value}] -> value
      [] -> default
    end
  end

  ## Server

  @impl true
  def init([]) do
    :ets.new(@table, [
      :ordered_set,
      :public,
      :named_table,
      read_concurrency: true,
      write_concurrency: true
    ])

    :ets.new(@feeds, [
      :bag,
      :public,
      :named_table,
      read_concurrency: true,
      write_concurrency: true
    ])

    {:ok, %{}}
  end

  @impl true
  def handle_call({:watch, pid, sid}, _from, watched) do
    {:reply, :ok, Map.put(watched, Process.monitor(pid), sid)}
  end

  @impl true
  def handle_info({:DOWN, ref, :process, worker, reason}, watched) do
    {sid, watched} = Map.pop(watched, ref)

    if sid do
      # Its computation in flight, if any, goes with it.
      with {^worker, pid} <- lookup({sid, :computing}, nil), do: Process.exit(pid, :kill)
      died(sid, worker, reason)
    end

    {:noreply, watched}
  end

  def handle_info(_other, watched), do: {:noreply, watched}

  # Its supervisor restarts a worker that died; the death is recorded here.
  # A normal stop is the session closing; `:noproc` a worker gone before it
  # was watched (nothing can be said about it).
  defp died(_sid, _worker, reason) when reason in [:normal, :shutdown, :noproc], do: :ok
  defp died(_sid, _worker, {:shutdown, _}), do: :ok

  defp died(sid, worker, reason) do
    if defs(sid) != [] and not closed?(sid) do
      :ets.update_counter(@table, {sid, :restarts}, 1, {{sid, :restarts}, 0})
      # The pass it was in, if any: the span that death ended.
      # (Not a restarted worker's: that one may have begun a pass already.)
      context =
        case :ets.lookup(@table, {sid, :pass}) do
          [{_, {^worker, context}} = entry] ->
            :ets.delete_object(@table, entry)
            context

          _ ->
            nil
        end

      start = System.monotonic_time()
      Propagator.report(sid, nil, {:worker_exit, reason}, [], start, context)
    end

    :ok
  end
end
