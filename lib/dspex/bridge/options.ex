defmodule DSPex.Bridge.Options do
  @moduledoc false
  # The one options policy of the public API (every module under
  # DSPex.Bridge, DSPex.Context and DSPex.Variables): options are a keyword
  # list of the keys a function documents, each given once. Anything else is
  # a caller's mistake answered with an error, never an exception:
  #
  #   - not a keyword list:    {:error, {:invalid_argument, {:bad_options, opts}}}
  #   - unknown keys:          {:error, {:invalid_argument, {:unknown_options, keys}}}
  #   - keys given twice:      {:error, {:invalid_argument, {:duplicate_options, keys}}}
  #   - a known key's value:   {:error, {:invalid_argument, {key, value}}} (see bad/2),
  #                            as for a bad positional argument ({:limit, -1})
  #
  # `keys` are in the order given, each once. Unknown keys are refused rather
  # than ignored because a misspelt `principal:` would otherwise run the call
  # as the session itself; a key given twice because `Keyword.get/2` and the
  # engine could read different ones.

  @type error ::
          {:error,
           {:invalid_argument,
            {:bad_options | :unknown_options | :duplicate_options, term} | {atom, term}}}

  @doc false
  @spec validate(term, [atom]) :: {:ok, keyword} | error
  def validate([], _allowed), do: {:ok, []}

  def validate(opts, allowed) when is_list(opts) do
    case scan(opts, allowed, [], [], []) do
      :bad -> {:error, {:invalid_argument, {:bad_options, opts}}}
      {[], []} -> {:ok, opts}
      {[], dups} -> {:error, {:invalid_argument, {:duplicate_options, ordered(dups)}}}
      {unknown, _} -> {:error, {:invalid_argument, {:unknown_options, ordered(unknown)}}}
    end
  end

  def validate(opts, _allowed), do: {:error, {:invalid_argument, {:bad_options, opts}}}

  @doc false
  # The answer for a known option with a bad value.
  @spec bad(atom, term) :: error
  def bad(key, value), do: {:error, {:invalid_argument, {key, value}}}

  defp scan([], _allowed, _seen, unknown, dups), do: {unknown, dups}

  defp scan([{key, _} | rest], allowed, seen, unknown, dups) when is_atom(key) do
    cond do
      not :lists.member(key, allowed) -> scan(rest, allowed, seen, [key | unknown], dups)
      :lists.member(key, seen) -> scan(rest, allowed, seen, unknown, [key | dups])
      true -> scan(rest, allowed, [key | seen], unknown, dups)
    end
  end

  # An improper list or an element that is not a `{atom, value}` pair.
  defp scan(_other, _allowed, _seen, _unknown, _dups), do: :bad

  defp ordered(keys), do: keys |> Enum.reverse() |> Enum.uniq()
end
