defmodule DSPex.TelemetryEmitters do
  @moduledoc """
  The code paths behind the `DSPex.Bridge.Telemetry` catalogue, for
  `test/dspex/bridge/telemetry_catalogue_test.exs`.

  Each component adds one module `DSPex.TelemetryEmitters.<Component>` in
  `test/support/telemetry_emitters/` implementing this behaviour:
  `emitters/0` maps every event the component documents to a function that
  runs the public code path emitting it. The catalogue test fails for a
  documented event with no emitter, an emitter for an undocumented event,
  and an event that does not arrive with its documented measurements and
  metadata keys.
  """

  @callback emitters() :: %{[atom] => (() -> any)}

  @doc "Every emitter module's map, merged; duplicates raise."
  @spec all() :: %{[atom] => {module, (() -> any)}}
  def all do
    {:ok, modules} = :application.get_key(:dspex_bridge, :modules)

    for module <- modules,
        String.starts_with?(Atom.to_string(module), "Elixir.DSPex.TelemetryEmitters."),
        {event, fun} <- module.emitters(),
        reduce: %{} do
      acc ->
        if Map.has_key?(acc, event),
          do: raise("#{inspect(event)} has emitters in two modules"),
          else: Map.put(acc, event, {module, fun})
    end
  end

  @doc "A session id unique to this run."
  def sid(prefix), do: "#{prefix}-#{System.unique_integer([:positive])}"
end
