#!/usr/bin/env bash
# Runs ferry on this machine: every role in one process with ops/ferry.local.toml, on the
# embedded store in ./.ferry/ferry.db (nothing to install but git, which builds need). Pass
# `--store redis://HOST:PORT/DB` to use a Redis server instead. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v git >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq git >/dev/null
fi
command -v cargo >/dev/null || { echo "ferry needs a Rust toolchain (cargo) to build" >&2; exit 1; }

cargo build --release --locked --bin ferry
exec ./target/release/ferry --config ops/ferry.local.toml "$@" up
