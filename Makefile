# The README's two commands:
#   make demo   set up a fresh machine and run the demo (NIF backend)
#   make test   set up a fresh machine and run every quality gate and test
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
export LC_ALL ?= C.UTF-8

.PHONY: setup demo test rust-checks elixir-checks python-checks ops-checks chaos-checks load-checks bench

setup:
	@scripts/setup.sh

demo: setup
	mix run examples/demo.exs
	mix run examples/python_demo.exs

test: setup rust-checks elixir-checks python-checks ops-checks chaos-checks load-checks

rust-checks:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

elixir-checks:
	mix format --check-formatted
	MIX_ENV=test mix compile --warnings-as-errors --force
	# No compile-time dependency cycles (lib and test/support): a cycle makes
	# every file in it recompile whenever any of them changes.
	MIX_ENV=test mix xref graph --format cycles --label compile-connected --fail-above 0
	mix test

# The Python bridge against a real server (python/tests/conftest.py starts
# `mix dspex.grpc --port 0`); stubs are generated from the proto first.
python-checks:
	MIX_ENV=test mix compile
	.venv/bin/python python/dspex_bridge/_generate.py
	.venv/bin/python -m pytest -q --timeout=120 python/tests

# The operations files: the Prometheus alerting rules (promtool's syntax
# check and the rules' unit tests) and the Grafana dashboard (valid JSON).
# promtool is Debian's prometheus package (scripts/setup.sh installs it); on
# CI (.ci/run sets DSPEX_CI=1) a missing promtool fails the check, elsewhere
# it is reported and skipped. test/dspex/ops_metrics_test.exs checks that the
# metrics both use are exported.
ops-checks:
	@if command -v promtool >/dev/null 2>&1; then \
	  promtool check rules ops/prometheus/alerts.yml && \
	  promtool test rules ops/prometheus/alerts_test.yml; \
	elif [ -n "$$DSPEX_CI$$CI" ]; then \
	  echo "ops-checks: promtool not found (Debian package prometheus); required on CI" >&2; \
	  exit 1; \
	else \
	  echo "ops-checks: promtool not found (Debian package prometheus): alerting rules NOT checked"; \
	fi
	python3 -m json.tool ops/grafana/dspex_bridge.json > /dev/null

# Chaos under load, short version (~2.5 min): every fault of
# bench/chaos/run.exs injected in turn while clients on the NIF, port, gRPC
# (Python) and replicated (3 peer nodes) paths run a mixed workload; fails
# on a lost acknowledged write, a call past its timeout or a stale read.
# The full run: MIX_ENV=test mix run --no-start bench/chaos/run.exs --profile full
chaos-checks:
	MIX_ENV=test mix compile
	.venv/bin/python python/dspex_bridge/_generate.py
	MIX_ENV=test mix run --no-start bench/chaos/run.exs --profile short

# Short versions of the load profiles (bench/load/, docs/performance.md):
# ramp, sustained, spike and soak in-VM, overload at 2x the measured
# capacity of the port backend, and the gRPC and replicated-session paths.
# Each run checks itself (errors other than clear refusals, lost
# acknowledged writes, callers not answered within their timeout, library
# mailboxes, memory) and fails the target when a check fails.
LOAD := MIX_ENV=prod mix run bench/load/run.exs --check --report-every 5
load-checks:
	MIX_ENV=prod mix compile
	$(LOAD) --path vm --profile ramp:8,sustained:8,spike:9,soak:8 --rate 2000 --max-history 10 --memory-tolerance 0.3
	$(LOAD) --path vm --backend port --profile overload:8 --sessions 200 --port-max-in-flight 64 --memory-tolerance 0.3
	$(LOAD) --path grpc --profile sustained:8 --rate 100 --sessions 100 --max-history 10 --memory-tolerance 0.3
	$(LOAD) --path raft --profile sustained:8 --rate 100 --sessions 30 --max-history 10 --memory-tolerance 0.3

bench: setup
	@for f in bench/*_bench.exs; do MIX_ENV=prod mix run $$f || exit 1; done
	MIX_ENV=prod .venv/bin/python bench/grpc_bench.py
