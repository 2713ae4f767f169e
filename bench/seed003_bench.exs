# Seed 003's benchmark suite (../shared/seeds/003, "Create a Benchmark Suite"):
# single_write, batch_write_10 and rollback, each beside the seed's design
# (one GenServer holding a map of sessions whose variables are maps, as
# seed 003's SessionStore is written), in one run, the cases taking turns.
#
#   MIX_ENV=prod mix run bench/seed003_bench.exs
#
# Both sides do the same work per call: validate the type, check
# `expected_version` when given, push the previous state to a bounded
# history (50), bump the version. A rollback goes back 25 versions (the
# seed's example goes back to version 5, which leaves a 50-entry history
# after 45 rollbacks; going back a fixed distance can run for ever, and
# makes both sides search the middle of the history).
#
# Measured on the 2-core development machine while other builds ran (load
# average 12-18, so absolute times are slow and tails long; the ratios are
# medians of per-round ratios in one run), two runs:
#
# | case | store vs seed, by ips (run 1; run 2) | p50 store vs seed (run 2) |
# | --- | --- | --- |
# | single_write | 11.1x; 9.3x | 0.85 vs 7.8 us |
# | batch_write_10 | 4.3x; 5.0x | 9.3 vs 121 us |
# | batch_write_10, atomic: true | 4.5x; 5.6x | 10.1 vs 121 us |
# | rollback | 5.3x; 8.7x | 0.76 vs 5.4 us |
Code.require_file("harness.exs", __DIR__)

defmodule Seed003Bench.SeedStore do
  @moduledoc """
  Seed 003's SessionStore: one GenServer, `%{sessions: %{sid => %{variables:
  %{name => variable}}}}`; every call is a `GenServer.call`. `update_variables`
  applies its updates in order inside one call (so all or nothing, as the
  store's `atomic: true`); `rollback_variable` finds the version in the
  history and writes its value as a new version, as the seed's test expects.
  """
  use GenServer
  @max_history 50

  def start_link, do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)
  def create_session(sid), do: GenServer.call(__MODULE__, {:create, sid})
  def register(sid, name, value), do: GenServer.call(__MODULE__, {:register, sid, name, value})
  def version(sid, name), do: GenServer.call(__MODULE__, {:version, sid, name})

  def update_variable(sid, name, value, metadata \\ %{}),
    do: GenServer.call(__MODULE__, {:update_variable, sid, name, value, metadata})

  def update_variables(sid, updates),
    do: GenServer.call(__MODULE__, {:update_variables, sid, updates})

  def rollback_variable(sid, name, version),
    do: GenServer.call(__MODULE__, {:rollback, sid, name, version})

  @impl true
  def init(nil), do: {:ok, %{sessions: %{}}}

  @impl true
  def handle_call({:create, sid}, _from, state),
    do: {:reply, :ok, put_in(state.sessions[sid], %{variables: %{}})}

  def handle_call({:register, sid, name, value}, _from, state) do
    var = %{
      name: name,
      type: :float,
      value: value,
      version: 0,
      history: [],
      metadata: %{},
      last_updated_at: DateTime.utc_now()
    }

    {:reply, :ok, put_in(state.sessions[sid].variables[name], var)}
  end

  def handle_call({:version, sid, name}, _from, state),
    do: {:reply, state.sessions[sid].variables[name].version, state}

  def handle_call({:update_variable, sid, name, value, metadata}, _from, state) do
    case update(state, sid, name, value, metadata) do
      {:ok, state} -> {:reply, :ok, state}
      error -> {:reply, error, state}
    end
  end

  def handle_call({:update_variables, sid, updates}, _from, state) do
    result =
      Enum.reduce_while(updates, {:ok, state}, fn {name, value}, {:ok, acc} ->
        case update(acc, sid, name, value, %{}) do
          {:ok, acc} -> {:cont, {:ok, acc}}
          error -> {:halt, error}
        end
      end)

    case result do
      {:ok, state} -> {:reply, :ok, state}
      error -> {:reply, error, state}
    end
  end

  def handle_call({:rollback, sid, name, version}, _from, state) do
    with {:ok, session} <- Map.fetch(state.sessions, sid),
         {:ok, var} <- Map.fetch(session.variables, name),
         %{value: value} <- Enum.find(var.history, &(&1.version == version)),
         {:ok, state} <- update(state, sid, name, value, %{"rolled_back_from" => var.version}) do
      {:reply, :ok, state}
    else
      nil -> {:reply, {:error, :version_not_found}, state}
      :error -> {:reply, {:error, :not_found}, state}
      error -> {:reply, error, state}
    end
  end

  defp update(state, sid, name, value, metadata) do
    with {:ok, session} <- Map.fetch(state.sessions, sid),
         {:ok, var} <- Map.fetch(session.variables, name),
         {:ok, value} <- validate(var.type, value) do
      expected = metadata["expected_version"]

      if expected && expected != var.version do
        {:error, {:version_mismatch, var.version}}
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

        {:ok, put_in(state.sessions[sid].variables[name], var)}
      end
    else
      :error -> {:error, :not_found}
      error -> error
    end
  end

  defp validate(:float, v) when is_float(v), do: {:ok, v}
  defp validate(:float, v) when is_integer(v), do: {:ok, v * 1.0}
  defp validate(_, _), do: {:error, :invalid_value}
