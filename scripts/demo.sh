#!/usr/bin/env bash
# `ferry demo` on this machine: installs git if missing, builds ferry, then builds and deploys a
# sample tag end to end on the embedded store (nothing else to install or start). Extra
# arguments go to `ferry demo`, e.g. `scripts/demo.sh --keep`.
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
exec ./target/release/ferry demo "$@"
