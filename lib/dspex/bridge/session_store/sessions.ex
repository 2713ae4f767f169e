defmodule DSPex.Bridge.SessionStore.Sessions do
  @moduledoc false
  # Sessions: create, describe, delete, list, diagnose, export and import
  # (the documented API is `DSPex.Bridge.SessionStore`'s).

  import DSPex.Bridge.SessionStore.Args

  alias DSPex.Bridge.{Options, Telemetry}
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.Bridge.SessionStore

  @type session_id :: SessionStore.session_id()
  @type reason :: SessionStore.reason()

  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

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
         :ok <- @backend.session_create(session_id, native_opts) do
      Telemetry.execute(
        [:dspex, :bridge, :session, :created],
        %{system_time: System.system_time()},
        %{session_id: session_id, backend: kind}
      )

      {:ok, session_id}
    end
  end

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

  @spec delete_session(session_id, keyword) :: :ok | {:error, reason}
  def delete_session(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :write, opts),
         :ok <- @backend.session_delete(session_id) do
      Propagator.session_closed(session_id)

      Telemetry.execute(
        [:dspex, :bridge, :session, :deleted],
        %{system_time: System.system_time()},
        %{session_id: session_id}
      )
    end
  end

  @spec list_sessions() :: [session_id] | {:error, {:partial, map}}
  def list_sessions, do: @backend.session_list()

  @spec get_session_diagnostics(session_id, keyword) :: {:ok, map} | {:error, reason}
  def get_session_diagnostics(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :read, opts),
         {:ok, session} <- get_session(session_id),
         {:ok, vars} <- @backend.var_list(session_id, nil, nil),
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
      case @backend.var_history(session_id, v.id, 1_000_000, nil) do
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

  @spec export_session(session_id, keyword) :: {:ok, binary} | {:error, reason}
  def export_session(session_id, opts \\ []) do
    with :ok <- session_guard(session_id, :read, opts),
         do: @backend.session_export(session_id)
  end

  @spec import_session(binary, keyword) :: {:ok, session_id} | {:error, reason}
  def import_session(snapshot, opts \\ [])

  def import_session(snapshot, opts) when is_binary(snapshot) do
    with {:ok, opts} <-
           Options.validate(opts, [:session_id, :backend, :replicas, :consistency]),
         kind = if(opts[:replicas], do: :raft, else: opts[:backend] || Router.default_kind()),
         raft_opts = %{replicas: opts[:replicas], consistency: opts[:consistency]},
         {:ok, sid} <- Router.session_import(snapshot, opts[:session_id], kind, raft_opts) do
      Telemetry.execute(
        [:dspex, :bridge, :session, :created],
        %{system_time: System.system_time()},
        %{session_id: sid, backend: kind}
      )

      {:ok, sid}
    end
  end

  def import_session(_snapshot, _opts), do: {:error, {:invalid_snapshot, "expected a binary"}}
end
