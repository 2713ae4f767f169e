defmodule DSPex.Bridge.SessionStore.Variables do
  @moduledoc false
  # One variable at a time (register, read, write, list, delete, access
  # rules), and reads of several (the documented API is
  # `DSPex.Bridge.SessionStore`'s).

  import DSPex.Bridge.SessionStore.{Args, Events}

  alias DSPex.Bridge.{AccessControl, Options, Telemetry}
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.Bridge.SessionStore

  require Telemetry

  @type session_id :: SessionStore.session_id()
  @type ident :: SessionStore.ident()
  @type reason :: SessionStore.reason()

  @read [:dspex, :bridge, :variable, :read]
  @write [:dspex, :bridge, :variable, :write]
  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

  @read_opts DSPex.Bridge.SessionStore.Args.read_opts()
  @query_opts DSPex.Bridge.SessionStore.Args.query_opts()
  # What the engines answer for a name that cannot name a variable.
  @ident_errors [:name_must_be_atom_or_string, :bad_name_length]
  @write_opts DSPex.Bridge.SessionStore.Args.write_opts()

  @spec variable_exists?(session_id, ident, keyword) :: {:ok, boolean} | {:error, reason}
  def variable_exists?(session_id, ident, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @query_opts) do
      caller = caller(opts)

      case read_at(opts, :var_exists, [session_id, ident, caller]) do
        {:ok, _} = ok -> ok
        error -> AccessControl.refusal(error, session_id, ident, caller, :read)
      end
    end
  end

  @spec register_variable(session_id, ident, atom, term, keyword) ::
          {:ok, String.t()} | {:error, reason}
  def register_variable(session_id, name, type, initial, opts \\ []) do
    with {:ok, opts} <-
           Options.validate(opts, [
             :constraints,
             :metadata,
             :description,
             :access_rules,
             :principal,
             :context
           ]),
         :ok <- check_type(type) do
      native_opts = %{
        constraints: opts[:constraints] || %{},
        metadata: opts[:metadata] || %{},
        description: opts[:description],
        access_rules: opts[:access_rules]
      }

      result =
        @backend.var_register(
          session_id,
          name,
          type,
          initial,
          native_opts,
          AccessControl.caller(opts)
        )
        |> AccessControl.refusal(session_id, name, AccessControl.caller(opts), :write)

      with {:ok, _id} <- result do
        Telemetry.execute(
          [:dspex, :bridge, :variable, :registered],
          %{system_time: System.system_time()},
          %{session_id: session_id, variable: name, type: type}
        )
      end

      result
    end
  end

  @spec get_variable(session_id, ident, keyword) :: {:ok, map} | {:error, reason}
  def get_variable(session_id, ident, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @query_opts) do
      caller = caller(opts)

      timed_read(session_id, ident, fn ->
        case read_at(opts, :var_get, [session_id, ident, caller]) do
          {:ok, var} -> {:ok, variable(var)}
          error -> AccessControl.refusal(error, session_id, ident, caller, :read)
        end
      end)
    end
  end

  @spec get_variable_value(session_id, ident, term, keyword) :: term
  def get_variable_value(session_id, ident, default \\ nil, opts \\ []) do
    case Options.validate(opts, @query_opts) do
      {:ok, []} ->
        value(session_id, ident, default, nil)

      {:ok, opts} ->
        case opts[:consistency] do
          nil -> value(session_id, ident, default, AccessControl.caller(opts))
          _ -> value_at(opts, session_id, ident, default)
        end

      {:error, _} ->
        default
    end
  end

  defp value_at(opts, session_id, ident, default) do
    principal = caller(opts)

    result =
      timed_read(session_id, ident, fn ->
        read_at(opts, :var_get_value, [session_id, ident, principal])
      end)

    case result do
      {:ok, value} ->
        value

      {:error, _} = error ->
        AccessControl.refusal(error, session_id, ident, principal, :read)
        default
    end
  end

  # The engine's caller term: `consistency:` is the transport's, not the caller's.
  defp caller(opts), do: AccessControl.caller(Keyword.delete(opts, :consistency))

  defp value(session_id, ident, default, principal) do
    result =
      if Telemetry.observed?(@read) do
        timed_read(session_id, ident, fn ->
          @backend.var_get_value(session_id, ident, principal)
        end)
      else
        @backend.var_get_value(session_id, ident, principal)
      end

    case result do
      {:ok, value} ->
        value

      {:error, _} = error ->
        AccessControl.refusal(error, session_id, ident, principal, :read)
        default
    end
  end

  @spec update_variable(session_id, ident, term, map, keyword) :: :ok | {:error, reason}
  def update_variable(session_id, ident, value, metadata \\ %{}, opts \\ []) do
    case Options.validate(opts, [:expected_version | @write_opts]) do
      {:ok, opts} -> update(session_id, ident, value, metadata, opts)
      error -> error
    end
  end

  defp update(session_id, ident, value, metadata, opts) do
    {expected, metadata} = expected_version(metadata, opts)
    principal = AccessControl.caller(opts)

    if Telemetry.observed?(@write) do
      start = System.monotonic_time()

      @backend.var_set(session_id, ident, value, metadata, expected, principal)
      |> written(session_id, ident, metadata, expected, Telemetry.since_us(start))
      |> AccessControl.refusal(session_id, ident, principal, :write)
    else
      case @backend.var_set(session_id, ident, value, metadata, expected, principal) do
        {:ok, version} ->
          Propagator.notify_write(session_id, ident, version)

        error ->
          error
          |> written(session_id, ident, metadata, expected, 0)
          |> AccessControl.refusal(session_id, ident, principal, :write)
      end
    end
  end

  @spec get_variables(session_id, [ident], keyword) :: {:ok, map} | {:error, reason}
  def get_variables(session_id, idents, opts \\ [])

  def get_variables(session_id, idents, opts) when is_list(idents) do
    with {:ok, opts} <- Options.validate(opts, @query_opts),
         principal = caller(opts),
         {:ok, acc} <- read_each(session_id, idents, principal, opts) do
      {:ok, %{acc | missing: Enum.reverse(acc.missing)}}
    end
  end

  def get_variables(_session_id, idents, _opts),
    do: {:error, {:invalid_argument, {:idents, idents}}}

  # With no name to read, the session is still checked.
  defp read_each(session_id, [], _principal, _opts) do
    with {:ok, _} <- @backend.session_info(session_id), do: {:ok, %{found: %{}, missing: []}}
  end

  defp read_each(session_id, idents, principal, opts) do
    Enum.reduce_while(idents, {:ok, %{found: %{}, missing: []}}, fn ident, {:ok, acc} ->
      case read_at(opts, :var_get, [session_id, ident, principal]) do
        {:ok, var} ->
          {:cont, {:ok, %{acc | found: Map.put(acc.found, ident, variable(var))}}}

        {:error, :access_denied} = denied ->
          AccessControl.refusal(denied, session_id, ident, principal, :read)
          {:cont, {:ok, %{acc | missing: [ident | acc.missing]}}}

        {:error, reason} = error ->
          if ident_error?(reason),
            do: {:cont, {:ok, %{acc | missing: [ident | acc.missing]}}},
            else: {:halt, AccessControl.refusal(error, session_id, ident, principal, :read)}
      end
    end)
  end

  # Errors about one name rather than the call: it names no variable.
  defp ident_error?(:not_found), do: true
  defp ident_error?({:invalid_argument, detail}), do: detail in @ident_errors
  defp ident_error?(_reason), do: false

  @spec list_variables(session_id, String.t() | nil, keyword) :: {:ok, [map]} | {:error, reason}
  def list_variables(session_id, pattern \\ nil, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @query_opts) do
      caller = caller(opts)

      case read_at(opts, :var_list, [session_id, pattern, caller]) do
        {:ok, vars} -> {:ok, Enum.map(vars, &variable/1)}
        error -> AccessControl.refusal(error, session_id, nil, caller, :read)
      end
    end
  end

  @spec delete_variable(session_id, ident, keyword) :: :ok | {:error, reason}
  def delete_variable(session_id, ident, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @write_opts) do
      caller = AccessControl.caller(opts)

      session_id
      |> @backend.var_delete(ident, caller)
      |> AccessControl.refusal(session_id, ident, caller, :write)
      |> case do
        :ok ->
          Telemetry.execute(
            [:dspex, :bridge, :variable, :deleted],
            %{system_time: System.system_time()},
            %{session_id: session_id, variable: ident}
          )

          Propagator.notify_delete(session_id, ident)

        error ->
          error
      end
    end
  end

  @spec set_variable_permissions(session_id, ident, [AccessControl.rule()], keyword) ::
          :ok | {:error, reason}
  def set_variable_permissions(session_id, ident, rules, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @read_opts) do
      caller = AccessControl.caller(opts)

      session_id
      |> @backend.acl_set_rules(ident, rules, caller)
      |> AccessControl.refusal(session_id, ident, caller, :write)
    end
  end

  @spec check_variable_access(session_id, ident, String.t(), AccessControl.permission(), keyword) ::
          :ok | {:error, reason}
  def check_variable_access(session_id, ident, principal, permission, opts \\ [])

  def check_variable_access(session_id, ident, principal, permission, opts)
      when permission in [:read, :write, :observe, :optimize] do
    with {:ok, opts} <- Options.validate(opts, [:context]) do
      caller = AccessControl.caller(principal: principal, context: opts[:context])
      @backend.acl_check(session_id, ident, caller, permission)
    end
  end

  def check_variable_access(_session_id, _ident, _principal, permission, _opts),
    do: {:error, {:invalid_argument, {:unknown_permission, permission}}}
end
