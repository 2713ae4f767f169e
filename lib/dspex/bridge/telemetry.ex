defmodule DSPex.Bridge.Telemetry do
  @moduledoc """
  Telemetry for dspex_bridge: the dispatcher that emits every event of the
  catalogue (`DSPex.Bridge.Telemetry.Catalogue`).

  Events go through `:telemetry` when the host application has it, so
  `:telemetry.attach/4`, `telemetry_metrics` and friends see them. Without
  `:telemetry`, a compatible built-in dispatcher is used: `attach/4`,
  `attach_many/4`, `detach/1`, `execute/3` and `span/3` here behave as their
  `:telemetry` namesakes (a handler that raises is logged once and
  detached, by a process of its own, moments later; it never breaks nor
  holds up the caller).

  Which one dispatches is decided when dspex_bridge starts: it starts
  `:telemetry` first when the application is present (whatever the boot
  order of a release), then uses it. The choice is checked again on every
  `attach/4` and `attach_many/4` while the built-in dispatcher is in use,
  and by `refresh/0`: when `:telemetry` has started since, the built-in
  dispatcher's handlers move to it.

      DSPex.Bridge.Telemetry.attach(
        "log-writes",
        [:dspex, :bridge, :variable, :write],
        fn _event, %{duration_us: us}, meta, _config ->
          IO.puts("\#{meta.variable} written in \#{us} us")
        end,
        nil
      )

  ## Events

  The catalogue of events is `DSPex.Bridge.Telemetry.Catalogue` (its data:
  `DSPex.Bridge.Telemetry.Catalogue.events/0`), repeated here:

  #{DSPex.Bridge.Telemetry.Catalogue.markdown()}
  ## Glossary

  - *principal*: the session on whose behalf a call is made (`principal:`
    option); the session itself when not given (reported as `nil`).
  - *fencing token*: the number every lock grant carries; larger than any
    granted before, so a write carrying an older one is known to be stale.
  - *lease*: how long a lock grant lasts unless renewed (`renew_lock/3`, or
    any progress report of its holder).
  - *hot path*: `get_variable_value/3`, `update_variable/5` and the lock
    cycle. They measure time only when a handler is attached to their event,
    and ask with `observed?/1`: one lookup of a boolean.
  """

  require Logger

  @type event :: [atom, ...]
  @type handler :: (event, map, map, term -> any)

  @handlers_key {__MODULE__, :handlers}
  # The process detaching a failed handler (see `failed/3`).
  @detacher DSPex.Bridge.Telemetry.Detacher
  # What `enabled?/1` reads: `:all` when `:telemetry` dispatches, else a map
  # of the events that have a handler. One lookup under a literal key.
  @enabled_key DSPex.Bridge.Telemetry.Enabled
  @trace_key :dspex_bridge_traceparent
  # Events whose emitters sit on hot paths: each has a boolean of its own
  # (see `observed?/1`).
  @hot_events [
    [:dspex, :bridge, :variable, :read],
    [:dspex, :bridge, :variable, :write],
    [:dspex, :optimization, :lock_acquired],
    [:dspex, :optimization, :lock_released],
    [:dspex, :optimization, :started],
    [:dspex, :optimization, :completed],
    [:dspex, :optimization, :failed]
  ]

  @doc """
  Emits `event`. Measurements and metadata are maps.

      iex> DSPex.Bridge.Telemetry.execute([:my, :event], %{count: 1}, %{})
      :ok
  """
  @spec execute(event, map, map) :: :ok
  def execute(event, measurements, metadata) do
    metadata = with_trace_context(metadata)

    if telemetry?() do
      apply(:telemetry, :execute, [event, measurements, metadata])
    else
      event |> handlers() |> Enum.each(&invoke(&1, event, measurements, metadata))
    end

    :ok
  end

  @doc """
  Sets the W3C `traceparent` of the calling process: every event it emits
  from now on carries it as `traceparent` in its metadata (the gRPC gateway
  sets the one a call carries). `nil` clears it.
  """
  @spec put_trace_context(String.t() | nil) :: :ok
  def put_trace_context(nil),
    do:
      (
        Process.delete(@trace_key)
        :ok
      )

  def put_trace_context(tp) when is_binary(tp),
    do:
      (
        Process.put(@trace_key, tp)
        :ok
      )

  defp with_trace_context(metadata) do
    case Process.get(@trace_key) do
      nil -> metadata
      tp when is_map(metadata) -> Map.put_new(metadata, :traceparent, tp)
      _ -> metadata
    end
  end

  @doc """
  True when emitting `event` can reach a handler. Hot paths call this before
  measuring time, so an unobserved read costs no clock reads. Always true when
  `:telemetry` is loaded (its handler table is its own).
  """
  @spec enabled?(event) :: boolean
  def enabled?(event) do
    case :persistent_term.get(@enabled_key, nil) do
      nil -> enabled_in(publish_enabled(), event)
      enabled -> enabled_in(enabled, event)
    end
  end

  defp enabled_in(:all, _event), do: true
  defp enabled_in(enabled, event), do: is_map_key(enabled, event)

  @doc """
  `enabled?/1` for the events of hot paths, resolved at compile time to one
  `:persistent_term` lookup of a boolean under an atom key: what a read or
  a write pays when nothing observes it. `event` must be a literal (or a
  module attribute) naming one of the hot events:
  #{Enum.map_join(@hot_events, ", ", &"`#{inspect(&1)}`")}.

      require DSPex.Bridge.Telemetry
      DSPex.Bridge.Telemetry.observed?([:dspex, :bridge, :variable, :read])
  """
  defmacro observed?(event) do
    event = Macro.expand(event, __CALLER__)

    unless event in @hot_events do
      raise ArgumentError,
            "observed?/1 takes one of the hot events #{inspect(@hot_events)}, got: " <>
              Macro.to_string(event)
    end

    quote do: :persistent_term.get(unquote(hot_key(event)), false)
  end

  @doc """
  Decides again which dispatcher emits: `:telemetry` while its application
  runs, else the built-in one. Handlers of the built-in dispatcher move to
  `:telemetry` when it takes over (a `:telemetry` that stops takes its
  handlers with it). The application calls it at start; call it after
  starting `:telemetry` yourself later on.

      iex> DSPex.Bridge.Telemetry.refresh()
      :ok
  """
  @spec refresh() :: :ok
  def refresh do
    was = :persistent_term.get({__MODULE__, :telemetry?}, nil)
    if check_telemetry() and was != true, do: move_handlers_to_telemetry()
    publish_enabled()
    :ok
  end

  # The built-in table's handlers, attached to `:telemetry` under the same ids.
  defp move_handlers_to_telemetry do
    update_handlers(fn table ->
      table
      |> Enum.flat_map(fn {event, hs} ->
        for {id, fun, config} <- hs, do: {id, fun, config, event}
      end)
      |> Enum.group_by(fn {id, fun, config, _} -> {id, fun, config} end, &elem(&1, 3))
      |> Enum.each(fn {{id, fun, config}, events} ->
        apply(:telemetry, :attach_many, [id, events, fun, config])
      end)

      {:ok, %{}}
    end)
  end

  @doc "Attaches `fun` to one event. Same contract as `:telemetry.attach/4`."
  @spec attach(term, event, handler, term) :: :ok | {:error, :already_exists}
  def attach(id, event, fun, config), do: attach_many(id, [event], fun, config)

  @doc "Attaches `fun` to several events. Same contract as `:telemetry.attach_many/4`."
  @spec attach_many(term, [event], handler, term) :: :ok | {:error, :already_exists}
  def attach_many(id, events, fun, config) when is_function(fun, 4) and is_list(events) do
    # Attaching is rare: while the built-in dispatcher is in use, ask again
    # whether `:telemetry` has started since.
    if telemetry?() or (refresh() == :ok and telemetry?()) do
      apply(:telemetry, :attach_many, [id, events, fun, config])
    else
      update_handlers(fn table ->
        if Enum.any?(table, fn {_event, hs} -> List.keymember?(hs, id, 0) end) do
          {{:error, :already_exists}, table}
        else
          table =
            Enum.reduce(events, table, fn event, acc ->
              Map.update(acc, event, [{id, fun, config}], &(&1 ++ [{id, fun, config}]))
            end)

          {:ok, table}
        end
      end)
    end
  end

  @doc "Detaches a handler. Same contract as `:telemetry.detach/1`."
  @spec detach(term) :: :ok | {:error, :not_found}
  def detach(id) do
    if telemetry?() do
      apply(:telemetry, :detach, [id])
    else
      update_handlers(&remove_handler(&1, id))
    end
  end

  defp remove_handler(table, id) do
    if Enum.any?(table, fn {_event, hs} -> List.keymember?(hs, id, 0) end) do
      table =
        table
        |> Enum.map(fn {event, hs} -> {event, List.keydelete(hs, id, 0)} end)
        |> Enum.reject(fn {_event, hs} -> hs == [] end)
        |> Map.new()

      {:ok, table}
    else
      {{:error, :not_found}, table}
    end
  end

  @doc """
  Runs `fun` inside `prefix ++ [:start]` / `[:stop]` / `[:exception]` events,
  as `:telemetry.span/3` does. `fun` returns `{result, stop_metadata}` or
  `{result, extra_measurements, stop_metadata}` (merged into the `:stop`
  measurements); `span/3` returns `result`.

  - `:start`: `%{system_time, monotonic_time}`, `start_metadata`;
  - `:stop`: `%{duration, monotonic_time}` (plus the extra measurements),
    `stop_metadata`;
  - `:exception` (when `fun` raises, exits or throws, which is then
    re-raised with its stack trace): `%{duration, monotonic_time}`,
    `start_metadata` with `kind`, `reason` and `stacktrace`.

  All three carry the same `telemetry_span_context` (a reference) in their
  metadata, unless `start_metadata` gives one. `duration` is in native time
  units.

      iex> DSPex.Bridge.Telemetry.span([:my, :work], %{}, fn -> {42, %{}} end)
      42
      iex> DSPex.Bridge.Telemetry.span([:my, :work], %{}, fn -> {42, %{items: 3}, %{}} end)
      42
  """
  @spec span(event, map, (() -> {term, map} | {term, map, map})) :: term
  def span(prefix, start_metadata, fun) do
    start = System.monotonic_time()
    context = Map.get_lazy(start_metadata, :telemetry_span_context, &make_ref/0)
    start_metadata = Map.put(start_metadata, :telemetry_span_context, context)

    execute(
      prefix ++ [:start],
      %{system_time: System.system_time(), monotonic_time: start},
      start_metadata
    )

    try do
      {result, extra, stop_metadata} =
        case fun.() do
          {result, stop_metadata} -> {result, %{}, stop_metadata}
          {_result, _extra, _stop_metadata} = three -> three
        end

      stop = System.monotonic_time()

      execute(
        prefix ++ [:stop],
        Map.merge(extra, %{duration: stop - start, monotonic_time: stop}),
        Map.put(stop_metadata, :telemetry_span_context, context)
      )

      result
    catch
      kind, reason ->
        stop = System.monotonic_time()

        execute(
          prefix ++ [:exception],
          %{duration: stop - start, monotonic_time: stop},
          Map.merge(start_metadata, %{kind: kind, reason: reason, stacktrace: __STACKTRACE__})
        )

        :erlang.raise(kind, reason, __STACKTRACE__)
    end
  end

  @doc """
  Microseconds elapsed since `start` (a `System.monotonic_time/0` reading),
  as a float: NIF reads take well under a microsecond, and a whole number
  would round them to zero.
  """
  @spec since_us(integer) :: float
  def since_us(start) do
    System.convert_time_unit(System.monotonic_time() - start, :native, :nanosecond) / 1000
  end

  @doc "Handlers of the built-in dispatcher attached to `event`: `[{id, fun, config}]`."
  @spec handlers(event) :: [{term, handler, term}]
  def handlers(event) do
    # One persistent_term per event: a lookup is one hash of the key, not a
    # scan of every attached event's list (which grew with Analytics'
    # twenty-odd events and showed in the read path's profile).
    :persistent_term.get({__MODULE__, :handlers, event}, [])
  end

  defp telemetry? do
    case :persistent_term.get({__MODULE__, :telemetry?}, nil) do
      nil -> check_telemetry()
      answer -> answer
    end
  end

  # Whether `:telemetry` dispatches: its application runs (its handler table
  # exists only then) and it has the API. Cached; see refresh/0.
  defp check_telemetry do
    answer =
      List.keymember?(Application.started_applications(), :telemetry, 0) and
        Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)

    if :persistent_term.get({__MODULE__, :telemetry?}, nil) != answer,
      do: :persistent_term.put({__MODULE__, :telemetry?}, answer)

    answer
  end

  defp invoke({id, fun, config}, event, measurements, metadata) do
    fun.(event, measurements, metadata, config)
  rescue
    e -> failed(id, event, Exception.message(e))
  catch
    kind, reason -> failed(id, event, inspect({kind, reason}))
  end

  # A failed handler is detached by a process of its own, not by the
  # caller that only emitted an event: any write of a persistent term (the
  # handler table is in them) holds the writing process until every
  # process has been scanned, which took up to seconds under load. One
  # detacher at a time: it registers a name (atomic, and no persistent
  # term written), then logs and detaches the handler if it is still
  # attached. Callers failing in it meanwhile find the name taken, or the
  # handler gone; a handler failing while another is being detached is
  # detached on one of its next failures.
  defp failed(id, event, why) do
    if Process.whereis(@detacher) == nil, do: spawn(fn -> detach_failed(id, event, why) end)
    :ok
  end

  defp detach_failed(id, event, why) do
    Process.register(self(), @detacher)

    if List.keymember?(handlers(event), id, 0) do
      Logger.error(
        "DSPex.Bridge.Telemetry handler #{inspect(id)} failed on #{inspect(event)} and was detached: " <>
          why
      )

      detach(id)
    end
  rescue
    # Another detacher runs.
    ArgumentError -> :ok
  end

  # Attach and detach are rare; :global.trans serialises them without a process.
  # Mirrors the changed events of the table into their per-event terms.
  defp publish_enabled do
    enabled =
      if telemetry?() do
        :all
      else
        for {event, [_ | _]} <- :persistent_term.get(@handlers_key, %{}),
            into: %{},
            do: {event, true}
      end

    if :persistent_term.get(@enabled_key, nil) != enabled,
      do: :persistent_term.put(@enabled_key, enabled)

    # Booleans are immediates: putting one costs no global collection.
    for event <- @hot_events do
      flag = enabled_in(enabled, event)
      key = hot_key(event)
      if :persistent_term.get(key, nil) != flag, do: :persistent_term.put(key, flag)
    end

    enabled
  end

  defp hot_key(event), do: :"#{__MODULE__}.Hot.#{Enum.join(event, ".")}"

  defp publish(old_table, new_table) do
    for event <- Enum.uniq(Map.keys(old_table) ++ Map.keys(new_table)),
        Map.get(old_table, event) != Map.get(new_table, event) do
      case Map.get(new_table, event, []) do
        [] -> :persistent_term.erase({__MODULE__, :handlers, event})
        hs -> :persistent_term.put({__MODULE__, :handlers, event}, hs)
      end
    end
  end

  defp update_handlers(fun) do
    # The lock id is {resource, requester}: the requester must be this
    # process, or every caller shares one lock holder and nothing is serialised.
    :global.trans(
      {{__MODULE__, :handlers}, self()},
      fn ->
        table = :persistent_term.get(@handlers_key, %{})
        {reply, new_table} = fun.(table)

        if new_table != table do
          :persistent_term.put(@handlers_key, new_table)
          publish(table, new_table)
          publish_enabled()
        end

        reply
      end,
      [node()]
    )
  end
end