end

defmodule Seed003Bench do
  alias DSPex.Bridge.SessionStore
  alias Seed003Bench.SeedStore

  @sid "bench-seed003"
  @batch for i <- 0..9, do: "batch_#{i}"
  # How far back a rollback goes (the history holds 50).
  @back 25

  def setup do
    {:ok, _} = SessionStore.create_session(@sid)
    {:ok, _} = SeedStore.start_link()
    :ok = SeedStore.create_session(@sid)

    for name <- ["var_a", "var_b" | @batch] do
      {:ok, _} = SessionStore.register_variable(@sid, name, :float, 0.5)
      :ok = SeedStore.register(@sid, name, 0.5)
    end

    # var_b gets a full history, so every rollback finds its version.
    for i <- 1..60 do
      :ok = SessionStore.update_variable(@sid, "var_b", i * 1.0)
      :ok = SeedStore.update_variable(@sid, "var_b", i * 1.0)
    end

    # Each side answers as it should before it is timed.
    {:ok, results} = SessionStore.update_variables(@sid, ten_updates())
    true = Enum.all?(Map.values(results), &(&1 == :ok))
    :ok = SessionStore.update_variables(@sid, ten_updates(), atomic: true)
    :ok = SeedStore.update_variables(@sid, ten_updates())
    :ok = store_rollback()
    :ok = seed_rollback()
  end

  def ten_updates, do: Map.new(@batch, &{&1, :rand.uniform()})

  def store_single, do: :ok = SessionStore.update_variable(@sid, "var_a", :rand.uniform())
  def seed_single, do: :ok = SeedStore.update_variable(@sid, "var_a", :rand.uniform())

  def store_batch, do: {:ok, _} = SessionStore.update_variables(@sid, ten_updates())

  def store_batch_atomic,
    do: :ok = SessionStore.update_variables(@sid, ten_updates(), atomic: true)

  def seed_batch, do: :ok = SeedStore.update_variables(@sid, ten_updates())

  # The version 25 writes back; each rollback is itself a new version.
  def store_rollback do
    v = Process.get(:store_version) || store_version()
    :ok = SessionStore.rollback_variable(@sid, "var_b", v - @back)
    Process.put(:store_version, v + 1)
    :ok
  end

  def seed_rollback do
    v = Process.get(:seed_version) || SeedStore.version(@sid, "var_b")
    :ok = SeedStore.rollback_variable(@sid, "var_b", v - @back)
    Process.put(:seed_version, v + 1)
    :ok
  end

  defp store_version do
    {:ok, %{version: v}} = SessionStore.get_variable(@sid, "var_b")
    v
  end
end

Seed003Bench.setup()
opts = [time: 5, warmup: 1, rounds: 5]

single =
  DSPex.Bench.run(
    %{
      "store single_write" => &Seed003Bench.store_single/0,
      "seed GenServer single_write" => &Seed003Bench.seed_single/0
    },
    [title: "single_write: update_variable of one float"] ++ opts
  )

batch =
  DSPex.Bench.run(
    %{
      "store batch_write_10" => &Seed003Bench.store_batch/0,
      "store batch_write_10 (atomic: true)" => &Seed003Bench.store_batch_atomic/0,
      "seed GenServer batch_write_10" => &Seed003Bench.seed_batch/0
    },
    [title: "batch_write_10: update_variables with ten updates"] ++ opts
  )

rollback =
  DSPex.Bench.run(
    %{
      "store rollback" => &Seed003Bench.store_rollback/0,
      "seed GenServer rollback" => &Seed003Bench.seed_rollback/0
    },
    [title: "rollback: rollback_variable 25 versions back"] ++ opts
  )

IO.puts("\n## ratios (median of 5 rounds)\n")
r_single = DSPex.Bench.ratio(single, "store single_write", "seed GenServer single_write")
r_batch = DSPex.Bench.ratio(batch, "store batch_write_10", "seed GenServer batch_write_10")

r_atomic =
  DSPex.Bench.ratio(batch, "store batch_write_10 (atomic: true)", "seed GenServer batch_write_10")

r_rollback = DSPex.Bench.ratio(rollback, "store rollback", "seed GenServer rollback")

p50 = fn results, name -> DSPex.Bench.fmt_ns(results[name].p50_ns) end

IO.puts("""

| case | store p50 | seed GenServer p50 | store vs seed (median of 5 rounds) |
| --- | --- | --- | --- |
| `single_write` | #{p50.(single, "store single_write")} | #{p50.(single, "seed GenServer single_write")} | #{Float.round(r_single, 1)}x |
| `batch_write_10` | #{p50.(batch, "store batch_write_10")} | #{p50.(batch, "seed GenServer batch_write_10")} | #{Float.round(r_batch, 1)}x |
| `batch_write_10`, `atomic: true` | #{p50.(batch, "store batch_write_10 (atomic: true)")} | #{p50.(batch, "seed GenServer batch_write_10")} | #{Float.round(r_atomic, 1)}x |
| `rollback` | #{p50.(rollback, "store rollback")} | #{p50.(rollback, "seed GenServer rollback")} | #{Float.round(r_rollback, 1)}x |
""")
