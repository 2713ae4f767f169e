defmodule DSPex.Wait do
  @moduledoc """
  A bounded polling wait, for the few conditions that no message or
  telemetry event announces (an OS process's exit, buckets aged by a timer,
  a count kept on another thread). Where an event exists, `assert_receive`
  it instead (`DSPex.TelemetryHelper`).

      assert DSPex.Wait.until(fn -> Endpoint.info(name).connections == 3 end)
  """

  @doc """
  Calls `fun` until it returns a truthy value: `true`, or `false` once
  `timeout:` ms (default 5000) have passed. `interval:` is the pause between
  calls (default 10 ms).
  """
  @spec until((() -> as_boolean(term)), keyword) :: boolean
  def until(fun, opts \\ []) do
    deadline = System.monotonic_time(:millisecond) + Keyword.get(opts, :timeout, 5_000)
    poll(fun, deadline, Keyword.get(opts, :interval, 10))
  end

  defp poll(fun, deadline, interval) do
    cond do
      fun.() -> true
      System.monotonic_time(:millisecond) >= deadline -> false
      true -> Process.sleep(interval) && poll(fun, deadline, interval)
    end
  end
end
