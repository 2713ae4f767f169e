defmodule DSPex.Context do
  @moduledoc """
  A program's variable context. It starts on a fast, pure-Elixir local state
  and moves into a `DSPex.Bridge.SessionStore` session with
  `ensure_bridged/1`, after which every BridgedState feature (history,
  optimistic locking, dependencies, optimizer locks, access control,
  telemetry) applies to its variables.

      {:ok, ctx} = DSPex.Context.start_link()
      {:ok, _} = DSPex.Variables.defvariable(ctx, :temperature, :float, 0.7)
      :ok = DSPex.Context.ensure_bridged(ctx)
      {:ok, "ctx_" <> _ = sid} = DSPex.Context.session_id(ctx)
      ^sid = DSPex.Context.get_id(ctx)
      0.7 = DSPex.Variables.get(ctx, :temperature)

  Once bridged, `DSPex.Variables` calls go straight to the session from the
  caller's process; the context process is no longer on the path. When the
  context process stops, its session is deleted unless it was started with
  `keep_session: true`.
  """
  use GenServer

  require Logger

  alias DSPex.Bridge.{Options, SessionStore}
  alias DSPex.Bridge.SessionStore.{Args, Batch}
  alias DSPex.Context.{LocalTypes, Registry}

  @type t :: GenServer.server()

  @session_keys [:ttl, :max_history, :metadata, :rate_limit, :audit_size, :backend]

  @doc """
  Starts a context. Options: `id:` (default: generated, `"ctx_" <> n`; a
  non-empty UTF-8 string of at most 255 bytes, which is also the id of the
  session `ensure_bridged/1` creates), `name:` (a GenServer
  name), `keep_session:` (keep the bridged session after the context stops;
  default false), `session_opts:` (passed to
  `SessionStore.create_session/2` when bridging: `ttl:`, `max_history:`,
  `metadata:`, `rate_limit:`, `audit_size:`, `backend:`).

  Bad options return `{:error, {:invalid_argument, detail}}`, `detail` being
  `{:bad_options, opts}` (not a keyword list), `{:unknown_options, keys}`,
  `{:duplicate_options, keys}` or `{key, value}` (a bad value).
  """
  @spec start_link(keyword) :: GenServer.on_start() | {:error, {:invalid_argument, term}}
  def start_link(opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:id, :name, :keep_session, :session_opts]),
         :ok <- check_start_opts(opts) do
      gen_opts = if opts[:name], do: [name: opts[:name]], else: []
      GenServer.start_link(__MODULE__, opts, gen_opts)
    end
  end

  defp check_start_opts(opts) do
    max = LocalTypes.limits().max_name_bytes

    cond do
      not valid_id?(opts[:id], max) ->
        bad_option(opts, :id)

      not valid_name?(opts[:name]) ->
        bad_option(opts, :name)

      opts[:keep_session] not in [nil, true, false] ->
        bad_option(opts, :keep_session)

      not match?({:ok, _}, Options.validate(opts[:session_opts] || [], @session_keys)) ->
        bad_option(opts, :session_opts)

      true ->
        :ok
    end
  end

  defp valid_id?(nil, _max), do: true

  defp valid_id?(id, max),
    do: is_binary(id) and id != "" and String.valid?(id) and byte_size(id) <= max

  defp valid_name?(name) when is_atom(name), do: not is_boolean(name)
  defp valid_name?({:global, _}), do: true
  defp valid_name?({:via, module, _}), do: is_atom(module)
  defp valid_name?(_), do: false

  defp bad_option(opts, key), do: Options.bad(key, opts[key])

  @doc """
  The context's id: the id of its session once bridged (`session_id/1`),
  and the `:id` of its state (`%{id: id} = :sys.get_state(ctx)`).
  """
  @spec get_id(t) :: String.t()
  def get_id(ctx), do: GenServer.call(ctx, :get_id)

  @doc """
  Moves the context's variables into a new SessionStore session whose id is
  the context's (`get_id/1`), keeping names, types, constraints, metadata
  and values.
  Idempotent.

  On failure the context stays local with all its variables and returns
  the error: `{:error, :already_exists}` when a session of that id exists
  already (another context's: it is left alone), or the store's error for
  the session or a variable (the half-filled session this call created is
  deleted).
  """
  @spec ensure_bridged(t) :: :ok | {:error, term}
  def ensure_bridged(ctx), do: GenServer.call(ctx, :ensure_bridged)

  @doc "`{:ok, session_id}` once bridged, else `{:error, :not_bridged}`."
  @spec session_id(t) :: {:ok, String.t()} | {:error, :not_bridged}
  def session_id(ctx) do
    case Registry.lookup(ctx) do
      {:bridged, sid} -> {:ok, sid}
      {:local, _pid} -> {:error, :not_bridged}
    end
  end

  @doc "Whether the context has been bridged."
  @spec bridged?(t) :: boolean
  def bridged?(ctx), do: match?({:ok, _}, session_id(ctx))

  @doc "Stops the context."
  @spec stop(t) :: :ok
  def stop(ctx), do: GenServer.stop(ctx)

  @doc false
  # Local-mode operations used by DSPex.Variables.
  def local(ctx, request), do: GenServer.call(ctx, {:local, request})

  ## Server

  @impl true
  def init(opts) do
    id = opts[:id] || "ctx_#{System.unique_integer([:positive, :monotonic])}"

    {:ok,
     %{
       id: id,
       session_id: nil,
       vars: %{},
       order: 0,
       limits: LocalTypes.limits(),
       keep_session: opts[:keep_session] == true,
       session_opts: opts[:session_opts] || []
     }}
  end

  @impl true
  def handle_call(:get_id, _from, state), do: {:reply, state.id, state}

  def handle_call(:ensure_bridged, _from, %{session_id: sid} = state) when sid != nil,
    do: {:reply, :ok, state}

  def handle_call(:ensure_bridged, _from, state) do
    sid = state.id

    case bridge(sid, state) do
      :ok -> {:reply, :ok, %{state | session_id: sid, vars: %{}}}
      {:error, _} = error -> {:reply, error, state}
    end
  end

  # A call racing ensure_bridged may arrive after the switch: serve it from
  # the session so it is not lost.
  def handle_call({:local, request}, _from, %{session_id: sid} = state) when sid != nil do
    {:reply, {:bridged, sid, request}, state}
  end

  # local_op/2 is pure (it returns the new state), so when it raises on an
  # input nobody foresaw the state is untouched: answer an error and keep
  # every variable rather than die with them.
  def handle_call({:local, request}, _from, state) do
    {reply, state} =
      try do
        local_op(request, state)
      rescue
        e ->
          Logger.error("DSPex.Context: #{Exception.format(:error, e, __STACKTRACE__)}")
          {{:error, {:internal_error, e.__struct__}}, state}
      end

    {:reply, reply, state}
  end

  def handle_call(_request, _from, state),
    do: {:reply, {:error, {:invalid_argument, :unknown_request}}, state}

  @impl true
  def handle_cast(_request, state), do: {:noreply, state}

  @impl true
  def handle_info(_message, state), do: {:noreply, state}

  ## Bridging

  # Creates the session, fills it, then switches the callers over. A session
  # that exists already is not ours and is left alone; one we created and
  # could not fill is deleted, and the local state stays as it was.
  defp bridge(sid, state) do
    case safely(fn -> SessionStore.create_session(sid, state.session_opts) end) do
      {:ok, ^sid} ->
        with :ok <- move_variables(sid, state.vars),
             :ok <- safely(fn -> Registry.bridge(self(), sid, state.keep_session) end) do
          :ok
        else
          error ->
            safely(fn -> SessionStore.delete_session(sid) end)
            error
        end

      {:error, _} = error ->
        error
    end
  end

  defp move_variables(sid, vars) do
    vars
    |> Map.values()
    |> Enum.sort_by(& &1.order)
    |> Enum.reduce_while(:ok, fn var, :ok ->
      opts = [constraints: var.constraints, metadata: var.metadata, description: var.description]

      case safely(fn ->
             SessionStore.register_variable(sid, var.name, var.type, var.value, opts)
           end) do
        {:ok, _} -> {:cont, :ok}
        {:error, _} = error -> {:halt, error}
      end
    end)
  end

  # The store and the registry answer errors as values; an exception or an
  # exit from them (a bug, a registry that is down) must not take the
  # context's variables with it.
  defp safely(fun) do
    fun.()
  rescue
    e -> {:error, {:internal_error, e.__struct__}}
  catch
    :exit, reason -> {:error, {:internal_error, {:exit, reason}}}
  end

  ## Local state: the store's rules and answers (see LocalTypes)

  defp local_op({:register, name, type, initial, opts}, state) when is_list(opts) do
    budget = state.limits.max_value_bytes
    constraints = opts[:constraints] || %{}
    metadata = opts[:metadata] || %{}
    description = opts[:description]
    fields = %{constraints: constraints, metadata: metadata, description: description}

    with :ok <- check_type(type),
         {:ok, key} <- LocalTypes.name_key(name, state.limits.max_name_bytes),
         :ok <- LocalTypes.decode(initial, budget),
         :ok <- LocalTypes.decode(fields, budget),
         :ok <- check_description(description),
         :ok <- check_metadata(metadata),
         :ok <- LocalTypes.check_name_length(key),
         :ok <- LocalTypes.check_depth(initial),
         :ok <- LocalTypes.check_depth(metadata),
         :ok <- check_count(state),
         {:ok, compiled} <- LocalTypes.compile(type, constraints) do
      # As the store, a registration that gets this far takes a number,
      # even when its value or name is then refused.
      order = state.order + 1

      case register(state, key, order, name, type, initial, compiled, opts) do
        {:ok, id, var} ->
          {{:ok, id}, %{state | vars: Map.put(state.vars, key, var), order: order}}

        error ->
          {error, %{state | order: order}}
      end
    else
      error -> {error, state}
    end
  end

  defp local_op({:get, ident}, state) do
    with {:ok, text} <- LocalTypes.ident(ident),
         {:ok, var} <- fetch(state.vars, text) do
      {{:ok, public(var)}, state}
    else
      error -> {error, state}
    end
  end

  defp local_op({:set, ident, value, opts}, state) when is_list(opts) do
    budget = state.limits.max_value_bytes
    # As SessionStore.update_variable/5: expected_version may come in the
    # metadata (atom or string key) or in the options.
    {expected, metadata} = Args.expected_version(Keyword.get(opts, :metadata, %{}), opts)

    with {:ok, metadata} <- LocalTypes.metadata(metadata, budget),
         {:ok, expected} <- LocalTypes.expected_version(expected),
         :ok <- LocalTypes.decode(value, budget),
         {:ok, text} <- LocalTypes.ident(ident),
         :ok <- LocalTypes.check_depth(value),
         :ok <- LocalTypes.check_depth(metadata),
         {:ok, var} <- fetch(state.vars, text),
         :ok <- check_version(var, expected),
         {:ok, value} <- LocalTypes.validate(var.type, var.compiled, value) do
      {:ok, put_var(state, write(var, value, metadata))}
    else
      error -> {error, state}
    end
  end

  defp local_op({:set_many, updates, opts}, state) when is_list(opts) do
    with {:ok, updates} <- Batch.normalize_updates(updates, opts[:metadata] || %{}),
         {:ok, decoded} <- decode_updates(updates, state.limits.max_value_bytes) do
      case check_updates(decoded, state.vars) do
        {:ok, writes} ->
          vars =
            Enum.reduce(writes, state.vars, fn {var, value, metadata}, vars ->
              var = write(var, value, metadata)
              Map.put(vars, var_key(var), var)
            end)

          {:ok, %{state | vars: vars}}

        {:error, {:validation_failed, errors}} ->
          {{:error, {:validation_failed, restore_keys(errors, updates)}}, state}

        error ->
          {error, state}
      end
    else
      error -> {error, state}
    end
  end

  defp local_op(:list, state) do
    vars = state.vars |> Map.values() |> Enum.sort_by(&var_key/1) |> Enum.map(&public/1)
    {{:ok, vars}, state}
  end

  defp local_op({:delete, ident}, state) do
    with {:ok, text} <- LocalTypes.ident(ident),
         {:ok, var} <- fetch(state.vars, text) do
      {:ok, %{state | vars: Map.delete(state.vars, var_key(var))}}
    else
      error -> {error, state}
    end
  end

  defp local_op(_request, state), do: {{:error, {:invalid_argument, :unknown_request}}, state}

  defp register(state, key, order, name, type, initial, compiled, opts) do
    with {:ok, value} <- LocalTypes.validate(type, compiled, initial),
         :ok <- check_new(state, key) do
      id = "var_#{key}_#{order}"
      now = DateTime.utc_now()

      var = %{
        id: id,
        name: name,
        type: type,
        value: value,
        version: 0,
        constraints: opts[:constraints] || %{},
        compiled: compiled,
        metadata: opts[:metadata] || %{},
        description: opts[:description],
        access_rules: [],
        created_at: now,
        updated_at: now,
        last_write: %{},
        order: order
      }

      {:ok, id, var}
    end
  end

  defp check_type(type) do
    if type in LocalTypes.types(),
      do: :ok,
      else: {:error, {:invalid_argument, {:unknown_type, type}}}
  end

  defp check_description(nil), do: :ok

  defp check_description(d) do
    if is_binary(d) and String.valid?(d),
      do: :ok,
      else: {:error, {:invalid_argument, :description_must_be_a_string}}
  end

  defp check_metadata(m) when is_map(m), do: :ok
  defp check_metadata(_m), do: {:error, {:invalid_argument, :metadata_must_be_a_map}}

  defp check_count(state) do
    max = state.limits.max_variables
    if map_size(state.vars) >= max, do: {:error, {:too_large, max}}, else: :ok
  end

  defp check_new(state, key) do
    if Map.has_key?(state.vars, key), do: {:error, :already_exists}, else: :ok
  end

  # The NIF decodes the whole batch first; any undecodable part fails it.
  defp decode_updates(updates, budget) do
    Enum.reduce_while(updates, {:ok, []}, fn {ident, value, meta, expected}, {:ok, acc} ->
      with {:ok, text} <- LocalTypes.ident(ident),
           :ok <- LocalTypes.decode(value, budget),
           {:ok, meta} <- LocalTypes.metadata(meta, budget),
           {:ok, expected} <- LocalTypes.expected_version(expected) do
        {:cont, {:ok, [{text, value, meta, expected} | acc]}}
      else
        error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  # The store's atomic batch: every variable found, none twice, then every
  # write checked; all errors are reported together.
  defp check_updates(updates, vars) do
    found =
      Enum.map(updates, fn {text, value, meta, _} = update ->
        with :ok <- LocalTypes.check_depth(value),
             :ok <- LocalTypes.check_depth(meta),
             {:ok, var} <- fetch(vars, text) do
          {:ok, var, update}
        else
          {:error, reason} -> {:error, text, reason}
        end
      end)

    missing = for {:error, text, reason} <- found, do: {text, reason}
    found = for {:ok, var, update} <- found, do: {var, update}

    cond do
      missing != [] ->
        {:error, {:validation_failed, Map.new(missing)}}

      length(Enum.uniq_by(found, fn {var, _} -> var.id end)) != length(found) ->
        {:error, {:invalid_argument, :duplicate_variable_in_batch}}

      true ->
        checked =
          Enum.map(found, fn {var, {text, value, meta, expected}} ->
            with :ok <- check_version(var, expected),
                 {:ok, value} <- LocalTypes.validate(var.type, var.compiled, value) do
              {:ok, {var, value, meta}}
            else
              {:error, reason} -> {:error, text, reason}
            end
          end)

        case for({:error, text, reason} <- checked, do: {text, reason}) do
          [] -> {:ok, for({:ok, write} <- checked, do: write)}
          errors -> {:error, {:validation_failed, Map.new(errors)}}
        end
    end
  end

  # The store reports failed idents as text; give back the caller's form,
  # mapped as SessionStore.update_variables/3 maps them (by to_string/1).
  defp restore_keys(errors, updates) do
    by_text = Map.new(updates, fn {ident, _, _, _} -> {to_string(ident), ident} end)
    Map.new(errors, fn {text, reason} -> {Map.get(by_text, text, text), reason} end)
  end

  defp fetch(vars, text) do
    case Map.fetch(vars, text) do
      {:ok, var} ->
        {:ok, var}

      :error ->
        case Enum.find(Map.values(vars), &(&1.id == text)) do
          nil -> {:error, :not_found}
          var -> {:ok, var}
        end
    end
  end

  defp check_version(_var, nil), do: :ok
  defp check_version(%{version: v}, v), do: :ok
  defp check_version(%{version: v}, _), do: {:error, {:version_mismatch, v}}

  defp write(var, value, metadata) do
    %{
      var
      | value: value,
        version: var.version + 1,
        updated_at: DateTime.utc_now(),
        last_write: metadata
    }
  end

  defp put_var(state, var), do: %{state | vars: Map.put(state.vars, var_key(var), var)}

  defp var_key(%{name: name}) when is_atom(name), do: Atom.to_string(name)
  defp var_key(%{name: name}), do: name

  defp public(var), do: Map.drop(var, [:order, :compiled])
end
