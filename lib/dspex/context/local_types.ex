defmodule DSPex.Context.LocalTypes do
  @moduledoc false
  # Validation for a context's local (not yet bridged) state, in plain
  # Elixir: the same types, coercions and error shapes as the engine, so a
  # program behaves the same before and after `DSPex.Context.ensure_bridged/1`.

  @types [:float, :integer, :string, :boolean, :choice, :module, :embedding, :tensor]

  def types, do: @types

  def validate(:float, c, v) when is_number(v), do: range(c, v * 1.0)
  def validate(:float, _c, _v), do: invalid(:float)

  def validate(:integer, c, v) when is_integer(v), do: range(c, v)

  def validate(:integer, c, v) when is_float(v) and v == trunc(v) and abs(v) < 9.0e15,
    do: range(c, trunc(v))

  def validate(:integer, _c, _v), do: invalid(:integer)

  def validate(:string, c, v) when is_binary(v) do
    cond do
      not String.valid?(v) -> {:error, {:invalid_value, :invalid_utf8}}
      (min = get(c, :min_length)) && String.length(v) < min -> violation(:min_length, min)
      (max = get(c, :max_length)) && String.length(v) > max -> violation(:max_length, max)
      (p = get(c, :pattern)) && not Regex.match?(~r/\A(?:#{p})\z/u, v) -> violation(:pattern, p)
      true -> one_of(get(c, :enum), v)
    end
  end

  def validate(:string, _c, _v), do: invalid(:string)

  def validate(:boolean, _c, v) when is_boolean(v), do: {:ok, v}
  def validate(:boolean, _c, "true"), do: {:ok, true}
  def validate(:boolean, _c, "false"), do: {:ok, false}
  def validate(:boolean, _c, _v), do: invalid(:boolean)

  def validate(:choice, c, v) when is_binary(v) or is_atom(v) or is_number(v),
    do: one_of(get(c, :choices), v)

  def validate(:choice, _c, _v), do: invalid(:choice)

  def validate(:module, c, v) when (is_atom(v) and not is_nil(v)) or is_binary(v) do
    name = v |> to_string() |> String.replace_prefix("Elixir.", "")

    case get(c, :allowed_modules) do
      nil ->
        {:ok, v}

      allowed ->
        names = Enum.map(allowed, &(&1 |> to_string() |> String.replace_prefix("Elixir.", "")))
        if name in names, do: {:ok, v}, else: violation(:allowed_modules, name)
    end
  end

  def validate(:module, _c, _v), do: invalid(:module)

  def validate(:embedding, c, v) when is_list(v) do
    if Enum.all?(v, &is_number/1) do
      dims = get(c, :dimensions)

      if dims && length(v) != dims,
        do: violation(:dimensions, dims),
        else: {:ok, Enum.map(v, &(&1 * 1.0))}
    else
      invalid(:embedding)
    end
  end

  def validate(:embedding, _c, _v), do: invalid(:embedding)

  def validate(:tensor, c, %{"shape" => shape, "data" => data})
      when is_list(shape) and is_list(data) do
    cond do
      not Enum.all?(shape, &(is_integer(&1) and &1 >= 0)) -> invalid(:tensor)
      not Enum.all?(data, &is_number/1) -> invalid(:tensor)
      Enum.product(shape) != length(data) -> {:error, {:invalid_value, :shape_data_mismatch}}
      (want = get(c, :shape)) && want != shape -> violation(:shape, want)
      true -> {:ok, %{"shape" => shape, "data" => Enum.map(data, &(&1 * 1.0))}}
    end
  end

  def validate(:tensor, _c, _v), do: invalid(:tensor)

  defp range(c, x) do
    min = get(c, :min)
    max = get(c, :max)

    cond do
      min != nil and x < min -> violation(:below_min, min * 1.0)
      max != nil and x > max -> violation(:above_max, max * 1.0)
      true -> {:ok, x}
    end
  end

  defp one_of(nil, v), do: {:ok, v}

  defp one_of(options, v) do
    text = if is_atom(v) or is_binary(v), do: to_string(v)

    if Enum.any?(
         options,
         &(&1 == v or (text != nil and (is_atom(&1) or is_binary(&1)) and to_string(&1) == text))
       ),
       do: {:ok, v},
       else: violation(:not_in_choices, options)
  end

  defp get(c, key), do: Map.get(c, key, Map.get(c, Atom.to_string(key)))
  defp invalid(type), do: {:error, {:invalid_value, {:expected, type}}}
  defp violation(tag, detail), do: {:error, {:constraint_violation, {tag, detail}}}
end
