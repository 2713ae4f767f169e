# The README's two commands:
#   make demo   set up a fresh machine and run the demo (NIF backend)
#   make test   set up a fresh machine and run every quality gate and test
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
export LC_ALL ?= C.UTF-8

.PHONY: setup demo test rust-checks elixir-checks bench

setup:
	@scripts/setup.sh

demo: setup
	mix run examples/demo.exs

test: setup rust-checks elixir-checks

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

bench: setup
	@for f in bench/*_bench.exs; do MIX_ENV=prod mix run $$f || exit 1; done
