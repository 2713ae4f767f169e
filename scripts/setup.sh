#!/usr/bin/env bash
# Installs what dspex_bridge needs on a fresh Debian machine: Erlang/OTP and
# Elixir from Debian's packages (Rust is expected to be there already).
# erlang-proper drives the property tests of the ExUnit suite.
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(elixir erlang-dev erlang-src erlang-proper)
# Extra tools used by the test suite when present.
optional=(prometheus)

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
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${optional[@]}" >/dev/null 2>&1 || echo "setup: optional ${optional[*]} not installed"
fi

command -v cargo >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo" ] || {
  echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
}

# ra (Raft) and its dependencies for replicated sessions, from Debian's
# rabbitmq-server package: downloaded and unpacked into .cache/ra, never
# installed (no RabbitMQ service). Optional: without it, sessions without
# `replicas:` work as before and `replicas:` answers {:error, :ra_unavailable}.
ra_cache="$(cd "$(dirname "$0")/.." && pwd)/.cache/ra"
if ! ls -d "$ra_cache"/ra-*/ebin >/dev/null 2>&1; then
  echo "setup: fetching ra from Debian's rabbitmq-server package into .cache/ra"
  tmp="$(mktemp -d)"
  if (cd "$tmp" && apt-get download -qq rabbitmq-server >/dev/null 2>&1) ||
     { [ "$(id -u)" -eq 0 ] && apt-get update -qq && (cd "$tmp" && apt-get download -qq rabbitmq-server >/dev/null 2>&1); }; then
    dpkg-deb -x "$tmp"/rabbitmq-server_*.deb "$tmp/x"
    mkdir -p "$ra_cache"
    for app in ra aten gen_batch_server seshat; do
      cp -r "$tmp"/x/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/"$app"-[0-9]* "$ra_cache"/
    done
  else
    echo "setup: could not download rabbitmq-server; replicated sessions unavailable" >&2
  fi
  rm -rf "$tmp"
fi
