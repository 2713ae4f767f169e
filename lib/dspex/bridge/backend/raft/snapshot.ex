defmodule DSPex.Bridge.Backend.Raft.Snapshot do
  @moduledoc false
  # An `export_session/1` snapshot made ready for a replicated session's
  # log: its ttl and rate limit are taken out (the state machine enforces
  # them over the log's stamped times; an engine copy enforcing them by
  # each member's clock would diverge) and the session id is read. The
  # other fields are passed on byte for byte; the engine validates the
  # result as every import.

  alias DSPex.Bridge.MsgPack

  @taken ["ttl_ms", "rate_limit"]

  @doc """
  `{:ok, %{sid: id, ttl_ms: ttl | nil, rate_limit: rate | nil}, snapshot}`
  (`new_id`, when given, is the id), or `{:error, {:invalid_snapshot, reason}}`.
  """
  @spec strip(binary, String.t() | nil) :: {:ok, map, binary} | {:error, term}
  def strip(bin, new_id) when is_binary(bin) do
    with {:ok, n, rest} <- map_header(bin),
         {:ok, fields} <- fields(rest, n, []) do
      values = Map.new(fields, fn {k, v, _raw} -> {k, v} end)
      kept = for {k, _v, raw} <- fields, k not in @taken, do: raw
      sid = new_id || values["session_id"]

      if sid != nil do
        info = %{sid: sid, ttl_ms: values["ttl_ms"], rate_limit: rate(values["rate_limit"])}
        {:ok, info, IO.iodata_to_binary([map_prefix(length(kept)) | kept])}
      else
        {:error, {:invalid_snapshot, "no session_id"}}
      end
    end
  end

  def strip(_bin, _new_id), do: {:error, {:invalid_snapshot, "expected a binary"}}

  defp rate(%{"ops_per_sec" => ops, "burst" => burst}), do: {ops, burst}
  defp rate([ops, burst]), do: {ops, burst}
  defp rate(other), do: other

  defp map_header(<<n, rest::binary>>) when n in 0x80..0x8F, do: {:ok, n - 0x80, rest}
  defp map_header(<<0xDE, n::16, rest::binary>>), do: {:ok, n, rest}
  defp map_header(<<0xDF, n::32, rest::binary>>), do: {:ok, n, rest}
  defp map_header(_), do: {:error, {:invalid_snapshot, "not a MessagePack map"}}

  defp map_prefix(n) when n < 16, do: <<0x80 + n>>
  defp map_prefix(n), do: <<0xDE, n::16>>

  # Each field: its key, its decoded value, and its bytes (key and value).
  defp fields("", 0, acc), do: {:ok, Enum.reverse(acc)}
  defp fields(_trailing, 0, _acc), do: {:error, {:invalid_snapshot, "trailing bytes"}}

  defp fields(bin, n, acc) do
    with {:ok, key, after_key} when is_binary(key) <- MsgPack.decode_prefix(bin),
         {:ok, value, rest} <- MsgPack.decode_prefix(after_key) do
      raw = binary_part(bin, 0, byte_size(bin) - byte_size(rest))
      fields(rest, n - 1, [{key, value, raw} | acc])
    else
      _ -> {:error, {:invalid_snapshot, "undecodable field"}}
    end
  end
end
