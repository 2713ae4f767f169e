defmodule DSPex.Bridge.Backend.Raft.Command do
  @moduledoc false
  # The core's `Command` (native/dspex_core/src/command.rs) as the
  # MessagePack frame the port program and `Native.replica_execute/1` accept,
  # built from a `DSPex.Bridge.Backend` callback's name and arguments.
  # Arguments are positional, in the order the command declares them; a
  # refused argument is the error the NIF gives for it.
  #
  # `encode/2` answers `{:ok, kind, frame}`: `kind` is `:write` (goes through
  # the Raft log) or `:read` (a query on one member's engine), and `:heavy`
  # when the engine runs it on a dirty scheduler.

  alias DSPex.Bridge.MsgPack

  @max_u64 0xFFFF_FFFF_FFFF_FFFF
  @max_i64 0x7FFF_FFFF_FFFF_FFFF

  @type kind :: :write | :read | :heavy_read | :heavy_write

  @spec encode(atom, list) :: {:ok, kind, binary} | {:error, term}
  def encode(fun, args) do
    {name, kind, fields} = fields(fun, args)
    frame = [0x81, MsgPack.encode!(name), MsgPack.array_header(length(fields)) | fields]
    {:ok, kind, IO.iodata_to_binary(frame)}
  catch
    {:invalid_value, _} = reason -> {:error, reason}
    {:invalid_argument, _} = reason -> {:error, reason}
    :version_not_found -> {:error, :version_not_found}
  end

  @doc false
  # The engine's create: no ttl and no rate limit (the machine enforces
  # those deterministically, see Raft.Machine).
  def fields(:create_session, [sid, opts]) do
    {"session_create", :write,
     [
       sid!(sid),
       nil_(),
       opt_int(opts[:max_history], :bad_max_history),
       MsgPack.encode!(opts[:metadata]),
       nil_(),
       opt_int(opts[:audit_capacity], {:audit_capacity, opts[:audit_capacity]})
     ]}
  end

  def fields(:session_info, [sid]), do: {"session_info", :read, [sid!(sid)]}
  def fields(:session_memory, [sid]), do: {"session_memory", :heavy_read, [sid!(sid)]}
  def fields(:delete_session, [sid]), do: {"session_delete", :write, [sid!(sid)]}
  def fields(:export_session, [sid]), do: {"session_export", :heavy_read, [sid!(sid)]}

  def fields(:import_session, [snapshot, sid]) when is_binary(snapshot),
    do: {"session_import", :heavy_write, [MsgPack.encode!(snapshot), sid!(sid)]}

  def fields(:register_variable, [sid, name, type, initial, opts, principal]) do
    {"var_register", :write,
     [
       sid!(sid),
       MsgPack.encode!(name),
       atom!(type, :type_must_be_an_atom),
       MsgPack.encode!(initial),
       MsgPack.encode!(opts[:constraints]),
       MsgPack.encode!(opts[:metadata]),
       description!(opts[:description]),
       principal!(principal),
       MsgPack.encode!(opts[:access_rules])
     ]}
  end

  def fields(:get_variable, [sid, ident, principal]),
    do: {"var_get", :read, [sid!(sid), MsgPack.encode_ident!(ident) | caller!(principal)]}

  def fields(:get_value, [sid, ident, principal]),
    do: {"var_get_value", :read, [sid!(sid), MsgPack.encode_ident!(ident) | caller!(principal)]}

  def fields(:set_value, [sid, ident, value, metadata, expected, principal]) do
    {"var_set", :write,
     [
       sid!(sid),
       MsgPack.encode_ident!(ident),
       MsgPack.encode!(value),
       MsgPack.encode!(metadata),
       expected!(expected) | caller!(principal)
     ]}
  end

  def fields(:set_values, [sid, updates, atomic, principal]) do
    unless is_list(updates), do: throw({:invalid_argument, :updates_must_be_a_list})
    kind = if length(updates) > 64, do: :heavy_write, else: :write

    {"var_set_many", kind,
     [
       sid!(sid),
       [MsgPack.array_header(length(updates)) | Enum.map(updates, &update!/1)],
       MsgPack.encode!(atomic == true) | caller!(principal)
     ]}
  end

  def fields(:history, [sid, ident, limit, principal]),
    do:
      {"var_history", :read,
       [sid!(sid), MsgPack.encode_ident!(ident), limit!(limit) | caller!(principal)]}

  def fields(:rollback, [sid, ident, version, principal]) do
    sid = sid!(sid)
    caller = caller!(principal)

    unless is_integer(version) and version >= 0 and version <= @max_u64,
      do: throw(:version_not_found)

    {"var_rollback", :write,
     [sid, MsgPack.encode_ident!(ident), MsgPack.uint(version), nil_() | caller]}
  end

  def fields(:delete_variable, [sid, ident, principal]),
    do: {"var_delete", :write, [sid!(sid), MsgPack.encode_ident!(ident) | caller!(principal)]}

  def fields(:list_variables, [sid, pattern, principal]),
    do: {"var_list", :heavy_read, [sid!(sid), pattern!(pattern) | caller!(principal)]}

  def fields(:variable_names, [sid, pattern, principal]),
    do: {"var_names", :heavy_read, [sid!(sid), pattern!(pattern) | caller!(principal)]}

  def fields(:set_access_rules, [sid, ident, rules, principal]),
    do:
      {"acl_set_rules", :write,
       [sid!(sid), MsgPack.encode_ident!(ident), MsgPack.encode!(rules) | caller!(principal)]}

  def fields(:check_access, [sid, ident, principal, permission]),
    do:
      {"acl_check", :read,
       [sid!(sid), MsgPack.encode_ident!(ident), permission!(permission) | caller!(principal)]}

  def fields(:authorize, [sid, ident, principal, permission]),
    do:
      {"acl_authorize", :read,
       [sid!(sid), MsgPack.encode_ident!(ident), permission!(permission) | caller!(principal)]}

  def fields(:authorize_session, [sid, principal, permission]),
    do: {"acl_authorize_session", :read, [sid!(sid), permission!(permission), principal!(principal)]}

  def fields(:audit_log, [sid, limit]), do: {"acl_audit_log", :read, [sid!(sid), limit!(limit)]}

  def fields(:graph_add_edge, [sid, from, to, type, principal]),
    do:
      {"graph_add_edge", :heavy_write,
       [
         sid!(sid),
         MsgPack.encode!(from),
         MsgPack.encode!(to),
         atom!(type, :type_must_be_an_atom),
         principal!(principal)
       ]}

  def fields(:graph_remove_edge, [sid, from, to, principal]),
    do:
      {"graph_remove_edge", :write,
       [sid!(sid), MsgPack.encode!(from), MsgPack.encode!(to), principal!(principal)]}

  def fields(:graph_clear, [sid, var, principal]),
    do: {"graph_clear", :write, [sid!(sid), MsgPack.encode!(var), principal!(principal)]}

  def fields(:graph_dependencies, [sid, var, transitive, principal]),
    do:
      {"graph_dependencies", :heavy_read,
       [sid!(sid), MsgPack.encode!(var), MsgPack.encode!(transitive == true), principal!(principal)]}

  def fields(:graph_dependents, [sid, var, transitive, principal]),
    do:
      {"graph_dependents", :heavy_read,
       [sid!(sid), MsgPack.encode!(var), MsgPack.encode!(transitive == true), principal!(principal)]}

  def fields(:graph_update_order, [sid, changed, principal]) do
    unless is_list(changed), do: throw({:invalid_argument, :expected_a_list})

    {"graph_update_order", :heavy_read,
     [
       sid!(sid),
       [MsgPack.array_header(length(changed)) | Enum.map(changed, &MsgPack.encode!/1)],
       principal!(principal)
     ]}
  end

  def fields(:graph_render, [sid, format, principal]),
    do:
      {"graph_render", :heavy_read,
       [sid!(sid), atom!(format, :type_must_be_an_atom), principal!(principal)]}

  def fields(:graph_info, [sid, principal]),
    do: {"graph_info", :read, [sid!(sid), principal!(principal)]}

  defp nil_, do: <<0xC0>>

  defp sid!(sid) when is_binary(sid) do
    if String.valid?(sid), do: MsgPack.encode!(sid), else: throw({:invalid_argument, :bad_session_id})
  end

  defp sid!(_), do: throw({:invalid_argument, :bad_session_id})

  defp opt_int(nil, _), do: nil_()
  defp opt_int(n, _) when is_integer(n), do: MsgPack.encode!(n)
  defp opt_int(_, reason), do: throw({:invalid_argument, reason})

  defp principal!(nil), do: nil_()
  defp principal!({principal, _context}), do: principal!(principal)
  defp principal!({p, _lock_token, _optimizer_id}), do: principal!(p)
  defp principal!({p, _context, _lock_token, _optimizer_id}), do: principal!(p)

  defp principal!(p) when is_binary(p) do
    if String.valid?(p), do: MsgPack.encode!(p), else: throw({:invalid_argument, :bad_principal})
  end

  defp principal!(_), do: throw({:invalid_argument, :bad_principal})

  defp caller!({principal, context}) when is_map(context),
    do: [principal!(principal), MsgPack.encode!(context)]

  defp caller!({_principal, _context}), do: throw({:invalid_argument, :context_must_be_a_map})

  defp caller!({principal, context, _lock_token, _optimizer_id}),
    do: caller!({principal, context})

  defp caller!(principal), do: [principal!(principal), nil_()]

  defp permission!(p) when is_atom(p), do: MsgPack.encode_ident!(p)
  defp permission!(_), do: throw({:invalid_argument, :unknown_permission})

  defp atom!(a, _) when is_atom(a) and a not in [nil, true, false], do: MsgPack.encode_ident!(a)
  defp atom!(_, reason), do: throw({:invalid_argument, reason})

  defp expected!(nil), do: nil_()
  defp expected!(n) when is_integer(n) and n >= 0 and n <= @max_u64, do: MsgPack.uint(n)
  defp expected!(_), do: throw({:invalid_argument, :expected_non_negative_integer})

  defp limit!(n) when is_integer(n) and n >= 0 and n <= @max_i64, do: MsgPack.uint(n)
  defp limit!(_), do: throw({:invalid_argument, :bad_limit})

  defp description!(nil), do: nil_()
  defp description!(d) when is_binary(d), do: MsgPack.encode!(d)
  defp description!(_), do: throw({:invalid_argument, :description_must_be_a_string})

  defp pattern!(nil), do: nil_()
  defp pattern!(p) when is_binary(p), do: MsgPack.encode!(p)
  defp pattern!(_), do: throw({:invalid_argument, :pattern_must_be_a_string})

  defp update!({ident, value, metadata, expected}) do
    [
      0x94,
      MsgPack.encode_ident!(ident),
      MsgPack.encode!(value),
      MsgPack.encode!(metadata),
      expected!(expected)
    ]
  end

  defp update!(_), do: throw({:invalid_argument, :bad_update})
end
