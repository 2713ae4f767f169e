defmodule DSPex.Bridge.DependencyManager.Propagator do
  @moduledoc """
  The propagation worker of one session: holds the session's derived
  variables (their compute functions) and recomputes them after writes.
  Started on demand by `DSPex.Bridge.DependencyManager`; stopped when the
  session goes.

  A pass takes every change waiting in the mailbox (so a burst coalesces),
  asks the engine for the update order of the changed variables (the
  maintained topological order, no graph walk here), and walks it once. A
  derived variable is recomputed when at least one of its inputs is dirty
  (written in this batch, or recomputed earlier in this pass); it then
  becomes dirty itself. As the order is topological, every derived variable
  is recomputed at most once per pass, after all of its inputs.

  Writers find the worker through `:persistent_term` (`whereis/1`), so a
  write to a session without derived variables does one lookup and nothing
  else; until the VM starts its first worker, a write looks up only a
  boolean. The worker's own writes do not notify it: their effects are already
  part of the pass that made them.
  """
  use GenServer, restart: :temporary

  require Logger

  alias DSPex.Bridge.{DependencyManager, SessionStore, Telemetry}

  @registry DSPex.Bridge.DependencyManager.Registry
  @supervisor DSPex.Bridge.DependencyManager.Supervisor
  @max_dead_letters 100
  # Writes named in a derived write's metadata, at most.
  @max_causes 16
  # Changes taken into one pass, at most, so a flood cannot starve calls.
  @max_batch 10_000
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
            {:error, {:already_started, pid}} -> {:ok, pid}
            other -> other
          end
        end
    end
  end

  def ensure(_session_id), do: {:error, :session_not_found}

  @doc false
  # Called by SessionStore after every accepted write.
  @spec notify_write(String.t(), term, pos_integer) :: :ok
  def notify_write(session_id, ident, version) do
    with true <- :persistent_term.get(@any_key, false),
         pid when is_pid(pid) and pid != self() <- whereis(session_id) do
      send(pid, {:changed, ident, version})
    end

    :ok
  end

  @doc false
  # Called by SessionStore when a variable is deleted.
  @spec notify_delete(String.t(), term) :: :ok
  def notify_delete(session_id, ident) do
    case whereis(session_id) do
      nil -> :ok
      pid -> send(pid, {:deleted, ident})
    end

    :ok
  end

  @doc false
  # Called by SessionStore when a session is deleted or expires.
  @spec session_closed(String.t()) :: :ok
  def session_closed(session_id) do
    case whereis(session_id) do
      nil -> :ok
      pid -> GenServer.cast(pid, :stop)
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
    :persistent_term.put({__MODULE__, session_id}, self())
    :persistent_term.get(@any_key, false) || :persistent_term.put(@any_key, true)

    {:ok,
     %{
       session_id: session_id,
       derived: %{},
       dead_letters: :queue.new(),
       dead_count: 0,
       next_letter: 1
     }}
  end

  @impl true
  def handle_call({:define, name, type, inputs, fun, opts}, _from, state) do
    case define(state, name, type, inputs, fun, opts) do
      {:ok, id, state} -> {:reply, {:ok, id}, state}
      {:error, _} = error -> {:reply, error, state}
    end
  end

  def handle_call({:status, name}, _from, state) do
    reply =
      case find(state, name) do
        nil -> {:error, :not_found}
        d -> {:ok, Map.take(d, [:status, :inputs, :error, :computed_at])}
      end

    {:reply, reply, state}
  end

  def handle_call(:dead_letters, _from, state),
    do: {:reply, {:ok, :queue.to_list(state.dead_letters)}, state}

  # Recomputes the variables of the dead letters; letters that are not
  # recomputations (a rejected `propagate_change/4` write) stay.
  def handle_call(:replay, _from, state) do
    derived? = &Map.has_key?(state.derived, to_string(&1.variable))
    {replayable, kept} = state.dead_letters |> :queue.to_list() |> Enum.split_with(derived?)
    keys = replayable |> Enum.map(&to_string(&1.variable)) |> Enum.uniq()
    state = %{state | dead_letters: :queue.from_list(kept), dead_count: length(kept)}

    roots = Enum.map(keys, fn key -> {state.derived[key].name, [%{replay: true}]} end)
    state = propagate(state, roots, MapSet.new(keys))

    failed =
      state.dead_letters
      |> :queue.to_list()
      |> Enum.map(&to_string(&1.variable))
      |> Enum.filter(&(&1 in keys))
      |> Enum.uniq()
      |> length()

    {:reply, {:ok, %{replayed: length(keys) - failed, failed: failed}}, state}
  end

  def handle_call(:sync, _from, state), do: {:reply, :ok, state}

  @impl true
  def handle_cast({:set, var, value, metadata}, state) do
    start = System.monotonic_time()

    case SessionStore.update_variable(state.session_id, var, value, metadata) do
      :ok ->
        version =
          case SessionStore.get_variable(state.session_id, var) do
            {:ok, %{version: v}} -> v
            _ -> nil
          end

        {:noreply, run(state, [{var, version}])}

      {:error, reason} ->
        cause = [%{variable: var, propagate_change: true}]
        {:noreply, report(state, var, {:write_rejected, reason}, cause, start)}
    end
  end

  def handle_cast(:stop, state), do: {:stop, :normal, state}

  @impl true
  def handle_info({:changed, ident, version}, state) do
    {:noreply, run(state, drain([{ident, version}], 1))}
  end

  def handle_info({:deleted, ident}, state) do
    case find(state, ident) do
      nil -> {:noreply, state}
      d -> {:noreply, %{state | derived: Map.delete(state.derived, d.key)}}
    end
  end

  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    key = {__MODULE__, state.session_id}
    if :persistent_term.get(key, nil) == self(), do: :persistent_term.erase(key)
    :ok
  end

  ## Passes

  defp drain(acc, n) when n >= @max_batch, do: Enum.reverse(acc)

  defp drain(acc, n) do
    receive do
      {:changed, ident, version} -> drain([{ident, version} | acc], n + 1)
    after
      0 -> Enum.reverse(acc)
    end
  end

  # `changes` are `{ident, version}` writes; a variable written several
  # times counts once, with its latest version.
  defp run(state, changes) when state.derived == %{} do
    _ = changes
    state
  end

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
  # input is dirty (a replay).
  # A pass: the update order of the changed variables, walked once. Writes
  # that reach no derived variable end here, without events.
  defp propagate(state, roots, forced) do
    start = System.monotonic_time()
    changed = Enum.map(roots, &elem(&1, 0))
    sid = state.session_id

    case update_order(sid, changed) do
      {:ok, order} ->
        if Enum.any?(order, &Map.has_key?(state.derived, to_string(&1))),
          do: walk(state, roots, order, forced, start),
          else: state

      {:error, :session_not_found} ->
        GenServer.cast(self(), :stop)
        state
    end
  end

  defp walk(state, roots, order, forced, start) do
    sid = state.session_id
    changed = Enum.map(roots, &elem(&1, 0))

    Telemetry.execute(
      [:dspex, :bridge, :propagation, :start],
      %{system_time: System.system_time(), monotonic_time: start},
      %{session_id: sid, changed: changed}
    )

    dirty = root_keys(sid, roots, order)

    {state, _dirty, counts} =
      Enum.reduce(order, {state, dirty, %{recomputed: 0, failed: 0}}, &step(&2, &1, forced))

    stop = System.monotonic_time()

    Telemetry.execute(
      [:dspex, :bridge, :propagation, :stop],
      Map.merge(counts, %{duration: stop - start, monotonic_time: stop}),
      %{session_id: sid, changed: changed}
    )

    state
  end

  # The engine's order for the changed variables that still exist.
  defp update_order(sid, changed) do
    case DSPex.Bridge.Backend.Router.graph_update_order(sid, changed, nil) do
      {:ok, order} ->
        {:ok, order}

      {:error, {:not_found, gone}} ->
        update_order(sid, Enum.reject(changed, &(&1 == gone)))

      {:error, :session_not_found} = error ->
        error

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

  defp step({state, dirty, counts} = acc, name, forced) do
    key = to_string(name)

    with %{} = d <- Map.get(state.derived, key),
         [_ | _] = causes <- causes(d, key, dirty, forced) do
      case recompute(state, d, causes) do
        {:ok, state} ->
          dirty = Map.update(dirty, key, causes, &Enum.uniq(&1 ++ causes))
          {state, dirty, %{counts | recomputed: counts.recomputed + 1}}

        {:error, state} ->
          {state, dirty, %{counts | failed: counts.failed + 1}}

        {:gone, state} ->
          {state, dirty, counts}
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

  defp recompute(state, d, causes) do
    sid = state.session_id
    start = System.monotonic_time()

    result =
      with {:ok, values} <- read_inputs(sid, d.inputs),
           {:ok, value} <- compute(d.fun, values) do
        meta = %{derived: true, caused_by: causes}

        case SessionStore.update_variable(sid, d.name, value, meta) do
          :ok -> :ok
          {:error, :not_found} -> :gone
          {:error, reason} -> {:error, {:write_rejected, reason}}
        end
      end

    case result do
      :ok ->
        d = %{d | status: :fresh, error: nil, computed_at: DateTime.utc_now()}
        {:ok, put_in(state.derived[d.key], d)}

      # Deleted under us (the delete notice is on its way): forget it.
      :gone ->
        {:gone, %{state | derived: Map.delete(state.derived, d.key)}}

      {:error, reason} ->
        state = put_in(state.derived[d.key], %{d | status: :stale, error: dead_reason(reason)})
        {:error, report(state, d.name, reason, causes, start)}
    end
  end

  # A failed recomputation or write: the event, then the dead letter.
  defp report(state, var, reason, causes, start) do
    now = System.monotonic_time()

    Telemetry.execute(
      [:dspex, :bridge, :propagation, :exception],
      %{duration: now - start, monotonic_time: now},
      exception_metadata(state.session_id, var, reason, causes)
    )

    fail(state, var, reason, causes)
  end

  defp exception_metadata(sid, var, {:raised, kind, reason, stack}, causes),
    do: %{
      session_id: sid,
      variable: var,
      kind: kind,
      reason: reason,
      stacktrace: stack,
      caused_by: causes
    }

  defp exception_metadata(sid, var, reason, causes),
    do: %{
      session_id: sid,
      variable: var,
      kind: :error,
      reason: reason,
      stacktrace: [],
      caused_by: causes
    }

  # Records a failure in the bounded dead letters.
  defp fail(state, var, reason, causes) do
    letter = %{
      id: state.next_letter,
      variable: var,
      reason: dead_reason(reason),
      caused_by: causes,
      at: DateTime.utc_now()
    }

    {letters, count} =
      if state.dead_count >= @max_dead_letters,
        do: {:queue.drop(state.dead_letters), state.dead_count},
        else: {state.dead_letters, state.dead_count + 1}

    %{
      state
      | dead_letters: :queue.in(letter, letters),
        dead_count: count,
        next_letter: state.next_letter + 1
    }
  end

  # Exceptions are kept, stack traces are not (they are in the event).
  defp dead_reason({:raised, :error, exception, _stack}), do: exception
  defp dead_reason({:raised, kind, reason, _stack}), do: {kind, reason}
  defp dead_reason(reason), do: reason

  defp read_inputs(sid, inputs) do
    Enum.reduce_while(inputs, {:ok, %{}}, fn input, {:ok, acc} ->
      case SessionStore.get_variable_value(sid, input, @missing) do
        @missing -> {:halt, {:error, {:missing_input, input}}}
        value -> {:cont, {:ok, Map.put(acc, input, value)}}
      end
    end)
  end

  defp compute(fun, values) do
    {:ok, fun.(values)}
  catch
    kind, reason ->
      {:error, {:raised, kind, Exception.normalize(kind, reason, __STACKTRACE__), __STACKTRACE__}}
  end

  ## Definitions

  defp define(state, name, type, inputs, fun, opts) do
    sid = state.session_id
    inputs = Enum.uniq_by(inputs, &to_string/1)

    with :ok <- check_inputs(inputs),
         {:ok, values} <- read_inputs(sid, inputs) |> missing_as_not_found(),
         {:ok, value} <- compute(fun, values) |> failed_as_compute_failed(),
         {:ok, id} <- register(sid, name, type, inputs, value, opts),
         :ok <- add_edges(sid, inputs, name) do
      d = %{
        key: to_string(name),
        id: id,
        name: name,
        inputs: inputs,
        input_keys: Enum.map(inputs, &to_string/1),
        fun: fun,
        status: :fresh,
        error: nil,
        computed_at: DateTime.utc_now()
      }

      {:ok, id, put_in(state.derived[d.key], d)}
    end
  end

  defp check_inputs(inputs) do
    case Enum.find(
           inputs,
           &(not (is_binary(&1) or (is_atom(&1) and &1 not in [nil, true, false])))
         ) do
      nil -> :ok
      bad -> {:error, {:invalid_argument, {:input, bad}}}
    end
  end

  defp missing_as_not_found({:error, {:missing_input, input}}), do: {:error, {:not_found, input}}
  defp missing_as_not_found(ok), do: ok

  defp failed_as_compute_failed({:error, {:raised, :error, exception, _}}),
    do: {:error, {:compute_failed, exception}}

  defp failed_as_compute_failed({:error, {:raised, kind, reason, _}}),
    do: {:error, {:compute_failed, {kind, reason}}}

  defp failed_as_compute_failed(ok), do: ok

  defp register(sid, name, type, inputs, value, opts) do
    metadata = Map.put(opts[:metadata] || %{}, :derived_from, inputs)
    opts = Keyword.put(opts, :metadata, metadata)
    SessionStore.register_variable(sid, name, type, value, opts)
  end

  # All edges or none: a failure removes the variable again.
  defp add_edges(sid, inputs, name) do
    Enum.reduce_while(inputs, :ok, fn input, :ok ->
      case DependencyManager.add_dependency(sid, input, name, :derived) do
        :ok -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
    |> case do
      :ok ->
        :ok

      error ->
        SessionStore.delete_variable(sid, name)
        error
    end
  end

  defp find(state, ident) do
    case Map.get(state.derived, to_string(ident)) do
      nil -> Enum.find_value(state.derived, fn {_k, d} -> if d.id == ident, do: d end)
      d -> d
    end
  end
end
