defmodule DSPex.Bridge.NativeLogTest do
  use ExUnit.Case, async: false

  alias DSPex.Bridge.{Native, SessionStore}

  # An Erlang :logger handler forwarding the engine's records (metadata
  # `source: :dspex_native`) to the test process, so a test awaits the
  # record itself rather than sleeping while the engine's thread delivers.
  defmodule Forward do
    @moduledoc false
    def log(%{level: level, msg: msg, meta: meta}, %{config: %{pid: pid}}) do
      if meta[:source] == :dspex_native, do: send(pid, {:native_log, level, text(msg)})
    end

    defp text({:string, chardata}), do: IO.chardata_to_string(chardata)
    defp text({format, args}) when is_list(args), do: to_string(:io_lib.format(format, args))
    defp text(other), do: inspect(other)
  end

  setup do
    id = :"native_log_test_#{System.unique_integer([:positive])}"
    :ok = :logger.add_handler(id, Forward, %{config: %{pid: self()}})
    on_exit(fn -> :logger.remove_handler(id) end)
    :ok
  end

  # The next record of the engine whose text matches `pattern`.
  defp await_log(pattern, timeout \\ 3_000) do
    receive do
      {:native_log, level, text} ->
        if text =~ pattern, do: {level, text}, else: await_log(pattern, timeout)
    after
      timeout -> flunk("no engine log matching #{inspect(pattern)}")
    end
  end

  test "a tracing event at warn level in Rust reaches Logger" do
    :ok = Native.log_emit(:warning, "engine says hello")
    assert {:warning, "engine says hello"} = await_log(~r/engine says hello/)
  end

  test "only the registered NativeLog process may subscribe" do
    assert {:error, :not_registered} = Native.log_subscribe(self())
    :ok = Native.log_emit(:warning, "still delivered")
    assert {:warning, _} = await_log(~r/still delivered/)
  end

  test "errors are forwarded at error level; bad levels are refused" do
    :ok = Native.log_emit(:error, "engine is unhappy")
    assert {:error, _} = await_log(~r/engine is unhappy/)
    assert {:error, :bad_level} = Native.log_emit(:shout, "x")
  end

  test "a rejected snapshot import logs a warning from the engine" do
    assert {:error, _} = SessionStore.import_session("not a snapshot")
    assert {:warning, _} = await_log(~r/snapshot import rejected/)
  end

  test "logging from many threads at once loses at most what the queue bounds" do
    1..4
    |> Enum.map(fn t ->
      Task.async(fn -> for i <- 1..50, do: Native.log_emit(:warning, "burst #{t}-#{i}") end)
    end)
    |> Task.await_many()

    bursts = for _ <- 1..200, do: await_log(~r/^burst \d+-\d+$/) |> elem(1)
    assert length(Enum.uniq(bursts)) == 200
    assert DSPex.Bridge.NativeLog.dropped() == 0
  end
end
