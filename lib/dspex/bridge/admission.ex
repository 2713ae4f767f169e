defmodule DSPex.Bridge.Admission do
  @moduledoc false
  # Admission control for the places where requests wait their turn: the
  # port program's pipe (`Backend.Port`) and a Raft group's leader
  # (`Backend.Raft`). One counter per gate and VM (an `:atomics` cell kept
  # in a persistent term, created once): a request is admitted while fewer
  # than `max` are in flight, else it is refused at once with
  # `{:error, :overloaded}`, so what waits is bounded and what is refused
  # learns so in microseconds instead of joining a queue it would time
  # out in.

  @doc "Creates the gate's counter if it does not exist (at a server's start)."
  @spec ensure(atom) :: :ok
  def ensure(gate) do
    case :persistent_term.get({__MODULE__, gate}, nil) do
      nil -> :persistent_term.put({__MODULE__, gate}, :atomics.new(1, signed: true))
      _ -> :ok
    end
  end

  @doc "Takes a place: `:ok`, or `{:error, :overloaded}` when `max` are taken."
  @spec admit(atom, pos_integer) :: :ok | {:error, :overloaded}
  def admit(gate, max) do
    case :persistent_term.get({__MODULE__, gate}, nil) do
      # No counter (its server never started): nothing to protect.
      nil ->
        :ok

      ref ->
        if :atomics.add_get(ref, 1, 1) > max do
          :atomics.sub(ref, 1, 1)
          {:error, :overloaded}
        else
          :ok
        end
    end
  end

  @doc "Gives `n` places back."
  @spec release(atom, pos_integer) :: :ok
  def release(gate, n \\ 1) do
    case :persistent_term.get({__MODULE__, gate}, nil) do
      nil -> :ok
      ref -> :atomics.sub(ref, 1, n)
    end
  end

  @doc "Sets the count to zero (a server that lost its queue with its process)."
  @spec reset(atom) :: :ok
  def reset(gate) do
    ensure(gate)
    :atomics.put(:persistent_term.get({__MODULE__, gate}), 1, 0)
  end

  @doc "How many places are taken."
  @spec in_flight(atom) :: integer
  def in_flight(gate) do
    case :persistent_term.get({__MODULE__, gate}, nil) do
      nil -> 0
      ref -> :atomics.get(ref, 1)
    end
  end
end
