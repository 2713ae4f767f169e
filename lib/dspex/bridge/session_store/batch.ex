defmodule DSPex.Bridge.SessionStore.Batch do
  @moduledoc false
  # Writes of several variables at once, atomic or each on its own (the
  # documented API is `DSPex.Bridge.SessionStore.update_variables/3`).

  import DSPex.Bridge.SessionStore.{Args, Events}

  alias DSPex.Bridge.{AccessControl, Options, Telemetry}
  alias DSPex.Bridge.Backend.Router
  alias DSPex.Bridge.DependencyManager.Propagator
  alias DSPex.Bridge.SessionStore

  @type session_id :: SessionStore.session_id()
  @type reason :: SessionStore.reason()

  # The hot paths make a static call: the Router itself picks the NIF or the
  # port for each session (`config :dspex_bridge, backend: :nif | :port` is
  # the Router's default for new sessions).
  @backend Router

  @write_opts DSPex.Bridge.SessionStore.Args.write_opts()

  @spec update_variables(session_id, map | list, keyword) ::
          :ok | {:ok, map} | {:error, reason}
  def update_variables(session_id, updates, opts \\ []) do
    with {:ok, opts} <- Options.validate(opts, [:atomic, :metadata | @write_opts]),
         {:ok, normalized} <- normalize_updates(updates, opts[:metadata] || %{}) do
      caller = AccessControl.caller(opts)
      start = System.monotonic_time()
      atomic = opts[:atomic] == true

      case @backend.var_set_many(session_id, normalized, atomic, caller) do
        {:ok, results} when atomic ->
          us = Telemetry.since_us(start)

          writes =
            Enum.zip_with(normalized, results, fn {ident, _, meta, _}, version ->
              emit_write(session_id, ident, meta, version, us)
              {ident, version}
            end)

          Propagator.notify_writes(session_id, writes)

        {:ok, results} ->
          us = Telemetry.since_us(start)

          pairs =
            Enum.zip_with(normalized, results, fn
              {ident, _, meta, _}, {:ok, version} ->
                emit_write(session_id, ident, meta, version, us)
                {ident, {:ok, version}}

              {ident, _, _, _}, {:error, _} = error ->
                AccessControl.refusal(error, session_id, ident, caller, :write)
                {ident, error}
            end)

          Propagator.notify_writes(session_id, for({ident, {:ok, v}} <- pairs, do: {ident, v}))
          {:ok, Map.new(pairs, fn {ident, result} -> {ident, ok_or_error(result)} end)}

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

  defp ok_or_error({:ok, _version}), do: :ok
  defp ok_or_error(error), do: error

  @doc false
  # The one reading of a batch, shared with `DSPex.Context`'s local state:
  # `{ident, value}` or `{ident, value, metadata_map}` pairs, in a map or a
  # list, each merged over the call's `metadata:` (`base`) and split into
  # `{ident, value, metadata, expected_version}`.
  @spec normalize_updates(term, term) ::
          {:ok, [{term, term, map, term}]} | {:error, {:invalid_argument, term}}
  def normalize_updates(updates, base) when is_map(updates),
    do: normalize_updates(Map.to_list(updates), base)

  def normalize_updates(updates, base) when is_list(updates) and is_map(base) do
    updates
    |> Enum.reduce_while({:ok, []}, fn
      {ident, value}, {:ok, acc} ->
        {expected, meta} = expected_version(base, [])
        {:cont, {:ok, [{ident, value, meta, expected} | acc]}}

      {ident, value, meta}, {:ok, acc} when is_map(meta) ->
        {expected, meta} = expected_version(Map.merge(base, meta), [])
        {:cont, {:ok, [{ident, value, meta, expected} | acc]}}

      other, _ ->
        {:halt, {:error, {:invalid_argument, {:bad_update, other}}}}
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  def normalize_updates(updates, _base) when is_list(updates),
    do: {:error, {:invalid_argument, :metadata_must_be_a_map}}

  def normalize_updates(other, _base), do: {:error, {:invalid_argument, {:bad_updates, other}}}

  # The engine reports failed idents as strings; give back the caller's form.
  defp restore_keys(errors, normalized) when is_map(errors) do
    by_text = Map.new(normalized, fn {ident, _, _, _} -> {to_string(ident), ident} end)
    Map.new(errors, fn {k, v} -> {Map.get(by_text, k, k), v} end)
  end

  defp restore_keys(errors, _), do: errors
end
