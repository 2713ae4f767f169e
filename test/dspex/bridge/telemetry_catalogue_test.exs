defmodule DSPex.Bridge.TelemetryCatalogueTest do
  @moduledoc """
  `DSPex.Bridge.Telemetry.Catalogue` lists every event the library emits.
  For each of its rows (`events/0`), this test runs the code
  path named in `test/support/telemetry_emitters/` and checks the event
  really arrives with the documented measurement and metadata keys.
  """
  use ExUnit.Case, async: false

  alias DSPex.TelemetryEmitters

  @catalogue DSPex.Bridge.Telemetry.Catalogue.events()

  test "the catalogue reads key names, not the notes in parentheses" do
    assert %{
             measurements: [:duration_us],
             metadata: [:session_id, :variable, :result]
           } = Enum.find(@catalogue, &(&1.event == [:dspex, :bridge, :variable, :read]))

    assert %{measurements: [:duration_us, :version]} =
             Enum.find(@catalogue, &(&1.event == [:dspex, :bridge, :variable, :write]))
  end

  test "the dispatcher's moduledoc repeats the catalogue" do
    {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(DSPex.Bridge.Telemetry)
    assert doc =~ DSPex.Bridge.Telemetry.Catalogue.markdown()
  end

  test "the catalogue lists events" do
    assert length(@catalogue) >= 8
    for %{event: event} <- @catalogue, do: assert([:dspex | _] = event)
  end

  test "every documented event has an emitter, and every emitter a documented event" do
    documented = MapSet.new(@catalogue, & &1.event)
    emitted = TelemetryEmitters.all() |> Map.keys() |> MapSet.new()

    assert MapSet.difference(documented, emitted) |> Enum.sort() == [],
           "documented events without an emitter in test/support/telemetry_emitters/"

    assert MapSet.difference(emitted, documented) |> Enum.sort() == [],
           "emitters for events missing from the DSPex.Bridge.Telemetry moduledoc"
  end

  for %{event: event, measurements: measurements, metadata: metadata} <- @catalogue do
    @event event
    @measurements measurements
    @metadata metadata

    test "#{inspect(event)} is emitted with its documented keys" do
      {_module, emit} = Map.fetch!(TelemetryEmitters.all(), @event)
      ref = DSPex.TelemetryHelper.attach([@event])
      emit.()
      assert_receive {@event, ^ref, measurements, metadata}, 3_000

      for key <- @measurements do
        assert Map.has_key?(measurements, key),
               "#{inspect(@event)}: measurement #{key} missing from #{inspect(measurements)}"
      end

      for key <- @metadata do
        assert Map.has_key?(metadata, key),
               "#{inspect(@event)}: metadata #{key} missing from #{inspect(metadata)}"
      end
    end
  end
end
