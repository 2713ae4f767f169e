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
    event = [:dspex, :optimization, :failed]
    assert :ok = Telemetry.attach(id, event, fn _, _, _, _ -> :ok end, nil)
    assert Telemetry.observed?([:dspex, :optimization, :failed])
    assert :ok = Telemetry.detach(id)
    # Other modules' tests may observe it too: the flag follows the table.
    assert Telemetry.observed?([:dspex, :optimization, :failed]) == Telemetry.enabled?(event)
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
    assert Telemetry.handlers([:t, :boom]) == []
  end

  test "span emits start, stop and exception", %{id: id} do
    parent = self()

    Telemetry.attach_many(
      id,
      [[:t, :span, :start], [:t, :span, :stop], [:t, :span, :exception]],
      fn event, m, meta, _ -> send(parent, {event, m, meta}) end,
      nil
    )

    assert 7 = Telemetry.span([:t, :span], %{a: 1}, fn -> {7, %{b: 2}} end)
    assert_receive {[:t, :span, :start], %{system_time: _}, %{a: 1}}
    assert_receive {[:t, :span, :stop], %{duration: d}, %{b: 2}} when d >= 0

    assert_raise RuntimeError, fn ->
      Telemetry.span([:t, :span], %{a: 1}, fn -> raise "no" end)
    end

    assert_receive {[:t, :span, :exception], %{duration: _},
                    %{kind: :error, reason: %RuntimeError{}}}
  end
end
