#!/usr/bin/env bash
# The whole test suite: installs missing system packages (redis-server, openssh-server, git,
# openssl),
# checks formatting and lints, then runs every test. Tests start their own servers on free
# loopback ports; nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v git >/dev/null || need+=(git)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The S3 tests talk to a real S3-compatible server: s3s-fs, which keeps objects as files. It is
# not packaged by the distribution; cargo builds it once into target/tools (about 3 minutes).
if [ ! -x target/tools/bin/s3s-fs ]; then
  cargo install s3s-fs --version 0.14.1 --locked --features binary --root target/tools
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
