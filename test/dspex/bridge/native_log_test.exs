defmodule DSPex.Bridge.NativeLogTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  alias DSPex.Bridge.{Native, SessionStore}

  defp wait_for_log(fun) do
    capture_log(fn ->
      fun.()
      # The engine's forwarding thread delivers asynchronously.
      Process.sleep(200)
    end)
  end

  test "a tracing event at warn level in Rust reaches Logger" do
    log = wait_for_log(fn -> :ok = Native.log_emit(:warning, "engine says hello") end)
    assert log =~ "[warning]"
    assert log =~ "engine says hello"
  end

  test "only the registered NativeLog process may subscribe" do
    assert {:error, :not_registered} = Native.log_subscribe(self())
    log = wait_for_log(fn -> :ok = Native.log_emit(:warning, "still delivered") end)
    assert log =~ "still delivered"
  end

  test "errors are forwarded at error level; bad levels are refused" do
    log = wait_for_log(fn -> :ok = Native.log_emit(:error, "engine is unhappy") end)
    assert log =~ "[error]"
    assert log =~ "engine is unhappy"
    assert {:error, :bad_level} = Native.log_emit(:shout, "x")
  end

  test "a rejected snapshot import logs a warning from the engine" do
    log =
      wait_for_log(fn -> assert {:error, _} = SessionStore.import_session("not a snapshot") end)

    assert log =~ "snapshot import rejected"
  end

  test "logging from many threads at once loses at most what the queue bounds" do
    log =
      wait_for_log(fn ->
        1..4
        |> Enum.map(fn t ->
          Task.async(fn -> for i <- 1..50, do: Native.log_emit(:warning, "burst #{t}-#{i}") end)
        end)
        |> Task.await_many()
      end)

    assert length(Regex.scan(~r/burst \d+-\d+/, log)) == 200
    assert DSPex.Bridge.NativeLog.dropped() == 0
  end
end
