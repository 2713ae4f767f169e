defmodule DSPex.TelemetryEmitters.Bridged do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{CircuitBreaker, DeadLetterQueue, SessionStore}
  alias DSPex.TelemetryEmitters

  @breaker {:dspex_backend, :port}

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :cache, :hit] => fn -> open_read(true) end,
      [:dspex, :bridge, :cache, :miss] => fn -> open_read(false) end,
      [:dspex, :bridge, :dlq, :added] => fn -> with_dlq(&add/1) end,
      [:dspex, :bridge, :dlq, :replayed] => fn ->
        with_dlq(fn q -> {:ok, _} = DeadLetterQueue.replay(add(q), server: q) end)
      end,
      [:dspex, :bridge, :dlq, :dropped] => fn ->
        with_dlq(fn q -> {:ok, 1} = DeadLetterQueue.drop(add(q), server: q, by: "t") end)
      end,
      [:dspex, :bridge, :dlq, :evicted] => fn ->
        with_dlq(fn q -> add(q) && add(q) end, max_entries: 1)
      end
    }
  end

  # A port read while the breaker is open: from the cache when it was read
  # before.
  defp open_read(read_before?) do
    sid = TelemetryEmitters.sid("bridged")
    {:ok, ^sid} = SessionStore.create_session(sid, backend: :port)
    {:ok, _} = SessionStore.register_variable(sid, :x, :integer, 1)
    if read_before?, do: {:ok, _} = SessionStore.get_variable(sid, :x)
    :ok = CircuitBreaker.force_open(@breaker)
    SessionStore.get_variable(sid, :x)
  after
    CircuitBreaker.reset(@breaker)
  end

  # A port command, parked: replaying it asks the port again.
  defp add(q) do
    entry = %{kind: :write, op: "session_list", args: [], backend: :port, breaker: @breaker}
    {:ok, id} = DeadLetterQueue.add(entry, server: q)
    id
  end

  defp with_dlq(fun, opts \\ []) do
    name = :"emitters_dlq_#{System.unique_integer([:positive])}"
    dir = Path.join(System.tmp_dir!(), "#{name}")
    {:ok, pid} = GenServer.start(DeadLetterQueue, [name: name, dir: dir] ++ opts, name: name)

    try do
      fun.(name)
    after
      GenServer.stop(pid)
      File.rm_rf!(dir)
    end
  end
end
