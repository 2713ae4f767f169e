defmodule DSPex.Bridge.SessionStore.Events do
  @moduledoc false
  # The telemetry of reads and writes (see the catalogue,
  # `DSPex.Bridge.Telemetry.Catalogue`), and the propagation a write starts.

  alias DSPex.Bridge.Telemetry
  alias DSPex.Bridge.DependencyManager.Propagator

  require Telemetry

  @read [:dspex, :bridge, :variable, :read]
  @write [:dspex, :bridge, :variable, :write]

  @doc false
  def timed_read(session_id, ident, fun) do
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

  @doc false
  def written({:ok, version}, session_id, ident, metadata, _expected, us) do
    emit_write(session_id, ident, metadata, version, us)
    Propagator.notify_write(session_id, ident, version)
  end

  def written({:error, {:version_mismatch, current}} = error, session_id, ident, _, expected, _) do
    Telemetry.execute(
      [:dspex, :bridge, :variable, :version_conflict],
      %{current_version: current},
      %{session_id: session_id, variable: ident, expected_version: expected}
    )

    error
  end

  def written(error, _session_id, _ident, _metadata, _expected, _us), do: error

  @doc false
  def emit_write(session_id, ident, metadata, version, us) do
    if Telemetry.observed?(@write) do
      Telemetry.execute(@write, %{duration_us: us, version: version}, %{
        session_id: session_id,
        variable: ident,
        metadata: metadata
      })
    end
  end
end
