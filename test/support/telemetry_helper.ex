defmodule DSPex.TelemetryHelper do
  @moduledoc """
  Forwards telemetry events to the test process, as `:telemetry_test` does:

      ref = DSPex.TelemetryHelper.attach([[:dspex, :bridge, :variable, :write]])
      ...
      assert_receive {[:dspex, :bridge, :variable, :write], ^ref, measurements, metadata}

  The handler is detached when the test process exits.
  """
  import ExUnit.Callbacks, only: [on_exit: 1]

  alias DSPex.Bridge.Telemetry

  @spec attach([Telemetry.event()]) :: reference
  def attach(events) do
    ref = make_ref()
    id = {__MODULE__, ref}
    Telemetry.attach_many(id, events, &__MODULE__.forward/4, {self(), ref})
    on_exit(fn -> Telemetry.detach(id) end)
    ref
  end

  @doc """
  Waits (5 s at most) until handler `id` is no longer attached to `event`:
  a handler that raised is detached by a process of its own, and no event
  tells when it is done, so this polls, 10 ms apart. True once detached.
  """
  @spec await_detached(Telemetry.event(), term, non_neg_integer) :: boolean
  def await_detached(event, id, tries \\ 500) do
    cond do
      not List.keymember?(Telemetry.handlers(event), id, 0) -> true
      tries == 0 -> false
      true -> Process.sleep(10) && await_detached(event, id, tries - 1)
    end
  end

  @doc false
  def forward(event, measurements, metadata, {pid, ref}) do
    send(pid, {event, ref, measurements, metadata})
  end
end
