defmodule DSPex.Bridge.Gateway.Wire do
  @moduledoc false
  # The wire forms of values, variables, timestamps and errors
  # (shared/wire/bridge_service.md). Everything built here has string keys and
  # no atoms but nil/true/false: it is encoded to MessagePack for the gateway.

  @types %{
    "float" => :float,
    "integer" => :integer,
    "string" => :string,
    "boolean" => :boolean,
    "choice" => :choice,
    "module" => :module,
    "embedding" => :embedding,
    "tensor" => :tensor
  }
  @prefix "type.googleapis.com/snakepit."
  @dtypes %{
    "float64" => {:float, 64},
    "float32" => {:float, 32},
    "int64" => {:int, 64},
    "int32" => {:int, 32},
    "int16" => {:int, 16},
    "int8" => {:int, 8},
    "uint8" => {:uint, 8}
  }
  # Embeddings and tensors with at least this many numbers go to clients that
  # asked for binary values (`x-dspex-binary: raw-le`) as raw little-endian.
  @binary_min 16

  def type(name) when is_binary(name), do: Map.fetch(@types, name)
  def type(_), do: :error

  ## Values in

  @doc false
  # An Any (as the gateway decodes it) and the call's binary bytes -> a term.
  def decode_value(any, binary \\ "")

  def decode_value(nil, _binary), do: {:error, {:invalid_value, "no value"}}

  def decode_value(%{"type_url" => url} = any, binary) do
    case String.split(url, "/") |> List.last() |> String.split(".") do
      ["snakepit", type, "binary"] -> decode_binary(type, any["json"], binary)
      ["snakepit", type] -> decode_json(type, any)
      _ -> {:error, {:invalid_value, "unknown type_url #{inspect(url)}"}}
    end
  end

  def decode_value(_any, _binary), do: {:error, {:invalid_value, "malformed Any"}}

  defp decode_json(type, %{"json" => json}), do: finite(type, json)
  defp decode_json(_type, _any), do: {:error, {:invalid_value, "the value is not JSON"}}

  # Non-finite floats travel as strings; the store holds no NaN or infinity.
  defp finite(type, v) when type in ["float", "embedding", "tensor"] do
    if non_finite?(v),
      do: {:error, {:invalid_value, "non-finite numbers (NaN, Infinity) cannot be stored"}},
      else: {:ok, v}
  end

  defp finite(_type, v), do: {:ok, v}

  defp non_finite?(s) when s in ["NaN", "Infinity", "-Infinity"], do: true
  defp non_finite?(l) when is_list(l), do: Enum.any?(l, &non_finite?/1)
  defp non_finite?(%{"data" => d}), do: non_finite?(d)
  defp non_finite?(_), do: false

  defp decode_binary(type, %{"encoding" => "raw-le", "dtype" => dtype, "shape" => shape}, bin)
       when type in ["embedding", "tensor"] and is_list(shape) and is_binary(bin) do
    with {:ok, {kind, bits}} <- Map.fetch(@dtypes, dtype),
         true <- Enum.all?(shape, &(is_integer(&1) and &1 >= 0)),
         count = Enum.reduce(shape, 1, &(&1 * &2)),
         true <- byte_size(bin) == div(count * bits, 8) do
      data = numbers(kind, bits, bin)

      if type == "embedding",
        do: {:ok, data},
        else: {:ok, %{"shape" => shape, "data" => data}}
    else
      _ -> {:error, {:invalid_value, "binary value: bad dtype, shape or length"}}
    end
  end

  defp decode_binary(_type, _header, _bin) do
    {:error,
     {:invalid_value,
      "binary values must be raw little-endian numbers (header encoding \"raw-le\", " <>
        "dtype, shape); pickled values are refused"}}
  end

  defp numbers(:float, 64, bin), do: for(<<x::little-float-64 <- bin>>, do: x)
  defp numbers(:float, 32, bin), do: for(<<x::little-float-32 <- bin>>, do: x)
  defp numbers(:int, bits, bin), do: for(<<x::little-signed-size(bits) <- bin>>, do: x)
  defp numbers(:uint, bits, bin), do: for(<<x::little-unsigned-size(bits) <- bin>>, do: x)

  ## Values out

  @doc false
  # {any, binary_value} for a variable's value.
  def encode_value(type, value, binary? \\ false)

  def encode_value(type, value, true) when type in [:embedding, :tensor] do
    {shape, data} =
      case value do
        %{"shape" => s, "data" => d} -> {s, d}
        list when is_list(list) -> {[length(list)], list}
        _ -> {nil, nil}
      end

    if is_list(data) and length(data) >= @binary_min and Enum.all?(data, &is_number/1) do
      header = %{"encoding" => "raw-le", "dtype" => "float64", "shape" => shape}
      bytes = for x <- data, into: <<>>, do: <<x * 1.0::little-float-64>>
      {%{"type_url" => @prefix <> "#{type}.binary", "json" => header}, bytes}
    else
      encode_value(type, value, false)
    end
  end

  def encode_value(type, value, _binary?),
    do: {%{"type_url" => @prefix <> to_string(type), "json" => json(value)}, ""}

  @doc false
  # A term as JSON-able data: atoms (but nil/true/false) to strings, keys to
  # strings, tuples to lists.
  def json(v) when v in [nil, true, false], do: v
  def json(v) when is_atom(v), do: Atom.to_string(v)
  def json(v) when is_list(v), do: Enum.map(v, &json/1)
  def json(v) when is_tuple(v), do: v |> Tuple.to_list() |> json()
  def json(%DateTime{} = d), do: DateTime.to_iso8601(d)
  def json(%_{} = s), do: inspect(s)
  def json(v) when is_map(v), do: Map.new(v, fn {k, x} -> {key(k), json(x)} end)
  def json(v) when is_pid(v) or is_reference(v) or is_function(v) or is_port(v), do: inspect(v)
  def json(v), do: v

  defp key(k) when is_binary(k), do: k
  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k), do: inspect(k)

  @doc false
  # map<string, string>
  def strings(nil), do: %{}
  def strings(map) when is_map(map), do: Map.new(map, fn {k, v} -> {key(k), text(v)} end)
  def strings(_), do: %{}

  defp text(v) when is_binary(v), do: v
  defp text(v) when is_atom(v) or is_number(v), do: to_string(v)
  defp text(v), do: inspect(v)

  def timestamp(%DateTime{} = d) do
    us = DateTime.to_unix(d, :microsecond)
    %{"seconds" => div(us, 1_000_000), "nanos" => rem(us, 1_000_000) * 1000}
  end

  def timestamp(us) when is_integer(us),
    do: %{"seconds" => div(us, 1_000_000), "nanos" => rem(us, 1_000_000) * 1000}

  def timestamp(_), do: nil

  def now, do: timestamp(System.system_time(:microsecond))

  @doc false
  def variable(var, binary? \\ false) do
    {any, bin} = encode_value(var.type, var.value, binary?)
    meta = Map.get(var, :metadata) || %{}

    %{
      "id" => var.id,
      "name" => to_string(var.name),
      "type" => to_string(var.type),
      "value" => any,
      "binary_value" => bin,
      "constraints_json" => json(Map.get(var, :constraints) || %{}),
      "metadata" => strings(meta),
      "source" => if(source(var) == "python", do: 1, else: 0),
      "last_updated_at" => timestamp(Map.get(var, :updated_at)),
      "version" => var.version,
      "access_control_json" => json(Map.get(var, :access_rules) || [])
    }
  end

  defp source(var) do
    last = Map.get(var, :last_write) || %{}
    to_string(last["source"] || Map.get(var.metadata || %{}, "source") || "")
  end

  ## Errors

  @doc false
  # The reason's name: what clients match on (the start of error_message,
  # and the x-dspex-error trailer).
  def reason_name(r) when is_atom(r), do: Atom.to_string(r)
  def reason_name({r, _}) when is_atom(r), do: Atom.to_string(r)
  def reason_name(_), do: "error"

  def reason_text({:version_mismatch, n}), do: "version_mismatch: current_version=#{n}"
  def reason_text({:locked_by, id}), do: "locked_by: #{id}"

  def reason_text({:already_optimizing, %{optimizer_id: id}}),
    do: "already_optimizing: held by #{id}"

  def reason_text(:not_found), do: "not_found: variable not found"
  def reason_text(:session_not_found), do: "session_not_found: session not found"
  def reason_text(r) when is_atom(r), do: Atom.to_string(r)
  def reason_text({r, detail}) when is_atom(r), do: "#{r}: #{detail_text(detail)}"
  def reason_text(other), do: "error: #{inspect(other)}"

  defp detail_text(d) when is_binary(d), do: d
  defp detail_text(d), do: inspect(d)

  # gRPC status codes.
  @codes %{
    ok: 0,
    cancelled: 1,
    unknown: 2,
    invalid_argument: 3,
    deadline_exceeded: 4,
    not_found: 5,
    already_exists: 6,
    permission_denied: 7,
    resource_exhausted: 8,
    failed_precondition: 9,
    aborted: 10,
    unimplemented: 12,
    internal: 13,
    unavailable: 14,
    unauthenticated: 16
  }

  def code(name), do: Map.fetch!(@codes, name)

  @doc false
  # The status for a reason, where the response has no success field.
  def status_of(reason) do
    case reason_name(reason) do
      n when n in ["not_found", "session_not_found", "version_not_found"] ->
        :not_found

      "access_denied" ->
        :permission_denied

      "rate_limited" ->
        :resource_exhausted

      "busy" ->
        :resource_exhausted

      "overloaded" ->
        :resource_exhausted

      "already_exists" ->
        :already_exists

      n when n in ["backend_unavailable", "timeout", "timeout_unknown_outcome"] ->
        :unavailable

      n when n in ["invalid_value", "constraint_violation", "invalid_argument", "too_large"] ->
        :invalid_argument

      n when n in ["version_mismatch", "locked_by", "stale_lock_token", "already_optimizing"] ->
        :failed_precondition

      n when n in ["would_create_cycle", "self_dependency", "not_optimizing", "not_lock_owner"] ->
        :failed_precondition

      _ ->
        :unknown
    end
  end
end
