#!/usr/bin/env bash
# Installs what dspex_bridge needs on a fresh Debian machine: Erlang/OTP and
# Elixir from Debian's packages (Rust is expected to be there already).
# erlang-proper drives the property tests of the ExUnit suite; python3 and
# python3-venv the Python bridge's tests (a virtualenv in .venv, from PyPI).
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(elixir erlang-dev erlang-src erlang-proper python3 python3-venv)
# Extra tools used by the test suite when present. prometheus gives promtool,
# for `make ops-checks`; on CI (DSPEX_CI or CI set) it is required.
optional=(prometheus)
if [ -n "${DSPEX_CI:-}${CI:-}" ]; then
  packages+=("${optional[@]}")
  optional=()
fi

missing=()
for p in "${packages[@]}" "${optional[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # prometheus (for promtool) is optional: do not fail the setup without it.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
  if [ ${#optional[@]} -gt 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${optional[@]}" >/dev/null 2>&1 || echo "setup: optional ${optional[*]} not installed"
  fi
fi

command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || {
  echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
}

# The Python bridge: a virtualenv at the project root with grpcio,
# grpcio-tools, protobuf and pytest from PyPI (installed once).
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import grpc, grpc_tools, google.protobuf, pytest, pytest_timeout" >/dev/null 2>&1; then
  echo "setup: installing grpcio grpcio-tools protobuf pytest pytest-timeout into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check grpcio grpcio-tools protobuf pytest pytest-timeout
fi
# matplotlib draws the load driver's memory plot (bench/load/plot.py);
# without it a load run still runs and checks, and only skips the plot.
if ! "$venv/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
  echo "setup: installing matplotlib into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check matplotlib ||
    echo "setup: matplotlib not installed; load runs skip the plot" >&2
fi

# ra (Raft) and its dependencies for replicated sessions, from Debian's
# rabbitmq-server package: downloaded and unpacked into .cache/ra (git-ignored),
# never installed (no RabbitMQ service starts). mix.exs puts their ebin folders
# on the code path. Optional: without it, sessions without `replicas:` work as
# before, `replicas:` answers {:error, :ra_unavailable} and the :ha tests are
# skipped. Idempotent: nothing is fetched once .cache/ra is complete, and a
# half-made cache is never left behind (staged, then renamed).
ra_cache="$(cd "$(dirname "$0")/.." && pwd)/.cache/ra"
ra_apps=(ra aten gen_batch_server seshat)

ra_complete() {
  local app
  for app in "${ra_apps[@]}"; do
    ls -d "$ra_cache/$app"-[0-9]*/ebin >/dev/null 2>&1 || return 1
  done
}

ra_download() {
  (cd "$1" && apt-get download -qq rabbitmq-server >/dev/null 2>&1) && return 0
  # A fresh machine may have no package lists yet.
  [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 &&
    (cd "$1" && apt-get download -qq rabbitmq-server >/dev/null 2>&1)
}

ra_fetch() {
  local tmp app
  tmp="$(mktemp -d)" || return 1
  ra_download "$tmp" &&
    dpkg-deb -x "$tmp"/rabbitmq-server_*.deb "$tmp/x" &&
    mkdir -p "$tmp/stage" || { rm -rf "$tmp"; return 1; }
  for app in "${ra_apps[@]}"; do
    cp -r "$tmp"/x/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/"$app"-[0-9]* "$tmp/stage/" ||
      { rm -rf "$tmp"; return 1; }
  done
  mkdir -p "$(dirname "$ra_cache")" && rm -rf "$ra_cache" && mv "$tmp/stage" "$ra_cache"
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

if ! ra_complete; then
  echo "setup: fetching ra from Debian's rabbitmq-server package into .cache/ra"
  ra_fetch && ra_complete ||
    echo "setup: could not fetch ra; replicated sessions unavailable, :ha tests skipped" >&2
fi
