defmodule DSPex.Bridge.SessionStore do
  @moduledoc """
  Sessions of typed, versioned variables: the BridgedState store.

  Reads and writes are one call into the backend from the caller's own
  process (see `DSPex.Bridge.Backend.Native`); this module's GenServer only
  sweeps expired sessions.

      {:ok, sid} = SessionStore.create_session("tuning-1", ttl: :timer.minutes(30))
      {:ok, _id} = SessionStore.register_variable(sid, :temperature, :float, 0.7,
                     constraints: %{min: 0.0, max: 2.0})
      :ok = SessionStore.update_variable(sid, :temperature, 0.9)
      0.9 = SessionStore.get_variable_value(sid, :temperature)
      {:error, {:version_mismatch, 1}} =
        SessionStore.update_variable(sid, :temperature, 1.1, %{expected_version: 0})
      :ok = SessionStore.rollback_variable(sid, :temperature, 0)
      {:ok, [%{version: 1, value: 0.9} | _]} = SessionStore.get_variable_history(sid, :temperature)

  ## Types and constraints

  | type | values | constraints |
  | --- | --- | --- |
  | `:float` | floats; integers are coerced | `min`, `max` |
  | `:integer` | integers; whole floats are coerced | `min`, `max` |
  | `:string` | UTF-8 binaries | `min_length`, `max_length`, `pattern` (anchored regex), `enum` |
  | `:boolean` | `true`/`false`; `"true"`/`"false"` are coerced | |
  | `:choice` | one of `choices` (atoms and strings of the same text match) | `choices` (required) |
  | `:module` | a module atom or name | `allowed_modules` |
  | `:embedding` | a list of numbers, stored as floats | `dimensions` |
  | `:tensor` | `%{"shape" => [dims], "data" => [numbers]}` | `shape` |

  A value of the wrong type returns `{:error, {:invalid_value, detail}}`; a
  value breaking a constraint `{:error, {:constraint_violation, detail}}`.

  ## Versions

  Every accepted write bumps `version` by one and pushes the previous
  `%{version, value, updated_at, metadata}` to a bounded history
  (`max_history`, default 50). `expected_version: n` (in the metadata or the
  options) makes a write conditional: on mismatch it returns
  `{:error, {:version_mismatch, current}}` and changes nothing. A rollback
  writes the old value as a new version.

  ## Common options

  - `principal:` the session on whose behalf the call is made (default: the
    session itself). Sessions are isolated: another principal is denied
    (`{:error, :access_denied}`) unless an access rule grants it (see
    `DSPex.Bridge.AccessControl`); listings leave out what it may not read.
  - `context:` a map compared against the `conditions` of access rules.
  - `lock_token:` / `optimizer_id:` on writes (update, batch, rollback,
    delete): the optimizer lock the write is made under. While a variable is
    being optimized (`start_optimization/4`), writes without the holder's
    token or id get `{:error, {:locked_by, optimizer_id}}`, and writes with
    an older token (a preempted optimizer's) `{:error, :stale_lock_token}`.

  Options are a keyword list of the keys a function documents: anything
  else returns `{:error, {:invalid_argument, {:bad_options, opts}}}` or
  `{:error, {:invalid_argument, {:unknown_options, keys}}}` (a misspelt
  `principal:` never runs a call as the session itself).

  Session-level operations (`get_session/2`, `get_session_diagnostics/2`,
  `export_session/2`, `delete_session/2`) are reserved to the session itself:
  another `principal:` gets `{:error, :access_denied}`, audited and reported
  as every denial is (see `DSPex.Bridge.AccessControl.authorize_session/3`).

  ## Access control and rate limits

  Every read, write, observe and optimize is checked inside the engine
  against the variable's access rules for the principal; a denial returns
  `{:error, :access_denied}`, is recorded in the session's audit log and
  emits `[:dspex, :bridge, :access, :denied]`. A session created with
  `rate_limit: {ops_per_sec, burst}` admits that many operations (one per
  variable touched) and returns `{:error, :rate_limited}` beyond them,
  emitting `[:dspex, :bridge, :rate_limit, :exceeded]`.

  ## Limits

  Values and metadata are limited to 1 MiB of engine memory each (nesting at
  most 64 deep), names and session ids to 255 bytes, 100,000 variables per
  session, `max_history` to 10,000 and snapshots to 256 MiB; see
  `DSPex.Bridge.Backend.Native.init/1` to change them. Over a limit a call
  returns `{:error, {:too_large, limit}}` or `{:error, {:invalid_argument, _}}`.
  """
  use GenServer

  alias DSPex.Bridge.{AccessControl, Options, Telemetry}
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator

  require Telemetry

  @type session_id :: String.t()
  @type ident :: atom | String.t()
  @type reason :: atom | {atom, term}

  @types [:float, :integer, :string, :boolean, :choice, :module, :embedding, :tensor]
  @read [:dspex, :bridge, :variable, :read]
  @write [:dspex, :bridge, :variable, :write]
  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

  @read_opts [:principal, :context]
  # What the engines answer for a name that cannot name a variable.
  @ident_errors [:name_must_be_atom_or_string, :bad_name_length]
  @write_opts [:principal, :context, :lock_token, :optimizer_id]

  ## Lifecycle

  @doc false
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc """
  The backend module serving sessions: `DSPex.Bridge.Backend.Router`, which
  serves each session from the backend it was created in (`:nif` or
  `:port`, see `create_session/2`).
  """
  @spec backend() :: module
  def backend, do: @backend

  ## Sessions

  @doc """
  Creates a session.

  Options: `ttl:` idle milliseconds before the session expires (default:
  never), `max_history:` history entries kept per variable (default 50),
  `metadata:` a map (e.g. owner information), `rate_limit:`
  `{ops_per_sec, burst}` (positive integers, at most 1,000,000,000 and
  1,000,000; default: unlimited), `audit_size:` audit entries kept
  (0..100,000, default 256), `backend:` `:nif` (in the VM)
  or `:port` (the engine in its own OS process, see
  `DSPex.Bridge.Backend.Port`); the default is `config :dspex_bridge,
  backend: :nif | :port`, else `:nif`. The API and its results are the same
  for both, except that a port call past `config :dspex_bridge,
  :port_timeout` returns `{:error, :timeout}` if it reads and
  `{:error, :timeout_unknown_outcome}` if it writes (the write may still take
  effect), and `{:error, :backend_unavailable}` while the port program
  restarts.

  `replicas: n` makes the session a Raft group on `n` connected nodes
  (`replicas: 1`: a durable session on one node), `consistency:` its
  default read consistency (`:consistent`, `:leader` or `:local`); see
  `DSPex.Bridge.Backend.Raft` and `DSPex.Bridge.HAManager`.

      iex> {:ok, "doc-create"} = DSPex.Bridge.SessionStore.create_session("doc-create")
      iex> DSPex.Bridge.SessionStore.create_session("doc-create")
      {:error, :already_exists}
  """
  @spec create_session(session_id, keyword) :: {:ok, session_id} | {:error, reason}
  def create_session(session_id, opts \\ []) do
    with {:ok, opts} <-
           Options.validate(opts, [
             :ttl,
             :max_history,
             :metadata,
             :rate_limit,
             :audit_size,
             :backend,
             :replicas,
             :consistency
           ]),
         kind = if(opts[:replicas], do: :raft, else: opts[:backend] || Router.default_kind()),
         native_opts = %{
           replicas: opts[:replicas],
           consistency: opts[:consistency],
           ttl_ms: opts[:ttl],
           max_history: opts[:max_history],
           metadata: opts[:metadata] || %{},
           rate_limit: opts[:rate_limit],
           audit_capacity: opts[:audit_size],
           backend: kind
         },
         :ok <- @backend.create_session(session_id, native_opts) do
      Telemetry.execute(
        [:dspex, :bridge, :session, :created],
        %{system_time: System.system_time()},
        %{session_id: session_id, backend: kind}
      )

      {:ok, session_id}
    end
  end

  @doc """
  Session information: id, timestamps, ttl, max_history, variable_count,
  metadata, rate_limit (`nil` or `%{ops_per_sec, burst, available}`) and
  audit_size. Options: `principal:` (only the session itself may).
  """
  @spec get_session(session_id, keyword) :: {:ok, map} | {:error, reason}
  def get_session(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :read, opts),
         {:ok, info} <- @backend.session_info(session_id) do
      {:ok,
       %{
         id: info.session_id,
         created_at: datetime(info.created_at),
         last_access: datetime(info.last_access),
         ttl: info.ttl_ms,
         max_history: info.max_history,
         variable_count: info.variable_count,
         metadata: info.metadata,
         rate_limit: info.rate_limit,
         audit_size: info.audit_capacity
       }}
    end
  end

  @doc """
  Deletes a session and all its variables. Options: `principal:` (only the
  session itself may).
  """
  @spec delete_session(session_id, keyword) :: :ok | {:error, reason}
  def delete_session(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :write, opts),
         :ok <- @backend.delete_session(session_id) do
      Propagator.session_closed(session_id)

      Telemetry.execute(
        [:dspex, :bridge, :session, :deleted],
        %{system_time: System.system_time()},
        %{session_id: session_id}
      )
    end
  end

  @doc """
  Ids of all live sessions, sorted; `{:error, {:partial, %{sessions: ids,
  missing: :port, reason: reason}}}` when the port backend holds sessions
  but does not answer (see `DSPex.Bridge.Backend.Router.list_sessions/0`).
  """
  @spec list_sessions() :: [session_id] | {:error, {:partial, map}}
  def list_sessions, do: @backend.list_sessions()

  @doc """
  What an operator wants to know about a session: `get_session/2`'s fields,
  the engine memory its variables hold, and per variable its type, version
  and history length. Options: `principal:` (only the session itself may).
  A variable deleted meanwhile is left out; a refusal of the session's rate
  limit is returned.
  """
  @spec get_session_diagnostics(session_id, keyword) :: {:ok, map} | {:error, reason}
  def get_session_diagnostics(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :read, opts),
         {:ok, session} <- get_session(session_id),
         {:ok, vars} <- @backend.list_variables(session_id, nil, nil),
         {:ok, variables} <- diagnose(session_id, vars) do
      memory =
        case Router.session_memory(session_id) do
          {:ok, bytes} -> bytes
          _ -> nil
        end

      {:ok,
       Map.merge(session, %{
         memory_bytes: memory,
         variables: variables,
         backend: Router.kind_of(session_id)
       })}
    end
  end

  # One entry per variable; one deleted since the listing is left out.
  defp diagnose(session_id, vars) do
    Enum.reduce_while(vars, {:ok, []}, fn v, {:ok, acc} ->
      case @backend.history(session_id, v.id, 1_000_000, nil) do
        {:ok, history} ->
          entry = %{
            name: v.name,
            id: v.id,
            type: v.type,
            version: v.version,
            history_length: length(history),
            updated_at: datetime(v.updated_at)
          }

          {:cont, {:ok, [entry | acc]}}

        {:error, :not_found} ->
          {:cont, {:ok, acc}}

        {:error, _} = error ->
          {:halt, error}
      end
    end)
    |> case do
      {:ok, entries} -> {:ok, Enum.reverse(entries)}
      error -> error
    end
  end

  @doc """
  A MessagePack snapshot of the whole session: variables, constraints,
  metadata, versions and history. `import_session/2` restores it.
  Options: `principal:` (only the session itself may).
  """
  @spec export_session(session_id, keyword) :: {:ok, binary} | {:error, reason}
  def export_session(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :read, opts),
         do: @backend.export_session(session_id)
  end

  @doc """
  Creates a session from an `export_session/1` snapshot; `session_id:` gives
  it a new id, `backend:` the backend to create it in (as in
  `create_session/2`; snapshots move freely between backends). Every value
  is validated again, every field as a write of it would be (types,
  constraints, rules, versions, timestamps, limits); garbage returns
  `{:error, {:invalid_snapshot, reason}}` and creates nothing. Imports into a
  backend take turns; with 8 already waiting, another returns
  `{:error, :busy}`.
  """
  @spec import_session(binary, keyword) :: {:ok, session_id} | {:error, reason}
  def import_session(snapshot, opts \\ [])

  def import_session(snapshot, opts) when is_binary(snapshot) do
    with {:ok, opts} <- Options.validate(opts, [:session_id, :backend]),
         kind = opts[:backend] || Router.default_kind(),
         {:ok, sid} <- Router.import_session(snapshot, opts[:session_id], kind) do
      Telemetry.execute(
        [:dspex, :bridge, :session, :created],
        %{system_time: System.system_time()},
        %{session_id: sid, backend: kind}
      )

      {:ok, sid}
    end
  end

  def import_session(_snapshot, _opts), do: {:error, {:invalid_snapshot, "expected a binary"}}

  ## Variables

  @doc """
  Registers a variable and returns its generated id.

  Options: `constraints:` (see the moduledoc), `metadata:`, `description:`,
  `access_rules:` (see `DSPex.Bridge.AccessControl`), `principal:`. Names are
  atoms or strings, unique per session (`:x` and `"x"` are the same name) and
  given back in the form registered.
  """
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
        @backend.register_variable(
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

  @doc """
  The whole variable: `id name type value version constraints metadata
  description created_at updated_at last_write access_rules`.
  Options: `principal:`, `context:`.
  """
  @spec get_variable(session_id, ident, keyword) :: {:ok, map} | {:error, reason}
  def get_variable(session_id, ident, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @read_opts) do
      caller = AccessControl.caller(opts)

      timed_read(session_id, ident, fn ->
        case @backend.get_variable(session_id, ident, caller) do
          {:ok, var} -> {:ok, variable(var)}
          error -> AccessControl.refusal(error, session_id, ident, caller, :read)
        end
      end)
    end
  end

  @doc """
  The value of a variable, or `default` when it cannot be read (unknown
  session or variable, access denied, or options other than `principal:`
  and `context:`). The hot read path.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-value")
      iex> {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, :k, :integer, 3)
      iex> DSPex.Bridge.SessionStore.get_variable_value(sid, :k)
      3
      iex> DSPex.Bridge.SessionStore.get_variable_value(sid, :missing, :none)
      :none
  """
  @spec get_variable_value(session_id, ident, term, keyword) :: term
  def get_variable_value(session_id, ident, default \\ nil, opts \\ []) do
    case Options.validate(opts, @read_opts) do
      {:ok, opts} -> value(session_id, ident, default, AccessControl.caller(opts))
      {:error, _} -> default
    end
  end

  defp value(session_id, ident, default, principal) do
    result =
      if Telemetry.observed?(@read) do
        timed_read(session_id, ident, fn -> @backend.get_value(session_id, ident, principal) end)
      else
        @backend.get_value(session_id, ident, principal)
      end

    case result do
      {:ok, value} ->
        value

      {:error, _} = error ->
        AccessControl.refusal(error, session_id, ident, principal, :read)
        default
    end
  end

  @doc """
  Writes a variable. `metadata` is kept with the new version in history;
  `expected_version:` (in `metadata` or `opts`) makes the write conditional.
  Options: `expected_version:`, `principal:`, `context:`, `lock_token:`,
  `optimizer_id:`.
  """
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

      @backend.set_value(session_id, ident, value, metadata, expected, principal)
      |> written(session_id, ident, metadata, expected, Telemetry.since_us(start))
      |> AccessControl.refusal(session_id, ident, principal, :write)
    else
      case @backend.set_value(session_id, ident, value, metadata, expected, principal) do
        {:ok, version} ->
          Propagator.notify_write(session_id, ident, version)

        error ->
          error
          |> written(session_id, ident, metadata, expected, 0)
          |> AccessControl.refusal(session_id, ident, principal, :write)
      end
    end
  end

  @doc """
  Writes several variables. `updates` is a map or a list of
  `{ident, value}` / `{ident, value, metadata}`.

  With `atomic: true` every write is applied or none: `:ok` or
  `{:error, {:validation_failed, %{ident => reason}}}`. Otherwise each write
  stands alone and the result is `{:ok, %{ident => :ok | {:error, reason}}}`.
  Options: `atomic:`, `metadata:` (for every write), `principal:`,
  `context:`, `lock_token:`, `optimizer_id:`.
  """
  @spec update_variables(session_id, map | list, keyword) ::
          :ok | {:ok, map} | {:error, reason}
  def update_variables(session_id, updates, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:atomic, :metadata | @write_opts]),
         {:ok, normalized} <- normalize_updates(updates, opts[:metadata] || %{}) do
      caller = AccessControl.caller(opts)
      start = System.monotonic_time()
      atomic = opts[:atomic] == true

      case @backend.set_values(session_id, normalized, atomic, caller) do
        {:ok, results} when atomic ->
          us = Telemetry.since_us(start)

          Enum.zip(normalized, results)
          |> Enum.each(fn {{ident, _, meta, _}, version} ->
            emit_write(session_id, ident, meta, version, us)
            Propagator.notify_write(session_id, ident, version)
          end)

          :ok

        {:ok, results} ->
          us = Telemetry.since_us(start)

          map =
            Enum.zip(normalized, results)
            |> Map.new(fn
              {{ident, _, meta, _}, {:ok, version}} ->
                emit_write(session_id, ident, meta, version, us)
                Propagator.notify_write(session_id, ident, version)
                {ident, :ok}

              {{ident, _, _, _}, {:error, _} = error} ->
                AccessControl.refusal(error, session_id, ident, caller, :write)
                {ident, error}
            end)

          {:ok, map}

        {:error, {:validation_failed, errors}} ->
          errors = restore_keys(errors, normalized)

          for {ident, :access_denied} <- errors do
            AccessControl.refusal({:error, :access_denied}, session_id, ident, caller, :write)
          end

          {:error, {:validation_failed, errors}}

        {:error, _} = error ->
          AccessControl.refusal(error, session_id, nil, caller, :write)
      end
    end
  end

  @doc """
  Several variables at once: `{:ok, %{found: %{ident => variable}, missing: [ident]}}`.
  Variables the principal may not read, and names that cannot name a
  variable, count as missing; what concerns the whole call is its error:
  an unknown or malformed session id (also with no names), a bad principal
  or context, the rate limit. Options: `principal:`, `context:`.
  """
  @spec get_variables(session_id, [ident], keyword) :: {:ok, map} | {:error, reason}
  def get_variables(session_id, idents, opts \\ [])

  def get_variables(session_id, idents, opts) when is_list(idents) do
    with {:ok, opts} <- Options.validate(opts, @read_opts),
         principal = AccessControl.caller(opts),
         {:ok, acc} <- read_each(session_id, idents, principal) do
      {:ok, %{acc | missing: Enum.reverse(acc.missing)}}
    end
  end

  def get_variables(_session_id, idents, _opts),
    do: {:error, {:invalid_argument, {:idents, idents}}}

  # With no name to read, the session is still checked.
  defp read_each(session_id, [], _principal) do
    with {:ok, _} <- @backend.session_info(session_id), do: {:ok, %{found: %{}, missing: []}}
  end

  defp read_each(session_id, idents, principal) do
    Enum.reduce_while(idents, {:ok, %{found: %{}, missing: []}}, fn ident, {:ok, acc} ->
      case @backend.get_variable(session_id, ident, principal) do
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

  @doc """
  Variables of a session, sorted by name; with a `pattern` (an anchored glob,
  `*` and `?`) only those whose name matches. Variables the principal may
  not read are left out. Options: `principal:`, `context:`.
  """
  @spec list_variables(session_id, String.t() | nil, keyword) :: {:ok, [map]} | {:error, reason}
  def list_variables(session_id, pattern \\ nil, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @read_opts) do
      caller = AccessControl.caller(opts)

      case @backend.list_variables(session_id, pattern, caller) do
        {:ok, vars} -> {:ok, Enum.map(vars, &variable/1)}
        error -> AccessControl.refusal(error, session_id, nil, caller, :read)
      end
    end
  end

  @doc """
  Deletes a variable and its dependency edges. Needs `:write`. Options:
  `principal:`, `context:`, `lock_token:`, `optimizer_id:`.
  """
  @spec delete_variable(session_id, ident, keyword) :: :ok | {:error, reason}
  def delete_variable(session_id, ident, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @write_opts) do
      caller = AccessControl.caller(opts)

      session_id
      |> @backend.delete_variable(ident, caller)
      |> AccessControl.refusal(session_id, ident, caller, :write)
      |> case do
        :ok -> Propagator.notify_delete(session_id, ident)
        error -> error
      end
    end
  end

  @doc """
  Replaces a variable's access rules (see `DSPex.Bridge.AccessControl`).
  Only the variable's owner may: the session itself (the default principal)
  or the principal named in its `owner_session`/`created_by` metadata.
  Invalid rules return `{:error, {:invalid_rules, detail}}` and leave the old
  ones in place. The change is recorded in the audit log. Options:
  `principal:`, `context:`.
  """
  @spec set_variable_permissions(session_id, ident, [AccessControl.rule()], keyword) ::
          :ok | {:error, reason}
  def set_variable_permissions(session_id, ident, rules, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, @read_opts) do
      caller = AccessControl.caller(opts)

      session_id
      |> @backend.set_access_rules(ident, rules, caller)
      |> AccessControl.refusal(session_id, ident, caller, :write)
    end
  end

  @doc """
  May `principal` do `permission` on the variable? `:ok` or
  `{:error, :access_denied}`. A question: it takes no rate-limit token and
  leaves no audit entry. Options: `context:`.
  """
  @spec check_variable_access(session_id, ident, String.t(), AccessControl.permission(), keyword) ::
          :ok | {:error, reason}
  def check_variable_access(session_id, ident, principal, permission, opts \\ [])

  def check_variable_access(session_id, ident, principal, permission, opts)
      when permission in [:read, :write, :observe, :optimize] do
    with {:ok, opts} <- Options.validate(opts, [:context]) do
      caller = AccessControl.caller(principal: principal, context: opts[:context])
      @backend.check_access(session_id, ident, caller, permission)
    end
  end

  def check_variable_access(_session_id, _ident, _principal, permission, _opts),
    do: {:error, {:invalid_argument, {:unknown_permission, permission}}}

  @doc """
  Previous versions of a variable, newest first: `[%{version, value,
  updated_at, metadata}]`. Options: `principal:`, `context:`.
  """
  @spec get_variable_history(session_id, ident, non_neg_integer, keyword) ::
          {:ok, [map]} | {:error, reason}
  def get_variable_history(session_id, ident, limit \\ 50, opts \\ [])

  def get_variable_history(session_id, ident, limit, opts)
      when is_integer(limit) and limit >= 0 do
    with {:ok, opts} <- Options.validate(opts, @read_opts) do
      caller = AccessControl.caller(opts)

      case @backend.history(session_id, ident, limit, caller) do
        {:ok, entries} -> {:ok, Enum.map(entries, &%{&1 | updated_at: datetime(&1.updated_at)})}
        error -> AccessControl.refusal(error, session_id, ident, caller, :read)
      end
    end
  end

  def get_variable_history(_session_id, _ident, limit, _opts),
    do: {:error, {:invalid_argument, {:limit, limit}}}

  @doc """
  Writes the value `version` had as a new version (v1, v2, rollback to 1 ->
  v3 with v1's value). `{:error, :version_not_found}` once the version has
  left the history. Options: `principal:`, `context:`, `lock_token:`,
  `optimizer_id:`.
  """
  @spec rollback_variable(session_id, ident, non_neg_integer, keyword) :: :ok | {:error, reason}
  def rollback_variable(session_id, ident, version, opts \\ []) do
    case Options.validate(opts, @write_opts) do
      {:ok, opts} -> rollback(session_id, ident, version, AccessControl.caller(opts))
      error -> error
    end
  end

  defp rollback(session_id, ident, version, caller) do
    case @backend.rollback(session_id, ident, version, caller) do
      {:ok, new_version} ->
        Telemetry.execute(
          [:dspex, :bridge, :variable, :rollback],
          %{version: new_version, to_version: version},
          %{session_id: session_id, variable: ident}
        )

        Propagator.notify_write(session_id, ident, new_version)

      error ->
        AccessControl.refusal(error, session_id, ident, caller, :write)
    end
  end

  ## Optimization

  @doc """
  Starts optimizing a variable: takes its optimizer lock (see
  `DSPex.Bridge.OptimizerCoordinator`) for `optimizer_pid`, which needs the
  `:optimize` permission. Returns the optimizer id and the fencing token the
  optimizer's writes carry (`lock_token:`); until `stop_optimization/3`,
  other writes to the variable get `{:error, {:locked_by, optimizer_id}}`.

  Options: `optimizer_id:` (default: generated), `conflict_resolution:`
  (default `:abort`, which answers `{:error, {:already_optimizing, status}}`
  with `status = %{optimizing: true, optimizer_id, optimizer_pid,
  started_at, token}`; `:wait` and `:preempt` as in `acquire_lock/4`),
  `timeout:`, `lease:`, `principal:`.

      iex> alias DSPex.Bridge.SessionStore
      iex> {:ok, sid} = SessionStore.create_session("doc-optimize")
      iex> {:ok, _} = SessionStore.register_variable(sid, :t, :float, 0.5)
      iex> {:ok, %{optimizer_id: "opt-a", token: token}} =
      ...>   SessionStore.start_optimization(sid, :t, self(), optimizer_id: "opt-a")
      iex> SessionStore.update_variable(sid, :t, 0.6)
      {:error, {:locked_by, "opt-a"}}
      iex> SessionStore.update_variable(sid, :t, 0.6, %{}, lock_token: token)
      :ok
      iex> SessionStore.stop_optimization(sid, :t)
      :ok
  """
  @spec start_optimization(session_id, ident, pid, keyword) ::
          {:ok, %{optimizer_id: String.t(), token: pos_integer}}
          | {:error, {:already_optimizing, map} | reason}
  def start_optimization(session_id, ident, optimizer_pid, opts \\ []) do
    DSPex.Bridge.OptimizerCoordinator.start_optimization(session_id, ident, optimizer_pid, opts)
  end

  @doc """
  Stops the optimization of a variable, releasing its lock (to the next
  waiter, if any). With `optimizer_id:` only that optimizer's; without, any.
  Options: `optimizer_id:`, `principal:`.
  """
  @spec stop_optimization(session_id, ident, keyword) ::
          :ok | {:error, :not_optimizing | :not_lock_owner | reason}
  def stop_optimization(session_id, ident, opts \\ []) do
    DSPex.Bridge.OptimizerCoordinator.stop_optimization(session_id, ident, opts)
  end

  ## GenServer: the TTL sweeper

  @impl true
  def init(opts) do
    interval = Keyword.get(opts, :sweep_interval, 1_000)
    Process.send_after(self(), :sweep, interval)
    {:ok, %{interval: interval}}
  end

  @impl true
  def handle_info(:sweep, state) do
    for sid <- @backend.sweep_expired() do
      Propagator.session_closed(sid)

      Telemetry.execute(
        [:dspex, :bridge, :session, :expired],
        %{system_time: System.system_time()},
        %{session_id: sid}
      )
    end

    Process.send_after(self(), :sweep, state.interval)
    {:noreply, state}
  end

  ## Helpers

  defp session_guard(session_id, permission, opts),
    do: AccessControl.authorize_session(session_id, permission, opts)

  defp check_type(type) when type in @types, do: :ok
  defp check_type(type), do: {:error, {:invalid_argument, {:unknown_type, type}}}

  defp timed_read(session_id, ident, fun) do
    start = System.monotonic_time()
    result = fun.()

    Telemetry.execute(@read, %{duration_us: Telemetry.since_us(start)}, %{
      session_id: session_id,
      variable: ident,
      result: result_tag(result)
    })

    result
  end

  defp result_tag({:ok, _}), do: :ok
  defp result_tag({:error, reason}), do: reason

  defp written({:ok, version}, session_id, ident, metadata, _expected, us) do
    emit_write(session_id, ident, metadata, version, us)
    Propagator.notify_write(session_id, ident, version)
  end

  defp written({:error, {:version_mismatch, current}} = error, session_id, ident, _, expected, _) do
    Telemetry.execute(
      [:dspex, :bridge, :variable, :version_conflict],
      %{current_version: current},
      %{session_id: session_id, variable: ident, expected_version: expected}
    )

    error
  end

  defp written(error, _session_id, _ident, _metadata, _expected, _us), do: error

  defp emit_write(session_id, ident, metadata, version, us) do
    if Telemetry.observed?(@write) do
      Telemetry.execute(@write, %{duration_us: us, version: version}, %{
        session_id: session_id,
        variable: ident,
        metadata: metadata
      })
    end
  end

  # expected_version may come in the metadata (atom or string key) or opts.
  defp expected_version(metadata, []) when map_size(metadata) == 0, do: {nil, metadata}

  defp expected_version(metadata, opts) when is_map(metadata) do
    cond do
      Map.has_key?(metadata, :expected_version) ->
        Map.pop(metadata, :expected_version)

      Map.has_key?(metadata, "expected_version") ->
        Map.pop(metadata, "expected_version")

      true ->
        {opts[:expected_version], metadata}
    end
  end

  defp expected_version(metadata, opts), do: {opts[:expected_version], metadata}

  defp normalize_updates(updates, base_meta) when is_map(updates) do
    normalize_updates(Map.to_list(updates), base_meta)
  end

  defp normalize_updates(updates, base_meta) when is_list(updates) do
    Enum.reduce_while(updates, {:ok, []}, fn
      {ident, value}, {:ok, acc} ->
        {expected, meta} = expected_version(base_meta, [])
        {:cont, {:ok, [{ident, value, meta, expected} | acc]}}

      {ident, value, meta}, {:ok, acc} when is_map(meta) ->
        {expected, meta} = expected_version(Map.merge(base_meta, meta), [])
        {:cont, {:ok, [{ident, value, meta, expected} | acc]}}

      other, _ ->
        {:halt, {:error, {:invalid_argument, {:bad_update, other}}}}
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  defp normalize_updates(other, _), do: {:error, {:invalid_argument, {:bad_updates, other}}}

  # The engine reports failed idents as strings; give back the caller's form.
  defp restore_keys(errors, normalized) when is_map(errors) do
    by_text = Map.new(normalized, fn {ident, _, _, _} -> {to_string(ident), ident} end)
    Map.new(errors, fn {k, v} -> {Map.get(by_text, k, k), v} end)
  end

  defp restore_keys(errors, _), do: errors

  defp variable(var) do
    %{var | created_at: datetime(var.created_at), updated_at: datetime(var.updated_at)}
  end

  defp datetime(us) when is_integer(us), do: DateTime.from_unix!(us, :microsecond)
  defp datetime(other), do: other
end
