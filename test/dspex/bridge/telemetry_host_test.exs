defmodule DSPex.Bridge.TelemetryHostTest do
  # dspex_bridge as a dependency of a host that has `:telemetry`: a fresh VM
  # (a `:peer`) with a fake `:telemetry` application on its code path.
  use ExUnit.Case, async: true

  alias DSPex.Bridge.{Analytics, Telemetry}

  @read [:dspex, :bridge, :variable, :read]

  setup do
    dir =
      Path.join(System.tmp_dir!(), "dspex-fake-telemetry-#{System.unique_integer([:positive])}")

    on_exit(fn -> File.rm_rf(dir) end)
    ebin = DSPex.FakeTelemetry.build!(dir)
    paths = [ebin | Enum.map(:code.get_path(), &to_string/1)]
    args = Enum.flat_map(paths, &[~c"-pa", String.to_charlist(&1)])
    {:ok, peer, _node} = :peer.start_link(%{connection: :standard_io, args: args})
    on_exit(fn -> catch_exit(:peer.stop(peer)) end)
    %{peer: peer}
  end

  defp call(peer, m, f, a), do: :peer.call(peer, m, f, a, 30_000)

  test "with analytics configured, dspex_bridge starts :telemetry first and dispatches through it",
       %{peer: peer} do
    :ok = call(peer, Application, :load, [:dspex_bridge])
    :ok = call(peer, Application, :put_env, [:dspex_bridge, :analytics, true])
    assert {:ok, _} = call(peer, Application, :ensure_all_started, [:dspex_bridge])

    started = call(peer, Application, :started_applications, []) |> Enum.map(&elem(&1, 0))
    assert :telemetry in started
    assert true == call(peer, Analytics, :running?, [])
    # Analytics' handler is in :telemetry's table, not the built-in one.
    assert {{Analytics, :handler}, @read} in call(peer, :telemetry, :handlers, [])
    assert [] == call(peer, Telemetry, :handlers, [@read])

    # An event emitted through :telemetry itself is counted.
    :ok = call(peer, :telemetry, :execute, [@read, %{duration_us: 5}, %{result: :ok}])
    now = System.os_time(:microsecond)

    assert {:ok, 1} =
             call(peer, Analytics, :get_metrics, [
               :variable_read,
               now - 60_000_000,
               now + 1_000_000,
               :count
             ])
  end

  test "refresh/0 moves the built-in dispatcher's handlers to a :telemetry started later",
       %{peer: peer} do
    assert {:ok, _} = call(peer, Application, :ensure_all_started, [:dspex_bridge])
    :ok = call(peer, Logger, :configure, [[level: :warning]])
    :ok = call(peer, Application, :stop, [:telemetry])
    :ok = call(peer, Telemetry, :refresh, [])

    # Built-in dispatcher now: the handler lands in its table.
    # (A handler the peer can load: test/support is compiled into the ebin.)
    handler = &DSPex.TelemetryHelper.forward/4
    :ok = call(peer, Telemetry, :attach, [:mine, [:x, :y], handler, nil])
    assert [{:mine, _, nil}] = call(peer, Telemetry, :handlers, [[:x, :y]])

    :ok = call(peer, Application, :start, [:telemetry])
    :ok = call(peer, Telemetry, :refresh, [])
    assert [] == call(peer, Telemetry, :handlers, [[:x, :y]])
    assert {:mine, [:x, :y]} in call(peer, :telemetry, :handlers, [])
  end
end
