#!/usr/bin/env bash
# Runs ferry on this machine: installs redis-server if missing, starts a local one (data under
# ./.ferry/redis, append-only file on), then runs every ferry role in one process with
# ops/ferry.local.toml. Ctrl-C stops ferry; the redis-server is stopped with it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
command -v cargo >/dev/null || { echo "ferry needs a Rust toolchain (cargo) to build" >&2; exit 1; }

port="${FERRY_REDIS_PORT:-6390}"
mkdir -p .ferry/redis
redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/.ferry/redis" \
  --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
  --save '' --daemonize no >.ferry/redis/redis.log 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done

cargo build --release --locked --bin ferry
FERRY_STORE="redis://127.0.0.1:$port/0" exec_status=0
FERRY_STORE="redis://127.0.0.1:$port/0" ./target/release/ferry --config ops/ferry.local.toml up "$@" || exec_status=$?
exit $exec_status
