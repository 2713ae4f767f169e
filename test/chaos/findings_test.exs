defmodule DSPex.Chaos.FindingsTest do
  # What the chaos run found, pinned down through the public API.
  # Attaches and detaches handlers of the one dispatcher: not async.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  require Logger

  alias DSPex.Bridge.Telemetry

  describe "a telemetry handler that crashes under load" do
    setup do
      id = "chaos-findings-#{System.unique_integer([:positive])}"
      on_exit(fn -> Telemetry.detach(id) end)
      %{id: id, event: [:chaos, :findings, System.unique_integer([:positive])]}
    end

    # Every caller enters the handler before any of them raises, as when
    # many processes emit a hot event at the moment a handler breaks.
    defp crash_together(id, event, n) do
      test = self()

      handler = fn _, _, _, _ ->
        send(test, {:inside, self()})

        receive do
          :raise -> raise "chaos: handler crashed"
        end
      end

      :ok = Telemetry.attach(id, event, handler, nil)

      callers =
        for _ <- 1..n do
          Task.async(fn -> Telemetry.execute(event, %{}, %{}) end)
        end

      inside = for _ <- 1..n, do: assert_receive({:inside, pid}, 5_000) && pid
      Enum.each(inside, &send(&1, :raise))
      Task.await_many(callers, 30_000)
    end

    test "is detached once and logged once, however many callers it failed",
         %{id: id, event: event} do
      log =
        capture_log(fn ->
          assert Enum.all?(crash_together(id, event, 16), &(&1 == :ok))
          assert DSPex.TelemetryHelper.await_detached(event, id)
          Logger.flush()
        end)

      assert log |> String.split("was detached") |> length() == 2, log
    end
  end
end
