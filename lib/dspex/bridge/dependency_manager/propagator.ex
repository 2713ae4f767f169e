defmodule DSPex.Bridge.DependencyManager.Propagator do
  @moduledoc """
  The propagation worker of one session: recomputes the session's derived
  variables after writes. Started on demand by
  `DSPex.Bridge.DependencyManager`; stopped when the session goes.

  The worker keeps nothing it cannot lose. Definitions, status, dead
  letters, pending changes and waiting callers live in
  `DSPex.Bridge.DependencyManager.Table`; the worker caches the definitions
  and reads them again when they change. A worker that dies is restarted by
  its supervisor (`restart: :transient`), reads the definitions back and
  recomputes every derived variable, so nothing written meanwhile is missed.

  Nothing arrives as one message per write. A write records its variable's
  latest version in the table and sends a wake-up only when none is on its
  way; callers waiting for the worker (`await_propagation/2`,
  `replay_dead_letters/2`) register in the table too and get their answer
  through an alias. So the mailbox holds at most one wake-up, however long
  a computation takes, and a caller that gives up leaves nothing behind.

  A pass takes every change waiting, asks the engine for the update order of
  the changed variables (the maintained topological order, no graph walk
  here), and walks it once. A derived variable is recomputed when at least
  one of its inputs is dirty (written in this batch, or recomputed earlier in
  this pass); it then becomes dirty itself. As the order is topological,
  every derived variable is recomputed at most once per pass, after all of
  its inputs. The computations run apart from the worker, each under its
  deadline, in one process per pass that is replaced only after a
  computation fails or leaves it changed
  (`DSPex.Bridge.DependencyManager.Compute`).

  Writers find the worker through `:persistent_term` (`whereis/1`), so a
  write to a session without derived variables does one lookup and nothing
  else; until the VM starts its first worker, a write looks up only a
  boolean. In a session with derived variables, a write to a variable that
  is no definition's input adds one table lookup (`Table.feeds?/2`) and
  tells the worker nothing: only a changed input makes a derived variable
  recompute. A batch tells the worker once, however many inputs it wrote. The worker's own writes do not notify it: their effects are already
  part of the pass that made them.
  """
  use GenServer, restart: :transient

  require Logger

  alias DSPex.Bridge.{DependencyManager, SessionStore, Telemetry}
  alias DSPex.Bridge.DependencyManager.{Compute, Table}
  alias DSPex.Bridge.Backend.Router

  @registry DSPex.Bridge.DependencyManager.Registry
  @supervisor DSPex.Bridge.DependencyManager.Supervisor
  # Writes named in a derived write's metadata, at most.
  @max_causes 16
  @overload_patience 5_000
  @retry_first 50
  @impatient {__MODULE__, :impatient}
  @retry_max 1_000
  @missing {__MODULE__, :missing}
  # Set when the first worker starts, never cleared: a boolean is an
  # immediate, so reading it is cheaper than the per-session lookup.
  @any_key DSPex.Bridge.DependencyManager.Propagator.Started

  ## Client side (runs in the caller)

  @doc "The worker of `session_id`, or `nil` when the session has none."
  @spec whereis(String.t()) :: pid | nil
  def whereis(session_id), do: :persistent_term.get({__MODULE__, session_id}, nil)

  @doc "The worker of `session_id`, started if needed."
  @spec ensure(String.t()) :: {:ok, pid} | {:error, term}
  def ensure(session_id) when is_binary(session_id) do
    case Registry.lookup(@registry, session_id) do
      [{pid, _}] ->
        {:ok, pid}

      [] ->
        with {:ok, _} <- DSPex.Bridge.Backend.Router.session_info(session_id) do
          case DynamicSupervisor.start_child(@supervisor, {__MODULE__, session_id}) do
            {:ok, pid} -> {:ok, pid}
            {:error, {:already_started, pid}} -> {:ok, pid}
            :ignore -> {:error, :session_not_found}
            {:error, _} = error -> error
          end
        end
    end
  end

  def ensure(_session_id), do: {:error, :session_not_found}

  @doc false
  # Defines a derived variable, in the caller's process (so a slow compute
  # function holds up only its caller, never the worker): reads the inputs
  # and computes the first value as the principal, registers the variable
  # and its edges, then hands the definition to the worker through the table.
  @spec define(String.t(), DependencyManager.ident(), atom, list, function, keyword) ::
          {:ok, String.t()} | {:error, term}
  def define(sid, name, type, inputs, fun, opts) do
    access = Keyword.take(opts, [:principal, :context])
    timeout = Keyword.fetch!(opts, :compute_timeout)
    inputs = Enum.uniq_by(inputs, &to_string/1)

    with {:ok, _} <- ensure(sid),
         {:ok, read, vars} <- read_versions(sid, inputs, access),
         values = Map.new(read, fn {input, {value, _}} -> {input, value} end),
         {:ok, value} <- Compute.run(fun, values, timeout) |> failed_as_compute_failed(),
         {:ok, id} <- register(sid, name, type, inputs, value, opts),
         :ok <- add_edges(sid, inputs, name, access) do
      d = %{
        key: to_string(name),
        id: id,
        name: name,
        inputs: inputs,
        # The inputs' names, as the pass's dirty keys are (an input given
        # by its id included).
        input_keys: Enum.map(vars, fn {name, _id} -> name end),
        # Every form a write may name an input by: its name, its id.
        feeds: Enum.uniq(Enum.flat_map(vars, &Tuple.to_list/1)),
        fun: fun,
        compute_timeout: timeout,
        access: access
      }

      # The order matters. A write checks the feeds rows (Table.feeds?/2) after the engine
      # accepted it (notify_write/3); put_def/2 writes them before catch_up/3
      # reads the inputs again. A write that found no row for its variable
      # therefore was accepted before that read, which sees its version and
      # propagates it; a write that found one is propagated by the worker.
      # Either way no write to an input is missed, whenever it happens.
      Table.put_def(sid, d)
      catch_up(sid, read, access)
      {:ok, id}
    end
  end

  # An input written after it was read, before the worker knew the
  # definition, is propagated now. A session deleted meanwhile keeps nothing.
  defp catch_up(sid, read, access) do
    reads =
      for {input, {_, version}} <- read, do: {input, version, read_version(sid, input, access)}

    if Enum.any?(reads, &match?({_, _, {:error, :session_not_found}}, &1)) do
      Table.drop(sid)
    else
      changed =
        for {input, version, {:ok, {_, now}}} <- reads,
            now != version,
            do: Table.mark_changed(sid, input, now)

      if changed != [], do: wake(sid)
    end

    :ok
  end

  # `{:ok, %{input => {value, version}}, vars}`: `vars` are the inputs'
  # `{name, id}`, as strings, in the order of `inputs`.
  defp read_versions(sid, inputs, access) do
    inputs
    |> Enum.reduce_while({:ok, %{}, []}, fn input, {:ok, acc, vars} ->
      case SessionStore.get_variable(sid, input, access) do
        {:ok, var} ->
          vars = [{to_string(var.name), to_string(var.id)} | vars]
          {:cont, {:ok, Map.put(acc, input, {var.value, var.version}), vars}}

        {:error, :not_found} ->
          {:halt, {:error, {:not_found, input}}}

        {:error, _} = error ->
          {:halt, error}
      end
    end)
    |> case do
      {:ok, read, vars} -> {:ok, read, Enum.reverse(vars)}
      error -> error
    end
  end

  defp read_version(sid, input, access) do
    with {:ok, var} <- SessionStore.get_variable(sid, input, access),
         do: {:ok, {var.value, var.version}}
  end

  defp failed_as_compute_failed({:error, :timeout}), do: {:error, {:compute_failed, :timeout}}

  defp failed_as_compute_failed({:error, {:raised, :error, exception, _}}),
    do: {:error, {:compute_failed, exception}}

  defp failed_as_compute_failed({:error, {:raised, kind, reason, _}}),
    do: {:error, {:compute_failed, {kind, reason}}}

  defp failed_as_compute_failed(ok), do: ok

  defp register(sid, name, type, inputs, value, opts) do
    metadata = Map.put(opts[:metadata] || %{}, :derived_from, inputs)

    opts =
      opts
      |> Keyword.take([:constraints, :description, :access_rules, :principal, :context])
      |> Keyword.put(:metadata, metadata)

    SessionStore.register_variable(sid, name, type, value, opts)
  end

  # All edges or none: a failure removes the variable again.
  defp add_edges(sid, inputs, name, access) do
    principal = [principal: access[:principal]]

    Enum.reduce_while(inputs, :ok, fn input, :ok ->
      case DependencyManager.add_dependency(sid, input, name, :derived, principal) do
        :ok -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
    |> case do
      :ok ->
        :ok

      error ->
        SessionStore.delete_variable(sid, name, access)
        error
    end
  end

  @doc false
  # Makes sure the worker looks at the table soon: raises the flag and, when
  # it was down, sends the one wake-up. The worker lowers the flag before it
  # reads the table, so whatever was recorded before the flag went up is seen.
  @spec wake(String.t()) :: :ok
  def wake(sid) do
    if Table.raise_flag(sid) do
      # Looked up after the flag: a restarted worker publishes itself first.
      case whereis(sid) do
        nil -> :ok
        pid -> send(pid, :wake)
      end
    end

    :ok
  end

  @doc false
  # Waits (at most `timeout` ms) for the worker to finish a pass begun after
  # this call: `reply` (the worker's), or `{:error, :timeout}`.
  @spec await(String.t(), :sync | :replay, timeout) :: term
  def await(sid, kind, timeout) do
    alias = :erlang.alias([:reply])
    Table.add_waiter(sid, alias, kind)
    wake(sid)

    receive do
      {^alias, reply} -> reply
    after
      timeout ->
        :erlang.unalias(alias)

        if Table.remove_waiter(sid, alias) do
          {:error, :timeout}
        else
          # Taken by the worker: its answer may be on its way already.
          receive do
            {^alias, reply} -> reply
          after
            0 -> {:error, :timeout}
          end
        end
    end
  end

  @doc false
  # Called by SessionStore after every accepted write. Only a write to an
  # input of a definition (`Table.feeds?/2`) can cause a recomputation; any
  # other costs one more table lookup and nothing else. See define/6 for why
  # a definition added concurrently misses no write.
  @spec notify_write(String.t(), term, pos_integer) :: :ok
  def notify_write(session_id, ident, version) do
    with true <- :persistent_term.get(@any_key, false),
         pid when is_pid(pid) and pid != self() <- whereis(session_id),
         true <- Table.feeds?(session_id, ident) do
      Table.mark_changed(session_id, ident, version)
      wake(session_id)
    end

    :ok
  end

  @doc false
  # notify_write/3 of a batch's accepted writes (`[{ident, version}]`): the
  # inputs among them are marked in one table operation, and one wake-up.
  @spec notify_writes(String.t(), [{term, pos_integer}]) :: :ok
  def notify_writes(session_id, writes) do
    with true <- :persistent_term.get(@any_key, false),
         pid when is_pid(pid) and pid != self() <- whereis(session_id),
         [_ | _] = changes <-
           Enum.filter(writes, fn {ident, _} -> Table.feeds?(session_id, ident) end) do
      Table.mark_all_changed(session_id, changes)
      wake(session_id)
    end

    :ok
  end

  @doc false
  # Called by SessionStore when a variable is deleted: a derived variable is
  # forgotten (unless its name was registered again meanwhile).
  @spec notify_delete(String.t(), term) :: :ok
  def notify_delete(session_id, ident) do
    with pid when is_pid(pid) <- whereis(session_id),
         %{} = d <- Table.find(session_id, ident),
         {:error, :not_found} <- Router.acl_check(session_id, d.id, nil, :read) do
      Table.delete_def(session_id, d)
    end

    :ok
  end

  @doc false
  # Called by SessionStore when a session is deleted or expires.
  @spec session_closed(String.t()) :: :ok
  def session_closed(session_id) do
    case whereis(session_id) do
      nil ->
        Table.drop(session_id)

      _pid ->
        Table.close(session_id)
        wake(session_id)
    end
  end

  @doc false
  def start_link(session_id),
    do:
      GenServer.start_link(__MODULE__, session_id, name: {:via, Registry, {@registry, session_id}})

  ## Server

  @impl true
  def init(session_id) do
    Process.flag(:trap_exit, true)

    if Table.closed?(session_id) or not session?(session_id) do
      Table.drop(session_id)
      key = {__MODULE__, session_id}
      :persistent_term.get(key, nil) && :persistent_term.erase(key)
      :ignore
    else
      :persistent_term.put({__MODULE__, session_id}, self())
      :persistent_term.get(@any_key, false) || :persistent_term.put(@any_key, true)
      Table.watch(self(), session_id)
      # Definitions already there: a worker before this one died.
      restarted? = Table.defs(session_id) != []

      state = %{
        session_id: session_id,
        gen: -1,
        derived: %{},
        # Refused for now (see "Refusals" in retry/1): derived keys to
        # recompute and roots whose update order was refused, each with
        # its causes; one timer, whose pause doubles while refusals last.
        refused: %{},
        refused_roots: %{},
        retrying: %{},
        retry_timer: nil,
        retry_pause: @retry_first
      }

      {:ok, state, {:continue, {:start, restarted?}}}
    end
  end

  defp session?(sid), do: match?({:ok, _}, Router.session_info(sid))

  @impl true
  def handle_continue({:start, restarted?}, state) do
    state = refresh(state)

    roots =
      if restarted?,
        do: for({_, d} <- state.derived, do: {d.name, [%{restart: true}]}),
        else: []

    forced = MapSet.new(roots, fn {name, _} -> to_string(name) end)
    state = if roots == [], do: state, else: propagate(state, roots, forced)
    cycle(state)
  end

  ## Refusals
  #
  # A backend at its admission limit refuses with `:overloaded` (a session's
  # rate limit with `:rate_limited`), and nothing happened. `patiently/1`
  # retries such a call for a while; a recomputation still refused after
  # that is reported once (the `:failed` event and a dead letter), marked
  # stale, and kept here to be recomputed again, after a pause that doubles
  # from @retry_first ms up to @retry_max ms while the refusals last,
  # from the inputs' values at that time. So a derived variable equals f of
  # its inputs once the backend admits its writes again, even when no input
  # is written after the overload; its dead letters for the refusal are
  # then removed, as a replay would. What waits is one entry per derived
  # variable (and per refused root), coalesced, and one timer.

  defp retry(state) do
    state = refresh(state)

    keys = state.refused |> Map.keys() |> Enum.filter(&Map.has_key?(state.derived, &1))

    roots =
      Enum.map(keys, fn key -> {state.derived[key].name, state.refused[key]} end) ++
        Map.to_list(state.refused_roots)

    # `retrying`: reported already, not again if refused again.
    state = %{state | refused: %{}, refused_roots: %{}, retrying: state.refused}

    state =
      if roots == [],
        do: state,
        else: propagate(state, Enum.uniq_by(roots, &elem(&1, 0)), MapSet.new(keys))

    state = %{state | retrying: %{}}

    # Recomputed now: what the refusals left in the dead letters is done.
    done = Enum.reject(keys, &Map.has_key?(state.refused, &1))
    clear_refusal_letters(state.session_id, done)

    pause =
      if state.refused == %{} and state.refused_roots == %{},
        do: @retry_first,
        else: min(state.retry_pause * 2, @retry_max)

    schedule_retry(%{state | retry_pause: pause})
  end

  defp schedule_retry(%{retry_timer: nil} = state)
       when state.refused != %{} or state.refused_roots != %{},
       do: %{state | retry_timer: Process.send_after(self(), :retry, state.retry_pause)}

  defp schedule_retry(state), do: state

  defp refused?(reason) when reason in [:overloaded, :rate_limited], do: true
  defp refused?({tag, reason}) when tag in [:write_rejected, :read_rejected], do: refused?(reason)
  defp refused?(_reason), do: false

  defp clear_refusal_letters(_sid, []), do: :ok

  defp clear_refusal_letters(sid, keys) do
    ids =
      for letter <- Table.letters(sid),
          to_string(letter.variable) in keys,
          refused?(letter.reason),
          do: letter.id

    Table.delete_letters(sid, ids)
  end

  @impl true
  def handle_info(:wake, state), do: cycle(state)
  def handle_info(:retry, state), do: {:noreply, retry(%{state | retry_timer: nil})}

  # A link other than the supervisor (the registry): stop with its reason,
  # to be restarted. A normal exit of a linked process is no reason to stop.
  def handle_info({:EXIT, _pid, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(reason, state) do
    sid = state.session_id

    if reason == :normal do
      # The session is gone: nothing is left to wait for.
      for {alias, _} <- Table.take_waiters(sid), do: send(alias, {alias, :ok})
      Table.drop(sid)
    end

    key = {__MODULE__, sid}
    if :persistent_term.get(key, nil) == self(), do: :persistent_term.erase(key)
    :ok
  end

  ## Passes

  # One look at the table: the flag down first (see wake/1), then the
  # waiters, then the changes; the waiters are answered once the changes
  # recorded before them are propagated.
  defp cycle(state) do
    sid = state.session_id
    Table.lower_flag(sid)

    if Table.closed?(sid) do
      {:stop, :normal, state}
    else
      waiters = Table.take_waiters(sid)
      changes = Table.take_changes(sid)
      state = state |> refresh() |> run(changes)

      {state, replayed} =
        if Enum.any?(waiters, &match?({_, :replay}, &1)), do: replay(state), else: {state, nil}

      for {alias, kind} <- waiters,
          do: send(alias, {alias, if(kind == :replay, do: {:ok, replayed}, else: :ok)})

      {:noreply, schedule_retry(state)}
    end
  end

  # The definitions, read again when they changed.
  defp refresh(state) do
    case Table.gen(state.session_id) do
      gen when gen == state.gen ->
        state

      gen ->
        derived = Map.new(Table.defs(state.session_id), &{&1.key, &1})
        %{state | gen: gen, derived: derived}
    end
  end

  # Recomputes the variables of the dead letters; letters that are not
  # recomputations (a rejected `propagate_change/5` write, a worker's death)
  # stay.
  defp replay(state) do
    sid = state.session_id
    derived? = &(&1.variable != nil and Map.has_key?(state.derived, to_string(&1.variable)))
    replayable = sid |> Table.letters() |> Enum.filter(derived?)
    keys = replayable |> Enum.map(&to_string(&1.variable)) |> Enum.uniq()
    Table.delete_letters(sid, Enum.map(replayable, & &1.id))
    before = Table.last_letter_id(sid)

    roots = Enum.map(keys, fn key -> {state.derived[key].name, [%{replay: true}]} end)
    state = if roots == [], do: state, else: propagate(state, roots, MapSet.new(keys))

    failed =
      sid
      |> Table.letters()
      |> Enum.filter(&(&1.id > before and to_string(&1.variable) in keys))
      |> Enum.map(&to_string(&1.variable))
      |> Enum.uniq()
      |> length()

    {state, %{replayed: length(keys) - failed, failed: failed}}
  end

  # `changes` are `{ident, version}` writes; a variable written several
  # times counts once, with its latest version.
  defp run(state, []), do: state
  defp run(state, _changes) when state.derived == %{}, do: state

  defp run(state, changes) do
    roots =
      changes
      |> Enum.reduce(%{}, fn {ident, version}, acc ->
        Map.put(acc, ident, [%{variable: ident, version: version}])
      end)
      |> Enum.to_list()

    propagate(state, roots, MapSet.new())
  end

  # `roots` are `{ident, causes}`; `forced` are keys recomputed even when no
  # input is dirty (a replay, a restart).
  # A pass: the update order of the changed variables, walked once. Writes
  # that reach no derived variable end here, without events.
  defp propagate(state, roots, forced) do
    Process.delete(@impatient)
    changed = Enum.map(roots, &elem(&1, 0))
    sid = state.session_id

    case update_order(sid, changed) do
      {:ok, order} ->
        if Enum.any?(order, &Map.has_key?(state.derived, to_string(&1))),
          do: walk(state, roots, order, forced),
          else: state

      {:error, :session_not_found} ->
        Table.close(sid)
        wake(sid)
        state

      {:error, :refused} ->
        refused_roots = Enum.reduce(roots, state.refused_roots, &keep_causes/2)
        forced = Map.new(forced, &{&1, Map.get(state.refused, &1, [%{retry: true}])})
        %{state | refused_roots: refused_roots, refused: Map.merge(state.refused, forced)}
    end
  end

  defp keep_causes({ident, causes}, acc),
    do: Map.update(acc, ident, causes, &Enum.take(Enum.uniq(&1 ++ causes), @max_causes))

  # The pass is a span (`:start`, then `:stop`, or `:exception` should the
  # pass itself crash); its failures are `:failed` events carrying its
  # `telemetry_span_context`, which the table keeps while the pass runs, so
  # a worker killed mid-pass names the pass it ended.
  defp walk(state, roots, order, forced) do
    sid = state.session_id
    meta = %{session_id: sid, changed: Enum.map(roots, &elem(&1, 0))}
    context = make_ref()
    Table.pass_started(sid, context)

    try do
      Telemetry.span(
        [:dspex, :bridge, :propagation],
        Map.put(meta, :telemetry_span_context, context),
        fn ->
          dirty = root_keys(sid, roots, order)
          acc = {state, dirty, %{recomputed: 0, failed: 0}, nil}

          {state, _dirty, counts, worker} =
            Enum.reduce(order, acc, &step(&2, &1, forced, context))

          Compute.stop(worker)
          {state, counts, meta}
        end
      )
    after
      Table.pass_ended(sid)
    end
  end

  # The engine's order for the changed variables that still exist.
  defp update_order(sid, changed) do
    case patiently(fn -> DSPex.Bridge.Backend.Router.graph_update_order(sid, changed, nil) end) do
      {:ok, order} ->
        {:ok, order}

      {:error, {:not_found, gone}} ->
        update_order(sid, Enum.reject(changed, &(&1 == gone)))

      {:error, :session_not_found} = error ->
        error

      {:error, reason} when reason in [:overloaded, :rate_limited] ->
        {:error, :refused}

      {:error, reason} ->
        Logger.warning("propagation in #{sid}: update order failed: #{inspect(reason)}")
        {:ok, []}
    end
  end

  # Dirty keys of the roots. A root named by its generated id is found by
  # asking for its name.
  defp root_keys(sid, roots, order) do
    names = MapSet.new(order, &to_string/1)

    Enum.reduce(roots, %{}, fn {ident, causes}, acc ->
      key =
        if MapSet.member?(names, to_string(ident)) do
          to_string(ident)
        else
          case SessionStore.get_variable(sid, ident) do
            {:ok, %{name: name}} -> to_string(name)
            _ -> to_string(ident)
          end
        end

      Map.update(acc, key, causes, &Enum.take(Enum.uniq(&1 ++ causes), @max_causes))
    end)
  end

  # `worker` is the pass's compute process (`Compute.run/5`).
  defp step({state, dirty, counts, worker} = acc, name, forced, context) do
    key = to_string(name)

    with %{} = d <- Map.get(state.derived, key),
         [_ | _] = causes <- causes(d, key, dirty, forced) do
      case recompute(state, d, causes, context, worker) do
        {:ok, state, worker} ->
          dirty = Map.update(dirty, key, causes, &Enum.uniq(&1 ++ causes))
          {state, dirty, %{counts | recomputed: counts.recomputed + 1}, worker}

        {:error, state, worker} ->
          {state, dirty, %{counts | failed: counts.failed + 1}, worker}

        {:gone, state, worker} ->
          {state, dirty, counts, worker}
      end
    else
      _ -> acc
    end
  end

  # The causes carried by the dirty inputs of `d`; `[]` when none is dirty,
  # so `d` is left alone. A forced variable carries its own.
  defp causes(d, key, dirty, forced) do
    causes =
      d.input_keys
      |> Enum.flat_map(&Map.get(dirty, &1, []))
      |> Enum.uniq()
      |> Enum.take(@max_causes)

    if causes == [] and MapSet.member?(forced, key), do: Map.get(dirty, key, []), else: causes
  end

  # Inputs are read and the result written with the definer's permissions.
  defp recompute(state, d, causes, context, worker) do
    sid = state.session_id
    start = System.monotonic_time()

    {result, worker} =
      case read_inputs(sid, d.inputs, d.access) do
        {:ok, values} ->
          case Compute.run(worker, d.fun, values, d.compute_timeout, &Table.computing(sid, &1)) do
            {{:ok, value}, worker} -> {write(sid, d, value, causes), worker}
            {error, worker} -> {error, worker}
          end

        error ->
          {error, worker}
      end

    case result do
      :ok ->
        Table.fresh(sid, d.key)
        {:ok, state, worker}

      # Deleted under us (SessionStore forgets it too): forget it.
      :gone ->
        Table.delete_def(sid, d)
        {:gone, %{state | derived: Map.delete(state.derived, d.key)}, worker}

      {:error, reason} ->
        Table.stale(sid, d.key, dead_reason(reason))

        if refused?(reason) do
          # Reported once, however many retries it takes (see retry/1).
          unless Map.has_key?(state.refused, d.key) or Map.has_key?(state.retrying, d.key),
            do: report(sid, d.name, reason, causes, start, context)

          {:error, %{state | refused: Map.update(state.refused, d.key, causes, & &1)}, worker}
        else
          report(sid, d.name, reason, causes, start, context)
          {:error, state, worker}
        end
    end
  end

  defp write(sid, d, value, causes) do
    meta = %{derived: true, caused_by: causes}

    case patiently(fn -> SessionStore.update_variable(sid, d.name, value, meta, d.access) end) do
      :ok -> :ok
      {:error, :not_found} -> :gone
      {:error, reason} -> {:error, {:write_rejected, reason}}
    end
  end

  defp read_inputs(sid, inputs, access) do
    Enum.reduce_while(inputs, {:ok, %{}}, fn input, {:ok, acc} ->
      case SessionStore.get_variable_value(sid, input, @missing, access) do
        @missing ->
          # Missing, or refused for now: only a variable's read says which.
          case patiently(fn -> SessionStore.get_variable(sid, input, access) end) do
            {:ok, %{value: value}} ->
              {:cont, {:ok, Map.put(acc, input, value)}}

            {:error, reason} when reason in [:overloaded, :rate_limited] ->
              {:halt, {:error, {:read_rejected, reason}}}

            _ ->
              {:halt, {:error, {:missing_input, input}}}
          end

        value ->
          {:cont, {:ok, Map.put(acc, input, value)}}
      end
    end)
  end

  # A backend at its admission limit (the port program's pipe, a Raft node;
  # see `DSPex.Bridge.Backend.Port`) refuses a call with `:overloaded`, and
  # nothing happened: the worker tries again after a pause growing to 50 ms,
  # for up to `overload_patience` ms in all (5,000 unless configured), so a
  # moment's overload costs no stale variable. Writes arriving meanwhile
  # coalesce as usual. Past that, see "Refusals" above retry/1.
  # The patience is the pass's, not each call's: once a call has been
  # refused past it, the rest of the pass does not wait again (what is
  # refused now waits for the retry), so a pass over N derived variables
  # holds the worker (and its waiting callers) for one patience, not N.
  # The mark lives in the worker's process dictionary, cleared by
  # propagate/3 at each pass.
  defp patiently(fun) do
    if Process.get(@impatient, false) do
      fun.()
    else
      case patiently(fun, 0, overload_patience()) do
        {:error, :overloaded} = refused ->
          Process.put(@impatient, true)
          refused

        other ->
          other
      end
    end
  end

  # `config :dspex_bridge, DSPex.Bridge.DependencyManager, overload_patience: ms`
  defp overload_patience do
    case Application.get_env(:dspex_bridge, DSPex.Bridge.DependencyManager, [])[
           :overload_patience
         ] do
      ms when is_integer(ms) and ms >= 0 -> ms
      _ -> @overload_patience
    end
  end

  defp patiently(fun, waited, patience) do
    case fun.() do
      {:error, :overloaded} when waited < patience ->
        pause = min(50, 1 + div(waited, 10))
        Process.sleep(pause)
        patiently(fun, waited + pause, patience)

      other ->
        other
    end
  end

  @doc false
  # A failure of propagation (a recomputation, a rejected `propagate_change/5`
  # write, a worker's death): the `:failed` event, then the dead letter.
  # `context` is the `telemetry_span_context` of the pass it happened in,
  # `nil` outside any pass; `start` when the failed work began.
  @spec report(String.t(), term, term, list, integer, reference | nil) :: :ok
  def report(sid, var, reason, causes, start, context \\ nil) do
    now = System.monotonic_time()

    Telemetry.execute(
      [:dspex, :bridge, :propagation, :failed],
      %{duration: now - start, monotonic_time: now},
      failed_metadata(sid, var, reason, causes, context)
    )

    Table.add_letter(sid, %{variable: var, reason: dead_reason(reason), caused_by: causes})
  end

  defp failed_metadata(sid, var, reason, causes, context) do
    {kind, reason, stack} =
      case reason do
        {:raised, kind, reason, stack} -> {kind, reason, stack}
        :timeout -> {:exit, :timeout, []}
        {:worker_exit, _} -> {:exit, reason, []}
        reason -> {:error, reason, []}
      end

    %{
      session_id: sid,
      variable: var,
      kind: kind,
      reason: reason,
      stacktrace: stack,
      caused_by: causes,
      telemetry_span_context: context
    }
  end

  # Exceptions are kept, stack traces are not (they are in the event).
  defp dead_reason({:raised, :error, exception, _stack}), do: exception
  defp dead_reason({:raised, kind, reason, _stack}), do: {kind, reason}
  defp dead_reason(reason), do: reason
end
