defmodule DSPex.SeedCompat do
  @moduledoc """
  What seed 002's own integration test (test/dspex/production_stage4_test.exs)
  needs around it and nothing more.
  """

  @doc """
  A `start_link/1` result as the seed expects it: `{:ok, pid}` also when the
  process runs already (the library's application starts it).
  """
  @spec started(GenServer.on_start()) :: {:ok, pid} | term
  def started({:error, {:already_started, pid}}), do: {:ok, pid}
  def started(other), do: other
end

defmodule DSPex.SeedCompat.TelemetryShim do
  @moduledoc """
  Seed 002's tests call `:telemetry.execute/3`, and `:telemetry` is not on
  this machine. `load/0` loads, in memory only, a `:telemetry` module whose
  `execute/3`, `attach/4`, `attach_many/4`, `detach/1` and `span/3` are the
  library's dispatcher's (`DSPex.Bridge.Telemetry`) -- and only when no
  `telemetry` module can be found at all. Nothing is written to disk: no
  other VM (the `:peer`s of telemetry_host_test.exs) ever sees it, and a
  real `:telemetry` is never shadowed.

  The shim is not the application: `DSPex.Bridge.Telemetry` dispatches
  through `:telemetry` only while the `:telemetry` application runs, so
  with the shim it keeps its built-in dispatcher (no loop).
  """

  @doc "Loads the shim unless a `telemetry` module exists: `:loaded` or `:real`."
  @spec load() :: :loaded | :real
  def load do
    if :code.which(:telemetry) == :non_existing and
         :code.where_is_file(~c"telemetry.app") == :non_existing do
      Code.compile_quoted(shim())
      :loaded
    else
      :real
    end
  end

  defp shim do
    quote do
      defmodule :telemetry do
        @moduledoc false
        # A test-only stand-in loaded by DSPex.SeedCompat.TelemetryShim.load/0.
        defdelegate execute(event, measurements, metadata), to: DSPex.Bridge.Telemetry
        defdelegate attach(id, event, fun, config), to: DSPex.Bridge.Telemetry
        defdelegate attach_many(id, events, fun, config), to: DSPex.Bridge.Telemetry
        defdelegate detach(id), to: DSPex.Bridge.Telemetry
        defdelegate span(prefix, metadata, fun), to: DSPex.Bridge.Telemetry
      end
    end
  end
end
