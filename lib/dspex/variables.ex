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
  On a bridged context calls go straight to its session; `opts` then also
  accept the `DSPex.Bridge.SessionStore` options (`principal:`, ...).
  """

  alias DSPex.Bridge.{Error, SessionStore}
  alias DSPex.Context

  @type ctx :: DSPex.Context.t()
  @type name :: atom | String.t()

  @doc """
  Defines a variable. Options: `constraints:`, `metadata:`, `description:`.
  """
  @spec defvariable(ctx, name, atom, term, keyword) :: {:ok, String.t()} | {:error, term}
  def defvariable(ctx, name, type, initial, opts \\ []) do
    on(ctx, {:register, name, type, initial, opts}, fn sid ->
      SessionStore.register_variable(sid, name, type, initial, opts)
    end)
  end

  @doc "As `defvariable/5`; returns the id or raises."
  @spec defvariable!(ctx, name, atom, term, keyword) :: String.t()
  def defvariable!(ctx, name, type, initial, opts \\ []),
    do: bang(defvariable(ctx, name, type, initial, opts), name)

  @doc """
  Defines `name`, a variable computed by `compute_fun` from `inputs` and
  recomputed whenever one of them changes (see
  `DSPex.Bridge.DependencyManager.defderived/6`). Dependencies live in the
  session, so this bridges a local context first.

      {:ok, _} = DSPex.Variables.defderived(ctx, :budget, :integer, [:max_tokens],
                   fn %{max_tokens: n} -> n * 4 end)
  """
  @spec defderived(ctx, name, atom, [name, ...], (map -> term), keyword) ::
          {:ok, String.t()} | {:error, term}
  def defderived(ctx, name, type, inputs, compute_fun, opts \\ []) do
    with :ok <- Context.ensure_bridged(ctx),
         {:ok, sid} <- Context.session_id(ctx) do
      DSPex.Bridge.DependencyManager.defderived(sid, name, type, inputs, compute_fun, opts)
    end
  end

  @doc "As `defderived/6`; returns the id or raises."
  @spec defderived!(ctx, name, atom, [name, ...], (map -> term), keyword) :: String.t()
  def defderived!(ctx, name, type, inputs, compute_fun, opts \\ []),
    do: bang(defderived(ctx, name, type, inputs, compute_fun, opts), name)

  @doc "The value of `name`, or `default` when there is no such variable."
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
    on(ctx, {:get, name}, fn sid ->
      with {:ok, var} <- SessionStore.get_variable(sid, name), do: {:ok, var.value}
    end)
    |> case do
      {:ok, %{value: value}} -> {:ok, value}
      other -> other
    end
  end

  @doc """
  Sets `name` to `value`. Options: `metadata:` (kept in history once
  bridged), `expected_version:`.
  """
  @spec set(ctx, name, term, keyword) :: :ok | {:error, term}
  def set(ctx, name, value, opts \\ []) do
    on(ctx, {:set, name, value, opts[:expected_version]}, fn sid ->
      {metadata, store_opts} = Keyword.pop(opts, :metadata, %{})
      SessionStore.update_variable(sid, name, value, metadata, store_opts)
    end)
  end

  @doc "As `set/4`; raises on error."
  @spec set!(ctx, name, term, keyword) :: :ok
  def set!(ctx, name, value, opts \\ []), do: bang(set(ctx, name, value, opts), name)

  @doc """
  Applies `fun` to the current value and writes the result. The write is
  conditional on the version read, and retried (up to `retries:`, default
  10) when another writer got in between, so no update is lost.
  """
  @spec update(ctx, name, (term -> term), keyword) :: :ok | {:error, term}
  def update(ctx, name, fun, opts \\ []) when is_function(fun, 1) do
    {retries, opts} = Keyword.pop(opts, :retries, 10)
    do_update(ctx, name, fun, opts, retries)
  end

  defp do_update(ctx, name, fun, opts, retries) do
    with {:ok, var} <- variable(ctx, name) do
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

  @doc "Values of the names that exist: `%{name => value}`."
  @spec get_many(ctx, [name]) :: %{name => term}
  def get_many(ctx, names) when is_list(names) do
    case Context.session_id(ctx) do
      {:ok, sid} ->
        {:ok, %{found: found}} = SessionStore.get_variables(sid, names)
        Map.new(found, fn {name, var} -> {name, var.value} end)

      {:error, :not_bridged} ->
        for name <- names, {:ok, value} <- [fetch(ctx, name)], into: %{}, do: {name, value}
    end
  end

  @doc """
  Sets several variables at once, all or nothing:
  `{:error, {:validation_failed, %{name => reason}}}` changes nothing.
  """
  @spec update_many(ctx, map | [{name, term}], keyword) :: :ok | {:error, term}
  def update_many(ctx, updates, opts \\ []) do
    on(ctx, {:set_many, Enum.to_list(updates)}, fn sid ->
      SessionStore.update_variables(sid, updates, Keyword.put(opts, :atomic, true))
    end)
  end

  @doc "As `update_many/3`; raises on error."
  @spec update_many!(ctx, map | [{name, term}], keyword) :: :ok
  def update_many!(ctx, updates, opts \\ []), do: bang(update_many(ctx, updates, opts), nil)

  @doc "Every variable as a map (`name type value version ...`), sorted by name."
  @spec list(ctx) :: [map]
  def list(ctx) do
    {:ok, vars} = on(ctx, :list, &SessionStore.list_variables/1)
    vars
  end

  @doc "Whether `name` exists."
  @spec exists?(ctx, name) :: boolean
  def exists?(ctx, name), do: match?({:ok, _}, variable(ctx, name))

  @doc "Deletes `name`."
  @spec delete(ctx, name) :: :ok | {:error, term}
  def delete(ctx, name) do
    on(ctx, {:delete, name}, fn sid -> SessionStore.delete_variable(sid, name) end)
  end

  @doc "As `delete/2`; raises on error."
  @spec delete!(ctx, name) :: :ok
  def delete!(ctx, name), do: bang(delete(ctx, name), name)

  defp variable(ctx, name) do
    on(ctx, {:get, name}, fn sid -> SessionStore.get_variable(sid, name) end)
  end

  # Local contexts answer through their process; bridged ones are served
  # from the session directly (also when a call raced the bridging).
  defp on(ctx, request, bridged) do
    case Context.Registry.lookup(ctx) do
      {:bridged, sid} ->
        bridged.(sid)

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
