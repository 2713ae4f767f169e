defmodule DSPex.Bridge.AccessControl do
  @moduledoc """
  Who may do what with a variable: access rules, their checks, and the audit
  log of what was refused.

      rules = [
        %{session_pattern: :any, permissions: [:read]},
        %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
      ]

      :ok = AccessControl.validate_rules(rules)
      {:ok, _} = SessionStore.register_variable(sid, :shared, :float, 0.5, access_rules: rules)

      0.5 = SessionStore.get_variable_value(sid, :shared, nil, principal: "worker_7")
      {:error, :access_denied} =
        SessionStore.update_variable(sid, :shared, 0.6, %{}, principal: "worker_7")
      :ok = SessionStore.update_variable(sid, :shared, 0.6, %{}, principal: "admin_ops")

  ## The model

  Permissions are `:read`, `:write`, `:observe` and `:optimize`. A principal
  (the `principal:` option of every `DSPex.Bridge.SessionStore` call, a
  session id) may do an operation on a variable when it is

  1. the session holding the variable (the default principal), or
  2. the variable's owner: `metadata.owner_session`, else `metadata.created_by`, or
  3. granted by a rule: `%{session_pattern: :any | "glob", permissions: [..],
     conditions: %{}}` whose pattern matches the principal, whose
     permissions include the one asked for, and whose conditions all equal
     the caller's `context:` (missing keys are `nil`; `conditions` may be
     left out).

  Anything else is denied. Session patterns are anchored globs: `*` matches
  any run of characters, `?` exactly one, everything else (regex
  metacharacters included) only itself, so `"admin_*"` does not match
  `"not_admin_1"` and `"a.b*"` does not match `"axb"`.

  Rules are compiled once, when a variable is registered or its rules are
  replaced (`DSPex.Bridge.SessionStore.set_variable_permissions/4`), and
  decisions are cached per variable; replacing the rules replaces the cache.
  The same check runs inside the engine for every read, write, observe and
  optimize on the variable. Denials are recorded in a bounded audit ring per
  session (`audit_log/2`) and emit `[:dspex, :bridge, :access, :denied]`.
  See `docs/security.md` for the isolation guarantees and the limits.

  ## Session-level operations

  What concerns a whole session rather than a variable (its information,
  diagnostics, snapshot and audit log, its deletion) is reserved to the
  session itself: `principal:` left out or naming the session. Any other
  principal gets `{:error, :access_denied}`, audited (with no variable) and
  reported like every other denial; see `authorize_session/3`.

  ## Options

  Options are keyword lists of the keys each function documents; anything
  else is answered with `{:error, {:invalid_argument, {:bad_options, opts}}}`
  or `{:error, {:invalid_argument, {:unknown_options, keys}}}`, so a
  misspelt `principal:` never runs a call as the session itself.
  """

  alias DSPex.Bridge.{Native, Options, Telemetry}
  alias DSPex.Bridge.Backend.Router

  @type permission :: :read | :write | :observe | :optimize
  @type rule :: %{
          required(:session_pattern) => :any | String.t(),
          required(:permissions) => [permission],
          optional(:conditions) => map
        }
  @type audit_entry :: %{
          seq: pos_integer,
          at: DateTime.t(),
          event: :denied | :rate_limited | :rules_changed,
          principal: String.t() | nil,
          variable: String.t() | nil,
          permission: permission | nil
        }

  @type reason :: atom | {atom, term}

  @permissions [:read, :write, :observe, :optimize]

  @doc """
  Checks a permission against a variable map (as `SessionStore.get_variable/3`
  returns it, or any map with `metadata` and `access_rules`): `:ok` or
  `{:error, :access_denied}`. The owner has every permission.

      iex> variable = %{
      ...>   metadata: %{owner_session: "owner"},
      ...>   access_rules: [
      ...>     %{session_pattern: :any, permissions: [:read]},
      ...>     %{session_pattern: "admin_*", permissions: [:read, :write, :optimize]}
      ...>   ]
      ...> }
      iex> DSPex.Bridge.AccessControl.check_permission(variable, "owner", :write)
      :ok
      iex> DSPex.Bridge.AccessControl.check_permission(variable, "someone", :read)
      :ok
      iex> DSPex.Bridge.AccessControl.check_permission(variable, "someone", :write)
      {:error, :access_denied}
      iex> DSPex.Bridge.AccessControl.check_permission(variable, "not_admin_1", :write)
      {:error, :access_denied}

  The rules are evaluated in place by the engine's own matcher (no regex,
  nothing compiled or copied per call). A rule that is not well formed grants
  nothing (validate rules with `validate_rules/1` before storing them).
  """
  @spec check_permission(map, String.t(), permission, map) ::
          :ok | {:error, :access_denied | {:invalid_argument, term}}
  def check_permission(variable, session_id, permission, context \\ %{})

  def check_permission(variable, session_id, permission, context)
      when is_map(variable) and is_binary(session_id) and byte_size(session_id) <= 255 and
             permission in @permissions and is_map(context) do
    Native.acl_check_map(variable, session_id, permission, context)
  end

  def check_permission(_variable, _session_id, permission, _context)
      when permission not in @permissions,
      do: {:error, {:invalid_argument, {:unknown_permission, permission}}}

  def check_permission(variable, session_id, _permission, context) do
    {:error, {:invalid_argument, bad_check_argument(variable, session_id, context)}}
  end

  @doc """
  Validates a list of rules with the engine's own compiler: `:ok` or
  `{:error, {:invalid_rules, detail}}`, where `detail` is `:not_a_list`,
  `{:too_many_rules, max}`, `{:too_large, max_bytes}`, or `{index, reason}`
  for the first bad rule, `reason` being one of `:not_a_map`,
  `:missing_session_pattern`, `:missing_permissions`, `{:unknown_key, key}`,
  `{:invalid_session_pattern, value}`, `{:permissions_not_a_list, value}`,
  `{:invalid_permission, value}`, `{:conditions_not_a_map, value}`,
  `{:too_many_conditions, max}` or `{:invalid_condition_key, key}`.

      iex> DSPex.Bridge.AccessControl.validate_rules([
      ...>   %{session_pattern: :any, permissions: [:read]},
      ...>   %{session_pattern: "test_*", permissions: [:read, :write]}
      ...> ])
      :ok
      iex> DSPex.Bridge.AccessControl.validate_rules([%{session_pattern: :any, permissions: [:invalid_perm]}])
      {:error, {:invalid_rules, {0, {:invalid_permission, :invalid_perm}}}}
  """
  @spec validate_rules(term) :: :ok | {:error, {:invalid_rules, term}}
  def validate_rules(rules), do: Native.acl_validate(rules)

  @doc """
  The variables (maps, as in `check_permission/4`) on which `session_id` has
  `permission`, in their order.
  """
  @spec filter_accessible_variables([map], String.t(), permission, map) :: [map]
  def filter_accessible_variables(variables, session_id, permission, context \\ %{})
      when is_list(variables) do
    Enum.filter(variables, &(check_permission(&1, session_id, permission, context) == :ok))
  end

  @doc """
  The session's audit log, newest first: access denials, calls refused by
  the rate limit, and rule changes. Options: `limit:` (default 100),
  `event:` to keep one kind, `by:` to keep one principal's entries,
  `principal:` on whose behalf the log is read (a session-level operation:
  only the session itself may, see "Session-level operations"). An unknown
  session has an empty log.

  The ring keeps the last `audit_size` entries per session (default 256, set
  with `SessionStore.create_session/2`); `seq` numbers every entry ever
  recorded, so a gap shows how many were dropped.

      iex> {:ok, sid} = DSPex.Bridge.SessionStore.create_session("doc-audit")
      iex> DSPex.Bridge.AccessControl.audit_log(sid, principal: "someone_else")
      {:error, :access_denied}
      iex> [%{event: :denied, principal: "someone_else", variable: nil}] =
      ...>   DSPex.Bridge.AccessControl.audit_log(sid, by: "someone_else")
      iex> DSPex.Bridge.AccessControl.audit_log(sid, limit: -1)
      {:error, {:invalid_argument, {:limit, -1}}}
  """
  @spec audit_log(String.t(), keyword) :: [audit_entry] | {:error, reason}
  def audit_log(session_id, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:limit, :event, :by, :principal]),
         {:ok, limit} <- audit_limit(Keyword.get(opts, :limit, 100)),
         :ok <- audit_reader(session_id, opts) do
      # Filters apply before the limit, so read the whole ring when filtering.
      read = if opts[:event] || opts[:by], do: 1_000_000, else: limit

      case DSPex.Bridge.Backend.Router.audit_log(session_id, read) do
        {:ok, entries} ->
          entries
          |> Enum.filter(&keep?(&1, opts[:event], opts[:by]))
          |> Enum.take(limit)
          |> Enum.map(&%{&1 | at: DateTime.from_unix!(&1.at, :microsecond)})

        {:error, _} ->
          []
      end
    end
  end

  # An unknown session has an empty log, whoever asks.
  defp audit_reader(session_id, opts) do
    case authorize_session(session_id, :read, Keyword.take(opts, [:principal])) do
      {:error, :session_not_found} -> :ok
      result -> result
    end
  end

  defp audit_limit(limit) when is_integer(limit) and limit >= 0, do: {:ok, limit}
  defp audit_limit(limit), do: {:error, {:invalid_argument, {:limit, limit}}}

  @doc """
  The guard of session-level operations (`SessionStore.get_session/2`,
  `get_session_diagnostics/2`, `export_session/2`, `delete_session/2`,
  `audit_log/2`): `:ok` when the `principal:` is left out or is the session
  itself. Any other principal is refused with `{:error, :access_denied}`,
  recorded in the session's audit log (`variable: nil`, with the
  `permission` given: `:read` for the reads, `:write` for a deletion) and
  reported with `[:dspex, :bridge, :access, :denied]`. The engine holding
  the session makes the check; it takes no rate-limit token. Options:
  `principal:`.
  """
  @spec authorize_session(String.t(), permission, keyword) ::
          :ok | {:error, :access_denied | :session_not_found | {:invalid_argument, term}}
  def authorize_session(session_id, permission, opts \\ [])

  def authorize_session(session_id, permission, opts) when permission in @permissions do
    with {:ok, opts} <- Options.validate(opts, [:principal]) do
      case opts[:principal] do
        nil ->
          :ok

        principal when is_binary(principal) ->
          session_id
          |> Router.authorize_session(principal, permission)
          |> refusal(session_id, nil, principal, permission)

        _other ->
          {:error, {:invalid_argument, :bad_principal}}
      end
    end
  end

  def authorize_session(_session_id, permission, _opts),
    do: {:error, {:invalid_argument, {:unknown_permission, permission}}}

  @doc """
  The guard for operations on a variable made outside `SessionStore`'s own
  functions (optimizer locks ask for `:optimize`, observers for `:observe`):
  takes a token from the session's rate limit, checks the ACL for the
  `principal:` (with `context:`), audits and reports a refusal exactly as the
  store's own operations do. Options: `principal:`, `context:`.
  """
  @spec authorize(String.t(), atom | String.t(), permission, keyword) ::
          :ok | {:error, :access_denied | :rate_limited | atom | {atom, term}}
  def authorize(session_id, ident, permission, opts \\ [])

  def authorize(session_id, ident, permission, opts) when permission in @permissions do
    with {:ok, opts} <- Options.validate(opts, [:principal, :context]) do
      caller = caller(opts)

      session_id
      |> DSPex.Bridge.Backend.Router.authorize(ident, caller, permission)
      |> refusal(session_id, ident, caller, permission)
    end
  end

  def authorize(_session_id, _ident, permission, _opts),
    do: {:error, {:invalid_argument, {:unknown_permission, permission}}}

  ## Used by SessionStore

  @doc false
  # The caller term the engine takes: nil, a session id, {session_id,
  # context} when the call carries a context, {session_id, lock_token,
  # optimizer_id} for a write under an optimizer lock, or all four.
  def caller([]), do: nil
  def caller(principal: principal), do: principal

  def caller(opts) do
    principal = opts[:principal]
    context = opts[:context]

    case {opts[:lock_token], optimizer_text(opts[:optimizer_id])} do
      {nil, nil} when context == nil -> principal
      {nil, nil} -> {principal, context}
      {token, optimizer} when context == nil -> {principal, token, optimizer}
      {token, optimizer} -> {principal, context, token, optimizer}
    end
  end

  defp optimizer_text(id) when is_atom(id) and id not in [nil, true, false],
    do: Atom.to_string(id)

  defp optimizer_text(id), do: id

  @doc false
  # Reports a refusal (telemetry) and passes the result through.
  def refusal({:error, :access_denied} = error, session_id, ident, caller, permission) do
    Telemetry.execute(
      [:dspex, :bridge, :access, :denied],
      %{system_time: System.system_time()},
      %{
        session_id: session_id,
        variable: ident,
        principal: principal_of(caller),
        permission: permission
      }
    )

    error
  end

  def refusal({:error, :rate_limited} = error, session_id, ident, caller, _permission) do
    Telemetry.execute(
      [:dspex, :bridge, :rate_limit, :exceeded],
      %{system_time: System.system_time()},
      %{session_id: session_id, variable: ident, principal: principal_of(caller)}
    )

    error
  end

  def refusal(result, _session_id, _ident, _caller, _permission), do: result

  defp principal_of(caller) when is_tuple(caller), do: elem(caller, 0)
  defp principal_of(principal), do: principal

  defp keep?(entry, event, by) do
    (event == nil or entry.event == event) and (by == nil or entry.principal == by)
  end

  defp bad_check_argument(variable, _sid, _ctx) when not is_map(variable),
    do: {:variable, variable}

  defp bad_check_argument(_variable, sid, _ctx) when not is_binary(sid) or byte_size(sid) > 255,
    do: {:session_id, sid}

  defp bad_check_argument(_variable, _sid, ctx), do: {:context, ctx}
end
