defmodule DSPexLoad.Workload do
  @moduledoc false
  # The mixed session workload, through the public Elixir API, for callers
  # in this VM (the in-VM path, the port backend, and replicated sessions,
  # where this module runs on each node). Each session has ten integer
  # variables x0..x9 and a derived variable d = x0 + x1; each caller owns
  # its sessions outright, so it knows what every variable must hold: reads
  # are checked against the last acknowledged write (read-your-writes),
  # conditional writes carry the version it knows, and at the end every
  # variable is compared with the caller's record (a lost acknowledged write
  # shows as a mismatch).
  #
  # Mix: 70% reads, 20% writes (a quarter with expected_version), 5% atomic
  # batches of 5, 3% lock cycles (OptimizerCoordinator acquire, a fenced
  # write, release), 2% dependency changes (an edge x5 -> x6 added or
  # removed). Writes to x0/x1 recompute d in the session's propagation
  # worker.

  alias DSPex.Bridge.{DependencyManager, OptimizerCoordinator, SessionStore}

  @vars {:x0, :x1, :x2, :x3, :x4, :x5, :x6, :x7, :x8, :x9}
  @ops [:read, :write, :write_cas, :batch, :lock_cycle, :dep_change]
  @refusals [:overloaded, :rate_limited, :busy, :circuit_open]

  def ops, do: @ops
  def refusal?(reason), do: reason in @refusals

  def vars, do: Tuple.to_list(@vars)

  ## Setup (run on the node that will call)

  # Creates sessions `ids` with `opts` (create_session options), registers
  # the variables, the derived variable, and writes each variable `prefill`
  # times (so histories are full before the run and memory is at its
  # steady level). Returns {:ok, count} or raises.
  def setup(ids, opts, prefill, derived?) do
    ids
    |> Task.async_stream(&setup_one(&1, opts, prefill, derived?),
      max_concurrency: Keyword.get(opts, :setup_concurrency, 8),
      timeout: 120_000,
      ordered: false
    )
    |> Enum.reduce(0, fn {:ok, :ok}, n -> n + 1 end)
  end

  defp setup_one(sid, opts, prefill, derived?) do
    create = Keyword.drop(opts, [:setup_concurrency])

    case SessionStore.create_session(sid, create) do
      {:ok, ^sid} -> :ok
      other -> raise "create_session #{sid}: #{inspect(other)}"
    end

    for v <- vars() do
      {:ok, _} = retry(fn -> SessionStore.register_variable(sid, v, :integer, 0) end)
    end

    if derived? do
      {:ok, _} =
        retry(fn ->
          DependencyManager.defderived(sid, :d, :integer, [:x0, :x1], &derive/1)
        end)
    end

    # Round by round, so the derived variable's history fills too (at
    # least one recomputation per round).
    # (One atomic batch of the ten per round: one Raft command, not ten.)
    all = for v <- vars(), do: {v, 0}

    for _ <- 1..prefill//1 do
      :ok = retry(fn -> SessionStore.update_variables(sid, all, atomic: true) end)
      if derived?, do: :ok = DependencyManager.await_propagation(sid, 60_000)
    end

    :ok
  end

  def derive(%{x0: a, x1: b}), do: a + b

  defp retry(fun, n \\ 20) do
    case fun.() do
      {:error, reason} = e when n > 0 ->
        if reason in [:timeout, :timeout_unknown_outcome, :unavailable, :overloaded],
          do: Process.sleep(50) && retry(fun, n - 1),
          else: e

      other ->
        other
    end
  end

  ## A caller's state: per session, the expected value and version of each
  ## variable (a tuple of {value, version, certain?}), and whether the edge
  ## x5 -> x6 is there.

  def caller_state(sessions, prefill, id) do
    vars = List.duplicate({0, prefill, true}, tuple_size(@vars)) |> List.to_tuple()

    %{
      sessions: List.to_tuple(sessions),
      n: length(sessions),
      expect: Map.new(sessions, &{&1, vars}),
      edge: Map.new(sessions, &{&1, false}),
      counter: 0,
      id: id,
      optimizer: "load-#{id}"
    }
  end

  ## One operation: {class, reason, state}; class :ok | :refused | :error

  def pick(r) when r <= 70, do: :read
  def pick(r) when r <= 85, do: :write
  def pick(r) when r <= 90, do: :write_cas
  def pick(r) when r <= 95, do: :batch
  def pick(r) when r <= 98, do: :lock_cycle
  def pick(_r), do: :dep_change

  def run(:read, st) do
    sid = session(st)
    i = :rand.uniform(10) - 1
    var = elem(@vars, i)

    # The default says only that it could not be read; the variable's read
    # says why (or, admitted this time, what it holds).
    case SessionStore.get_variable_value(sid, var, :__unreadable__) do
      :__unreadable__ ->
        case SessionStore.get_variable(sid, var) do
          {:ok, %{value: value}} -> check_read(st, sid, i, var, value)
          other -> failed(other, st)
        end

      value ->
        check_read(st, sid, i, var, value)
    end
  end

  def run(:write, st), do: write(st, false)
  def run(:write_cas, st), do: write(st, true)

  def run(:batch, st) do
    sid = session(st)
    st = %{st | counter: st.counter + 1}
    base = st.counter * 10
    updates = for i <- 0..4, do: {elem(@vars, i), base + i}

    case SessionStore.update_variables(sid, updates, atomic: true) do
      :ok ->
        exp =
          Enum.reduce(0..4, st.expect[sid], fn i, exp ->
            {_, version, certain} = elem(exp, i)
            put_elem(exp, i, {base + i, version + 1, certain})
          end)

        {:ok, nil, put_expect(st, sid, exp)}

      other ->
        st = if unknown?(other), do: uncertain(st, sid, 0..4), else: st
        failed(other, st)
    end
  end

  def run(:lock_cycle, st) do
    sid = session(st)
    opts = [session_id: sid, conflict_resolution: :wait, timeout: 1_000]

    case OptimizerCoordinator.acquire_lock(:x9, st.optimizer, self(), opts) do
      {:ok, _} ->
        st = %{st | counter: st.counter + 1}
        value = st.counter * 10
        written = SessionStore.update_variable(sid, :x9, value, %{}, optimizer_id: st.optimizer)
        released = OptimizerCoordinator.release_lock(:x9, st.optimizer, session_id: sid)

        st =
          case written do
            :ok -> bump(st, sid, 9, value)
            other -> if unknown?(other), do: uncertain(st, sid, [9]), else: st
          end

        case {written, released} do
          {:ok, :ok} -> {:ok, nil, st}
          {:ok, other} -> failed(other, st)
          {other, _} -> failed(other, st)
        end

      other ->
        failed(other, st)
    end
  end

  def run(:dep_change, st) do
    sid = session(st)

    result =
      if st.edge[sid],
        do: DependencyManager.remove_dependency(sid, :x5, :x6),
        else: DependencyManager.add_dependency(sid, :x5, :x6)

    case result do
      :ok -> {:ok, nil, %{st | edge: Map.update!(st.edge, sid, &(!&1))}}
      other -> failed(other, st)
    end
  end

  defp write(st, cas?) do
    sid = session(st)
    # x9 is written under its lock (lock_cycle); writes go to x0..x8.
    i = :rand.uniform(9) - 1
    var = elem(@vars, i)
    st = %{st | counter: st.counter + 1}
    value = st.counter * 10
    {_, version, certain} = elem(st.expect[sid], i)

    result =
      if cas? and certain,
        do: SessionStore.update_variable(sid, var, value, %{}, expected_version: version),
        else: SessionStore.update_variable(sid, var, value)

    case result do
      :ok ->
        {:ok, nil, bump(st, sid, i, value)}

      {:error, {:version_mismatch, _}} = e when cas? and certain ->
        # This caller is the only writer: a mismatch means a write it saw
        # acknowledged is not there (or one it never made is).
        {:error, e, uncertain(st, sid, [i])}

      other ->
        st = if unknown?(other), do: uncertain(st, sid, [i]), else: st
        failed(other, st)
    end
  end

  defp session(st), do: elem(st.sessions, :rand.uniform(st.n) - 1)

  defp bump(st, sid, i, value) do
    {_, version, certain} = elem(st.expect[sid], i)
    put_expect(st, sid, put_elem(st.expect[sid], i, {value, version + 1, certain}))
  end

  # An outcome nobody knows (a timeout on a write): the value may or may
  # not be there; the version is unknown from now on.
  defp uncertain(st, sid, is) do
    exp = Enum.reduce(is, st.expect[sid], fn i, e -> put_elem(e, i, {nil, nil, false}) end)
    put_expect(st, sid, exp)
  end

  defp put_expect(st, sid, exp), do: %{st | expect: Map.put(st.expect, sid, exp)}

  defp unknown?({:error, :timeout_unknown_outcome}), do: true
  defp unknown?({:error, :timeout}), do: true
  defp unknown?(_), do: false

  defp failed({:error, reason} = e, st) do
    if refusal?(reason), do: {:refused, reason, st}, else: {:error, e, st}
  end

  defp failed({:ok, _} = other, st), do: {:error, {:unexpected, other}, st}
  defp failed(other, st), do: {:error, other, st}

  ## The final check: every variable as this caller last saw it acknowledged.

  def verify(st) do
    Enum.reduce(Tuple.to_list(st.sessions), %{checked: 0, lost: 0, examples: []}, fn sid, acc ->
      exp = st.expect[sid]

      acc =
        Enum.reduce(0..9, acc, fn i, acc ->
          var = elem(@vars, i)

          case elem(exp, i) do
            {_, _, false} ->
              acc

            {value, version, true} ->
              case patiently(fn -> SessionStore.get_variable(sid, var) end) do
                {:ok, %{value: ^value, version: ^version}} ->
                  %{acc | checked: acc.checked + 1}

                other ->
                  lost(acc, {sid, var, {value, version}, short(other)})
              end
          end
        end)

      # The derived variable catches up with its inputs.
      case derived_check(sid) do
        :ok -> acc
        :skip -> acc
        bad -> lost(acc, {sid, :d, bad})
      end
    end)
  end

  defp derived_check(sid) do
    case DependencyManager.await_propagation(sid, 10_000) do
      :ok ->
        with {:ok, %{value: a}} <- patiently(fn -> SessionStore.get_variable(sid, :x0) end),
             {:ok, %{value: b}} <- patiently(fn -> SessionStore.get_variable(sid, :x1) end),
             {:ok, %{value: d}} <- patiently(fn -> SessionStore.get_variable(sid, :d) end) do
          if d == a + b, do: :ok, else: {:derived_behind, d, a + b}
        else
          {:error, :not_found} -> :skip
          other -> {:derived_unreadable, short(other)}
        end

      {:error, :session_not_found} ->
        :skip

      other ->
        {:propagation, other}
    end
  end

  # The check reads through the same admission as the load: a refusal says
  # nothing about the data, so it asks again.
  defp patiently(fun, n \\ 500) do
    case fun.() do
      {:error, reason} when n > 0 and reason in @refusals ->
        Process.sleep(10)
        patiently(fun, n - 1)

      other ->
        other
    end
  end

  defp lost(acc, example) do
    %{acc | lost: acc.lost + 1, examples: Enum.take([example | acc.examples], 5)}
  end

  defp short({:ok, %{value: v, version: n}}), do: {v, n}
  defp short(other), do: other

  defp check_read(st, sid, i, var, value) do
    case elem(st.expect[sid], i) do
      {^value, _, _} -> {:ok, nil, st}
      {_, _, false} -> {:ok, nil, st}
      {want, _, true} -> {:error, {:stale_read, {var, value, want}}, st}
    end
  end

  # The driver without the library: the session and variable picked as a
  # read picks them, nothing called.
  def null(_op, st) do
    _ = {session(st), elem(@vars, :rand.uniform(10) - 1)}
    {:ok, nil, st}
  end
end
