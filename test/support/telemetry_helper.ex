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
  As `attach/1`, but each event also names the process that emitted it (a
  handler runs in the emitting process): read them with `emitted_by/2`, so
  a test counts its own callers' events and nothing that other processes
  of the VM happened to do meanwhile.
  """
  @spec attach_with_emitter([Telemetry.event()]) :: reference
  def attach_with_emitter(events) do
    ref = make_ref()
    id = {__MODULE__, ref}
    test = self()

    Telemetry.attach_many(
      id,
      events,
      fn _event, measurements, metadata, _ ->
        send(test, {ref, self(), measurements, metadata})
      end,
      nil
    )

    on_exit(fn -> Telemetry.detach(id) end)
    ref
  end

  @doc """
  `{measurements, metadata}` of the events of `attach_with_emitter/1`'s
  `ref` received so far (waiting 100 ms for stragglers) that `pids` emitted.
  """
  @spec emitted_by(reference, [pid]) :: [{map, map}]
  def emitted_by(ref, pids, acc \\ []) do
    receive do
      {^ref, pid, measurements, metadata} ->
        emitted_by(ref, pids, if(pid in pids, do: [{measurements, metadata} | acc], else: acc))
    after
      100 -> Enum.reverse(acc)
    end
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
