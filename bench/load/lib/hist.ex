defmodule DSPexLoad.Hist do
  @moduledoc false
  # Log-linear latency buckets over nanoseconds (HdrHistogram's layout with
  # 32 sub-buckets per octave, about 3% resolution): values below 64 ns
  # have a bucket each, then every power of two is split into 32. Up to
  # 2^40 ns (18 minutes); larger values land in the last bucket.

  import Bitwise

  @linear 64
  @sub 32
  @octaves 40 - 6
  @size @linear + @octaves * @sub

  def size, do: @size

  # Index of the bucket holding `ns` (0-based).
  def index(ns) when ns < @linear, do: max(ns, 0)

  def index(ns) do
    e = log2(ns, 0)
    i = @linear + (e - 6) * @sub + ((ns >>> (e - 5)) - @sub)
    min(i, @size - 1)
  end

  defp log2(v, acc) when v >= 256, do: log2(v >>> 8, acc + 8)
  defp log2(v, acc) when v >= 16, do: log2(v >>> 4, acc + 4)
  defp log2(v, acc) when v >= 2, do: log2(v >>> 1, acc + 1)
  defp log2(_v, acc), do: acc

  # The upper bound (ns) of bucket `i`: what a percentile in it reports.
  def upper(i) when i < @linear, do: i

  def upper(i) do
    j = i - @linear
    e = div(j, @sub) + 6
    sub = rem(j, @sub) + @sub
    ((sub + 1) <<< (e - 5)) - 1
  end

  # `counts` is a tuple or list of @size counts. Percentiles (0..100) in ns.
  def percentile(counts, total, q) when total > 0 do
    rank = max(1, ceil(total * q / 100))
    walk(counts, 0, 0, rank)
  end

  def percentile(_counts, _total, _q), do: nil

  defp walk([c | rest], i, seen, rank) do
    if seen + c >= rank, do: upper(i), else: walk(rest, i + 1, seen + c, rank)
  end

  defp walk([], i, _seen, _rank), do: upper(i - 1)

  def merge(nil, b), do: b
  def merge(a, nil), do: a
  def merge(a, b), do: :lists.zipwith(&+/2, a, b)
end
