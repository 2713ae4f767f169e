defmodule DSPex.Variables do
  @moduledoc """
  Variables of a `DSPex.Context`, local or bridged alike.

      {:ok, ctx} = DSPex.Context.start_link()
      {:ok, _} = DSPex.Variables.defvariable(ctx, :temperature, :float, 0.7,
                   constraints: %{min: 0.0, max: 2.0})
      :ok = DSPex.Variables.set(ctx, :temperature, 0.9)
      0.9 = DSPex.Variables.get(ctx, :temperature)
      :ok = DSPex.Variables.update(ctx, :temperature, &(&1 / 2))
      {:error, {:constraint_violation, {:above_max, 2.0}}} =
        DSPex.Variables.set(ctx, :temperature, 3.0)

  Every function has a `!` variant that returns the bare value and raises a
  `DSPex.Bridge.Error` exception instead of returning `{:error, reason}`.
  On a bridged context calls go straight to its session.

  ## Arguments

  Options are keyword lists with the keys each function lists. A bad
  argument is an `{:error, reason}` answer, the same on a local context as
  on a bridged one (the local state applies the store's rules and answers
  with its error terms); it never raises and never stops the context. Option
  errors are `{:error, {:invalid_argument, detail}}` with `detail` one of
  `{:bad_options, opts}` (not a keyword list), `{:unknown_options, keys}`,
  `{:duplicate_options, keys}` and `{key, value}` (a bad value), as for
  every option list of the library. (`ctx` itself must
  be a context: calling a dead one exits, as with any GenServer.)

  Some options are session features a local state cannot reproduce: the
  store's access control (`principal:`, `context:`, `access_rules:`), its
  optimizer locks (`lock_token:`, `optimizer_id:`) and the `pattern`
  constraint (the engine's regex dialect). A call on a local context that
  uses one (with a non-nil value) bridges the context first, as
  `defderived/6` does, so it gets the session's answer.
  """

  alias DSPex.Bridge.{Error, Options, SessionStore}
  alias DSPex.Context
  alias DSPex.Context.LocalTypes

  @type ctx :: DSPex.Context.t()
  @type name :: atom | String.t()

  @session_features [:principal, :context, :access_rules, :lock_token, :optimizer_id]
  @register_opts [:constraints, :metadata, :description, :access_rules, :principal, :context]
  @write_opts [:metadata, :principal, :context, :lock_token, :optimizer_id]
  @derived_opts [:constraints, :description, :metadata]

  @doc """
  Defines a variable. Options: `constraints:`, `metadata:`, `description:`,
  and the session's `access_rules:`, `principal:`, `context:`.
  """
  @spec defvariable(ctx, name, atom, term, keyword) :: {:ok, String.t()} | {:error, term}
  def defvariable(ctx, name, type, initial, opts \\ []) do
    with {:ok, _} <- Options.validate(opts, @register_opts) do
      needs_session = needs_session?(opts) or has_pattern?(opts[:constraints])

      on(ctx, {:register, name, type, initial, opts}, needs_session, fn sid ->
        SessionStore.register_variable(sid, name, type, initial, opts)
      end)
    end
  end

  @doc "As `defvariable/5`; returns the id or raises."
  @spec defvariable!(ctx, name, atom, term, keyword) :: String.t()
  def defvariable!(ctx, name, type, initial, opts \\ []),
    do: bang(defvariable(ctx, name, type, initial, opts), name)

  @doc """
  Defines `name`, a variable computed by `compute_fun` from `inputs` and
  recomputed whenever one of them changes (see
  `DSPex.Bridge.DependencyManager.defderived/6`). Dependencies live in the
  session, so this bridges a local context first. Options: `constraints:`,
  `description:`, `metadata:`.

      {:ok, _} = DSPex.Variables.defderived(ctx, :budget, :integer, [:max_tokens],
                   fn %{max_tokens: n} -> n * 4 end)
  """
  @spec defderived(ctx, name, atom, [name, ...], (map -> term), keyword) ::
          {:ok, String.t()} | {:error, term}
  def defderived(ctx, name, type, inputs, compute_fun, opts \\ []) do
    with {:ok, _} <- Options.validate(opts, @derived_opts),
         :ok <- Context.ensure_bridged(ctx),
         {:ok, sid} <- Context.session_id(ctx) do
      DSPex.Bridge.DependencyManager.defderived(sid, name, type, inputs, compute_fun, opts)
    end
  end

  @doc "As `defderived/6`; returns the id or raises."
  @spec defderived!(ctx, name, atom, [name, ...], (map -> term), keyword) :: String.t()
  def defderived!(ctx, name, type, inputs, compute_fun, opts \\ []),
    do: bang(defderived(ctx, name, type, inputs, compute_fun, opts), name)

  @doc "The value of `name`, or `default` when it cannot be read (no such variable, a bad name)."
  @spec get(ctx, name, term) :: term
  def get(ctx, name, default \\ nil) do
    case fetch(ctx, name) do
      {:ok, value} -> value
      {:error, _} -> default
    end
  end

  @doc "The value of `name`; raises `DSPex.Bridge.Error.VariableNotFound` when absent."
  @spec get!(ctx, name) :: term
  def get!(ctx, name), do: bang(fetch(ctx, name), name)

  @doc "`{:ok, value}` or `{:error, reason}`."
  @spec fetch(ctx, name) :: {:ok, term} | {:error, term}
  def fetch(ctx, name) do
    on(ctx, {:get, name}, false, fn sid ->
      with {:ok, var} <- SessionStore.get_variable(sid, name), do: {:ok, var.value}
    end)
    |> case do
      {:ok, %{value: value}} -> {:ok, value}
      other -> other
    end
  end

  @doc """
  Sets `name` to `value`. Options: `metadata:` (a map, kept with the
  version), `expected_version:` (also accepted in the metadata), and the
  session's `principal:`, `context:`, `lock_token:`, `optimizer_id:`.
  """
  @spec set(ctx, name, term, keyword) :: :ok | {:error, term}
  def set(ctx, name, value, opts \\ []) do
    with {:ok, _} <- Options.validate(opts, [:expected_version | @write_opts]) do
      on(ctx, {:set, name, value, opts}, needs_session?(opts), fn sid ->
        {metadata, store_opts} = Keyword.pop(opts, :metadata, %{})
        SessionStore.update_variable(sid, name, value, metadata, store_opts)
      end)
    end
  end

  @doc "As `set/4`; raises on error."
  @spec set!(ctx, name, term, keyword) :: :ok
  def set!(ctx, name, value, opts \\ []), do: bang(set(ctx, name, value, opts), name)

  @doc """
  Applies `fun` to the current value and writes the result. The write is
  conditional on the version read, and retried (up to `retries:`, a
  non-negative integer, default 10) when another writer got in between, so
  no update is lost. Other options as in `set/4` (but `expected_version:`).
  `fun` runs in the caller's process; what it raises is the caller's.
  """
  @spec update(ctx, name, (term -> term), keyword) :: :ok | {:error, term}
  def update(ctx, name, fun, opts \\ []) do
    with {:ok, _} <- Options.validate(opts, [:retries | @write_opts]),
         :ok <- check_fun(fun),
         {:ok, retries} <- retries(opts) do
      do_update(ctx, name, fun, Keyword.delete(opts, :retries), retries)
    end
  end

  defp check_fun(fun) when is_function(fun, 1), do: :ok
  defp check_fun(_fun), do: {:error, {:invalid_argument, :fun_must_take_one_argument}}

  defp retries(opts) do
    case Keyword.get(opts, :retries, 10) do
      n when is_integer(n) and n >= 0 -> {:ok, n}
      bad -> Options.bad(:retries, bad)
    end
  end

  defp do_update(ctx, name, fun, opts, retries) do
    read_opts = Keyword.take(opts, [:principal, :context])

    with {:ok, var} <- variable(ctx, name, read_opts) do
      case set(ctx, name, fun.(var.value), Keyword.put(opts, :expected_version, var.version)) do
        {:error, {:version_mismatch, _}} when retries > 0 ->
          do_update(ctx, name, fun, opts, retries - 1)

        other ->
          other
      end
    end
  end

  @doc "As `update/4`; raises on error."
  @spec update!(ctx, name, (term -> term), keyword) :: :ok
  def update!(ctx, name, fun, opts \\ []), do: bang(update(ctx, name, fun, opts), name)

  @doc """
  Values of the names that exist: `%{name => value}` (bad names count as
  missing). `{:error, {:invalid_argument, :names_must_be_a_list}}` when
  `names` is not a list; the store's error when the session cannot answer.
  """
  @spec get_many(ctx, [name]) :: %{name => term} | {:error, term}
  def get_many(ctx, names) do
    if LocalTypes.proper_list?(names),
      do: values(ctx, names, Context.session_id(ctx)),
      else: {:error, {:invalid_argument, :names_must_be_a_list}}
  end

  defp values(_ctx, names, {:ok, sid}) do
    case SessionStore.get_variables(sid, names) do
      {:ok, %{found: found}} -> Map.new(found, fn {name, var} -> {name, var.value} end)
      {:error, _} = error -> error
    end
  end

  defp values(ctx, names, {:error, :not_bridged}) do
    for name <- names, {:ok, value} <- [fetch(ctx, name)], into: %{}, do: {name, value}
  end

  @doc """
  Sets several variables at once, all or nothing:
  `{:error, {:validation_failed, %{name => reason}}}` changes nothing.
  `updates` is a map or a list of `{name, value}` / `{name, value,
  metadata}`. Options: `metadata:` (for every write), and the session's
  `principal:`, `context:`, `lock_token:`, `optimizer_id:`.
  """
  @spec update_many(ctx, map | [{name, term}], keyword) :: :ok | {:error, term}
  def update_many(ctx, updates, opts \\ []) do
    with {:ok, _} <- Options.validate(opts, @write_opts),
         :ok <- check_updates(updates),
         :ok <- check_metadata(opts[:metadata]) do
      on(ctx, {:set_many, updates, opts}, needs_session?(opts), fn sid ->
        SessionStore.update_variables(sid, updates, Keyword.put(opts, :atomic, true))
      end)
    end
  end

  defp check_updates(updates) do
    if is_map(updates) or LocalTypes.proper_list?(updates),
      do: :ok,
      else: {:error, {:invalid_argument, {:bad_updates, updates}}}
  end

  defp check_metadata(metadata) when is_nil(metadata) or is_map(metadata), do: :ok
  defp check_metadata(_metadata), do: {:error, {:invalid_argument, :metadata_must_be_a_map}}

  @doc "As `update_many/3`; raises on error."
  @spec update_many!(ctx, map | [{name, term}], keyword) :: :ok
  def update_many!(ctx, updates, opts \\ []), do: bang(update_many(ctx, updates, opts), nil)

  @doc """
  Every variable as a map (`name type value version ...`), sorted by name;
  the store's error when the session cannot answer.
  """
  @spec list(ctx) :: [map] | {:error, term}
  def list(ctx) do
    case on(ctx, :list, false, &SessionStore.list_variables/1) do
      {:ok, vars} -> vars
      {:error, _} = error -> error
    end
  end

  @doc "Whether `name` exists."
  @spec exists?(ctx, name) :: boolean
  def exists?(ctx, name), do: match?({:ok, _}, variable(ctx, name, []))

  @doc "Deletes `name`."
  @spec delete(ctx, name) :: :ok | {:error, term}
  def delete(ctx, name) do
    on(ctx, {:delete, name}, false, fn sid -> SessionStore.delete_variable(sid, name) end)
  end

  @doc "As `delete/2`; raises on error."
  @spec delete!(ctx, name) :: :ok
  def delete!(ctx, name), do: bang(delete(ctx, name), name)

  defp variable(ctx, name, read_opts) do
    on(ctx, {:get, name}, needs_session?(read_opts), fn sid ->
      SessionStore.get_variable(sid, name, read_opts)
    end)
  end

  defp needs_session?(opts), do: Enum.any?(@session_features, &(opts[&1] != nil))

  defp has_pattern?(constraints) when is_map(constraints),
    do: Enum.any?(Map.keys(constraints), &(&1 in [:pattern, "pattern"]))

  defp has_pattern?(_constraints), do: false

  # Local contexts answer through their process; bridged ones are served
  # from the session directly (also when a call raced the bridging). A call
  # that needs a session feature bridges a local context first.
  defp on(ctx, request, needs_session, bridged) do
    case Context.Registry.lookup(ctx) do
      {:bridged, sid} ->
        bridged.(sid)

      {:local, pid} when needs_session ->
        with :ok <- Context.ensure_bridged(pid),
             {:ok, sid} <- Context.session_id(pid),
             do: bridged.(sid)

      {:local, pid} ->
        case Context.local(pid, request) do
          {:bridged, sid, _request} -> bridged.(sid)
          reply -> reply
        end
    end
  end

  defp bang(:ok, _name), do: :ok
  defp bang({:ok, value}, _name), do: value

  defp bang({:error, reason}, name),
    do: raise(Error.exception_for(reason, if(name, do: %{variable: name}, else: %{})))
end
