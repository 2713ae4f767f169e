defmodule DSPex.Bridge.MsgPack do
  @moduledoc """
  MessagePack for the port protocol, in the shape the Rust engine uses
  (`dspex_core::value`): terms are written the natural way, except atoms
  (extension type 1, the name's UTF-8 bytes) and tuples (extension type 2, an
  encoded array of the elements), so both round-trip.

      iex> alias DSPex.Bridge.MsgPack
      iex> {:ok, bin} = MsgPack.encode(%{a: {1, "x"}, b: [0.5, nil]})
      iex> MsgPack.decode(IO.iodata_to_binary(bin))
      {:ok, %{a: {1, "x"}, b: [0.5, nil]}}

  `nil`, `true` and `false` are MessagePack's nil and booleans; binaries are
  `str` when valid UTF-8 and `bin` otherwise; integers must fit in 64 signed
  bits. Terms the engine cannot store are refused with the reason the NIF
  gives for them: `{:invalid_value, :unsupported_term | :integer_out_of_range
  | :improper_list | :bitstring | :nested_too_deeply}`. No integer is ever
  truncated: one outside the range of its encoding is refused.

  Decoding never creates an atom: an atom whose name is not already an atom
  of the VM comes back as its name, a binary (see `decode/1`), so data can
  not exhaust the atom table.
  """

  @ext_atom 1
  @ext_tuple 2
  # As the NIF's decoder: the outermost term is depth 0, 64 is the deepest.
  @max_depth 64
  @max_u64 0xFFFF_FFFF_FFFF_FFFF

  @type reason :: {:invalid_value, atom} | :invalid_msgpack

  @doc "Encodes a term to iodata."
  @spec encode(term) :: {:ok, iodata} | {:error, reason}
  def encode(term) do
    {:ok, value(term, 0)}
  catch
    {:invalid_value, _} = reason -> {:error, reason}
  end

  @doc """
  Encodes a term to iodata, throwing `{:invalid_value, reason}` when the term
  cannot be encoded. For building larger messages around values.
  """
  @spec encode!(term) :: iodata
  def encode!(term), do: value(term, 0)

  @doc """
  Encodes an identifier: any atom (`nil`, `true` and `false` included) as an
  atom, anything else as a value.
  """
  @spec encode_ident!(term) :: iodata
  def encode_ident!(atom) when is_atom(atom), do: atom(atom)
  def encode_ident!(other), do: value(other, 0)

  @doc """
  The MessagePack unsigned integer `n`, `0..2**64 - 1`. Throws
  `{:invalid_value, :integer_out_of_range}` for any other term (never
  truncates).
  """
  @spec uint(non_neg_integer) :: binary
  def uint(n) when is_integer(n) and n >= 0 and n < 0x80, do: <<n>>
  def uint(n) when is_integer(n) and n >= 0 and n < 0x100, do: <<0xCC, n>>
  def uint(n) when is_integer(n) and n >= 0 and n < 0x10000, do: <<0xCD, n::16>>
  def uint(n) when is_integer(n) and n >= 0 and n < 0x100000000, do: <<0xCE, n::32>>
  def uint(n) when is_integer(n) and n >= 0 and n <= @max_u64, do: <<0xCF, n::64>>
  def uint(_), do: throw({:invalid_value, :integer_out_of_range})

  defp value(nil, _), do: <<0xC0>>
  defp value(false, _), do: <<0xC2>>
  defp value(true, _), do: <<0xC3>>
  defp value(_, depth) when depth > @max_depth, do: throw({:invalid_value, :nested_too_deeply})

  defp value(n, _) when is_integer(n) and n >= 0x8000000000000000,
    do: throw({:invalid_value, :integer_out_of_range})

  defp value(n, _) when is_integer(n) and n >= 0, do: uint(n)
  defp value(n, _) when is_integer(n) and n >= -32, do: <<n::signed-8>>
  defp value(n, _) when is_integer(n) and n >= -0x80, do: <<0xD0, n::signed-8>>
  defp value(n, _) when is_integer(n) and n >= -0x8000, do: <<0xD1, n::signed-16>>
  defp value(n, _) when is_integer(n) and n >= -0x80000000, do: <<0xD2, n::signed-32>>

  defp value(n, _) when is_integer(n) and n >= -0x8000000000000000,
    do: <<0xD3, n::signed-64>>

  defp value(n, _) when is_integer(n), do: throw({:invalid_value, :integer_out_of_range})
  defp value(f, _) when is_float(f), do: <<0xCB, f::float-64>>

  defp value(b, _) when is_binary(b) do
    if String.valid?(b), do: [str_header(byte_size(b)), b], else: [bin_header(byte_size(b)), b]
  end

  defp value(a, _) when is_atom(a), do: atom(a)

  defp value(list, depth) when is_list(list) do
    {items, n} = list(list, depth + 1, [], 0)
    [array_header(n) | items]
  end

  defp value(map, depth) when is_map(map) do
    pairs =
      :maps.fold(fn k, v, acc -> [value(k, depth + 1), value(v, depth + 1) | acc] end, [], map)

    [map_header(map_size(map)) | pairs]
  end

  defp value(tuple, depth) when is_tuple(tuple) do
    n = tuple_size(tuple)
    items = for i <- 1..n//1, do: value(:erlang.element(i, tuple), depth + 1)
    body = [array_header(n) | items]
    [ext_header(IO.iodata_length(body), @ext_tuple) | body]
  end

  defp value(b, _) when is_bitstring(b), do: throw({:invalid_value, :bitstring})
  defp value(_, _), do: throw({:invalid_value, :unsupported_term})

  defp list([], _depth, acc, n), do: {:lists.reverse(acc), n}
  defp list([x | rest], depth, acc, n), do: list(rest, depth, [value(x, depth) | acc], n + 1)
  defp list(_improper, _depth, _acc, _n), do: throw({:invalid_value, :improper_list})

  defp atom(a) do
    name = Atom.to_string(a)
    [ext_header(byte_size(name), @ext_atom), name]
  end

  defp str_header(n) when n < 32, do: <<0xA0 + n>>
  defp str_header(n) when n < 0x100, do: <<0xD9, n>>
  defp str_header(n) when n < 0x10000, do: <<0xDA, n::16>>
  defp str_header(n), do: <<0xDB, n::32>>

  defp bin_header(n) when n < 0x100, do: <<0xC4, n>>
  defp bin_header(n) when n < 0x10000, do: <<0xC5, n::16>>
  defp bin_header(n), do: <<0xC6, n::32>>

  @doc "The header of a MessagePack array of `n` elements."
  @spec array_header(non_neg_integer) :: binary
  def array_header(n) when n < 16, do: <<0x90 + n>>
  def array_header(n) when n < 0x10000, do: <<0xDC, n::16>>
  def array_header(n), do: <<0xDD, n::32>>

  defp map_header(n) when n < 16, do: <<0x80 + n>>
  defp map_header(n) when n < 0x10000, do: <<0xDE, n::16>>
  defp map_header(n), do: <<0xDF, n::32>>

  defp ext_header(1, type), do: <<0xD4, type>>
  defp ext_header(2, type), do: <<0xD5, type>>
  defp ext_header(4, type), do: <<0xD6, type>>
  defp ext_header(8, type), do: <<0xD7, type>>
  defp ext_header(16, type), do: <<0xD8, type>>
  defp ext_header(n, type) when n < 0x100, do: <<0xC7, n, type>>
  defp ext_header(n, type) when n < 0x10000, do: <<0xC8, n::16, type>>
  defp ext_header(n, type), do: <<0xC9, n::32, type>>

  ## Decoding

  @doc """
  Decodes one whole MessagePack message. Trailing bytes, truncated input,
  unknown extension types and non-finite floats are `{:error,
  :invalid_msgpack}`.

  An atom (extension type 1) decodes to that atom only if the VM already has
  it; otherwise to its name as a binary. Decoding never creates atoms (names
  come from data: a snapshot, another node, the port program), so no input
  can fill the atom table. A name that is not UTF-8 is `:invalid_msgpack`.

      iex> DSPex.Bridge.MsgPack.decode(<<0xC7, 15, 1, "never an atom 1">>)
      {:ok, "never an atom 1"}
      iex> DSPex.Bridge.MsgPack.decode(<<0xD4, 1, "x">>)
      {:ok, :x}
  """
  @spec decode(binary) :: {:ok, term} | {:error, :invalid_msgpack}
  def decode(bin) when is_binary(bin) do
    case decode_prefix(bin) do
      {:ok, term, ""} -> {:ok, term}
      _ -> {:error, :invalid_msgpack}
    end
  end

  @doc "Decodes the first message of `bin`; returns it and the bytes after it."
  @spec decode_prefix(binary) :: {:ok, term, binary} | {:error, :invalid_msgpack}
  def decode_prefix(bin) when is_binary(bin) do
    {term, rest} = term(bin)
    {:ok, term, rest}
  catch
    :invalid -> {:error, :invalid_msgpack}
  end

  defp term(<<n, rest::binary>>) when n < 0x80, do: {n, rest}
  defp term(<<n, rest::binary>>) when n >= 0xE0, do: {n - 0x100, rest}
  defp term(<<n, rest::binary>>) when n in 0xA0..0xBF, do: bytes(rest, n - 0xA0)
  defp term(<<n, rest::binary>>) when n in 0x90..0x9F, do: array(rest, n - 0x90, [])
  defp term(<<n, rest::binary>>) when n in 0x80..0x8F, do: map(rest, n - 0x80, [])
  defp term(<<0xC0, rest::binary>>), do: {nil, rest}
  defp term(<<0xC2, rest::binary>>), do: {false, rest}
  defp term(<<0xC3, rest::binary>>), do: {true, rest}
  defp term(<<0xCC, n, rest::binary>>), do: {n, rest}
  defp term(<<0xCD, n::16, rest::binary>>), do: {n, rest}
  defp term(<<0xCE, n::32, rest::binary>>), do: {n, rest}
  defp term(<<0xCF, n::64, rest::binary>>), do: {n, rest}
  defp term(<<0xD0, n::signed-8, rest::binary>>), do: {n, rest}
  defp term(<<0xD1, n::signed-16, rest::binary>>), do: {n, rest}
  defp term(<<0xD2, n::signed-32, rest::binary>>), do: {n, rest}
  defp term(<<0xD3, n::signed-64, rest::binary>>), do: {n, rest}
  defp term(<<0xCA, f::float-32, rest::binary>>), do: {f, rest}
  defp term(<<0xCB, f::float-64, rest::binary>>), do: {f, rest}
  defp term(<<0xD9, n, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xDA, n::16, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xDB, n::32, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xC4, n, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xC5, n::16, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xC6, n::32, rest::binary>>), do: bytes(rest, n)
  defp term(<<0xDC, n::16, rest::binary>>), do: array(rest, n, [])
  defp term(<<0xDD, n::32, rest::binary>>), do: array(rest, n, [])
  defp term(<<0xDE, n::16, rest::binary>>), do: map(rest, n, [])
  defp term(<<0xDF, n::32, rest::binary>>), do: map(rest, n, [])
  defp term(<<0xD4, type, rest::binary>>), do: ext(rest, 1, type)
  defp term(<<0xD5, type, rest::binary>>), do: ext(rest, 2, type)
  defp term(<<0xD6, type, rest::binary>>), do: ext(rest, 4, type)
  defp term(<<0xD7, type, rest::binary>>), do: ext(rest, 8, type)
  defp term(<<0xD8, type, rest::binary>>), do: ext(rest, 16, type)
  defp term(<<0xC7, n, type, rest::binary>>), do: ext(rest, n, type)
  defp term(<<0xC8, n::16, type, rest::binary>>), do: ext(rest, n, type)
  defp term(<<0xC9, n::32, type, rest::binary>>), do: ext(rest, n, type)
  defp term(_), do: throw(:invalid)

  defp bytes(bin, n) do
    case bin do
      <<b::binary-size(n), rest::binary>> -> {b, rest}
      _ -> throw(:invalid)
    end
  end

  defp array(rest, 0, acc), do: {:lists.reverse(acc), rest}

  defp array(bin, n, acc) do
    {x, rest} = term(bin)
    array(rest, n - 1, [x | acc])
  end

  defp map(rest, 0, acc), do: {:maps.from_list(acc), rest}

  defp map(bin, n, acc) do
    {k, rest} = term(bin)
    {v, rest} = term(rest)
    map(rest, n - 1, [{k, v} | acc])
  end

  defp ext(bin, n, type) do
    {data, rest} = bytes(bin, n)

    case type do
      @ext_atom ->
        {existing_atom(data), rest}

      @ext_tuple ->
        case term(data) do
          {items, ""} when is_list(items) -> {List.to_tuple(items), rest}
          _ -> throw(:invalid)
        end

      _ ->
        throw(:invalid)
    end
  end

  # The atom named `name` if the VM has it, else the name itself: never a
  # new atom. (A name too long for an atom cannot exist and stays a binary.)
  defp existing_atom(name) do
    if String.valid?(name), do: lookup_atom(name), else: throw(:invalid)
  end

  defp lookup_atom(name) do
    :erlang.binary_to_existing_atom(name, :utf8)
  rescue
    ArgumentError -> name
  end
end
