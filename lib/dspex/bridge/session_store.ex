defmodule DSPex.Bridge.SessionStore do
  @moduledoc """
  Sessions of typed, versioned variables: the BridgedState store.

  Reads and writes are one call into the backend from the caller's own
  process (see `DSPex.Bridge.Backend.Native`); the store's one process
  only sweeps expired sessions.

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

  - `consistency:` on reads of variables (`get_variable/3`,
    `get_variable_value/4`, `get_variables/3`, `variable_exists?/3`,
    `list_variables/3`, `get_variable_history/4`): for a replicated session
    (`replicas:`), where the read is served: `:consistent` (the leader,
    after confirming it still leads), `:leader` (the leader, without that
    round) or `:local` (this node's member, possibly stale, answering also
    when the group has no leader). The default is the session's own
    (`create_session/2`'s `consistency:`, else `:consistent`): the leader.
    A session that is not replicated has one copy and ignores it; any
    other value is `{:error, {:invalid_argument, {:consistency, value}}}`.

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

  alias DSPex.Bridge.AccessControl
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.SessionStore.{Batch, History, Sessions, Sweeper, Variables}

  @type session_id :: String.t()
  @type ident :: atom | String.t()
  @type reason :: atom | {atom, term}

  # The implementation is split along its seams: `Sessions`, `Variables`
  # (one at a time, and reads of several), `Batch` (writes of several),
  # `History` (history and rollback), `Args` (options and the engine's
  # answers), `Events` (telemetry) and the `Sweeper` process.

  ## Lifecycle

  @doc false
  def start_link(opts \\ []), do: Sweeper.start_link(opts)

  @doc false
  def child_spec(opts), do: %{Sweeper.child_spec(opts) | id: __MODULE__}

  @doc """
  The backend holding a session: `{:ok, :nif}` (in the VM), `{:ok, :port}`
  (the out-of-process engine), as chosen by `create_session/2`'s
  `backend:`, or `{:ok, :raft}` (a replicated session, `replicas:`);
  `{:error, :session_not_found}` when none holds it.
  """
  @spec backend(session_id) :: {:ok, :nif | :port | :raft} | {:error, :session_not_found}
  def backend(session_id) do
    case Router.kind_of(session_id) do
      nil -> {:error, :session_not_found}
      kind -> {:ok, kind}
    end
  end

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
  `DSPex.Bridge.Backend.Raft` and `DSPex.Bridge.HAManager`. A replicated
  session's `ttl:` counts from its last write or the last read its leader
  served, and its expiry is a command in its log, so every member agrees.

      iex> {:ok, "doc-create"} = DSPex.Bridge.SessionStore.create_session("doc-create")
      iex> DSPex.Bridge.SessionStore.create_session("doc-create")
      {:error, :already_exists}
  """
  @spec create_session(session_id, keyword) :: {:ok, session_id} | {:error, reason}
  defdelegate create_session(session_id, opts \\ []), to: Sessions

  @doc """
  Session information: id, timestamps, ttl, max_history, variable_count,
  metadata, rate_limit (`nil` or `%{ops_per_sec, burst, available}`) and
  audit_size. Options: `principal:` (only the session itself may).
  """
  @spec get_session(session_id, keyword) :: {:ok, map} | {:error, reason}
  defdelegate get_session(session_id, opts \\ []), to: Sessions

  @doc """
  Deletes a session and all its variables. Options: `principal:` (only the
  session itself may).
  """
  @spec delete_session(session_id, keyword) :: :ok | {:error, reason}
  defdelegate delete_session(session_id, opts \\ []), to: Sessions

  @doc """
  Ids of all live sessions, sorted; `{:error, {:partial, %{sessions: ids,
  missing: :port, reason: reason}}}` when the port backend holds sessions
  but does not answer (see `DSPex.Bridge.Backend.Router.session_list/0`).
  """
  @spec list_sessions() :: [session_id] | {:error, {:partial, map}}
  defdelegate list_sessions, to: Sessions

  @doc """
  What an operator wants to know about a session: `get_session/2`'s fields,
  the engine memory its variables hold, and per variable its type, version
  and history length. Options: `principal:` (only the session itself may).
  A variable deleted meanwhile is left out; a refusal of the session's rate
  limit is returned.
  """
  @spec get_session_diagnostics(session_id, keyword) :: {:ok, map} | {:error, reason}
  defdelegate get_session_diagnostics(session_id, opts \\ []), to: Sessions

  @doc """
  A MessagePack snapshot of the whole session: variables, constraints,
  metadata, versions and history. `import_session/2` restores it.
  Options: `principal:` (only the session itself may).
  """
  @spec export_session(session_id, keyword) :: {:ok, binary} | {:error, reason}
  defdelegate export_session(session_id, opts \\ []), to: Sessions

  @doc """
  Creates a session from an `export_session/1` snapshot; `session_id:` gives
  it a new id, `backend:` the backend to create it in (as in
  `create_session/2`; snapshots move freely between backends), `replicas:`
  and `consistency:` make it a replicated session (as in
  `create_session/2`; the snapshot's ttl and rate limit carry over). Every value
  is validated again, every field as a write of it would be (types,
  constraints, rules, versions, timestamps, limits); garbage returns
  `{:error, {:invalid_snapshot, reason}}` and creates nothing. Imports into a
  backend take turns; with 8 already waiting, another returns
  `{:error, :busy}`.
  """
  @spec import_session(binary, keyword) :: {:ok, session_id} | {:error, reason}
  defdelegate import_session(snapshot, opts \\ []), to: Sessions

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
  defdelegate register_variable(session_id, name, type, initial, opts \\ []), to: Variables

  @doc """
  The whole variable: `id name type value version constraints metadata
  description created_at updated_at last_write access_rules`.
  Options: `principal:`, `context:`, `consistency:`.
  """
  @spec get_variable(session_id, ident, keyword) :: {:ok, map} | {:error, reason}
  defdelegate get_variable(session_id, ident, opts \\ []), to: Variables

  @doc """
  Is there a variable under this name or id that the caller may read?
  `{:ok, true}` or `{:ok, false}`; a variable the caller may not read is
  `{:error, :access_denied}`, as reading it is. Options: `principal:`,
  `context:`, `consistency:`.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-exists")
      iex> {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, :k, :integer, 3)
      iex> DSPex.Bridge.SessionStore.variable_exists?(sid, :k)
      {:ok, true}
      iex> DSPex.Bridge.SessionStore.variable_exists?(sid, :missing)
      {:ok, false}
  """
  @spec variable_exists?(session_id, ident, keyword) :: {:ok, boolean} | {:error, term}
  defdelegate variable_exists?(session_id, ident, opts \\ []), to: Variables

  @doc """
  The value of a variable, or `default` when it cannot be read (unknown
  session or variable, access denied, or options other than `principal:`,
  `context:` and `consistency:`). The hot read path.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-value")
      iex> {:ok, _} = DSPex.Bridge.SessionStore.register_variable(sid, :k, :integer, 3)
      iex> DSPex.Bridge.SessionStore.get_variable_value(sid, :k)
      3
      iex> DSPex.Bridge.SessionStore.get_variable_value(sid, :missing, :none)
      :none
  """
  @spec get_variable_value(session_id, ident, term, keyword) :: term
  defdelegate get_variable_value(session_id, ident, default \\ nil, opts \\ []), to: Variables

  @doc """
  Writes a variable. `metadata` is kept with the new version in history;
  `expected_version:` (in `metadata` or `opts`) makes the write conditional.
  Options: `expected_version:`, `principal:`, `context:`, `lock_token:`,
  `optimizer_id:`.
  """
  @spec update_variable(session_id, ident, term, map, keyword) :: :ok | {:error, reason}
  defdelegate update_variable(session_id, ident, value, metadata \\ %{}, opts \\ []),
    to: Variables

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
  defdelegate update_variables(session_id, updates, opts \\ []), to: Batch

  @doc """
  Several variables at once: `{:ok, %{found: %{ident => variable}, missing: [ident]}}`.
  Variables the principal may not read, and names that cannot name a
  variable, count as missing; what concerns the whole call is its error:
  an unknown or malformed session id (also with no names), a bad principal
  or context, the rate limit. Options: `principal:`, `context:`, `consistency:`.
  """
  @spec get_variables(session_id, [ident], keyword) :: {:ok, map} | {:error, reason}
  defdelegate get_variables(session_id, idents, opts \\ []), to: Variables

  @doc """
  Variables of a session, sorted by name; with a `pattern` (an anchored glob,
  `*` and `?`) only those whose name matches. Variables the principal may
  not read are left out. Options: `principal:`, `context:`, `consistency:`;
  they may come in place of the pattern, as in `list_variables(sid, principal: p)`.
  """
  @spec list_variables(session_id, String.t() | nil | keyword, keyword) ::
          {:ok, [map]} | {:error, reason}
  def list_variables(session_id, pattern \\ nil, opts \\ [])

  def list_variables(session_id, opts, []) when is_list(opts),
    do: Variables.list_variables(session_id, nil, opts)

  def list_variables(session_id, pattern, opts),
    do: Variables.list_variables(session_id, pattern, opts)

  @doc """
  Deletes a variable and its dependency edges. Needs `:write`. Options:
  `principal:`, `context:`, `lock_token:`, `optimizer_id:`.
  """
  @spec delete_variable(session_id, ident, keyword) :: :ok | {:error, reason}
  defdelegate delete_variable(session_id, ident, opts \\ []), to: Variables

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
  defdelegate set_variable_permissions(session_id, ident, rules, opts \\ []), to: Variables

  @doc """
  May `principal` do `permission` on the variable? `:ok` or
  `{:error, :access_denied}`. A question: it takes no rate-limit token and
  leaves no audit entry. Options: `context:`.
  """
  @spec check_variable_access(session_id, ident, String.t(), AccessControl.permission(), keyword) ::
          :ok | {:error, reason}
  defdelegate check_variable_access(session_id, ident, principal, permission, opts \\ []),
    to: Variables

  @doc """
  Previous versions of a variable, newest first: `[%{version, value,
  updated_at, metadata}]`. Options: `principal:`, `context:`, `consistency:`.
  """
  @spec get_variable_history(session_id, ident, non_neg_integer, keyword) ::
          {:ok, [map]} | {:error, reason}
  defdelegate get_variable_history(session_id, ident, limit \\ 50, opts \\ []), to: History

  @doc """
  Writes the value `version` had as a new version (v1, v2, rollback to 1 ->
  v3 with v1's value). `{:error, :version_not_found}` once the version has
  left the history. Options: `principal:`, `context:`, `lock_token:`,
  `optimizer_id:`.
  """
  @spec rollback_variable(session_id, ident, non_neg_integer, keyword) :: :ok | {:error, reason}
  defdelegate rollback_variable(session_id, ident, version, opts \\ []), to: History

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

  ## Watching (see `DSPex.Bridge.SessionStore.Watch`)

  @doc """
  Watches variables for the calling process; see
  `DSPex.Bridge.SessionStore.Watch.watch_variables/3`. Needs `:observe`.
  """
  defdelegate watch_variables(session_id, idents, opts \\ []), to: __MODULE__.Watch

  @doc "Ends a watch; see `DSPex.Bridge.SessionStore.Watch.unwatch/1`."
  defdelegate unwatch(ref), to: __MODULE__.Watch
end
