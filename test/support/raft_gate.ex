defmodule DSPex.Test.RaftGate do
  @moduledoc false
  # The node's Raft admission gate is shared by every replicated session of
  # the VM: a test counting admitted and refused calls first waits until no
  # earlier test's call holds a place (a caller killed while admitted gives
  # its place back at the next sweep, within a second).

  alias DSPex.Bridge.Admission

  @spec await_idle(non_neg_integer) :: :ok | {:error, {:busy, integer}}
  def await_idle(deadline_ms \\ 5_000) do
    case Admission.in_flight(:dspex_raft) do
      0 ->
        :ok

      n when deadline_ms <= 0 ->
        {:error, {:busy, n}}

      _ ->
        Process.sleep(20)
        await_idle(deadline_ms - 20)
    end
  end
end
