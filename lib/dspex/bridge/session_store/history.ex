defmodule DSPex.Bridge.SessionStore.History do
  @moduledoc false
  # A variable's previous versions, and rollback to one of them (the
  # documented API is `DSPex.Bridge.SessionStore`'s).

  import DSPex.Bridge.SessionStore.Args

  alias DSPex.Bridge.{AccessControl, Options, Telemetry}
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.Bridge.SessionStore

  @type session_id :: SessionStore.session_id()
  @type ident :: SessionStore.ident()
  @type reason :: SessionStore.reason()

  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

  @query_opts DSPex.Bridge.SessionStore.Args.query_opts()
  @write_opts DSPex.Bridge.SessionStore.Args.write_opts()

  @spec get_variable_history(session_id, ident, non_neg_integer, keyword) ::
          {:ok, [map]} | {:error, reason}
  def get_variable_history(session_id, ident, limit \\ 50, opts \\ [])

  def get_variable_history(session_id, ident, limit, opts)
      when is_integer(limit) and limit >= 0 do
    with {:ok, opts} <- Options.validate(opts, @query_opts) do
      caller = AccessControl.caller(Keyword.delete(opts, :consistency))

      case read_at(opts, :var_history, [session_id, ident, limit, caller]) do
        {:ok, entries} -> {:ok, Enum.map(entries, &%{&1 | updated_at: datetime(&1.updated_at)})}
        error -> AccessControl.refusal(error, session_id, ident, caller, :read)
      end
    end
  end

  def get_variable_history(_session_id, _ident, limit, _opts),
    do: {:error, {:invalid_argument, {:limit, limit}}}

  @spec rollback_variable(session_id, ident, non_neg_integer, keyword) :: :ok | {:error, reason}
  def rollback_variable(session_id, ident, version, opts \\ []) do
    case Options.validate(opts, @write_opts) do
      {:ok, opts} -> rollback(session_id, ident, version, AccessControl.caller(opts))
      error -> error
    end
  end

  defp rollback(session_id, ident, version, caller) do
    case @backend.var_rollback(session_id, ident, version, caller) do
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
end
