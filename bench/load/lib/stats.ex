defmodule DSPexLoad.Stats do
  @moduledoc false
  # Per-node latency counters shared by every caller process: two
  # generations of `:counters` arrays (one being written, one being read by
  # the reporter every interval), so recording is three atomic adds and no
  # message. Per operation: a histogram of admitted latencies, one of
  # refusal latencies, error and unanswered counts, sums and maxima.
  # Error and refusal reasons are counted in an ETS table.

  alias DSPexLoad.Hist

  @key __MODULE__
  @nb Hist.size()
  # Layout: admitted latencies, refusal latencies (both from the intended
  # start), refusals' own service time (from the call's start), then sums
  # and counts.
  @svc 2 * @nb
  @ok_sum 3 * @nb + 1
  @ref_sum 3 * @nb + 2
  @errors 3 * @nb + 3
  @unanswered 3 * @nb + 4
  @width 3 * @nb + 4

  def setup(ops) do
    sets =
      for _gen <- 0..1 do
        ops
        |> Enum.map(fn _ ->
          {:counters.new(@width, [:write_concurrency]), :atomics.new(2, signed: false)}
        end)
        |> List.to_tuple()
      end

    table =
      case :ets.whereis(:dspex_load_reasons) do
        :undefined ->
          :ets.new(:dspex_load_reasons, [:public, :named_table, write_concurrency: true])

        t ->
          :ets.delete_all_objects(t)
          t
      end

    gen = :atomics.new(1, signed: false)
    index = ops |> Enum.with_index(1) |> Map.new()
    :persistent_term.put(@key, {gen, List.to_tuple(sets), index, List.to_tuple(ops), table})
    :ok
  end

  def op_index(op) do
    {_, _, index, _, _} = :persistent_term.get(@key)
    Map.fetch!(index, op)
  end

  # `i` an op index (1-based), `class` :ok | :refused | :error | :unanswered.
  def record(i, :ok, ns), do: add(i, 1 + Hist.index(ns), @ok_sum, 1, ns)
  def record(i, :refused, ns), do: add(i, 1 + @nb + Hist.index(ns), @ref_sum, 2, ns)

  def record(i, :error, _ns) do
    {c, _} = current(i)
    :counters.add(c, @errors, 1)
  end

  def record(i, :unanswered, _ns) do
    {c, _} = current(i)
    :counters.add(c, @unanswered, 1)
  end

  # The refusal's cost inside the library, without the caller's backlog.
  def refusal_service(i, ns) do
    {c, _} = current(i)
    :counters.add(c, 1 + @svc + Hist.index(ns), 1)
  end

  def reason(i, class, reason) do
    {_, _, _, ops, table} = :persistent_term.get(@key)
    key = {elem(ops, i - 1), class, short(reason)}
    :ets.update_counter(table, key, 1, {key, 0})
  end

  defp short({:error, r}), do: short(r)
  defp short(r) when is_tuple(r) and tuple_size(r) > 0 and is_atom(elem(r, 0)), do: elem(r, 0)
  defp short(r) when is_atom(r) or is_binary(r), do: r
  defp short(r), do: inspect(r, limit: 5, printable_limit: 60)

  defp add(i, bucket, sum, max_slot, ns) do
    {c, m} = current(i)
    :counters.add(c, bucket, 1)
    :counters.add(c, sum, ns)
    bump(m, max_slot, ns)
  end

  defp bump(m, slot, ns) do
    old = :atomics.get(m, slot)

    if ns > old do
      case :atomics.compare_exchange(m, slot, old, ns) do
        :ok -> :ok
        _ -> bump(m, slot, ns)
      end
    end
  end

  defp current(i) do
    {gen, sets, _, _, _} = :persistent_term.get(@key)
    elem(elem(sets, :atomics.get(gen, 1)), i - 1)
  end

  # Switches generations and returns what the old one holds (then zeroes
  # it): %{op => %{ok: counts, refused: counts, ok_sum, ref_sum, ok_max,
  # ref_max, errors, unanswered}}, plus the reasons counted so far.
  def take do
    {gen, sets, _, ops, table} = :persistent_term.get(@key)
    old = :atomics.get(gen, 1)
    :atomics.put(gen, 1, 1 - old)
    # Callers that read the generation just before the switch finish their
    # three adds within microseconds.
    Process.sleep(5)
    set = elem(sets, old)

    per_op =
      for {op, i} <- Enum.with_index(Tuple.to_list(ops)), into: %{} do
        {c, m} = elem(set, i)
        values = for j <- 1..@width, do: :counters.get(c, j)
        for j <- 1..@width, do: :counters.put(c, j, 0)
        maxes = {:atomics.exchange(m, 1, 0), :atomics.exchange(m, 2, 0)}
        {ok, rest} = Enum.split(values, @nb)
        {refused, rest} = Enum.split(rest, @nb)
        {service, [ok_sum, ref_sum, errors, unanswered]} = Enum.split(rest, @nb)

        {op,
         %{
           ok: ok,
           refused: refused,
           ref_service: service,
           ok_sum: ok_sum,
           ref_sum: ref_sum,
           ok_max: elem(maxes, 0),
           ref_max: elem(maxes, 1),
           errors: errors,
           unanswered: unanswered
         }}
      end

    # Reasons counted since the last take (an increment racing the clear
    # may be lost: these are for reading, the counters above are exact).
    reasons = :ets.tab2list(table)
    :ets.delete_all_objects(table)
    {per_op, reasons}
  end

  def empty,
    do: %{
      ok: nil,
      refused: nil,
      ref_service: nil,
      ok_sum: 0,
      ref_sum: 0,
      ok_max: 0,
      ref_max: 0,
      errors: 0,
      unanswered: 0
    }

  def merge(a, b) do
    %{
      ok: Hist.merge(a.ok, b.ok),
      refused: Hist.merge(a.refused, b.refused),
      ref_service: Hist.merge(a.ref_service, b.ref_service),
      ok_sum: a.ok_sum + b.ok_sum,
      ref_sum: a.ref_sum + b.ref_sum,
      ok_max: max(a.ok_max, b.ok_max),
      ref_max: max(a.ref_max, b.ref_max),
      errors: a.errors + b.errors,
      unanswered: a.unanswered + b.unanswered
    }
  end

  def merge_ops(a, b), do: Map.merge(a, b, fn _op, x, y -> merge(x, y) end)
end
