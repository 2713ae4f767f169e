# Variable reads and writes: the store against the seed's GenServer-plus-map
# SessionStore (../shared/seeds/003) and against raw ETS, in one run.
#
#   MIX_ENV=prod mix run bench/variables_bench.exs
Code.require_file("harness.exs", __DIR__)

defmodule VariablesBench.SeedStore do
  @moduledoc """
  The seed's design: one GenServer holding `%{session_id => session}` with
  variables in maps; every read and write is a `GenServer.call`; a write
  validates the type, checks `expected_version`, pushes the previous state to
  a history list truncated with `Enum.take(@max_history)` and bumps the version.
  """
  use GenServer
  @max_history 50

  def start_link, do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)
  def create_session(sid), do: GenServer.call(__MODULE__, {:create, sid})

  def register(sid, name, type, value),
    do: GenServer.call(__MODULE__, {:register, sid, name, type, value})

  def get_value(sid, name), do: GenServer.call(__MODULE__, {:get, sid, name})

  def update(sid, name, value, metadata \\ %{}),
    do: GenServer.call(__MODULE__, {:update, sid, name, value, metadata})

  @impl true
  def init(nil), do: {:ok, %{sessions: %{}}}

  @impl true
  def handle_call({:create, sid}, _from, state),
    do: {:reply, :ok, put_in(state.sessions[sid], %{variables: %{}})}

  def handle_call({:register, sid, name, type, value}, _from, state) do
    var = %{
      name: name,
      type: type,
      value: value,
      version: 0,
      history: [],
      metadata: %{},
      last_updated_at: DateTime.utc_now()
    }

    {:reply, :ok, put_in(state.sessions[sid].variables[name], var)}
  end

  def handle_call({:get, sid, name}, _from, state) do
    with {:ok, session} <- Map.fetch(state.sessions, sid),
         {:ok, var} <- Map.fetch(session.variables, name) do
      {:reply, {:ok, var.value}, state}
    else
      :error -> {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call({:update, sid, name, value, metadata}, _from, state) do
    with {:ok, session} <- Map.fetch(state.sessions, sid),
         {:ok, var} <- Map.fetch(session.variables, name),
         {:ok, value} <- validate(var.type, value) do
      expected = metadata["expected_version"]

      if expected && expected != var.version do
        {:reply, {:error, {:version_mismatch, var.version}}, state}
      else
        entry = %{
          version: var.version,
          value: var.value,
          updated_at: var.last_updated_at,
          metadata: var.metadata
        }

        var = %{
          var
          | value: value,
            version: var.version + 1,
            history: Enum.take([entry | var.history], @max_history),
            metadata: metadata,
            last_updated_at: DateTime.utc_now()
        }

        {:reply, :ok, put_in(state.sessions[sid].variables[name], var)}
      end
    else
      :error -> {:reply, {:error, :not_found}, state}
      error -> {:reply, error, state}
    end
  end

  defp validate(:float, v) when is_float(v), do: {:ok, v}
  defp validate(:float, v) when is_integer(v), do: {:ok, v * 1.0}
  defp validate(_, _), do: {:error, :invalid_value}
end

defmodule VariablesBench do
  alias DSPex.Bridge.SessionStore

  @sid "bench-vars"

  def setup do
    {:ok, _} = SessionStore.create_session(@sid)
    {:ok, _} = SessionStore.register_variable(@sid, :temperature, :float, 0.5)
    {:ok, _} = SessionStore.register_variable(@sid, :top_p, :float, 0.5)
    {:ok, _} = VariablesBench.SeedStore.start_link()
    :ok = VariablesBench.SeedStore.create_session(@sid)
    :ok = VariablesBench.SeedStore.register(@sid, :temperature, :float, 0.5)

    table =
      :ets.new(:bench_vars, [:public, :set, read_concurrency: true, write_concurrency: true])

    :ets.insert(table, {{@sid, :temperature}, 0.5})
    :ets.insert(table, {{@sid, :top_p}, 0.5})
    :persistent_term.put({__MODULE__, :table}, table)
  end

  defp table, do: :persistent_term.get({__MODULE__, :table})

  def store_read, do: SessionStore.get_variable_value(@sid, :temperature)
  def seed_read, do: VariablesBench.SeedStore.get_value(@sid, :temperature)
  def ets_read, do: :ets.lookup(table(), {@sid, :temperature})

  def store_write, do: SessionStore.update_variable(@sid, :temperature, :rand.uniform())
  def seed_write, do: VariablesBench.SeedStore.update(@sid, :temperature, :rand.uniform())
  def ets_write, do: :ets.insert(table(), {{@sid, :temperature}, :rand.uniform()})

  # Each of two writers owns a variable; the one-writer case writes one.
  def store_write_own do
    name = Process.get(:bench_var) || pick_var()
    SessionStore.update_variable(@sid, name, :rand.uniform())
  end

  defp pick_var do
    n = :counters.add(:persistent_term.get({__MODULE__, :picker}), 1, 1)
    _ = n
    count = :counters.get(:persistent_term.get({__MODULE__, :picker}), 1)
    name = if rem(count, 2) == 0, do: :top_p, else: :temperature
    Process.put(:bench_var, name)
    name
  end

  def init_picker, do: :persistent_term.put({__MODULE__, :picker}, :counters.new(1, []))

  # Engine bytes per float variable with a full 50-entry history.
  def memory_per_variable(n \\ 10_000) do
    sid = "bench-memory"
    {:ok, _} = SessionStore.create_session(sid)
    before = DSPex.Bridge.Backend.Native.memory()

    for i <- 1..n do
      name = "v#{i}"
      {:ok, _} = SessionStore.register_variable(sid, name, :float, 0.0)
      for w <- 1..60, do: :ok = SessionStore.update_variable(sid, name, w * 0.5)
    end

    bytes = (DSPex.Bridge.Backend.Native.memory() - before) / n
    SessionStore.delete_session(sid)
    bytes
  end
end

VariablesBench.setup()
# Five rounds, the cases taking turns: ratios are medians of the rounds.
opts = [time: 5, warmup: 1, rounds: 5]

reads =
  DSPex.Bench.run(
    %{
      "store get_variable_value" => &VariablesBench.store_read/0,
      "seed GenServer store read" => &VariablesBench.seed_read/0,
      "raw :ets.lookup" => &VariablesBench.ets_read/0
    },
    [title: "read one float variable"] ++ opts
  )

writes =
  DSPex.Bench.run(
    %{
      "store update_variable" => &VariablesBench.store_write/0,
      "seed GenServer store write" => &VariablesBench.seed_write/0,
      "raw :ets.insert" => &VariablesBench.ets_write/0
    },
    [title: "write one float variable (validate, version, history)"] ++ opts
  )

VariablesBench.init_picker()

scaling =
  DSPex.Bench.run(
    %{
      "1 writer" => {&VariablesBench.store_write_own/0, parallel: 1},
      "2 writers, different variables" => {&VariablesBench.store_write_own/0, parallel: 2}
    },
    [title: "write scaling"] ++ opts
  )

bytes = VariablesBench.memory_per_variable()

IO.puts("\n## ratios\n")
read_vs_seed = DSPex.Bench.ratio(reads, "store get_variable_value", "seed GenServer store read")
read_vs_ets = DSPex.Bench.ratio(reads, "raw :ets.lookup", "store get_variable_value")
write_vs_seed = DSPex.Bench.ratio(writes, "store update_variable", "seed GenServer store write")
scale = DSPex.Bench.ratio(scaling, "2 writers, different variables", "1 writer")
IO.puts("engine memory per float variable with 50 history entries: #{round(bytes)} bytes")

IO.puts("""

| case (median of 5 rounds) | measured | target |
| --- | --- | --- |
| read vs seed GenServer store | #{Float.round(read_vs_seed, 1)}x faster | >= 20x |
| read vs raw `:ets.lookup` | #{Float.round(read_vs_ets, 2)}x the cost | <= 2x |
| write vs seed GenServer store | #{Float.round(write_vs_seed, 1)}x faster | >= 10x |
| 2 writers vs 1 (different variables) | #{Float.round(scale, 2)}x throughput | >= 1.6x |
| memory per float variable, full history | #{round(bytes)} B | <= 4096 B |
""")
