defmodule DSPex.Context.Options do
  @moduledoc false
  # Option lists of `DSPex.Context` and `DSPex.Variables`, checked in the
  # caller's process before anything reaches the context or the store, so a
  # bad list is an `{:error, {:invalid_argument, _}}` answer and never an
  # exception in the caller or in the context process.

  @doc """
  `:ok` when `opts` is a keyword list whose keys are all in `allowed`, else
  `{:error, {:invalid_argument, :options_must_be_a_keyword_list}}`,
  `{:error, {:invalid_argument, {:unknown_option, key}}}` or
  `{:error, {:invalid_argument, {:duplicate_option, key}}}` (the store
  refuses a key given twice).
  """
  @spec check(term, [atom]) :: :ok | {:error, {:invalid_argument, term}}
  def check(opts, allowed) do
    if keyword?(opts) do
      keys = Keyword.keys(opts)

      cond do
        key = Enum.find(keys, &(&1 not in allowed)) ->
          {:error, {:invalid_argument, {:unknown_option, key}}}

        length(keys) != length(Enum.uniq(keys)) ->
          {:error, {:invalid_argument, {:duplicate_option, hd(keys -- Enum.uniq(keys))}}}

        true ->
          :ok
      end
    else
      {:error, {:invalid_argument, :options_must_be_a_keyword_list}}
    end
  end

  defp keyword?([]), do: true
  defp keyword?([{key, _} | rest]) when is_atom(key), do: keyword?(rest)
  defp keyword?(_), do: false
end
