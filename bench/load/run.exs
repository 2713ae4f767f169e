# The load driver: open-loop mixed session workload over 1,000 sessions,
# through the in-VM API (`--path vm`, NIF or `--backend port`), Python
# clients over gRPC (`--path grpc`, bench/load/grpc_load.py) or replicated
# sessions on 3 local :peer nodes (`--path raft`).
#
#   MIX_ENV=prod mix run bench/load/run.exs --path vm --profile sustained --rate 100000
#   MIX_ENV=prod mix run bench/load/run.exs --profile all --scale 0.02 --check
#
# Profiles: ramp (0 -> rate over 300 s), sustained (rate, 600 s), spike
# (rate, 2x rate, rate; 180 s), soak (rate/2, 3600 s), overload (2x the
# capacity measured in the same run, 60 s); `all` = the first four in turn.
# `--scale F` multiplies the lengths, `--duration S` sets them. Every 10 s
# a line per operation (throughput, p50/p95/p99/max from the intended
# start); at the end a summary, the checks (`--check`: exit 1 if one
# fails), and the JSON under bench/load/results/. `--plot docs/x.png`
# plots the memory samples.
#
# Options: --path vm|grpc|raft, --backend nif|port (vm, grpc), --profile
# LIST (name or name:seconds), --rate N (ops/s; default the issue's target
# of the path), --duration S / --scale F, --sessions N (1000), --callers N
# (vm with NIF sessions: one per 50 sessions, each woken once per 1 ms
# tick for its due arrivals; port backend and raft: one per session), --max-history N (50), --prefill N (histories filled),
# --timeout MS (5000), --report-every S (10), --sample-every S, --warmup S,
# --memory-tolerance F (0.10), --max-queue N (1000), --offered N (overload
# at this rate instead of 2x the measured capacity), --rate-limit N (per
# session), --port-max-in-flight N, --raft-max-in-flight N,
# --grpc-max-in-flight N, --grpc-procs N (2), --analytics, --msacc (where
# the time goes: microstate accounting, VM CPU per operation, reductions
# per process group), --null (the driver alone: arrivals picked, timed
# and recorded, nothing called), --check,
# --plot PNG, --out NAME. See docs/performance.md.
lib = Path.join(__DIR__, "lib")

modules =
  ~w(hist stats json workload gen sampler node report run)
  |> Enum.flat_map(&Code.compile_file(Path.join(lib, "#{&1}.ex")))

:persistent_term.put({DSPexLoad.Run, :modules}, modules)
DSPexLoad.Run.main(System.argv())
