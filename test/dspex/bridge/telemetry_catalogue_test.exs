defmodule DSPex.Bridge.TelemetryCatalogueTest do
  @moduledoc """
  The `DSPex.Bridge.Telemetry` moduledoc is the catalogue of every event the
  library emits. This test reads its tables and, for each row, runs the code
  path named in `test/support/telemetry_emitters/` and checks the event
  really arrives with the documented measurement and metadata keys.
  """
  use ExUnit.Case, async: false

  alias DSPex.TelemetryEmitters

  @catalogue (fn ->
                {:docs_v1, _, _, _, %{"en" => doc}, _, _} =
                  Code.fetch_docs(DSPex.Bridge.Telemetry)

                for "| `[:" <> _ = line <- String.split(doc, "\n") do
                  [event, measurements, metadata] =
                    line
                    |> String.trim()
                    |> String.trim("|")
                    |> String.split(" | ")
                    |> Enum.map(&String.trim/1)

                  {event |> String.trim("`") |> Code.eval_string() |> elem(0), measurements,
                   metadata}
                end
              end).()

  # `a`, `b` (`:ok` or ...) -> [:a, :b]: backticked names outside parentheses.
  defp keys(cell) do
    cell
    |> String.replace(~r/\([^)]*\)/, "")
    |> then(&Regex.scan(~r/`([a-z_][a-z0-9_]*)`/, &1, capture: :all_but_first))
    |> Enum.map(fn [k] -> String.to_atom(k) end)
  end

  test "the key parser reads names, not the notes in parentheses" do
    assert keys("`session_id`, `variable`, `result` (`:ok` or the error reason)") ==
             [:session_id, :variable, :result]

    assert keys("`duration_us`, `version`") == [:duration_us, :version]
    assert keys("(none)") == []
  end

  test "the catalogue lists events" do
    assert length(@catalogue) >= 8
    for {event, _, _} <- @catalogue, do: assert([:dspex | _] = event)
  end

  test "every documented event has an emitter, and every emitter a documented event" do
    documented = MapSet.new(@catalogue, &elem(&1, 0))
    emitted = TelemetryEmitters.all() |> Map.keys() |> MapSet.new()

    assert MapSet.difference(documented, emitted) |> Enum.sort() == [],
           "documented events without an emitter in test/support/telemetry_emitters/"

    assert MapSet.difference(emitted, documented) |> Enum.sort() == [],
           "emitters for events missing from the DSPex.Bridge.Telemetry moduledoc"
  end

  for {event, measurements, metadata} <- @catalogue do
    @event event
    @measurements measurements
    @metadata metadata

    test "#{inspect(event)} is emitted with its documented keys" do
      {_module, emit} = Map.fetch!(TelemetryEmitters.all(), @event)
      ref = DSPex.TelemetryHelper.attach([@event])
      emit.()
      assert_receive {@event, ^ref, measurements, metadata}, 3_000

      for key <- keys(@measurements) do
        assert Map.has_key?(measurements, key),
               "#{inspect(@event)}: measurement #{key} missing from #{inspect(measurements)}"
      end

      for key <- keys(@metadata) do
        assert Map.has_key?(metadata, key),
               "#{inspect(@event)}: metadata #{key} missing from #{inspect(metadata)}"
      end
    end
  end
end
