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
      {:ok, "ctx_" <> _} = DSPex.Context.session_id(ctx)
      0.7 = DSPex.Variables.get(ctx, :temperature)

  Once bridged, `DSPex.Variables` calls go straight to the session from the
  caller's process; the context process is no longer on the path. When the
  context process stops, its session is deleted unless it was started with
  `keep_session: true`.
  """
  use GenServer

  alias DSPex.Bridge.SessionStore
  alias DSPex.Context.{LocalTypes, Registry}

  @type t :: GenServer.server()

  @doc """
  Starts a context. Options: `id:` (default: generated), `name:` (a
  GenServer name), `keep_session:` (keep the bridged session after the
  context stops; default false), `session_opts:` (passed to
  `SessionStore.create_session/2` when bridging).
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = Keyword.validate!(opts, [:id, :name, :keep_session, :session_opts])
    gen_opts = if opts[:name], do: [name: opts[:name]], else: []
    GenServer.start_link(__MODULE__, opts, gen_opts)
  end

  @doc "The context's id."
  @spec get_id(t) :: String.t()
  def get_id(ctx), do: GenServer.call(ctx, :get_id)

  @doc """
  Moves the context's variables into a new SessionStore session (id
  `"ctx_" <> id`), keeping names, types, constraints, metadata and values.
  Idempotent.
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
    id = opts[:id] || "#{System.unique_integer([:positive, :monotonic])}"

    {:ok,
     %{
       id: id,
       session_id: nil,
       vars: %{},
       order: 0,
       keep_session: opts[:keep_session] == true,
       session_opts: opts[:session_opts] || []
     }}
  end

  @impl true
  def handle_call(:get_id, _from, state), do: {:reply, state.id, state}

  def handle_call(:ensure_bridged, _from, %{session_id: sid} = state) when sid != nil,
    do: {:reply, :ok, state}

  def handle_call(:ensure_bridged, _from, state) do
    sid = "ctx_" <> state.id

    with {:ok, ^sid} <- SessionStore.create_session(sid, state.session_opts),
         :ok <- move_variables(sid, state.vars) do
      Registry.bridge(self(), sid, state.keep_session)
      {:reply, :ok, %{state | session_id: sid, vars: %{}}}
    else
      {:error, _} = error ->
        SessionStore.delete_session(sid)
        {:reply, error, state}
    end
  end

  # A call racing ensure_bridged may arrive after the switch: serve it from
  # the session so it is not lost.
  def handle_call({:local, request}, _from, %{session_id: sid} = state) when sid != nil do
    {:reply, {:bridged, sid, request}, state}
  end

  def handle_call({:local, request}, _from, state) do
    {reply, state} = local_op(request, state)
    {:reply, reply, state}
  end

  defp move_variables(sid, vars) do
    vars
    |> Map.values()
    |> Enum.sort_by(& &1.order)
    |> Enum.reduce_while(:ok, fn var, :ok ->
      opts = [constraints: var.constraints, metadata: var.metadata, description: var.description]

      case SessionStore.register_variable(sid, var.name, var.type, var.value, opts) do
        {:ok, _} -> {:cont, :ok}
        {:error, _} = error -> {:halt, error}
      end
    end)
  end

  defp local_op({:register, name, type, initial, opts}, state) do
    key = key(name)

    cond do
      not (is_atom(name) or is_binary(name)) or name in [nil, true, false, ""] ->
        {{:error, {:invalid_argument, :name_must_be_atom_or_string}}, state}

      Map.has_key?(state.vars, key) ->
        {{:error, :already_exists}, state}

      type not in LocalTypes.types() ->
        {{:error, {:invalid_argument, {:unknown_type, type}}}, state}

      true ->
        constraints = Map.new(opts[:constraints] || %{})

        case LocalTypes.validate(type, constraints, initial) do
          {:ok, value} ->
            id = "var_#{key}_#{state.order + 1}"

            var = %{
              id: id,
              name: name,
              type: type,
              value: value,
              version: 0,
              constraints: constraints,
              metadata: opts[:metadata] || %{},
              description: opts[:description],
              order: state.order + 1
            }

            {{:ok, id}, %{state | vars: Map.put(state.vars, key, var), order: state.order + 1}}

          error ->
            {error, state}
        end
    end
  end

  defp local_op({:get, name}, state) do
    case fetch(state, name) do
      {:ok, var} -> {{:ok, public(var)}, state}
      error -> {error, state}
    end
  end

  defp local_op({:set, name, value, expected}, state) do
    with {:ok, var} <- fetch(state, name),
         :ok <- check_version(var, expected),
         {:ok, value} <- LocalTypes.validate(var.type, var.constraints, value) do
      var = %{var | value: value, version: var.version + 1}
      {:ok, %{state | vars: Map.put(state.vars, key(var.name), var)}}
    else
      error -> {error, state}
    end
  end

  defp local_op({:set_many, updates}, state) do
    Enum.reduce_while(updates, {:ok, state.vars}, fn {name, value}, {:ok, vars} ->
      with {:ok, var} <- fetch(%{state | vars: vars}, name),
           {:ok, value} <- LocalTypes.validate(var.type, var.constraints, value) do
        {:cont,
         {:ok, Map.put(vars, key(var.name), %{var | value: value, version: var.version + 1})}}
      else
        {:error, reason} -> {:halt, {:error, {:validation_failed, %{name => reason}}}}
      end
    end)
    |> case do
      {:ok, vars} -> {:ok, %{state | vars: vars}}
      error -> {error, state}
    end
  end

  defp local_op(:list, state) do
    vars = state.vars |> Map.values() |> Enum.sort_by(&key(&1.name)) |> Enum.map(&public/1)
    {{:ok, vars}, state}
  end

  defp local_op({:delete, name}, state) do
    case fetch(state, name) do
      {:ok, var} -> {:ok, %{state | vars: Map.delete(state.vars, key(var.name))}}
      error -> {error, state}
    end
  end

  defp fetch(state, name) when is_atom(name) or is_binary(name) do
    case Map.fetch(state.vars, key(name)) do
      {:ok, var} ->
        {:ok, var}

      :error ->
        case Enum.find(Map.values(state.vars), &(&1.id == name)) do
          nil -> {:error, :not_found}
          var -> {:ok, var}
        end
    end
  end

  defp fetch(_state, _name), do: {:error, :not_found}

  defp check_version(_var, nil), do: :ok
  defp check_version(%{version: v}, v), do: :ok
  defp check_version(%{version: v}, _), do: {:error, {:version_mismatch, v}}

  defp public(var), do: Map.delete(var, :order)

  defp key(name) when is_atom(name), do: Atom.to_string(name)
  defp key(name), do: name
end
