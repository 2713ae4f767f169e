defmodule DSPex.Context.LocalTypes do
  @moduledoc false
  # Validation for a context's local (not yet bridged) state, in plain
  # Elixir: the engine's rules (native/dspex_core/src/types.rs and the NIF's
  # term decoding in native/dspex_nif/src/term.rs), with the same error
  # terms, so a program gets the same answers before and after
  # `DSPex.Context.ensure_bridged/1`.
  #
  # Every function here is total: any term gives `{:ok, _}`, `:ok` or
  # `{:error, reason}`, never an exception, because the context process
  # calls them on its callers' arguments.
  #
  # The `pattern` constraint is not here: its syntax is the engine's regex
  # dialect, which PCRE does not reproduce, so `DSPex.Variables` bridges a
  # context before defining a variable with one.

  import Bitwise

  @types [:float, :integer, :string, :boolean, :choice, :module, :embedding, :tensor]
  # The engine's `Value` is 24 bytes; containers are charged per slot.
  @slot 24
  @max_depth 64
  @i64_min -9_223_372_036_854_775_808
  @i64_max (1 <<< 63) - 1
  @u64_max (1 <<< 64) - 1

  @default_limits %{max_value_bytes: 1_048_576, max_name_bytes: 255, max_variables: 100_000}

  def types, do: @types

  @doc "The engine's limits (the NIF store's), else its defaults."
  def limits do
    case DSPex.Bridge.Backend.Native.limits() do
      %{} = limits -> Map.merge(@default_limits, Map.take(limits, Map.keys(@default_limits)))
      _ -> @default_limits
    end
  rescue
    _ -> @default_limits
  end

  ## Terms the engine can store (the NIF's decode_value)

  @doc """
  `:ok` when the engine can store `term` within `budget` bytes, else the
  engine's error: `{:invalid_value, :unsupported_term | :improper_list |
  :integer_out_of_range | :bitstring | :nested_too_deeply}` or
  `{:too_large, budget}`.
  """
  def decode(term, budget) do
    case decode(term, 0, budget) do
      {:ok, _left} -> :ok
      {:error, {:too_large, _}} -> {:error, {:too_large, budget}}
      error -> error
    end
  end

  defp decode(_term, depth, _left) when depth > @max_depth,
    do: {:error, {:invalid_value, :nested_too_deeply}}

  defp decode(term, _depth, left) when term in [nil, true, false], do: {:ok, left}
  defp decode(term, _depth, left) when is_atom(term), do: charge(left, byte_size(to_string(term)))

  defp decode(term, _depth, left) when is_integer(term) do
    if term >= @i64_min and term <= @i64_max,
      do: {:ok, left},
      else: {:error, {:invalid_value, :integer_out_of_range}}
  end

  defp decode(term, _depth, left) when is_float(term), do: {:ok, left}
  defp decode(term, _depth, left) when is_binary(term), do: charge(left, byte_size(term))

  defp decode(term, _depth, _left) when is_bitstring(term),
    do: {:error, {:invalid_value, :bitstring}}

  defp decode(term, depth, left) when is_list(term) do
    case proper_length(term, 0) do
      nil ->
        {:error, {:invalid_value, :improper_list}}

      len ->
        with {:ok, left} <- charge(left, len * @slot), do: decode_all(term, depth + 1, left)
    end
  end

  defp decode(term, depth, left) when is_tuple(term) do
    with {:ok, left} <- charge(left, tuple_size(term) * @slot),
         do: decode_all(Tuple.to_list(term), depth + 1, left)
  end

  defp decode(term, _depth, left) when is_map(term) and map_size(term) == 0, do: {:ok, left}

  defp decode(term, depth, left) when is_map(term) do
    with {:ok, left} <- charge(left, map_size(term) * 2 * @slot) do
      Enum.reduce_while(term, {:ok, left}, fn {k, v}, {:ok, left} ->
        with {:ok, left} <- decode(k, depth + 1, left),
             {:ok, left} <- decode(v, depth + 1, left) do
          {:cont, {:ok, left}}
        else
          error -> {:halt, error}
        end
      end)
    end
  end

  defp decode(_term, _depth, _left), do: {:error, {:invalid_value, :unsupported_term}}

  defp decode_all([], _depth, left), do: {:ok, left}

  defp decode_all([x | rest], depth, left) do
    with {:ok, left} <- decode(x, depth, left), do: decode_all(rest, depth, left)
  end

  defp charge(left, n) when n <= left, do: {:ok, left - n}
  defp charge(_left, _n), do: {:error, {:too_large, 0}}

  defp proper_length([], n), do: n
  defp proper_length([_ | rest], n), do: proper_length(rest, n + 1)
  defp proper_length(_improper, _n), do: nil

  @doc "Whether `term` is a proper list."
  def proper_list?(term), do: is_list(term) and proper_length(term, 0) != nil

  @doc """
  The engine's check on a decoded value before it is stored (depth counted
  from 1): `:ok` or `{:invalid_argument, :nested_too_deeply}`.
  """
  def check_depth(term) do
    if deeper_than?(term, 1, @max_depth),
      do: {:error, {:invalid_argument, :nested_too_deeply}},
      else: :ok
  end

  defp deeper_than?(_term, depth, max) when depth > max, do: true

  defp deeper_than?(term, depth, max) when is_list(term),
    do: Enum.any?(term, &deeper_than?(&1, depth + 1, max))

  defp deeper_than?(term, depth, max) when is_tuple(term),
    do: deeper_than?(Tuple.to_list(term), depth, max)

  defp deeper_than?(term, depth, max) when is_map(term),
    do:
      Enum.any?(term, fn {k, v} ->
        deeper_than?(k, depth + 1, max) or deeper_than?(v, depth + 1, max)
      end)

  defp deeper_than?(_term, _depth, _max), do: false

  ## Names and identifiers

  @doc """
  A name to register, as the NIF decodes it: `{:ok, key}` (its text) or the
  engine's error. The store refuses an empty key later (see
  `check_name_length/1`).
  """
  def name_key(name, max_bytes) do
    case decode(name, max_bytes) do
      :ok -> registrable_name(name, max_bytes)
      {:error, {:too_large, _}} -> {:error, {:invalid_argument, :bad_name_length}}
      error -> error
    end
  end

  defp registrable_name(name, max_bytes) do
    case text(name) do
      nil -> {:error, {:invalid_argument, :name_must_be_atom_or_string}}
      key when byte_size(key) > max_bytes -> {:error, {:invalid_argument, :bad_name_length}}
      key -> {:ok, key}
    end
  end

  @doc "The store's check_name: a key is not empty."
  def check_name_length(""), do: {:error, {:invalid_argument, :bad_name_length}}
  def check_name_length(_key), do: :ok

  @doc """
  The lookup text of an identifier (the NIF's ident_text): `{:ok, text}`;
  a binary that is not UTF-8 names nothing (`{:error, :not_found}`).
  """
  def ident(ident) when is_binary(ident) do
    if String.valid?(ident), do: {:ok, ident}, else: {:error, :not_found}
  end

  def ident(ident) when is_atom(ident), do: {:ok, Atom.to_string(ident)}
  def ident(_ident), do: {:error, {:invalid_argument, :name_must_be_atom_or_string}}

  @doc "`nil` or a non-negative integer that fits 64 bits (decode_opt_u64)."
  def expected_version(nil), do: {:ok, nil}

  def expected_version(v) when is_integer(v) and v >= 0 and v <= @u64_max, do: {:ok, v}
  def expected_version(_v), do: {:error, {:invalid_argument, :expected_non_negative_integer}}

  @doc "Write metadata: `nil` (none) or a map (the NIF's metadata_of)."
  def metadata(nil, _budget), do: {:ok, %{}}

  def metadata(meta, budget) do
    with :ok <- decode(meta, budget) do
      if is_map(meta),
        do: {:ok, meta},
        else: {:error, {:invalid_argument, :metadata_must_be_a_map}}
    end
  end

  # The text of an engine string or atom (Value::as_text); nil, true and
  # false are not atoms to the engine, a non-UTF-8 binary is not a string.
  defp text(v) when v in [nil, true, false], do: nil
  defp text(v) when is_atom(v), do: Atom.to_string(v)
  defp text(v) when is_binary(v), do: if(String.valid?(v), do: v)
  defp text(_v), do: nil

  ## Constraints (Constraints::compile)

  @doc """
  Compiles a constraint map (`nil` or `%{}` for none) for `type`:
  `{:ok, compiled}` or `{:error, {:invalid_argument, detail}}`. Unknown keys
  are kept and not enforced. `pattern` is refused here (see the moduledoc).
  """
  def compile(type, nil), do: compile(type, %{})

  def compile(type, source) when is_map(source) do
    source
    |> Enum.reduce_while({:ok, %{}}, fn {key, value}, {:ok, c} ->
      case text(key) do
        nil ->
          {:halt, {:error, {:invalid_argument, :constraint_keys_must_be_atoms}}}

        key ->
          case constraint(c, key, value) do
            {:ok, c} -> {:cont, {:ok, c}}
            error -> {:halt, error}
          end
      end
    end)
    |> case do
      {:ok, c} -> finish(type, c)
      {:error, _} = error -> error
    end
  end

  def compile(_type, _source), do: {:error, {:invalid_argument, :constraints_must_be_a_map}}

  defp constraint(c, key, v) when key in ["min", "max"] do
    if is_number(v), do: {:ok, Map.put(c, String.to_atom(key), :erlang.float(v))}, else: bad(key)
  end

  defp constraint(c, key, v) when key in ["min_length", "max_length", "dimensions"] do
    if non_negative?(v), do: {:ok, Map.put(c, String.to_atom(key), v)}, else: bad(key)
  end

  defp constraint(_c, "pattern", _v),
    do: {:error, {:invalid_argument, :pattern_needs_the_session}}

  defp constraint(c, key, v) when key in ["enum", "choices"] do
    if is_list(v) and v != [], do: {:ok, Map.put(c, :one_of, v)}, else: bad(key)
  end

  defp constraint(c, "allowed_modules", v) when is_list(v) do
    names = Enum.map(v, &text/1)

    if Enum.any?(names, &is_nil/1),
      do: bad("allowed_modules"),
      else: {:ok, Map.put(c, :allowed_modules, Enum.map(names, &module_name/1))}
  end

  defp constraint(c, "shape", v) when is_list(v) do
    if Enum.all?(v, &non_negative?/1), do: {:ok, Map.put(c, :shape, v)}, else: bad("shape")
  end

  defp constraint(_c, key, _v) when key in ["allowed_modules", "shape"], do: bad(key)
  defp constraint(c, _unknown, _v), do: {:ok, c}

  defp bad(key), do: {:error, {:invalid_argument, {:bad_constraint, String.to_atom(key)}}}

  defp finish(type, c) do
    cond do
      is_float(c[:min]) and is_float(c[:max]) and c.min > c.max ->
        {:error, {:invalid_argument, :min_greater_than_max}}

      type == :choice and not Map.has_key?(c, :one_of) ->
        {:error, {:invalid_argument, :choice_needs_choices}}

      true ->
        {:ok, c}
    end
  end

  defp non_negative?(v), do: is_integer(v) and v >= 0

  defp module_name("Elixir." <> name), do: name
  defp module_name(name), do: name

  ## Values (types::validate)

  @doc "Validates `value` as `type` under compiled constraints: the coerced value or the engine's error."
  def validate(:float, c, v) when is_number(v), do: range(c, :erlang.float(v))
  def validate(:float, _c, _v), do: invalid(:float)

  def validate(:integer, c, v) when is_integer(v), do: range(c, v)

  def validate(:integer, c, v) when is_float(v) and abs(v) < 9.0e15 do
    if Float.floor(v) == v, do: range(c, trunc(v)), else: invalid(:integer)
  end

  def validate(:integer, _c, _v), do: invalid(:integer)

  def validate(:string, c, v) when is_binary(v) do
    if String.valid?(v) do
      len = length(String.codepoints(v))

      cond do
        c[:min_length] && len < c.min_length -> violation(:min_length, c.min_length)
        c[:max_length] && len > c.max_length -> violation(:max_length, c.max_length)
        true -> one_of(c, v)
      end
    else
      {:error, {:invalid_value, :invalid_utf8}}
    end
  end

  def validate(:string, _c, _v), do: invalid(:string)

  def validate(:boolean, _c, v) when is_boolean(v), do: {:ok, v}
  def validate(:boolean, _c, "true"), do: {:ok, true}
  def validate(:boolean, _c, "false"), do: {:ok, false}
  def validate(:boolean, _c, _v), do: invalid(:boolean)

  def validate(:choice, c, v) when is_number(v) or is_boolean(v), do: one_of(c, v)

  def validate(:choice, c, v) do
    if text(v), do: one_of(c, v), else: invalid(:choice)
  end

  def validate(:module, c, v) do
    case text(v) do
      name when name not in [nil, ""] ->
        name = module_name(name)

        case c[:allowed_modules] do
          nil -> {:ok, v}
          allowed -> if name in allowed, do: {:ok, v}, else: violation(:allowed_modules, name)
        end

      _ ->
        invalid(:module)
    end
  end

  def validate(:embedding, c, v) when is_list(v) do
    if Enum.all?(v, &is_number/1) do
      if c[:dimensions] && length(v) != c.dimensions,
        do: violation(:dimensions, c.dimensions),
        else: {:ok, Enum.map(v, &:erlang.float/1)}
    else
      invalid(:embedding)
    end
  end

  def validate(:embedding, _c, _v), do: invalid(:embedding)

  def validate(:tensor, c, v) when is_map(v) do
    with {:ok, shape} when is_list(shape) <- field(v, "shape"),
         {:ok, data} when is_list(data) <- field(v, "data"),
         true <- Enum.all?(shape, &non_negative?/1),
         {:ok, size} <- elements(shape) do
      cond do
        size != length(data) -> {:error, {:invalid_value, :shape_data_mismatch}}
        c[:shape] && c.shape != shape -> violation(:shape, c.shape)
        not Enum.all?(data, &is_number/1) -> invalid(:tensor)
        true -> {:ok, %{"shape" => shape, "data" => Enum.map(data, &:erlang.float/1)}}
      end
    else
      _ -> invalid(:tensor)
    end
  end

  def validate(:tensor, _c, _v), do: invalid(:tensor)

  # The product of the dimensions, refused once it passes 64 bits (as the
  # engine's checked_mul, which fails even when a later dimension is 0).
  defp elements(shape) do
    Enum.reduce_while(shape, {:ok, 1}, fn d, {:ok, acc} ->
      if acc * d <= @u64_max, do: {:cont, {:ok, acc * d}}, else: {:halt, :overflow}
    end)
  end

  # Value::get: the first key (in map order) whose text is `key`.
  defp field(map, key) do
    Enum.find_value(map, :error, fn {k, v} -> if text(k) == key, do: {:ok, v} end)
  end

  # The engine compares as floats, integers rounded as `as f64` rounds them.
  defp range(c, x) do
    f = :erlang.float(x)

    cond do
      c[:min] && f < c.min -> violation(:below_min, c.min)
      c[:max] && f > c.max -> violation(:above_max, c.max)
      true -> {:ok, x}
    end
  end

  defp one_of(c, v) do
    case c[:one_of] do
      nil ->
        {:ok, v}

      options ->
        t = text(v)

        if Enum.any?(options, &(&1 === v or (t != nil and text(&1) == t))),
          do: {:ok, v},
          else: violation(:not_in_choices, options)
    end
  end

  defp invalid(type), do: {:error, {:invalid_value, {:expected, type}}}
  defp violation(tag, detail), do: {:error, {:constraint_violation, {tag, detail}}}
end
