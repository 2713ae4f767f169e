defmodule DSPex.Bridge.TelemetryTest do
  use ExUnit.Case, async: false

  alias DSPex.Bridge.Telemetry

  require Telemetry

  doctest Telemetry

  setup do
    id = {__MODULE__, make_ref()}
    on_exit(fn -> Telemetry.detach(id) end)
    %{id: id}
  end

  test "attach, execute, detach", %{id: id} do
    parent = self()
    fun = fn event, m, meta, config -> send(parent, {event, m, meta, config}) end
    assert :ok = Telemetry.attach(id, [:t, :one], fun, :cfg)
    assert {:error, :already_exists} = Telemetry.attach(id, [:t, :two], fun, :cfg)
    assert Telemetry.enabled?([:t, :one])
    refute Telemetry.enabled?([:t, :unheard])
    :ok = Telemetry.execute([:t, :one], %{n: 1}, %{k: :v})
    assert_receive {[:t, :one], %{n: 1}, %{k: :v}, :cfg}
    assert :ok = Telemetry.detach(id)
    assert {:error, :not_found} = Telemetry.detach(id)
    :ok = Telemetry.execute([:t, :one], %{n: 2}, %{})
    refute_receive {[:t, :one], _, _, _}
  end

  test "observed?/1 turns on with a handler of a hot event and off without", %{id: id} do
    # Analytics does not observe this hot event, and other tests' handlers
    # are detached when they end (this module is not async): nobody else
    # has one, so the flag must follow this test's handler alone.
    event = [:dspex, :optimization, :lock_released]
    assert Telemetry.handlers(event) == []
    refute Telemetry.observed?([:dspex, :optimization, :lock_released])
    assert :ok = Telemetry.attach(id, event, fn _, _, _, _ -> :ok end, nil)
    assert Telemetry.observed?([:dspex, :optimization, :lock_released])
    assert :ok = Telemetry.detach(id)
    refute Telemetry.observed?([:dspex, :optimization, :lock_released])
    refute Telemetry.enabled?(event)
  end

  test "observed?/1 refuses, at compile time, an event that is not hot" do
    assert_raise ArgumentError, ~r/hot events/, fn ->
      Code.eval_string("""
      require DSPex.Bridge.Telemetry
      DSPex.Bridge.Telemetry.observed?([:my, :event])
      """)
    end
  end

  test "a failing handler is detached and does not break the caller", %{id: id} do
    assert :ok = Telemetry.attach(id, [:t, :boom], fn _, _, _, _ -> raise "boom" end, nil)
    assert :ok = Telemetry.execute([:t, :boom], %{}, %{})
    assert DSPex.TelemetryHelper.await_detached([:t, :boom], id)
  end

  defp span_events(id) do
    parent = self()

    Telemetry.attach_many(
      id,
      [[:t, :span, :start], [:t, :span, :stop], [:t, :span, :exception]],
      fn event, m, meta, _ -> send(parent, {event, m, meta}) end,
      nil
    )
  end

  test "span emits start and stop, as :telemetry.span/3 does", %{id: id} do
    span_events(id)
    assert 7 = Telemetry.span([:t, :span], %{a: 1}, fn -> {7, %{b: 2}} end)

    assert_receive {[:t, :span, :start], %{system_time: _, monotonic_time: _},
                    %{a: 1, telemetry_span_context: ctx}}

    assert is_reference(ctx)
    assert_receive {[:t, :span, :stop], %{duration: d}, %{b: 2, telemetry_span_context: ^ctx}}
    assert d >= 0
  end

  test "span takes {result, extra_measurements, stop_metadata}", %{id: id} do
    span_events(id)
    assert :r = Telemetry.span([:t, :span], %{}, fn -> {:r, %{items: 3}, %{b: 2}} end)
    assert_receive {[:t, :span, :start], _, %{telemetry_span_context: ctx}}

    assert_receive {[:t, :span, :stop], %{items: 3, duration: _, monotonic_time: _},
                    %{b: 2, telemetry_span_context: ^ctx}}
  end

  test "span keeps a context given in the start metadata", %{id: id} do
    span_events(id)
    Telemetry.span([:t, :span], %{telemetry_span_context: :mine}, fn -> {1, %{}} end)
    assert_receive {[:t, :span, :start], _, %{telemetry_span_context: :mine}}
    assert_receive {[:t, :span, :stop], _, %{telemetry_span_context: :mine}}
  end

  test "span emits :exception with kind, reason and stacktrace, and re-raises", %{id: id} do
    span_events(id)

    assert_raise RuntimeError, "no", fn ->
      Telemetry.span([:t, :span], %{a: 1}, fn -> raise "no" end)
    end

    assert_receive {[:t, :span, :start], _, %{telemetry_span_context: ctx}}

    assert_receive {[:t, :span, :exception], %{duration: _, monotonic_time: _},
                    %{
                      a: 1,
                      kind: :error,
                      reason: %RuntimeError{message: "no"},
                      stacktrace: [_ | _],
                      telemetry_span_context: ^ctx
                    }}

    refute_received {[:t, :span, :stop], _, _}

    assert catch_exit(Telemetry.span([:t, :span], %{}, fn -> exit(:bye) end)) == :bye
    assert_receive {[:t, :span, :exception], _, %{kind: :exit, reason: :bye}}
    assert catch_throw(Telemetry.span([:t, :span], %{}, fn -> throw(:ball) end)) == :ball
    assert_receive {[:t, :span, :exception], _, %{kind: :throw, reason: :ball}}
  end

  test "a span function returning neither form is an :exception", %{id: id} do
    span_events(id)
    assert_raise CaseClauseError, fn -> Telemetry.span([:t, :span], %{}, fn -> :bare end) end
    assert_receive {[:t, :span, :exception], _, %{kind: :error, reason: {:case_clause, :bare}}}
  end
end
