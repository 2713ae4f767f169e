defmodule DSPex.Bridge.SessionStore.Args do
  @moduledoc false
  # Arguments of the SessionStore API: the option lists of reads and
  # writes, types, where `expected_version` comes from, the session guard,
  # and the engine's answers made the caller's (timestamps as DateTimes).

  alias DSPex.Bridge.AccessControl
  alias DSPex.Bridge.Backend.Router

  @types [:float, :integer, :string, :boolean, :choice, :module, :embedding, :tensor]
  @read_opts [:principal, :context]
  # Reads of variables also take `consistency:` (a replicated session's).
  @query_opts [:principal, :context, :consistency]
  @write_opts [:principal, :context, :lock_token, :optimizer_id]

  @doc false
  def read_opts, do: @read_opts

  @doc false
  def query_opts, do: @query_opts

  @doc false
  def write_opts, do: @write_opts

  @doc false
  # A read (a Router callback and its arguments) at the call's
  # `consistency:`, else at the session's own.
  def read_at(opts, fun, args) do
    case opts[:consistency] do
      nil -> apply(Router, fun, args)
      consistency -> Router.read(consistency, fun, args)
    end
  end

  @doc false
  def session_guard(session_id, permission, opts),
    do: AccessControl.authorize_session(session_id, permission, opts)

  def check_type(type) when type in @types, do: :ok
  def check_type(type), do: {:error, {:invalid_argument, {:unknown_type, type}}}

  @doc false
  # expected_version may come in the metadata (atom or string key) or opts.
  def expected_version(metadata, []) when map_size(metadata) == 0, do: {nil, metadata}

  def expected_version(metadata, opts) when is_map(metadata) do
    cond do
      Map.has_key?(metadata, :expected_version) ->
        Map.pop(metadata, :expected_version)

      Map.has_key?(metadata, "expected_version") ->
        Map.pop(metadata, "expected_version")

      true ->
        {opts[:expected_version], metadata}
    end
  end

  def expected_version(metadata, opts), do: {opts[:expected_version], metadata}

  @doc false
  def variable(var) do
    %{var | created_at: datetime(var.created_at), updated_at: datetime(var.updated_at)}
  end

  def datetime(us) when is_integer(us), do: DateTime.from_unix!(us, :microsecond)
  def datetime(other), do: other
end
