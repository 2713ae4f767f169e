defmodule DSPex.Bridge.MsgPackTest do
  use ExUnit.Case, async: true

  alias DSPex.Bridge.MsgPack

  doctest MsgPack

  defp round_trip(term) do
    {:ok, iodata} = MsgPack.encode(term)
    MsgPack.decode(IO.iodata_to_binary(iodata))
  end

  describe "encode/1 and decode/1" do
    test "every boundary of every size class round-trips" do
      ints =
        for n <- [0, 127, 128, 255, 256, 65_535, 65_536, 4_294_967_295, 4_294_967_296],
            sign <- [1, -1],
            do: sign * n

      ints = ints ++ [-32, -33, -128, -129, -32_768, -32_769, 2 ** 63 - 1, -(2 ** 63)]
      sizes = [0, 1, 2, 4, 8, 15, 16, 31, 32, 255, 256, 65_535, 65_536]

      terms =
        ints ++
          [nil, true, false, 0.5, -1.0e300, :a, :"with space", :nil_not, {}, {1}, %{}, []] ++
          Enum.map(sizes, &String.duplicate("é", &1)) ++
          Enum.map(sizes, &:binary.copy(<<0xFF>>, &1)) ++
          Enum.map(sizes, &List.duplicate(1, &1)) ++
          Enum.map(sizes, &Map.new(1..&1//1, fn i -> {i, i} end)) ++
          Enum.map([1, 2, 4, 8, 16, 17, 255], &String.to_atom(String.duplicate("a", &1))) ++
          Enum.map(sizes, &List.to_tuple(List.duplicate(:x, &1)))

      for term <- terms do
        assert round_trip(term) == {:ok, term}, inspect(term, limit: 5)
      end
    end

    test "nested atoms, tuples and maps keep their shape" do
      term = %{{:a, "b"} => [%{c: {1, {2, [3.0, nil]}}}], "k" => {:ok, <<1, 2, 255>>}}
      assert round_trip(term) == {:ok, term}
    end

    test "terms the engine cannot store are refused with the NIF's reasons" do
      assert MsgPack.encode(self()) == {:error, {:invalid_value, :unsupported_term}}
      assert MsgPack.encode(%{f: fn -> 1 end}) == {:error, {:invalid_value, :unsupported_term}}
      assert MsgPack.encode(2 ** 64) == {:error, {:invalid_value, :integer_out_of_range}}
      assert MsgPack.encode(2 ** 63) == {:error, {:invalid_value, :integer_out_of_range}}
      assert MsgPack.encode(-(2 ** 63) - 1) == {:error, {:invalid_value, :integer_out_of_range}}
      assert MsgPack.encode([1 | 2]) == {:error, {:invalid_value, :improper_list}}
      assert MsgPack.encode(<<1::3>>) == {:error, {:invalid_value, :bitstring}}
      deep = Enum.reduce(1..65, :leaf, fn _, acc -> [acc] end)
      assert {:ok, _} = MsgPack.encode(Enum.reduce(1..64, :leaf, fn _, acc -> [acc] end))
      assert MsgPack.encode(deep) == {:error, {:invalid_value, :nested_too_deeply}}
    end

    test "identifiers encode every atom as an atom" do
      for a <- [nil, true, false, :x] do
        assert MsgPack.decode(IO.iodata_to_binary(MsgPack.encode_ident!(a))) == {:ok, a}
      end
    end

    test "garbage, truncation and trailing bytes are errors, not crashes" do
      {:ok, good} = MsgPack.encode(%{a: [1, 2, {:x, "y"}]})
      good = IO.iodata_to_binary(good)

      for cut <- 0..(byte_size(good) - 1) do
        assert {:error, :invalid_msgpack} = MsgPack.decode(binary_part(good, 0, cut))
      end

      assert {:error, :invalid_msgpack} = MsgPack.decode(good <> <<0>>)
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xC1>>)
      # unknown ext type, an atom that is not UTF-8, a tuple that is not an array
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xD4, 9, 0>>)
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xD4, 1, 0xFF>>)
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xD4, 2, 0x01>>)
      # NaN and infinity have no Elixir float
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xCB, 0x7FF8::16, 0::48>>)
      assert {:error, :invalid_msgpack} = MsgPack.decode(<<0xCB, 0x7FF0::16, 0::48>>)
    end

    test "an atom the VM does not have decodes to its name, and no atom is created" do
      names =
        for len <- [16, 31, 200, 255, 256, 1000] do
          fresh = "fresh " <> Base.encode16(:crypto.strong_rand_bytes(8))
          binary_part(String.duplicate(fresh, div(len, byte_size(fresh)) + 1), 0, len)
        end

      names = ["é" <> Base.encode16(:crypto.strong_rand_bytes(8)) | names]

      for name <- names do
        ext = IO.iodata_to_binary([<<0xC9, byte_size(name)::32, 1>>, name])
        assert MsgPack.decode(ext) == {:ok, name}
        assert MsgPack.decode(<<0x81, ext::binary, ext::binary>>) == {:ok, %{name => name}}
        assert_raise ArgumentError, fn -> :erlang.binary_to_existing_atom(name, :utf8) end
      end
    end

    test "an atom the VM has decodes to the atom, whatever its byte length" do
      # Characters, not bytes, bound an atom's name: 200 "é" are 400 bytes.
      long = String.to_atom(String.duplicate("é", 200))
      assert round_trip(long) == {:ok, long}
      assert round_trip(%{long => [long]}) == {:ok, %{long => [long]}}
    end

    test "uint/1 refuses what does not fit in 64 unsigned bits instead of truncating" do
      assert MsgPack.uint(2 ** 64 - 1) == <<0xCF, 2 ** 64 - 1::64>>

      for n <- [2 ** 64, 2 ** 64 + 1, 2 ** 200, -1, 1.0] do
        assert catch_throw(MsgPack.uint(n)) == {:invalid_value, :integer_out_of_range}
      end
    end

    test "random bytes never raise" do
      for _ <- 1..2_000 do
        bin = :crypto.strong_rand_bytes(:rand.uniform(64))

        assert match?({:ok, _}, MsgPack.decode(bin)) or
                 MsgPack.decode(bin) == {:error, :invalid_msgpack}
      end
    end
  end

  describe "property: encode then decode is the identity" do
    test "over generated terms" do
      assert :proper.quickcheck(prop_round_trip(), [:quiet, numtests: 200, max_size: 12]) == true
    end
  end

  defp prop_round_trip do
    :proper.forall(term_gen(), fn term -> round_trip(term) == {:ok, term} end)
  end

  defp term_gen do
    leaf =
      :proper_types.union([
        :proper_types.integer(-(2 ** 63), 2 ** 63 - 1),
        :proper_types.float(),
        :proper_types.boolean(),
        :proper_types.exactly(nil),
        :proper_types.elements([:a, :b, :ok, :error, :é]),
        :proper_types.binary(),
        :proper_unicode.utf8()
      ])

    :proper_types.sized(fn size -> tree(leaf, size) end)
  end

  defp tree(leaf, 0), do: leaf

  defp tree(leaf, size) do
    sub = :proper_types.lazy(fn -> tree(leaf, div(size, 3)) end)

    :proper_types.frequency([
      {4, leaf},
      {1, :proper_types.list(sub)},
      {1, :proper_types.bind(:proper_types.list(sub), &List.to_tuple/1, false)},
      {1, :proper_types.bind(:proper_types.list({leaf, sub}), &Map.new/1, false)}
    ])
  end
end
