defmodule DSPex.Bridge.Backend.Raft.Command do
  @moduledoc false
  # The core's `Command` (native/dspex_core/src/command/) as the MessagePack
  # frame the port program and `Native.replica_execute/2` accept, built from
  # a `DSPex.Bridge.Backend` callback's name and arguments by the port
  # backend's own encoding (`Backend.Port.encode_command/2`): one definition
  # of every operation's arguments for both transports.
  #
  # `encode/2` answers `{:ok, kind, frame}`: `kind` is `:write` (through
  # the Raft log) or `:read` (a query on one member's engine), `:heavy_*`
  # when the engine runs it on a dirty scheduler.

  alias DSPex.Bridge.Backend.Port
  alias DSPex.Bridge.MsgPack

  @heavy ~w(session_list session_sweep session_memory session_export session_import
            var_list var_names graph_add_edge graph_dependencies graph_dependents
            graph_update_order graph_render)

  @type kind :: :write | :read | :heavy_read | :heavy_write

  @spec encode(atom, list) :: {:ok, kind, binary} | {:error, term}
  def encode(:session_create, [sid, opts]) do
    # The engine's create: no ttl and no rate limit (a wall-clock sweep per
    # member would diverge; the machine enforces the rate deterministically).
    encode_raw("session_create",
      session: sid,
      max_history: opts[:max_history],
      metadata: opts[:metadata],
      audit_capacity: opts[:audit_capacity]
    )
  end

  def encode(fun, args) do
    case Port.encode_command(fun, args) do
      {:ok, name, frame, write?} -> {:ok, kind(name, write?), frame}
      {:error, _} = error -> error
    end
  end

  @doc false
  # A frame from plain values (commands the machine itself issues).
  def encode_raw(name, args) do
    n = length(args)
    header = if n < 16, do: <<0x80 + n>>, else: <<0xDE, n::16>>

    fields =
      Enum.map(args, fn {k, v} -> [MsgPack.encode!(Atom.to_string(k)), MsgPack.encode!(v)] end)

    {:ok, kind(name, true), IO.iodata_to_binary([0x81, MsgPack.encode!(name), header | fields])}
  catch
    {:invalid_value, _} = reason -> {:error, reason}
  end

  defp kind(name, true), do: if(name in @heavy, do: :heavy_write, else: :write)
  defp kind(name, false), do: if(name in @heavy, do: :heavy_read, else: :read)
end
