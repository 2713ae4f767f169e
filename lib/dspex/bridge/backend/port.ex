defmodule DSPex.Bridge.Backend.Port do
  @moduledoc """
  The out-of-process backend: the same Rust engine as `DSPex.Bridge.Backend.Native`,
  run as its own OS process (`priv/native/dspex_port`), so nothing it does can
  take the VM down.

  This GenServer owns the Erlang port (`{:spawn_executable, _}`, `:binary`,
  `{:packet, 4}`, `:exit_status`). Callers encode their request in their own
  process, the server tags it with an id, writes it and remembers who asked;
  replies come back by id, in any order, and are decoded by the caller. Many
  requests are in flight at once, so concurrent callers share one pipe
  without waiting for each other's round trips.

      {:ok, "p1"} = DSPex.Bridge.SessionStore.create_session("p1", backend: :port)
      {:ok, _} = DSPex.Bridge.SessionStore.register_variable("p1", :x, :integer, 1)

  ## Failure

  - A call that gets no answer within its timeout (default 5 s, config
    `:port_timeout`) returns `{:error, :timeout}` if it only reads, and
    `{:error, :timeout_unknown_outcome}` if it writes (creates, deletes,
    imports, registers, sets, rolls back, changes rules or edges, sweeps,
    and the guards `acl_authorize`/`acl_authorize_session`, which take a
    rate-limit token and audit a refusal; `writes?/1` says which):
    the request may still be waiting in the pipe or running, so the write may
    or may not take effect later. Read the state back before retrying. The
    caller never exits. A create or delete that timed out leaves the id
    claimed by the port, so a session that does appear is reachable (if it
    never does, reads answer `{:error, :session_not_found}` and
    `session_delete/1` releases the id).
  - When the OS process dies, every call in flight returns
    `{:error, :backend_unavailable}` at once. The port's sessions lived in
    that process and are gone; sessions of the NIF backend are untouched.
    This server stays up and starts a fresh program after a delay that
    doubles with each death in a row (`min_restart_delay_ms`, default 10,
    up to `max_restart_delay_ms`, default 5 000; a program that ran for the
    longest delay starts the count again). Calls made meanwhile return
    `{:error, :backend_unavailable}` at once. However often the program
    dies, this server does not exit for it, so a crash loop never reaches
    the application's supervisor.
  - Bad frames never reach the program from here; the program answers those
    it gets from elsewhere with `{:error, {:bad_request, _}}` and carries on.

  ## Overload

  The program serves one pipe: requests past what it can answer queue in
  this server and in the pipe, and a caller would wait there until its
  timeout. So at most `max_in_flight` requests (default 1024; read at each
  call) are admitted at once, counted from the caller's send until this
  server answers it (a reply, `:backend_unavailable`, or the program's
  death; a caller that timed out still holds its place until then, so a
  stopped program cannot collect more). Past that a call returns
  `{:error, :overloaded}` at once, having sent nothing: whatever it asked,
  it did not happen. Admitted calls wait at most for the requests ahead of
  them; the server's mailbox and its table of pending requests stay below
  `max_in_flight`. `DSPex.Bridge.State.Bridged` neither retries
  `:overloaded` nor counts it against the breaker.
  - No integer is truncated on the way: an argument outside the range the
    NIF accepts gets the NIF's error (`expected_version` beyond 64 unsigned
    bits `{:error, {:invalid_argument, :expected_non_negative_integer}}`, a
    rollback version beyond them `{:error, :version_not_found}`, a history
    or audit limit beyond 63 bits `{:error, {:invalid_argument, :bad_limit}}`,
    values `{:error, {:invalid_value, :integer_out_of_range}}`).
  - Replies never create atoms: an atom name the VM does not know comes back
    as a binary (`DSPex.Bridge.MsgPack.decode/1`). The engine's own
    vocabulary (reasons, keys, types; `dspex_core::vocabulary`) exists as
    atoms once the server has started: the NIF creates it when it loads.

  ## Configuration

      config :dspex_bridge,
        port_timeout: 5_000,               # per call, milliseconds
        port: [max_frame_bytes: 64 * 1024 * 1024, workers: 2,
               min_restart_delay_ms: 10, max_restart_delay_ms: 5_000,
               max_in_flight: 1024]

  The store limits (`config :dspex_bridge, limits: ...`) apply to both
  backends. The restart delays are read at each restart. Telemetry:
  `[:dspex, :bridge, :port, :started | :exited]`.

  ## Wire format

  Each frame is one MessagePack message (`DSPex.Bridge.MsgPack`): requests
  `[id, %{command => %{argument => value}}]`, replies `[id, result]` where `result` is the
  term this module returns. Commands and their arguments are defined once, in
  `native/dspex_core/src/command/` (one module per concern).
  """
  use GenServer
  @behaviour DSPex.Bridge.Backend

  require Logger

  alias DSPex.Bridge.{Admission, MsgPack, Telemetry}
  alias DSPex.Bridge.State.Bridged

  @sessions __MODULE__.Sessions
  @limit_flags [
    max_value_bytes: "--max-value-bytes",
    max_name_bytes: "--max-name-bytes",
    max_variables: "--max-variables",
    max_history: "--max-history",
    max_snapshot_bytes: "--max-snapshot-bytes"
  ]
  @max_u64 0xFFFF_FFFF_FFFF_FFFF
  @max_i64 0x7FFF_FFFF_FFFF_FFFF

  # Which commands change the engine's state (past its timeout, whether such
  # a request took effect is unknown; see "Failure"): the core's
  # `Operation::WRITES` of each command, read from the NIF once
  # (`Native.command_catalog/0`) and kept in a persistent term.
  @catalog_key {__MODULE__, :writes}
  @encode_only :dspex_port_encode_only
  # Requests admitted to the program's pipe at once (see "Overload").
  @gate :dspex_port
  @default_max_in_flight 1024

  ## Lifecycle

  @doc """
  Starts the server and the port program. Options (defaults from the
  `:port` config): `max_frame_bytes:`, `workers:`, `limits:`, `name:`.
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts \\ []) do
    GenServer.start_link(__MODULE__, opts, name: Keyword.get(opts, :name, __MODULE__))
  end

  @doc """
  A child spec. The server outlives the program (it restarts it itself), so
  its supervisor only sees the server's own failures.
  """
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}, restart: :permanent}
  end

  @doc "The path of the port program."
  @spec executable() :: Path.t()
  def executable, do: Path.join(:code.priv_dir(:dspex_bridge), "native/dspex_port")

  @doc """
  True if `command` changes the engine's state (the core's
  `Operation::WRITES`): past its timeout such a call answers
  `{:error, :timeout_unknown_outcome}`. False for a name the engine does
  not know.
  """
  @spec writes?(String.t()) :: boolean
  def writes?(command) do
    catalog =
      case :persistent_term.get(@catalog_key, nil) do
        nil -> load_catalog()
        catalog -> catalog
      end

    Map.get(catalog, command, false)
  end

  # The NIF is always loaded in the VM; loading it also creates the
  # engine's vocabulary as atoms, so replies decode it as atoms.
  defp load_catalog do
    catalog = Map.new(DSPex.Bridge.Native.command_catalog())

    if :persistent_term.get(@catalog_key, nil) != catalog,
      do: :persistent_term.put(@catalog_key, catalog)

    catalog
  end

  @doc "The OS pid of the running port program, or `nil` while it is down."
  @spec os_pid() :: non_neg_integer | nil
  def os_pid do
    GenServer.call(__MODULE__, :os_pid)
  catch
    :exit, _ -> nil
  end

  @doc "True if the port backend holds any session (one `:ets` lookup)."
  @spec owns_any?() :: boolean
  def owns_any? do
    :ets.first(@sessions) != :"$end_of_table"
  rescue
    ArgumentError -> false
  end

  @doc "True if `sid` is a session of the port backend (one `:ets` lookup)."
  @spec owns?(String.t()) :: boolean
  def owns?(sid) do
    :ets.member(@sessions, sid)
  rescue
    # No table: the server is (re)starting and owns nothing yet.
    ArgumentError -> false
  end

  @doc """
  Sends one command and waits for its result: `:ok`, `{:ok, value}` or
  `{:error, reason}`. `args` is a keyword list of the command's arguments
  by their core names (`native/dspex_core/src/command/`); optional ones may
  be left off, an unknown one is `{:error, {:bad_request, _}}`. Past
  `timeout`, `{:error, :timeout}`, or `{:error, :timeout_unknown_outcome}`
  for a command that writes.

      DSPex.Bridge.Backend.Port.request("session_list", [])
      #=> {:ok, ["p1"]}
  """
  @spec request(String.t(), keyword, timeout) :: term
  def request(command, args, timeout \\ default_timeout()) do
    encoded = Enum.map(args, fn {k, v} -> {k, MsgPack.encode!(v)} end)
    send_command(command, encoded, timeout)
  catch
    {:invalid_value, _} = reason -> {:error, reason}
  end

  ## Backend callbacks

  @impl DSPex.Bridge.Backend
  def session_create(sid, opts) do
    with :ok <- check_sid(sid),
         :ok <- claim(sid) do
      result =
        call("session_create", fn ->
          [
            session: str(sid),
            ttl_ms: MsgPack.encode!(opts[:ttl_ms]),
            max_history: MsgPack.encode!(opts[:max_history]),
            metadata: MsgPack.encode!(opts[:metadata]),
            rate_limit: MsgPack.encode!(opts[:rate_limit]),
            audit_capacity: MsgPack.encode!(opts[:audit_capacity])
          ]
        end)

      # Past its timeout the session may yet be created: keep the id.
      if result not in [:ok, {:error, :timeout_unknown_outcome}], do: release(sid)
      result
    end
  end

  @impl DSPex.Bridge.Backend
  def session_info(sid), do: call("session_info", fn -> [session: sid!(sid)] end)

  @impl DSPex.Bridge.Backend
  def session_memory(sid), do: call("session_memory", fn -> [session: sid!(sid)] end)

  @doc """
  Deletes a session. An id the program does not have (it expired, or a
  create timed out and never happened) is released too, so it can be used
  again.
  """
  @impl DSPex.Bridge.Backend
  def session_delete(sid) do
    case call("session_delete", fn -> [session: sid!(sid)] end) do
      :ok ->
        release(sid)

      {:error, :session_not_found} = error ->
        release(sid)
        error

      error ->
        error
    end
  end

  @doc """
  Ids of the program's live sessions, or `{:error, reason}` when it does not
  answer (`:timeout`, `:backend_unavailable`): never a silently empty list.
  """
  @impl DSPex.Bridge.Backend
  @spec session_list() :: [String.t()] | {:error, term}
  def session_list do
    case call("session_list", fn -> [] end) do
      {:ok, ids} -> ids
      {:error, _} = error -> error
    end
  end

  @impl DSPex.Bridge.Backend
  def session_sweep do
    case call("session_sweep", fn -> [] end) do
      {:ok, ids} ->
        Enum.each(ids, &release/1)
        ids

      {:error, _} ->
        []
    end
  end

  @impl DSPex.Bridge.Backend
  def session_export(sid), do: call("session_export", fn -> [session: sid!(sid)] end)

  @impl DSPex.Bridge.Backend
  def session_import(snapshot, new_id) when is_binary(snapshot) do
    with :ok <- if(new_id, do: check_sid(new_id), else: :ok),
         :ok <- if(new_id, do: claim(new_id), else: :ok) do
      case call("session_import", fn ->
             [snapshot: MsgPack.encode!(snapshot), session: opt_sid(new_id)]
           end) do
        {:ok, sid} = ok ->
          :ets.insert(@sessions, {sid})
          ok

        {:error, :timeout_unknown_outcome} = error ->
          error

        error ->
          if new_id, do: release(new_id)
          error
      end
    end
  end

  def session_import(_snapshot, _new_id), do: {:error, {:invalid_snapshot, "expected a binary"}}

  @impl DSPex.Bridge.Backend
  def var_register(sid, name, type, initial, opts, principal) do
    call("var_register", fn ->
      [
        session: sid!(sid),
        name: MsgPack.encode!(name),
        var_type: type!(type),
        initial: MsgPack.encode!(initial),
        constraints: MsgPack.encode!(opts[:constraints]),
        metadata: MsgPack.encode!(opts[:metadata]),
        description: description!(opts[:description]),
        access_rules: MsgPack.encode!(opts[:access_rules]),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def var_get(sid, ident, principal) do
    call("var_get", fn -> ident_args(sid, ident, principal) end)
  end

  @impl DSPex.Bridge.Backend
  def var_get_value(sid, ident, principal) do
    call("var_get_value", fn -> ident_args(sid, ident, principal) end)
  end

  @impl DSPex.Bridge.Backend
  def var_exists(sid, ident, principal) do
    call("var_exists", fn -> ident_args(sid, ident, principal) end)
  end

  @impl DSPex.Bridge.Backend
  def var_set(sid, ident, value, metadata, expected, principal) do
    call("var_set", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode_ident!(ident),
        value: MsgPack.encode!(value),
        metadata: MsgPack.encode!(metadata),
        expected_version: expected!(expected),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def var_set_many(sid, updates, atomic, principal) when is_list(updates) do
    call("var_set_many", fn ->
      [
        session: sid!(sid),
        updates: [MsgPack.array_header(length(updates)) | Enum.map(updates, &update!/1)],
        atomic: MsgPack.encode!(atomic == true),
        actor: actor!(principal)
      ]
    end)
  end

  def var_set_many(_sid, _updates, _atomic, _principal),
    do: {:error, {:invalid_argument, :updates_must_be_a_list}}

  @impl DSPex.Bridge.Backend
  def var_history(sid, ident, limit, principal) do
    call("var_history", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode_ident!(ident),
        limit: limit!(limit),
        actor: actor!(principal)
      ]
    end)
  end

  # As the NIF: the session and the caller are checked before the version,
  # and a version that is not a 64-bit unsigned integer is not found.
  @impl DSPex.Bridge.Backend
  def var_rollback(sid, ident, version, principal) do
    call("var_rollback", fn ->
      sid = sid!(sid)
      actor = actor!(principal)

      unless is_integer(version) and version >= 0 and version <= @max_u64,
        do: throw(:version_not_found)

      [
        session: sid,
        ident: MsgPack.encode_ident!(ident),
        version: MsgPack.uint(version),
        actor: actor
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def var_delete(sid, ident, principal) do
    call("var_delete", fn -> ident_args(sid, ident, principal) end)
  end

  @impl DSPex.Bridge.Backend
  def var_list(sid, pattern, principal) do
    call("var_list", fn ->
      [session: sid!(sid), pattern: pattern!(pattern), actor: actor!(principal)]
    end)
  end

  @impl DSPex.Bridge.Backend
  def var_names(sid, pattern, principal) do
    call("var_names", fn ->
      [session: sid!(sid), pattern: pattern!(pattern), actor: actor!(principal)]
    end)
  end

  @impl DSPex.Bridge.Backend
  def acl_set_rules(sid, ident, rules, principal) do
    call("acl_set_rules", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode_ident!(ident),
        rules: MsgPack.encode!(rules),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def acl_check(sid, ident, principal, permission) do
    call("acl_check", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode_ident!(ident),
        permission: permission!(permission),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def acl_authorize(sid, ident, principal, permission) do
    call("acl_authorize", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode_ident!(ident),
        permission: permission!(permission),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def acl_authorize_session(sid, principal, permission) do
    call("acl_authorize_session", fn ->
      [
        session: sid!(sid),
        permission: permission!(permission),
        principal: if(principal, do: str(principal!(principal)), else: <<0xC0>>)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def acl_audit_log(sid, limit),
    do: call("acl_audit_log", fn -> [session: sid!(sid), limit: limit!(limit)] end)

  # Dependency graph (DSPex.Bridge.DependencyManager). Idents go through
  # `encode!/1`, so `nil` and booleans are refused as names, as the NIF does.

  @impl DSPex.Bridge.Backend
  def graph_add_edge(sid, from, to, type, principal) do
    call("graph_add_edge", fn ->
      [
        session: sid!(sid),
        from: MsgPack.encode!(from),
        to: MsgPack.encode!(to),
        edge_type: type!(type),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_remove_edge(sid, from, to, principal) do
    call("graph_remove_edge", fn ->
      [
        session: sid!(sid),
        from: MsgPack.encode!(from),
        to: MsgPack.encode!(to),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_clear(sid, var, principal) do
    call("graph_clear", fn ->
      [session: sid!(sid), ident: MsgPack.encode!(var), actor: actor!(principal)]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_dependencies(sid, var, transitive, principal) do
    call("graph_dependencies", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode!(var),
        transitive: MsgPack.encode!(transitive == true),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_dependents(sid, var, transitive, principal) do
    call("graph_dependents", fn ->
      [
        session: sid!(sid),
        ident: MsgPack.encode!(var),
        transitive: MsgPack.encode!(transitive == true),
        actor: actor!(principal)
      ]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_update_order(sid, changed, principal) when is_list(changed) do
    call("graph_update_order", fn ->
      [
        session: sid!(sid),
        changed: [MsgPack.array_header(length(changed)) | Enum.map(changed, &MsgPack.encode!/1)],
        actor: actor!(principal)
      ]
    end)
  end

  def graph_update_order(_sid, _changed, _principal),
    do: {:error, {:invalid_argument, :expected_a_list}}

  @impl DSPex.Bridge.Backend
  def graph_render(sid, format, principal) do
    call("graph_render", fn ->
      [session: sid!(sid), format: type!(format), actor: actor!(principal)]
    end)
  end

  @impl DSPex.Bridge.Backend
  def graph_info(sid, principal) do
    call("graph_info", fn -> [session: sid!(sid), actor: actor!(principal)] end)
  end

  ## Requests (in the caller's process)

  defp default_timeout, do: Application.get_env(:dspex_bridge, :port_timeout, 5_000)

  # Encodes the arguments, turning a refused argument into the error the
  # NIF gives for it, then sends.
  defp call(command, args_fun) do
    send_command(command, args_fun.(), default_timeout())
  catch
    {:invalid_value, _} = reason -> {:error, reason}
    {:invalid_argument, _} = reason -> {:error, reason}
    :version_not_found -> {:error, :version_not_found}
  end

  # Every request goes through the backend's protection (breaker, retries,
  # cache, dead-letter queue; `DSPex.Bridge.State.Bridged`).
  defp send_command(command, args, timeout) do
    if Process.get(@encode_only) do
      throw({@encode_only, command, IO.iodata_to_binary([0x81, str(command), named(args)])})
    end

    Bridged.run(:port, command, args, writes?(command), fn ->
      send_raw(command, args, timeout)
    end)
  end

  @doc false
  # The command a backend callback sends, without sending it:
  # `{:ok, name, frame, write?}` (the frame as `send_raw/3` would put it on
  # the wire), or the callback's `{:error, reason}` for a refused argument.
  # The Raft backend (`Backend.Raft.Command`) appends these frames to its
  # log, so both transports share one encoding of every operation.
  def encode_command(fun, args) do
    Process.put(@encode_only, true)

    try do
      apply(__MODULE__, fun, args)
    catch
      {@encode_only, name, frame} -> {:ok, name, frame, writes?(name)}
    else
      {:error, _} = error -> error
    after
      Process.delete(@encode_only)
    end
  end

  @doc false
  # `State.Bridged`'s replay of a parked request: `args` already encoded.
  def bridged_execute(command, args), do: send_raw(command, args, default_timeout())

  # A command goes over as `%{name => %{argument => value}}`, arguments by
  # the core's names (`native/dspex_core/src/command/`), never by position.
  # Admitted first (see "Overload"): the server gives the place back when it
  # answers; a request that never reached it (no server) gives it back here.
  defp send_raw(command, args, timeout) do
    frame = [0x81, str(command), named(args)]

    max = max_in_flight()

    case Admission.admit(@gate, max) do
      :ok ->
        case GenServer.call(__MODULE__, {:request, frame}, timeout) do
          {:reply, bytes} ->
            case MsgPack.decode(bytes) do
              {:ok, result} -> result
              {:error, _} -> {:error, {:internal_error, "undecodable reply"}}
            end

          {:error, _} = error ->
            error
        end

      {:error, :overloaded} = refused ->
        Admission.refused(:port, max, fn -> session_of(args) end)
        refused
    end
  catch
    :exit, {:timeout, _} ->
      if writes?(command), do: {:error, :timeout_unknown_outcome}, else: {:error, :timeout}

    :exit, {:noproc, _} ->
      Admission.release(@gate)
      {:error, :backend_unavailable}

    :exit, _ ->
      {:error, :backend_unavailable}
  end

  # The session a request names (its `session:` argument, encoded), for
  # the refusal event; nil for requests that name none.
  defp session_of(args) do
    with {:session, encoded} <- List.keyfind(args, :session, 0),
         {:ok, sid} when is_binary(sid) <- MsgPack.decode(IO.iodata_to_binary(encoded)) do
      sid
    else
      _ -> nil
    end
  rescue
    ArgumentError -> nil
  end

  defp max_in_flight do
    case Application.get_env(:dspex_bridge, :port, [])[:max_in_flight] do
      n when is_integer(n) and n > 0 -> n
      _ -> @default_max_in_flight
    end
  end

  defp str(s), do: MsgPack.encode!(s)

  # Already encoded arguments, as a MessagePack map keyed by name.
  defp named(args) do
    n = length(args)
    header = if n < 16, do: <<0x80 + n>>, else: <<0xDE, n::16>>
    [header | Enum.map(args, fn {k, v} -> [str(Atom.to_string(k)), v] end)]
  end

  defp ident_args(sid, ident, principal),
    do: [session: sid!(sid), ident: MsgPack.encode_ident!(ident), actor: actor!(principal)]

  defp check_sid(sid) when is_binary(sid) do
    if String.valid?(sid), do: :ok, else: {:error, {:invalid_argument, :bad_session_id}}
  end

  defp check_sid(_), do: {:error, {:invalid_argument, :bad_session_id}}

  defp sid!(sid) do
    case check_sid(sid) do
      :ok -> str(sid)
      {:error, reason} -> throw(reason)
    end
  end

  defp opt_sid(nil), do: <<0xC0>>
  defp opt_sid(sid), do: sid!(sid)

  defp principal!(p) when is_binary(p) do
    if String.valid?(p), do: p, else: throw({:invalid_argument, :bad_principal})
  end

  defp principal!(_), do: throw({:invalid_argument, :bad_principal})

  # Who a call is for (`Backend.principal`): `nil`, a principal,
  # `{principal, context}`, `{principal, lock_token, optimizer_id}` or
  # `{principal, context, lock_token, optimizer_id}`, as the core's `Actor`.
  defp actor!(nil), do: named([])
  defp actor!({principal, context}), do: actor!({principal, context, nil, nil})

  defp actor!({principal, token, optimizer}) when not is_map(token),
    do: actor!({principal, nil, token, optimizer})

  defp actor!({principal, context, token, optimizer}) do
    unless is_nil(context) or is_map(context),
      do: throw({:invalid_argument, :context_must_be_a_map})

    [
      principal: principal && str(principal!(principal)),
      context: context && MsgPack.encode!(context),
      lock_token: token && lock_token!(token),
      optimizer_id: optimizer && str(optimizer_id!(optimizer))
    ]
    |> Enum.reject(fn {_, v} -> is_nil(v) end)
    |> named()
  end

  defp actor!(principal), do: named(principal: str(principal!(principal)))

  defp lock_token!(n) when is_integer(n) and n >= 0 and n <= @max_u64, do: MsgPack.uint(n)
  defp lock_token!(_), do: throw({:invalid_argument, :bad_lock_token})

  defp optimizer_id!(id) when is_binary(id) and byte_size(id) in 1..255 do
    if String.valid?(id), do: id, else: throw({:invalid_argument, :bad_optimizer_id})
  end

  defp optimizer_id!(_), do: throw({:invalid_argument, :bad_optimizer_id})

  defp permission!(p) when is_atom(p), do: MsgPack.encode_ident!(p)
  defp permission!(_), do: throw({:invalid_argument, :unknown_permission})

  defp expected!(nil), do: <<0xC0>>
  # The NIF's ranges: u64 for versions, i64 for limits.
  defp expected!(n) when is_integer(n) and n >= 0 and n <= @max_u64, do: MsgPack.uint(n)
  defp expected!(_), do: throw({:invalid_argument, :expected_non_negative_integer})

  defp limit!(n) when is_integer(n) and n >= 0 and n <= @max_i64, do: MsgPack.uint(n)
  defp limit!(_), do: throw({:invalid_argument, :bad_limit})

  defp type!(type) when is_atom(type), do: MsgPack.encode_ident!(type)
  defp type!(_), do: throw({:invalid_argument, :type_must_be_an_atom})

  defp description!(nil), do: <<0xC0>>
  defp description!(d) when is_binary(d), do: str(d)
  defp description!(_), do: throw({:invalid_argument, :description_must_be_a_string})

  defp pattern!(nil), do: <<0xC0>>
  defp pattern!(p) when is_binary(p), do: str(p)
  defp pattern!(_), do: throw({:invalid_argument, :pattern_must_be_a_string})

  defp update!({ident, value, metadata, expected}) do
    named(
      ident: MsgPack.encode_ident!(ident),
      value: MsgPack.encode!(value),
      metadata: MsgPack.encode!(metadata),
      expected_version: expected!(expected)
    )
  end

  defp update!(_), do: throw({:invalid_argument, :bad_update})

  # Session ownership: the table lists the port's sessions, so a caller that
  # missed a session in the NIF store learns in one lookup whether to ask
  # here. An id is claimed before it is created, so a concurrent create of
  # the same id in the other backend sees it (see Backend.Router).
  defp claim(sid) do
    if :ets.insert_new(@sessions, {sid}), do: :ok, else: {:error, :already_exists}
  rescue
    ArgumentError -> {:error, :backend_unavailable}
  end

  defp release(sid) do
    :ets.delete(@sessions, sid)
    :ok
  rescue
    ArgumentError -> :ok
  end

  ## Server

  # The server owns the program: when it dies the server answers
  # `:backend_unavailable` and starts another after a backoff; it never
  # exits because the program did (a crash loop must not reach the
  # supervisors above it).

  @impl GenServer
  def init(opts) do
    Process.flag(:trap_exit, true)
    # What an earlier server had admitted died with its mailbox.
    Admission.reset(@gate)
    # Replies carry the engine's vocabulary: the NIF makes it atoms.
    load_catalog()
    config = Keyword.merge(Application.get_env(:dspex_bridge, :port, []), opts)
    :ets.new(@sessions, [:named_table, :public, :set, read_concurrency: true])
    path = executable()

    if File.exists?(path) do
      state = %{
        path: path,
        args: args(config),
        opts: opts,
        port: nil,
        os_pid: nil,
        started_at: nil,
        deaths: 0,
        next_id: 1,
        pending: %{}
      }

      {:ok, spawn_program(state)}
    else
      Logger.warning("dspex_bridge: #{path} is missing; the port backend is not started")
      :ignore
    end
  end

  defp spawn_program(state) do
    port =
      Port.open({:spawn_executable, state.path}, [
        :binary,
        {:packet, 4},
        :exit_status,
        args: state.args
      ])

    # No os_pid: the program is already gone, and its exit is on its way.
    os_pid =
      case Port.info(port, :os_pid) do
        {:os_pid, os_pid} -> os_pid
        nil -> nil
      end

    Telemetry.execute(
      [:dspex, :bridge, :port, :started],
      %{system_time: System.system_time()},
      %{os_pid: os_pid}
    )

    %{state | port: port, os_pid: os_pid, started_at: System.monotonic_time(:millisecond)}
  rescue
    # Out of processes or file descriptors, say: try again later.
    e in [ErlangError, ArgumentError] ->
      Logger.warning("dspex_bridge: cannot start the port program: #{Exception.message(e)}")
      schedule_restart(state)
  end

  # The delay before the next start doubles with each death in a row, from
  # `min_restart_delay_ms` to `max_restart_delay_ms`; a program that ran at
  # least the longest delay starts the count again.
  defp schedule_restart(state) do
    config = Keyword.merge(Application.get_env(:dspex_bridge, :port, []), state.opts)
    min_delay = positive(config[:min_restart_delay_ms], 10)
    max_delay = max(positive(config[:max_restart_delay_ms], 5_000), min_delay)

    lived =
      if state.started_at, do: System.monotonic_time(:millisecond) - state.started_at, else: 0

    deaths = if lived >= max_delay, do: 1, else: state.deaths + 1
    delay = min(max_delay, min_delay * Bitwise.bsl(1, min(deaths - 1, 32)))
    # A program that keeps dying (a bad option exits with 2) must show up.
    Logger.warning("dspex_bridge: port program down (#{deaths} in a row); restart in #{delay} ms")
    Process.send_after(self(), :restart, delay)
    %{state | port: nil, os_pid: nil, started_at: nil, deaths: deaths}
  end

  defp positive(n, _default) when is_integer(n) and n > 0, do: n
  defp positive(_, default), do: default

  defp args(config) do
    limits = Keyword.get(config, :limits) || Application.get_env(:dspex_bridge, :limits, %{})

    limit_args =
      for {key, flag} <- @limit_flags,
          n = limits[key],
          is_integer(n),
          n > 0,
          do: [flag, Integer.to_string(n)]

    frame_args =
      for {key, flag} <- [max_frame_bytes: "--max-frame-bytes", workers: "--workers"],
          n = config[key],
          is_integer(n),
          n > 0,
          do: [flag, Integer.to_string(n)]

    List.flatten([frame_args, limit_args])
  end

  @impl GenServer
  # Every request answered here gives its admission back (`send_raw/3`).
  def handle_call({:request, _frame}, _from, %{port: nil} = state) do
    Admission.release(@gate)
    {:reply, {:error, :backend_unavailable}, state}
  end

  def handle_call({:request, frame}, from, %{port: port, next_id: id} = state) do
    Port.command(port, [0x92, MsgPack.uint(id) | frame])
    {:noreply, %{state | next_id: id + 1, pending: Map.put(state.pending, id, from)}}
  rescue
    ArgumentError ->
      Admission.release(@gate)
      {:reply, {:error, :backend_unavailable}, state}
  end

  def handle_call(:os_pid, _from, state), do: {:reply, state.os_pid, state}

  @doc false
  # The optimizer-lock table (in the VM, `DSPex.Bridge.OptimizerCoordinator`)
  # moved a port session's variable fence: pass it on as a `var_fence`
  # command. The NIF sends this from the process whose call moved the lock,
  # before that call returns, so the holder's own writes reach the program
  # after the fence. Nobody waits for the reply (its id is not pending).
  @impl GenServer
  def handle_info({:dspex_fence, sid, var_id, change}, %{port: port, next_id: id} = state)
      when is_port(port) do
    change =
      case change do
        {:granted, optimizer, token, preempted} ->
          named(
            granted:
              named(
                optimizer: str(optimizer),
                token: MsgPack.uint(token),
                preempted: MsgPack.encode!(preempted)
              )
          )

        {:released, token} ->
          named(released: named(token: MsgPack.uint(token)))
      end

    frame = [0x81, str("var_fence"), named(session: str(sid), ident: str(var_id), change: change)]
    Port.command(port, [0x92, MsgPack.uint(id) | frame])
    {:noreply, %{state | next_id: id + 1}}
  rescue
    ArgumentError -> {:noreply, state}
  end

  def handle_info({port, {:data, <<0x92, reply::binary>>}}, %{port: port} = state) do
    case MsgPack.decode_prefix(reply) do
      {:ok, id, result} when is_integer(id) ->
        case :maps.take(id, state.pending) do
          {from, pending} ->
            # The place first: a caller that has its answer may call again.
            Admission.release(@gate)
            GenServer.reply(from, {:reply, result})
            {:noreply, %{state | pending: pending}}

          :error ->
            {:noreply, state}
        end

      _ ->
        Logger.warning("dspex_bridge: port reply without a request id: #{inspect(reply)}")
        {:noreply, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) when is_port(port) do
    exited(state, status)
  end

  # Writing to a program that was just killed can close the port (epipe)
  # first; the port is then gone and no exit status will follow.
  def handle_info({:EXIT, port, _reason}, %{port: port} = state) when is_port(port) do
    exited(state, nil)
  end

  def handle_info(:restart, %{port: nil} = state), do: {:noreply, spawn_program(state)}

  def handle_info(_other, state), do: {:noreply, state}

  defp exited(state, status) do
    fail_pending(state)
    # The program's sessions died with it.
    :ets.delete_all_objects(@sessions)

    Telemetry.execute(
      [:dspex, :bridge, :port, :exited],
      %{system_time: System.system_time(), in_flight: map_size(state.pending)},
      %{os_pid: state.os_pid, status: status}
    )

    {:noreply, schedule_restart(%{state | pending: %{}})}
  end

  @impl GenServer
  def terminate(_reason, state) do
    fail_pending(state)

    if is_port(state.port) do
      # The program sees end of input and exits on its own.
      try do
        Port.close(state.port)
      rescue
        ArgumentError -> :ok
      end
    end

    :ok
  end

  defp fail_pending(%{pending: pending}) do
    if map_size(pending) > 0, do: Admission.release(@gate, map_size(pending))

    Enum.each(pending, fn {_id, from} -> GenServer.reply(from, {:error, :backend_unavailable}) end)
  end
end
