defmodule DSPex.Bridge.Gateway.WatchStream do
  @moduledoc false
  # A WatchVariables stream: the watcher of `SessionStore.watch_variables/3`
  # for one gRPC client. Sends at most the gateway's window of updates ahead
  # of the client (the gateway grants credit as the client takes them);
  # what arrives meanwhile is coalesced to the latest update per variable.
  # Ends with OK when the watch ends (session deleted or expired, variables
  # deleted), with UNAUTHENTICATED when its token is revoked, and quietly
  # when the client goes away or the gateway program dies.

  alias DSPex.Bridge.Gateway
  alias DSPex.Bridge.Gateway.{Handler, Wire}
  alias DSPex.Bridge.SessionStore

  def run(port, id, "WatchVariables", req, meta, config) do
    with {:ok, ctx} <- Handler.context(meta, config),
         {:ok, sid, ref} <- watch(req, ctx) do
      if is_map(ctx.auth), do: Registry.register(Gateway.Streams, ctx.auth.hash, nil)

      loop(%{
        port: port,
        id: id,
        ref: ref,
        sid: sid,
        binary?: ctx.binary?,
        credit: config.stream_window,
        pending: %{}
      })
    else
      {:status, _, _, _} = status -> Gateway.reply(port, id, status)
    end
  end

  def run(port, id, method, _req, _meta, _config) do
    Gateway.reply(
      port,
      id,
      {:status, :unimplemented, "#{method} belongs to the worker pool, not to this server",
       "unimplemented"}
    )
  end

  defp watch(req, ctx) do
    idents = Enum.filter(req["variable_identifiers"] || [], &is_binary/1)

    with {:ok, sid} <- Handler.session_for(req, ctx) do
      opts =
        Handler.principal_opts(ctx, sid) ++
          [include_initial_values: req["include_initial_values"] == true, max_queue: 64]

      case SessionStore.watch_variables(sid, idents, opts) do
        {:ok, ref} ->
          {:ok, sid, ref}

        {:error, reason} ->
          {:status, Wire.status_of(reason), Wire.reason_text(reason), Wire.reason_name(reason)}
      end
    end
  end

  defp loop(state) do
    receive do
      {:dspex_variable_update, ref, update} when ref == state.ref ->
        state |> Map.update!(:pending, &Map.put(&1, update.id, update)) |> flush() |> loop()

      {:dspex_credit, n} ->
        %{state | credit: state.credit + n} |> flush() |> loop()

      {:dspex_watch_ended, ref, _reason} when ref == state.ref ->
        state = flush(state)
        Gateway.reply(state.port, state.id, :end)

      :dspex_token_revoked ->
        SessionStore.unwatch(state.ref)

        Gateway.reply(
          state.port,
          state.id,
          {:status, :unauthenticated, "token revoked", "unauthenticated"}
        )

      :dspex_cancel ->
        SessionStore.unwatch(state.ref)

      :dspex_link_down ->
        SessionStore.unwatch(state.ref)

      _other ->
        loop(state)
    end
  end

  defp flush(%{credit: credit, pending: pending} = state)
       when credit <= 0 or map_size(pending) == 0,
       do: state

  defp flush(state) do
    # Oldest-first is not known after coalescing; lowest version first keeps
    # a variable's own order, which is all the contract promises.
    {send_now, keep} =
      state.pending
      |> Enum.sort_by(fn {_id, u} -> u.version || 0 end)
      |> Enum.split(state.credit)

    for {_id, update} <- send_now,
        do: Gateway.reply(state.port, state.id, {:item, message(update, state)})

    %{state | credit: state.credit - length(send_now), pending: Map.new(keep)}
  end

  defp message(update, state) do
    variable =
      case update.update_type do
        :deleted ->
          %{"id" => update.id, "name" => to_string(update.variable)}

        _ ->
          Wire.variable(
            %{
              id: update.id,
              name: update.variable,
              type: update.type,
              value: update.value,
              version: update.version,
              metadata: %{},
              updated_at: update.updated_at
            },
            state.binary?
          )
      end

    meta = Wire.strings(update.metadata)

    %{
      "variable_id" => update.id,
      "variable" => variable,
      "update_source" => meta["source"] || "",
      "update_metadata" => meta,
      "timestamp" => Wire.now(),
      "update_type" => Atom.to_string(update.update_type)
    }
  end
end
