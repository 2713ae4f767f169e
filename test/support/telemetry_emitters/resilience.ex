defmodule DSPex.TelemetryEmitters.Resilience do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.{CircuitBreaker, RetryPolicy}

  @impl true
  def emitters do
    %{
      [:dspex, :bridge, :circuit_breaker, :state_change] => fn ->
        CircuitBreaker.remove(open_breaker())
      end,
      [:dspex, :bridge, :circuit_breaker, :rejected] => fn ->
        name = open_breaker()
        {:error, :circuit_open} = CircuitBreaker.ask(name)
        CircuitBreaker.remove(name)
      end,
      [:dspex, :bridge, :retry, :attempt] => fn -> retry_twice() end,
      [:dspex, :bridge, :retry, :exhausted] => fn -> retry_twice() end
    }
  end

  defp open_breaker do
    name = {:telemetry_catalogue, System.unique_integer([:positive])}
    :ok = CircuitBreaker.install(name, threshold: 1)
    :ok = CircuitBreaker.record(name, :error)
    name
  end

  defp retry_twice do
    policy = RetryPolicy.new(max_attempts: 2, initial_delay: 0)

    {:error, :timeout} =
      RetryPolicy.run(policy, fn -> {:error, :timeout} end, sleep: fn _ -> :ok end)
  end
end
