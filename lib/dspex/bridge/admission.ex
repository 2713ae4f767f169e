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
  #
  # Every refusal, here or in the gRPC gateway's program, goes through
  # `refused/4`: one `[:dspex, :bridge, :admission, :refused]` event (only
  # built when a handler listens) and one increment of a per-path counter
  # that `DSPex.Bridge.Analytics.prometheus_text/0` exports as
  # `dspex_admission_refused_total{path}`, whether Analytics runs or not.

  alias DSPex.Bridge.Telemetry

  @refused_event [:dspex, :bridge, :admission, :refused]
  @refused_key {__MODULE__, :refused}
  # Counter slots, by path.
  @paths [port: 1, raft: 2, grpc: 3]

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

  ## Places held by their caller
  #
  # Where the caller itself gives its place back (a Raft call: no server
  # answers on its behalf), a caller killed while admitted would keep its
  # place for good, and a gate that leaks places ends up refusing
  # everything. So such a place is also written down with its holder, and
  # `sweep/1` (run periodically by the gate's owner) gives back the places
  # of dead holders. Whoever takes the row out of the table gives the place
  # back, so it is given back exactly once.

  @doc "Creates the table of held places of `gate` (by the gate's owner process)."
  @spec ensure_holders(atom) :: :ok
  def ensure_holders(gate) do
    ensure(gate)

    case :ets.whereis(holders(gate)) do
      :undefined ->
        :ets.new(holders(gate), [:named_table, :public, :set, write_concurrency: true])
        # A new table (the owner restarted) knows no holder: places taken
        # before it could never be given back, so the count starts again.
        reset(gate)

      _ ->
        :ok
    end
  end

  @doc """
  `admit/2` for a place the calling process holds until `release_held/2`
  (or its death: see `sweep/1`): `{:ok, key}` or `{:error, :overloaded}`.
  """
  @spec admit_held(atom, pos_integer) :: {:ok, reference} | {:error, :overloaded}
  def admit_held(gate, max) do
    with :ok <- admit(gate, max) do
      key = make_ref()
      :ets.insert(holders(gate), {key, self()})
      {:ok, key}
    end
  end

  @doc "Gives back the place `key` of `admit_held/2`, unless `sweep/1` did."
  @spec release_held(atom, reference) :: :ok
  def release_held(gate, key) do
    if :ets.take(holders(gate), key) != [], do: release(gate)
    :ok
  end

  @doc "Gives back the places whose holders are dead; how many."
  @spec sweep(atom) :: non_neg_integer
  def sweep(gate) do
    tab = holders(gate)

    dead =
      for {key, pid} <- :ets.tab2list(tab),
          not Process.alive?(pid),
          :ets.take(tab, key) != [],
          do: key

    if dead != [], do: release(gate, length(dead))
    length(dead)
  end

  defp holders(gate), do: :"#{gate}_holders"

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

  @doc """
  Creates the refusal counters if they do not exist (at the application's
  start, before any gate can refuse).
  """
  @spec ensure_counters() :: :ok
  def ensure_counters do
    case :persistent_term.get(@refused_key, nil) do
      nil ->
        :persistent_term.put(@refused_key, :counters.new(length(@paths), [:write_concurrency]))

      _ ->
        :ok
    end
  end

  @doc """
  Reports `count` refusals on `path` (`:port`, `:raft` or `:grpc`) whose
  gate admits `limit`: counts them and emits
  `[:dspex, :bridge, :admission, :refused]` with `%{count: count}` and
  `%{path: path, limit: limit, session_id: id}`. `session_id` is a session
  id, `nil` when unknown, or a function computing it, called only when a
  handler listens. Costs a counter increment and a lookup when none does.
  """
  @spec refused(:port | :raft | :grpc, pos_integer, term, pos_integer) :: :ok
  def refused(path, limit, session_id, count \\ 1) do
    case :persistent_term.get(@refused_key, nil) do
      nil -> :ok
      ref -> :counters.add(ref, Keyword.fetch!(@paths, path), count)
    end

    if Telemetry.enabled?(@refused_event) do
      session_id = if is_function(session_id, 0), do: session_id.(), else: session_id

      Telemetry.execute(@refused_event, %{count: count}, %{
        path: path,
        limit: limit,
        session_id: session_id
      })
    end

    :ok
  end

  @doc "Refusals counted since the application started, by path."
  @spec refused_counts() :: %{port: non_neg_integer, raft: non_neg_integer, grpc: non_neg_integer}
  def refused_counts do
    ref = :persistent_term.get(@refused_key, nil)
    Map.new(@paths, fn {path, i} -> {path, if(ref, do: :counters.get(ref, i), else: 0)} end)
  end
end
