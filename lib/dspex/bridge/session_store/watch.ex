defmodule DSPex.Bridge.SessionStore.Watch do
  @moduledoc """
  Watching variables: `DSPex.Bridge.SessionStore.watch_variables/3` and
  `unwatch/1` (delegated here).

      {:ok, ref} = SessionStore.watch_variables(sid, [:temperature], include_initial_values: true)
      receive do
        {:dspex_variable_update, ^ref, %{variable: :temperature, version: v, value: x}} -> {v, x}
      end

  Each watch is a process of its own (under this module's supervisor) that
  stands between the writers and the watcher:

  - Writers only tell it that a variable changed (a telemetry handler on the
    store's write, rollback and delete events, attached while at least one
    watch exists, so a store nobody watches pays nothing). It reads the
    variable when it delivers, so what the watcher gets is the latest value,
    and versions only go up: updates arrive in version order per variable.
  - It delivers while the watcher's mailbox holds fewer than `max_queue`
    messages (default 100). A slower watcher is coalesced: changes that
    arrive meanwhile are merged into one update per variable, with its latest
    value. The watcher's mailbox never grows without bound.
  - Messages to the watcher:
    `{:dspex_variable_update, ref, %{variable, id, version, value, update_type, metadata}}`
    with `update_type` `:initial_value` (with `include_initial_values: true`),
    `:value_change` or `:deleted` (value `nil`); and a last
    `{:dspex_watch_ended, ref, reason}` when the session is deleted or expires
    (`:session_deleted`, `:session_expired`) or every watched variable was
    deleted (`:variables_deleted`). The watch ends with the watcher too.

  The `:observe` permission is checked for the principal on every variable
  when the watch starts (audited and rate limited as every check); values are
  then read on the watcher's behalf by the store itself.
  """
  use Supervisor

  alias DSPex.Bridge.{AccessControl, Options, SessionStore, Telemetry}

  @table :dspex_bridge_watchers
  @handler "dspex_bridge-watch"
  @events [
    [:dspex, :bridge, :variable, :write],
    [:dspex, :bridge, :variable, :rollback],
    [:dspex, :bridge, :variable, :deleted],
    [:dspex, :bridge, :session, :deleted],
    [:dspex, :bridge, :session, :expired]
  ]
  @default_max_queue 100
  @retry_ms 5

  @doc false
  def start_link(opts \\ []), do: Supervisor.start_link(__MODULE__, opts, name: __MODULE__)

  @impl Supervisor
  def init(_opts) do
    children = [
      __MODULE__.Registry,
      {DynamicSupervisor, name: __MODULE__.Supervisor, strategy: :one_for_one}
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end

  @doc """
  Starts watching `idents` of `session_id` for the calling process. Options:
  `principal:`, `context:`, `include_initial_values:` (default `false`),
  `max_queue:` (a positive integer, default 100). Errors: those of the
  `:observe` check and of the lookup of each variable (`:session_not_found`,
  `:not_found`, `:access_denied`, `:rate_limited`), `{:invalid_argument, _}`
  for an empty or non-list `idents` or bad options, `:not_running` when
  dspex_bridge is not started.
  """
  @spec watch_variables(String.t(), [atom | String.t()], keyword) ::
          {:ok, reference} | {:error, term}
  def watch_variables(session_id, idents, opts \\ [])

  def watch_variables(session_id, [_ | _] = idents, opts) do
    with {:ok, opts} <-
           Options.validate(opts, [:principal, :context, :include_initial_values, :max_queue]),
         :ok <- check_max_queue(opts[:max_queue]),
         {:ok, vars} <- resolve(session_id, idents, Keyword.take(opts, [:principal, :context])) do
      ref = make_ref()

      spec = %{
        id: ref,
        restart: :temporary,
        start:
          {GenServer, :start_link,
           [
             __MODULE__.Server,
             %{
               ref: ref,
               session_id: session_id,
               consumer: self(),
               vars: vars,
               initial: opts[:include_initial_values] == true,
               max_queue: opts[:max_queue] || @default_max_queue
             }
           ]}
      }

      case start_child(spec) do
        {:ok, _pid} -> {:ok, ref}
        {:error, _} = error -> error
      end
    end
  end

  def watch_variables(_session_id, idents, _opts),
    do: {:error, {:invalid_argument, {:idents, idents}}}

  defp start_child(spec) do
    DynamicSupervisor.start_child(__MODULE__.Supervisor, spec)
  catch
    :exit, _ -> {:error, :not_running}
  end

  defp check_max_queue(nil), do: :ok
  defp check_max_queue(n) when is_integer(n) and n > 0, do: :ok
  defp check_max_queue(n), do: {:error, {:invalid_argument, {:max_queue, n}}}

  # Every ident checked for :observe, then looked up (as the session) for its
  # id and registered name.
  defp resolve(session_id, idents, auth_opts) do
    Enum.reduce_while(idents, {:ok, %{}}, fn ident, {:ok, acc} ->
      with :ok <- AccessControl.authorize(session_id, ident, :observe, auth_opts),
           {:ok, var} <- SessionStore.get_variable(session_id, ident) do
        {:cont, {:ok, Map.put(acc, var.id, %{name: var.name, version: -1})}}
      else
        {:error, _} = error -> {:halt, error}
      end
    end)
  end

  @doc """
  Ends a watch. Once it returns, no more messages of the watch are sent
  (some may already be in the mailbox). `:ok` for an unknown or ended watch.
  """
  @spec unwatch(reference) :: :ok
  def unwatch(ref) when is_reference(ref) do
    case lookup(ref) do
      nil ->
        :ok

      pid ->
        try do
          GenServer.call(pid, :unwatch)
        catch
          :exit, _ -> :ok
        end
    end
  end

  def unwatch(_ref), do: :ok

  defp lookup(ref) do
    case :ets.lookup(@table, {:ref, ref}) do
      [{_, pid}] -> pid
      [] -> nil
    end
  rescue
    ArgumentError -> nil
  end

  @doc false
  # The telemetry handler: runs in the writer's process, costs one ETS
  # lookup for a session nobody watches.
  def handle_event(event, measurements, %{session_id: sid} = meta, _config) do
    case :ets.lookup(@table, sid) do
      [] -> :ok
      rows -> notify(rows, message(event, measurements, meta))
    end
  rescue
    ArgumentError -> :ok
  end

  def handle_event(_event, _measurements, _meta, _config), do: :ok

  defp notify(rows, message), do: Enum.each(rows, fn {_, pid} -> send(pid, message) end)

  defp message([_, _, :variable, :deleted], _m, meta), do: {:dspex_watch_deleted, meta.variable}

  defp message([_, _, :variable, _], m, meta),
    do: {:dspex_watch_written, meta.variable, m.version, Map.get(meta, :metadata, %{})}

  defp message([_, _, :session, :deleted], _m, _meta),
    do: {:dspex_watch_session, :session_deleted}

  defp message([_, _, :session, :expired], _m, _meta),
    do: {:dspex_watch_session, :session_expired}

  defmodule Registry do
    @moduledoc false
    # Owns the table of watches (`{session_id, pid}` and `{{:ref, ref}, pid}`
    # rows) and the telemetry handler, attached while a watch exists.
    use GenServer

    alias DSPex.Bridge.SessionStore.Watch

    @table :dspex_bridge_watchers
    @handler "dspex_bridge-watch"

    def start_link(_), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

    def register(session_id, ref), do: GenServer.call(__MODULE__, {:register, session_id, ref})

    @impl true
    def init([]) do
      :ets.new(@table, [:named_table, :public, :bag, read_concurrency: true])
      {:ok, %{watches: %{}}}
    end

    @impl true
    def handle_call({:register, sid, ref}, {pid, _}, state) do
      if map_size(state.watches) == 0, do: attach()
      :ets.insert(@table, [{sid, pid}, {{:ref, ref}, pid}])
      mon = Process.monitor(pid)
      {:reply, :ok, %{state | watches: Map.put(state.watches, mon, {sid, ref, pid})}}
    end

    @impl true
    def handle_info({:DOWN, mon, :process, _, _}, state) do
      case Map.pop(state.watches, mon) do
        {nil, _} ->
          {:noreply, state}

        {{sid, ref, pid}, watches} ->
          :ets.delete_object(@table, {sid, pid})
          :ets.delete(@table, {:ref, ref})
          if map_size(watches) == 0, do: Telemetry.detach(@handler)
          {:noreply, %{state | watches: watches}}
      end
    end

    def handle_info(_other, state), do: {:noreply, state}

    @impl true
    def terminate(_reason, _state), do: Telemetry.detach(@handler)

    defp attach do
      Telemetry.detach(@handler)
      :ok = Telemetry.attach_many(@handler, Watch.events(), &Watch.handle_event/4, nil)
    end
  end

  @doc false
  def events, do: @events

  @doc false
  def handler_id, do: @handler

  @doc false
  def retry_ms, do: @retry_ms

  defmodule Server do
    @moduledoc false
    # One watch: pending changes in, coalesced updates out, at the pace of
    # the watcher's mailbox.
    use GenServer

    alias DSPex.Bridge.SessionStore
    alias DSPex.Bridge.SessionStore.Watch

    @impl true
    def init(args) do
      :ok = Watch.Registry.register(args.session_id, args.ref)
      mon = Process.monitor(args.consumer)
      keys = keys(args.vars)

      pending =
        if args.initial,
          do: Map.new(args.vars, fn {id, _} -> {id, {:initial_value, %{}}} end),
          else: %{}

      state =
        Map.merge(args, %{mon: mon, keys: keys, pending: pending, timer: nil})
        |> deliver()

      {:ok, state}
    end

    # A write may name the variable by id, name (atom or string).
    defp keys(vars) do
      Enum.reduce(vars, %{}, fn {id, %{name: name}}, acc ->
        acc |> Map.put(id, id) |> Map.put(to_string(name), id)
      end)
    end

    @impl true
    def handle_call(:unwatch, _from, state), do: {:stop, :normal, :ok, state}

    @impl true
    def handle_info({:dspex_watch_written, ident, version, metadata}, state) do
      with {:ok, id} <- Map.fetch(state.keys, to_string(ident)),
           %{version: seen} when version > seen <- state.vars[id] do
        {:noreply,
         deliver(%{state | pending: Map.put(state.pending, id, {:value_change, metadata})})}
      else
        _ -> {:noreply, state}
      end
    end

    def handle_info({:dspex_watch_deleted, ident}, state) do
      case Map.fetch(state.keys, to_string(ident)) do
        {:ok, id} -> {:noreply, deliver(%{state | pending: Map.put(state.pending, id, :deleted)})}
        :error -> {:noreply, state}
      end
    end

    def handle_info({:dspex_watch_session, reason}, state) do
      send(state.consumer, {:dspex_watch_ended, state.ref, reason})
      {:stop, :normal, state}
    end

    def handle_info(:retry, state), do: {:noreply, deliver(%{state | timer: nil})}
    def handle_info(:dspex_watch_stop, state), do: {:stop, :normal, state}

    def handle_info({:DOWN, mon, :process, _, _}, %{mon: mon} = state),
      do: {:stop, :normal, state}

    def handle_info(_other, state), do: {:noreply, state}

    defp deliver(%{pending: pending} = state) when map_size(pending) == 0, do: state

    defp deliver(state) do
      room =
        case Process.info(state.consumer, :message_queue_len) do
          {:message_queue_len, n} -> state.max_queue - n
          nil -> 0
        end

      {sent, state} =
        state.pending
        |> Enum.sort()
        |> Enum.take(max(room, 0))
        |> Enum.reduce({0, state}, fn {id, what}, {n, st} ->
          {n + 1, deliver_one(st, id, what)}
        end)

      if sent == 0 or map_size(state.pending) > 0, do: schedule(state), else: state
    end

    defp schedule(%{timer: nil, pending: p} = state) when map_size(p) > 0,
      do: %{state | timer: Process.send_after(self(), :retry, Watch.retry_ms())}

    defp schedule(state), do: state

    defp deliver_one(state, id, :deleted) do
      %{name: name} = state.vars[id]
      fields = %{variable: name, id: id, version: nil, value: nil, type: nil, updated_at: nil}
      update(state, fields, :deleted, %{})
      vars = Map.delete(state.vars, id)
      state = %{state | vars: vars, pending: Map.delete(state.pending, id)}

      if map_size(vars) == 0 do
        send(state.consumer, {:dspex_watch_ended, state.ref, :variables_deleted})
        send(self(), :dspex_watch_stop)
      end

      state
    end

    defp deliver_one(state, id, {type, metadata}) do
      case SessionStore.get_variable(state.session_id, id) do
        {:ok, var} ->
          if var.version > state.vars[id].version or type == :initial_value do
            fields = %{
              variable: var.name,
              id: id,
              version: var.version,
              value: var.value,
              type: var.type,
              updated_at: var.updated_at
            }

            update(state, fields, type, metadata)

            put_in(state.vars[id].version, var.version)
            |> Map.update!(:pending, &Map.delete(&1, id))
          else
            Map.update!(state, :pending, &Map.delete(&1, id))
          end

        {:error, :not_found} ->
          deliver_one(state, id, :deleted)

        # Rate limited, or the port backend restarting: try again later.
        {:error, _} ->
          state
      end
    end

    defp update(state, fields, type, metadata) do
      send(
        state.consumer,
        {:dspex_variable_update, state.ref,
         Map.merge(fields, %{update_type: type, metadata: metadata})}
      )
    end
  end
end
