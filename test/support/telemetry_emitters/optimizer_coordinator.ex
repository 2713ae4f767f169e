defmodule DSPex.TelemetryEmitters.OptimizerCoordinator do
  @moduledoc false
  @behaviour DSPex.TelemetryEmitters

  alias DSPex.Bridge.OptimizerCoordinator, as: OC

  @impl true
  def emitters do
    %{
      [:dspex, :optimization, :lock_acquired] => &cycle/0,
      [:dspex, :optimization, :started] => &cycle/0,
      [:dspex, :optimization, :lock_released] => &cycle/0,
      [:dspex, :optimization, :completed] => &cycle/0,
      [:dspex, :optimization, :progress] => &progress/0,
      [:dspex, :optimization, :lock_conflict] => &conflict/0,
      [:dspex, :optimization, :preempted] => &preempt/0,
      [:dspex, :optimization, :lock_expired] => &expire/0,
      [:dspex, :optimization, :failed] => &holder_dies/0
    }
  end

  defp key, do: DSPex.TelemetryEmitters.sid("lock")
  defp opt, do: DSPex.TelemetryEmitters.sid("opt")

  defp cycle do
    {key, opt} = {key(), opt()}
    {:ok, :lock_acquired} = OC.acquire_lock(key, opt, self())
    :ok = OC.release_lock(key, opt)
  end

  defp progress do
    {key, opt} = {key(), opt()}
    {:ok, :lock_acquired} = OC.acquire_lock(key, opt, self())
    {:ok, true} = OC.report_progress(opt, 1, 0.5, %{loss: 0.1})
    :ok = OC.release_lock(key, opt)
  end

  defp conflict do
    {key, opt} = {key(), opt()}
    {:ok, :lock_acquired} = OC.acquire_lock(key, opt, self())

    {:error, {:lock_held_by, ^opt}} =
      OC.acquire_lock(key, opt(), self(), conflict_resolution: :abort)

    :ok = OC.release_lock(key, opt)
  end

  defp preempt do
    {key, old, new} = {key(), opt(), opt()}
    holder = hold(key, old)
    {:ok, _} = OC.report_progress(old, 10, 0.5, %{})
    {:ok, :lock_acquired} = OC.acquire_lock(key, new, self(), conflict_resolution: :preempt)
    :ok = OC.release_lock(key, new)
    Process.exit(holder, :kill)
  end

  defp expire do
    {:ok, :lock_acquired} = OC.acquire_lock(key(), opt(), self(), lease: 20)
  end

  defp holder_dies do
    key() |> hold(opt()) |> Process.exit(:kill)
  end

  # A process holding `key` until killed.
  defp hold(key, opt) do
    test = self()

    pid =
      spawn(fn ->
        {:ok, :lock_acquired} = OC.acquire_lock(key, opt, self())
        send(test, {:holding, self()})
        Process.sleep(:infinity)
      end)

    receive do
      {:holding, ^pid} -> pid
    after
      2_000 -> raise "#{opt} never got #{key}"
    end
  end
end
