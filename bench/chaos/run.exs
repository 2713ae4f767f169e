# Chaos under sustained load: faults injected one after another while a
# mixed workload runs on every path, then a check of the clients' histories.
#
#   make chaos-checks                                   # the short run (~2.5 min), part of make test
#   MIX_ENV=test mix run --no-start bench/chaos/run.exs --profile full   # the full run (~25 min)
#
# Options: --profile short|full, --faults a,b,... (names below), --window S
# (seconds per fault), --hold S (how long a lasting fault lasts), --no-raft,
# --no-grpc, --trace (every operation also as a line of a TSV file per
# client, under bench/chaos/results/trace-*/). Faults: gateway_kill,
# port_kill, raft_leader_kill, raft_partition, port_sigstop, telemetry_crash,
# compute_crash. What the run does and checks: bench/chaos/README.md.
#
# Needs scripts/setup.sh (the .venv with grpcio for the Python clients, ra in
# .cache/ra for the replicated sessions). Prints the tables, writes JSON under
# bench/chaos/results/ (git-ignored) and exits 1 if a check failed: an
# acknowledged write lost, a call answering after its timeout or never, a
# stale read, replicas or derived variables disagreeing after healing.
# MIX_ENV=test: test/support's HACluster is compiled there (loaded here
# otherwise); the Rust crates are built in release mode in every env.

# Started here (`mix run --no-start`), so that the peers' and ra's start-up
# logs stay out of the report.
Logger.configure(level: :error)
{:ok, _} = Application.ensure_all_started(:dspex_bridge)

for file <- ~w(history checker report client cluster faults runner) do
  Code.require_file("lib/#{file}.ex", __DIR__)
end

unless Code.ensure_loaded?(DSPex.Test.HACluster),
  do: Code.require_file("../../test/support/ha_cluster.ex", __DIR__)

{opts, _, invalid} =
  OptionParser.parse(System.argv(),
    strict: [
      profile: :string,
      faults: :string,
      window: :integer,
      hold: :integer,
      raft: :boolean,
      grpc: :boolean
    ]
  )

if invalid != [], do: raise("bench/chaos/run.exs: unknown options #{inspect(invalid)}")

profile =
  case opts[:profile] || "short" do
    "short" -> :short
    "full" -> :full
    other -> raise "unknown profile #{other}"
  end

faults =
  case opts[:faults] do
    nil ->
      DSPex.Chaos.Faults.all()

    list ->
      for f <- String.split(list, ",", trim: true) do
        atom = String.to_atom(f)
        unless atom in DSPex.Chaos.Faults.all(), do: raise("unknown fault #{f}")
        atom
      end
  end

override =
  Enum.flat_map([window: :window_s, hold: :hold_s], fn {opt, key} ->
    if opts[opt], do: [{key, opts[opt]}], else: []
  end)

result =
  DSPex.Chaos.Runner.run(
    profile: profile,
    faults: faults,
    override: override,
    raft: Keyword.get(opts, :raft, true),
    grpc: Keyword.get(opts, :grpc, true),
    trace: Keyword.get(opts, :trace, false)
  )

System.halt(if result.ok, do: 0, else: 1)
