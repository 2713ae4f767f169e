defmodule DSPex.Bridge.Gateway.Handler do
  @moduledoc false
  # One unary RPC of BridgeService, run in a short-lived process of its own:
  # authenticate, check the token covers the session, call the public
  # Elixir API with the token's principal, shape the answer. No semantics of
  # its own: what is allowed, what a value may be, what versions do, is the
  # store's.
  #
  # Answers: {:reply, response_map} or {:status, code, message, reason_name}.

  alias DSPex.Bridge.{DependencyManager, OptimizerCoordinator, SessionStore, Telemetry}
  alias DSPex.Bridge.Gateway.{Tokens, Wire}

  @capture :dspex_gateway_capture
  @permissions %{
    "read" => :read,
    "write" => :write,
    "observe" => :observe,
    "optimize" => :optimize
  }
  @edge_types %{"" => :data, "data" => :data, "derived" => :derived, "control" => :control}
  @conflict %{"abort" => :abort, "wait" => :wait, "preempt" => :preempt}
  @tools ~w(ExecuteTool ExecuteStreamingTool RegisterTools GetExposedElixirTools ExecuteElixirTool)

  ## Context

  @doc false
  # {:ok, ctx} or a status: the token checked, the trace context set.
  def context(meta, config) do
    trace(meta["traceparent"])

    with {:ok, auth} <- authenticate(meta, config.auth) do
      {:ok,
       %{
         auth: auth,
         meta: meta,
         binary?: meta["x-dspex-binary"] == "raw-le",
         lock: lock_opts(meta)
       }}
    end
  end

  defp authenticate(_meta, :none), do: {:ok, :none}

  defp authenticate(meta, _token) do
    with "Bearer " <> token <- meta["authorization"] || :missing,
         {:ok, auth} <- Tokens.verify(String.trim(token)) do
      {:ok, auth}
    else
      {:error, :expired} -> {:status, :unauthenticated, "token expired", "unauthenticated"}
      :missing -> {:status, :unauthenticated, "missing bearer token", "unauthenticated"}
      _ -> {:status, :unauthenticated, "invalid bearer token", "unauthenticated"}
    end
  end

  # W3C trace context: `00-<32 hex>-<16 hex>-<2 hex>`; anything else is ignored.
  defp trace(tp) when is_binary(tp) and byte_size(tp) == 55 do
    if Regex.match?(~r/\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\z/, tp),
      do: Telemetry.put_trace_context(tp)
  end

  defp trace(_), do: :ok

  defp lock_opts(meta) do
    token =
      case Integer.parse(meta["x-dspex-lock-token"] || "") do
        {n, ""} when n > 0 -> [lock_token: n]
        _ -> []
      end

    case meta["x-dspex-optimizer-id"] do
      id when is_binary(id) and id != "" -> [{:optimizer_id, id} | token]
      _ -> token
    end
  end

  # The principal for calls on `sid`: the session itself when the token's
  # principal is that session (or `:session`), else the principal.
  defp principal(%{auth: :none}, _sid), do: []
  defp principal(%{auth: %{principal: :session}}, _sid), do: []
  defp principal(%{auth: %{principal: sid}}, sid), do: []
  defp principal(%{auth: %{principal: p}}, _sid), do: [principal: p]

  defp who(ctx, sid) do
    case principal(ctx, sid) do
      [] -> sid
      [principal: p] -> p
    end
  end

  defp session(%{"session_id" => sid}, ctx) when is_binary(sid) and sid != "" do
    case ctx.auth do
      :none ->
        {:ok, sid}

      auth ->
        if Tokens.allows?(auth, sid),
          do: {:ok, sid},
          else:
            {:status, :permission_denied, "the token does not cover session #{sid}",
             "access_denied"}
    end
  end

  defp session(_req, _ctx),
    do: {:status, :invalid_argument, "session_id is required", "invalid_argument"}

  defp ident(%{"variable_identifier" => id}) when is_binary(id) and id != "", do: {:ok, id}

  defp ident(_),
    do: {:status, :invalid_argument, "variable_identifier is required", "invalid_argument"}

  @doc false
  def session_for(req, ctx), do: session(req, ctx)

  @doc false
  def principal_opts(ctx, sid), do: principal(ctx, sid)

  ## Calls

  @doc false
  def call(method, req, ctx) do
    if method in @tools do
      {:status, :unimplemented, "#{method} belongs to the worker pool, not to this server",
       "unimplemented"}
    else
      case run(method, req, ctx) do
        {:status, _, _, _} = status -> status
        {:reply, _} = reply -> reply
        {:error, reason} -> error_status(reason)
      end
    end
  end

  defp error_status(reason) do
    {:status, Wire.status_of(reason), Wire.reason_text(reason), Wire.reason_name(reason)}
  end

  defp refused(reason),
    do: {:reply, %{"success" => false, "error_message" => Wire.reason_text(reason)}}

  defp run("Ping", req, _ctx) do
    {:reply, %{"message" => "pong: " <> to_string(req["message"]), "server_time" => Wire.now()}}
  end

  defp run("InitializeSession", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      created =
        case SessionStore.create_session(sid, metadata: req["metadata"] || %{}) do
          {:ok, _} -> :ok
          {:error, :already_exists} -> :ok
          {:error, _} = e -> e
        end

      with :ok <- created,
           {:ok, vars} <- SessionStore.list_variables(sid, nil, principal(ctx, sid)) do
        initial = Map.new(vars, &{to_string(&1.name), Wire.variable(&1, ctx.binary?)})
        {:reply, %{"success" => true, "initial_variables" => initial}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("CleanupSession", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      count =
        case SessionStore.get_session(sid, principal(ctx, sid)) do
          {:ok, info} -> info.variable_count
          _ -> 0
        end

      case SessionStore.delete_session(sid, principal(ctx, sid)) do
        :ok -> {:reply, %{"success" => true, "resources_cleaned" => count}}
        {:error, _} -> {:reply, %{"success" => false}}
      end
    end
  end

  defp run("GetSession", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, info} <- SessionStore.get_session(sid, principal(ctx, sid)) do
      {:reply,
       %{
         "session_id" => info.id,
         "metadata" => Wire.strings(info.metadata),
         "created_at" => Wire.timestamp(info.created_at),
         "variable_count" => info.variable_count,
         "tool_count" => 0
       }}
    end
  end

  defp run("Heartbeat", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      valid = match?({:ok, _}, SessionStore.get_session(sid, principal(ctx, sid)))
      {:reply, %{"server_time" => Wire.now(), "session_valid" => valid}}
    end
  end

  defp run("GetVariable", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req),
         {:ok, var} <- SessionStore.get_variable(sid, id, principal(ctx, sid)) do
      {:reply, %{"variable" => Wire.variable(var, ctx.binary?), "from_cache" => false}}
    else
      {:error, :not_found} ->
        {:status, :not_found, "variable not found: #{req["variable_identifier"]}", "not_found"}

      {:error, :session_not_found} ->
        {:status, :not_found, "session not found: #{req["session_id"]}", "session_not_found"}

      other ->
        other
    end
  end

  defp run("SetVariable", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      {expected, meta} = expected_version(req)
      opts = principal(ctx, sid) ++ ctx.lock ++ expected

      with {:ok, value} <- Wire.decode_value(req["value"], req["binary_value"] || ""),
           {:ok, versions} <-
             captured(fn -> SessionStore.update_variable(sid, id, value, meta, opts) end) do
        {:reply, %{"success" => true, "new_version" => List.last(versions, 0)}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("GetVariables", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         idents = Enum.filter(req["variable_identifiers"] || [], &is_binary/1),
         {:ok, %{found: found, missing: missing}} <-
           SessionStore.get_variables(sid, idents, principal(ctx, sid)) do
      vars = Map.new(found, fn {k, v} -> {k, Wire.variable(v, ctx.binary?)} end)
      {:reply, %{"variables" => vars, "missing_variables" => missing}}
    end
  end

  defp run("SetVariables", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      binaries = req["binary_updates"] || %{}

      {values, bad} =
        Enum.reduce(req["updates"] || %{}, {[], %{}}, fn {k, any}, {ok, bad} ->
          case Wire.decode_value(any, Map.get(binaries, k, "")) do
            {:ok, v} -> {[{k, v} | ok], bad}
            {:error, r} -> {ok, Map.put(bad, k, Wire.reason_text(r))}
          end
        end)

      atomic = req["atomic"] == true
      opts = [atomic: atomic, metadata: req["metadata"] || %{}] ++ principal(ctx, sid) ++ ctx.lock

      cond do
        atomic and bad != %{} ->
          {:reply, %{"success" => false, "errors" => bad}}

        values == [] ->
          {:reply, %{"success" => bad == %{}, "errors" => bad}}

        true ->
          set_many(sid, Enum.reverse(values), opts, bad, atomic)
      end
    end
  end

  defp run("RegisterVariable", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      with {:ok, type} <- type(req["type"]),
           {:ok, constraints} <- json_field(req["constraints_json"], %{}),
           {:ok, value} <-
             Wire.decode_value(req["initial_value"], req["initial_binary_value"] || ""),
           opts = [constraints: constraints, metadata: req["metadata"] || %{}],
           {:ok, id} <-
             SessionStore.register_variable(
               sid,
               req["name"],
               type,
               value,
               opts ++ principal(ctx, sid)
             ) do
        {:reply, %{"success" => true, "variable_id" => id}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("ListVariables", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         pattern = if(req["pattern"] in [nil, ""], do: nil, else: req["pattern"]),
         {:ok, vars} <- SessionStore.list_variables(sid, pattern, principal(ctx, sid)) do
      {:reply, %{"variables" => Enum.map(vars, &Wire.variable(&1, ctx.binary?))}}
    end
  end

  defp run("DeleteVariable", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      case SessionStore.delete_variable(sid, id, principal(ctx, sid) ++ ctx.lock) do
        :ok -> {:reply, %{"success" => true}}
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("AddDependency", req, ctx) do
    with {:ok, sid} <- session(req, ctx) do
      with {:ok, type} <- lookup(@edge_types, req["dependency_type"] || "", :dependency_type),
           :ok <-
             DependencyManager.add_dependency(
               sid,
               req["from_variable"],
               req["to_variable"],
               type,
               principal(ctx, sid)
             ) do
        {:reply, %{"success" => true}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run(method, req, ctx) when method in ["GetDependencies", "GetDependents"] do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      opts = [transitive: req["transitive"] == true] ++ principal(ctx, sid)

      result =
        if method == "GetDependencies",
          do: DependencyManager.get_dependencies(sid, id, opts),
          else: DependencyManager.get_dependents(sid, id, opts)

      case result do
        {:ok, vars} -> {:reply, %{"success" => true, "variables" => Enum.map(vars, &to_string/1)}}
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("StartOptimization", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      config = req["optimizer_config"] || %{}

      with {:ok, conflict} <-
             lookup(@conflict, config["conflict_resolution"] || "abort", :conflict_resolution),
           {:ok, extra} <- start_opts(config),
           opts =
             [conflict_resolution: conflict] ++
               optimizer_id(req["optimizer_id"]) ++ extra ++ principal(ctx, sid),
           {:ok, %{optimizer_id: oid, token: token}} <-
             DSPex.Bridge.Gateway.Holders.start(sid, id, opts) do
        {:reply, %{"success" => true, "optimization_id" => oid, "lock_token" => token}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("StopOptimization", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      owner = if req["force"] == true, do: [], else: Keyword.take(ctx.lock, [:optimizer_id])

      case DSPex.Bridge.Gateway.Holders.stop(sid, id, owner ++ principal(ctx, sid)) do
        :ok ->
          final =
            case SessionStore.get_variable(sid, id, principal(ctx, sid)) do
              {:ok, var} -> var.type |> Wire.encode_value(var.value) |> elem(0)
              _ -> nil
            end

          {:reply, %{"success" => true, "final_value" => final}}

        {:error, _} ->
          {:reply, %{"success" => false}}
      end
    end
  end

  defp run("GetOptimizationStatus", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      case OptimizerCoordinator.get_lock_info(id, [session_id: sid] ++ principal(ctx, sid)) do
        {:ok, info} ->
          status = %{
            "optimizing" => true,
            "optimizer_id" => to_string(info.optimizer_id),
            "started_at" => Wire.timestamp(info.acquired_at)
          }

          {:reply, %{"success" => true, "status" => status, "lock_token" => info.token}}

        {:error, :not_locked} ->
          {:reply, %{"success" => true, "status" => %{"optimizing" => false}}}

        {:error, reason} ->
          refused(reason)
      end
    end
  end

  defp run("GetVariableHistory", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req),
         {:ok, var} <- SessionStore.get_variable(sid, id, principal(ctx, sid)),
         limit = if(is_integer(req["limit"]) and req["limit"] > 0, do: req["limit"], else: 50),
         {:ok, entries} <- SessionStore.get_variable_history(sid, id, limit, principal(ctx, sid)) do
      entries =
        for e <- entries do
          meta = Wire.strings(e.metadata)

          %{
            "version" => e.version,
            "value" => var.type |> Wire.encode_value(e.value) |> elem(0),
            "timestamp" => Wire.timestamp(e.updated_at),
            "changed_by" => meta["changed_by"] || meta["source"] || "",
            "metadata" => meta
          }
        end

      {:reply, %{"entries" => entries}}
    end
  end

  defp run("RollbackVariable", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      opts = principal(ctx, sid) ++ ctx.lock

      with {:ok, version} <- version_arg(req["target_version"]),
           :ok <- SessionStore.rollback_variable(sid, id, version, opts),
           {:ok, var} <- SessionStore.get_variable(sid, id, principal(ctx, sid)) do
        {:reply, %{"success" => true, "variable" => Wire.variable(var, ctx.binary?)}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("SetVariablePermissions", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      with {:ok, rules} <- rules(req["rules"] || []),
           :ok <- SessionStore.set_variable_permissions(sid, id, rules, principal(ctx, sid)) do
        {:reply, %{"success" => true}}
      else
        {:error, reason} -> refused(reason)
      end
    end
  end

  defp run("CheckVariableAccess", req, ctx) do
    with {:ok, sid} <- session(req, ctx),
         {:ok, id} <- ident(req) do
      who = if req["principal"] in [nil, ""], do: who(ctx, sid), else: req["principal"]

      with {:ok, perm} <- lookup(@permissions, req["permission"] || "", :permission),
           :ok <- SessionStore.check_variable_access(sid, id, who, perm) do
        {:reply, %{"allowed" => true}}
      else
        {:error, :access_denied} ->
          {:reply, %{"allowed" => false}}

        {:error, reason} ->
          {:reply, %{"allowed" => false, "error_message" => Wire.reason_text(reason)}}
      end
    end
  end

  defp run(method, _req, _ctx),
    do: {:status, :unimplemented, "unknown method #{method}", "unimplemented"}

  ## Helpers

  # A write's new version(s), as the store's write events report them in
  # this process (see DSPex.Bridge.Gateway's capture handler).
  defp captured(fun) do
    Process.put(@capture, [])

    try do
      case fun.() do
        :ok -> {:ok, Process.get(@capture) |> Enum.reverse() |> Enum.map(&elem(&1, 1))}
        {:ok, results} -> {:ok, results, Map.new(Process.get(@capture))}
        error -> error
      end
    after
      Process.delete(@capture)
    end
  end

  @doc false
  # The telemetry handler that feeds `captured/1`.
  def capture_event(_event, %{version: v}, %{variable: var}, _config) do
    case Process.get(@capture) do
      nil -> :ok
      acc -> Process.put(@capture, [{to_string(var), v} | acc])
    end
  end

  def capture_event(_event, _m, _meta, _config), do: :ok

  defp set_many(sid, values, opts, bad, atomic) do
    case captured(fn -> SessionStore.update_variables(sid, values, opts) end) do
      {:ok, versions} when atomic ->
        names = Enum.map(values, &elem(&1, 0))
        {:reply, %{"success" => true, "new_versions" => Map.new(Enum.zip(names, versions))}}

      {:ok, results, versions} ->
        errors =
          for {k, {:error, r}} <- results, into: bad, do: {to_string(k), Wire.reason_text(r)}

        ok =
          for {k, :ok} <- results,
              into: %{},
              do: {to_string(k), Map.get(versions, to_string(k), 0)}

        {:reply, %{"success" => true, "errors" => errors, "new_versions" => ok}}

      {:error, {:validation_failed, errors}} ->
        errors = Map.new(errors, fn {k, r} -> {to_string(k), Wire.reason_text(r)} end)
        {:reply, %{"success" => false, "errors" => errors}}

      {:error, reason} ->
        {:reply, %{"success" => false, "errors" => %{"*" => Wire.reason_text(reason)}}}
    end
  end

  # expected_version = 0 is proto3's "unset" for existing clients; ours set
  # has_expected_version to make 0 a real condition. An existing client may
  # also send it in the metadata.
  defp expected_version(req) do
    meta = req["metadata"] || %{}
    {from_meta, meta} = Map.pop(meta, "expected_version")

    cond do
      req["has_expected_version"] == true ->
        {[expected_version: req["expected_version"]], meta}

      is_integer(req["expected_version"]) and req["expected_version"] > 0 ->
        {[expected_version: req["expected_version"]], meta}

      is_binary(from_meta) ->
        case Integer.parse(from_meta) do
          {n, ""} when n >= 0 -> {[expected_version: n], meta}
          _ -> {[], meta}
        end

      true ->
        {[], meta}
    end
  end

  defp type(name) do
    case Wire.type(name) do
      {:ok, t} -> {:ok, t}
      :error -> {:error, {:invalid_argument, {:unknown_type, name}}}
    end
  end

  defp json_field(nil, default), do: {:ok, default}

  defp json_field(%{"invalid_json" => text}, _),
    do: {:error, {:invalid_argument, {:invalid_json, text}}}

  defp json_field(v, _) when is_map(v), do: {:ok, v}
  defp json_field(v, _), do: {:error, {:invalid_argument, {:expected_json_object, v}}}

  defp lookup(table, key, what) do
    case Map.fetch(table, key) do
      {:ok, v} -> {:ok, v}
      :error -> {:error, {:invalid_argument, {what, key}}}
    end
  end

  defp optimizer_id(id) when is_binary(id) and id != "", do: [optimizer_id: id]
  defp optimizer_id(_), do: []

  defp start_opts(config) do
    Enum.reduce_while([{"timeout_ms", :timeout}, {"lease_ms", :lease}], {:ok, []}, fn {k, opt},
                                                                                      {:ok, acc} ->
      case config[k] do
        nil ->
          {:cont, {:ok, acc}}

        text ->
          case Integer.parse(text) do
            {n, ""} when n > 0 -> {:cont, {:ok, [{opt, n} | acc]}}
            _ -> {:halt, {:error, {:invalid_argument, {opt, text}}}}
          end
      end
    end)
  end

  defp version_arg(v) when is_integer(v) and v >= 0, do: {:ok, v}
  defp version_arg(v), do: {:error, {:invalid_argument, {:target_version, v}}}

  defp rules(list) do
    Enum.reduce_while(list, {:ok, []}, fn rule, {:ok, acc} ->
      perms = Enum.map(rule["permissions"] || [], &Map.get(@permissions, &1))

      if Enum.any?(perms, &is_nil/1) do
        {:halt, {:error, {:invalid_rules, {:unknown_permission, rule["permissions"]}}}}
      else
        pattern =
          case rule["session_pattern"] do
            p when p in [nil, "", "*"] -> :any
            p -> p
          end

        r = %{session_pattern: pattern, permissions: perms, conditions: rule["conditions"] || %{}}
        {:cont, {:ok, acc ++ [r]}}
      end
    end)
  end
end
