defmodule DSPex.Bridge.Gateway.Tokens do
  @moduledoc false
  # Bearer tokens of the gRPC gateway: an ETS table of SHA-256 hashes (the
  # token itself is never stored) -> principal, sessions, expiry. Owned by
  # this process, which also sweeps expired tokens.
  use GenServer

  @table :dspex_bridge_gateway_tokens
  @sweep_ms 60_000
  @max_principal 255

  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @impl true
  def init([]) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    Process.send_after(self(), :sweep, @sweep_ms)
    {:ok, nil}
  end

  @impl true
  def handle_info(:sweep, state) do
    now = now()
    :ets.select_delete(@table, [{{:_, :_, :_, :"$1"}, [{:<, :"$1", now}], [true]}])
    Process.send_after(self(), :sweep, @sweep_ms)
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  def issue(principal, opts) do
    with :ok <- check_principal(principal),
         {:ok, opts} <- DSPex.Bridge.Options.validate(opts, [:ttl, :sessions]),
         {:ok, ttl} <- ttl(opts[:ttl]),
         {:ok, sessions} <- sessions(Keyword.get(opts, :sessions, default_sessions(principal))) do
      token = "dspex_" <> Base.url_encode64(:crypto.strong_rand_bytes(32), padding: false)

      try do
        :ets.insert(@table, {hash(token), principal, sessions, now() + ttl})
        {:ok, token}
      rescue
        ArgumentError -> {:error, :not_running}
      end
    end
  end

  def revoke(token) when is_binary(token) do
    hash = hash(token)

    try do
      :ets.delete(@table, hash)
    rescue
      ArgumentError -> :ok
    end

    end_streams(hash)
  end

  def revoke(_token), do: :ok

  defp end_streams(hash) do
    Registry.dispatch(DSPex.Bridge.Gateway.Streams, hash, fn entries ->
      for {pid, _} <- entries, do: send(pid, :dspex_token_revoked)
    end)
  rescue
    # The registry is not running: no stream to end.
    ArgumentError -> :ok
  end

  # {:ok, %{principal, sessions, hash}} or {:error, :unauthenticated | :expired}.
  def verify(token) when is_binary(token) and byte_size(token) <= 512 do
    hash = hash(token)

    case :ets.lookup(@table, hash) do
      [{^hash, principal, sessions, expires}] ->
        if expires >= now(),
          do: {:ok, %{principal: principal, sessions: sessions, hash: hash}},
          else: {:error, :expired}

      [] ->
        {:error, :unauthenticated}
    end
  rescue
    ArgumentError -> {:error, :unauthenticated}
  end

  def verify(_token), do: {:error, :unauthenticated}

  # Is `session_id` among the sessions the token names?
  def allows?(%{sessions: :any}, _session_id), do: true

  def allows?(%{sessions: patterns}, session_id) when is_binary(session_id),
    do: Enum.any?(patterns, &glob_match?(&1, session_id))

  def allows?(_auth, _session_id), do: false

  defp hash(token), do: :crypto.hash(:sha256, token)
  defp now, do: System.monotonic_time(:millisecond)

  defp check_principal(:session), do: :ok

  defp check_principal(p) when is_binary(p) and byte_size(p) in 1..@max_principal,
    do: if(String.valid?(p), do: :ok, else: {:error, {:invalid_argument, {:principal, p}}})

  defp check_principal(p), do: {:error, {:invalid_argument, {:principal, p}}}

  defp default_sessions(:session), do: []
  defp default_sessions(principal), do: [principal]

  defp ttl(nil), do: {:ok, :timer.hours(1)}
  defp ttl(ms) when is_integer(ms) and ms > 0, do: {:ok, ms}
  defp ttl(ms), do: {:error, {:invalid_argument, {:ttl, ms}}}

  defp sessions(:any), do: {:ok, :any}

  defp sessions(list) when is_list(list) do
    if Enum.all?(list, &(is_binary(&1) and &1 != "")),
      do: {:ok, list},
      else: {:error, {:invalid_argument, {:sessions, list}}}
  end

  defp sessions(other), do: {:error, {:invalid_argument, {:sessions, other}}}

  # Anchored globs: `*` any run, `?` one character.
  defp glob_match?(pattern, text) do
    if String.contains?(pattern, ["*", "?"]) do
      regex =
        pattern
        |> Regex.escape()
        |> String.replace("\\*", ".*")
        |> String.replace("\\?", ".")

      Regex.match?(~r/\A#{regex}\z/us, text)
    else
      pattern == text
    end
  end
end
