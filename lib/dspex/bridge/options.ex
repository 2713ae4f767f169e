defmodule DSPex.Bridge.Options do
  @moduledoc false
  # The one options policy of the public API (SessionStore, AccessControl,
  # OptimizerCoordinator): options are a keyword list of known keys. Anything
  # else is a caller's mistake answered with an error, never an exception:
  #
  #   - not a keyword list: {:error, {:invalid_argument, {:bad_options, opts}}}
  #   - unknown keys:       {:error, {:invalid_argument, {:unknown_options, keys}}}
  #
  # Unknown keys are refused rather than ignored because a misspelt
  # `principal:` would otherwise run the call as the session itself.

  @type error :: {:error, {:invalid_argument, {:bad_options | :unknown_options, term}}}

  @doc false
  @spec validate(term, [atom]) :: {:ok, keyword} | error
  def validate([], _allowed), do: {:ok, []}

  def validate(opts, allowed) when is_list(opts) do
    case unknown(opts, allowed, []) do
      [] -> {:ok, opts}
      :bad -> {:error, {:invalid_argument, {:bad_options, opts}}}
      keys -> {:error, {:invalid_argument, {:unknown_options, Enum.reverse(keys)}}}
    end
  end

  def validate(opts, _allowed), do: {:error, {:invalid_argument, {:bad_options, opts}}}

  defp unknown([], _allowed, acc), do: acc

  defp unknown([{key, _} | rest], allowed, acc) when is_atom(key) do
    if :lists.member(key, allowed),
      do: unknown(rest, allowed, acc),
      else: unknown(rest, allowed, [key | acc])
  end

  # An improper list or an element that is not a `{atom, value}` pair.
  defp unknown(_other, _allowed, _acc), do: :bad
end
