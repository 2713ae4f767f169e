defmodule DSPexLoad.JSON do
  @moduledoc false
  # Just enough JSON for the results files (no Hex here): maps, lists,
  # strings, numbers, booleans, nil; atoms as strings, tuples as lists,
  # anything else inspected.

  def encode(term), do: IO.iodata_to_binary(enc(term, 0))

  defp enc(nil, _), do: "null"
  defp enc(true, _), do: "true"
  defp enc(false, _), do: "false"
  defp enc(n, _) when is_integer(n), do: Integer.to_string(n)
  defp enc(f, _) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  defp enc(a, d) when is_atom(a), do: enc(Atom.to_string(a), d)
  defp enc(s, _) when is_binary(s), do: [?", escape(s), ?"]
  defp enc(t, d) when is_tuple(t), do: enc(Tuple.to_list(t), d)
  defp enc([], _), do: "[]"

  defp enc(l, d) when is_list(l) do
    if List.improper?(l),
      do: enc(inspect(l), d),
      else: ["[", Enum.map_intersperse(l, ",", &enc(&1, d + 1)), "]"]
  end

  defp enc(m, _d) when is_map(m) and map_size(m) == 0, do: "{}"

  defp enc(m, d) when is_map(m) do
    pad = ["\n", String.duplicate("  ", d + 1)]

    items =
      m
      |> Enum.map(fn {k, v} -> {key(k), v} end)
      |> Enum.sort()
      |> Enum.map_intersperse(",", fn {k, v} -> [pad, enc(k, d), ": ", enc(v, d + 1)] end)

    ["{", items, "\n", String.duplicate("  ", d), "}"]
  end

  defp enc(other, d), do: enc(inspect(other), d)

  defp key(k) when is_binary(k), do: k
  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k), do: inspect(k)

  defp escape(s) do
    if String.valid?(s) do
      for <<c::utf8 <- s>>, into: "" do
        case c do
          ?" -> "\\\""
          ?\\ -> "\\\\"
          ?\n -> "\\n"
          ?\r -> "\\r"
          ?\t -> "\\t"
          c when c < 0x20 -> :io_lib.format("\\u~4.16.0b", [c]) |> IO.iodata_to_binary()
          c -> <<c::utf8>>
        end
      end
    else
      escape(inspect(s))
    end
  end

  # Reading back (for the JSON the Python driver writes): a small parser.
  def decode!(bin) do
    {v, rest} = value(skip(bin))
    "" = skip(rest)
    v
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\n, ?\r, ?\t], do: skip(rest)
  defp skip(b), do: b

  defp value(<<"{", rest::binary>>), do: object(skip(rest), %{})
  defp value(<<"[", rest::binary>>), do: array(skip(rest), [])
  defp value(<<"\"", rest::binary>>), do: string(rest, [])
  defp value(<<"true", rest::binary>>), do: {true, rest}
  defp value(<<"false", rest::binary>>), do: {false, rest}
  defp value(<<"null", rest::binary>>), do: {nil, rest}
  defp value(b), do: number(b)

  defp object(<<"}", rest::binary>>, acc), do: {acc, rest}

  defp object(b, acc) do
    {k, rest} = value(skip(b))
    <<":", rest::binary>> = skip(rest)
    {v, rest} = value(skip(rest))
    acc = Map.put(acc, k, v)

    case skip(rest) do
      <<",", rest::binary>> -> object(skip(rest), acc)
      <<"}", rest::binary>> -> {acc, rest}
    end
  end

  defp array(<<"]", rest::binary>>, acc), do: {Enum.reverse(acc), rest}

  defp array(b, acc) do
    {v, rest} = value(skip(b))

    case skip(rest) do
      <<",", rest::binary>> -> array(skip(rest), [v | acc])
      <<"]", rest::binary>> -> {Enum.reverse([v | acc]), rest}
    end
  end

  defp string(<<"\"", rest::binary>>, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}

  defp string(<<"\\u", h::binary-size(4), rest::binary>>, acc),
    do: string(rest, [<<String.to_integer(h, 16)::utf8>> | acc])

  defp string(<<"\\", c, rest::binary>>, acc) do
    ch =
      case c do
        ?n -> "\n"
        ?t -> "\t"
        ?r -> "\r"
        ?b -> "\b"
        ?f -> "\f"
        other -> <<other>>
      end

    string(rest, [ch | acc])
  end

  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [<<c::utf8>> | acc])

  defp number(b) do
    {num, rest} = take_num(b, [])

    v =
      if String.contains?(num, [".", "e", "E"]) do
        {f, ""} = Float.parse(num)
        f
      else
        String.to_integer(num)
      end

    {v, rest}
  end

  defp take_num(<<c, rest::binary>>, acc) when c in ~c"0123456789+-.eE",
    do: take_num(rest, [c | acc])

  defp take_num(rest, acc), do: {acc |> Enum.reverse() |> List.to_string(), rest}
end
