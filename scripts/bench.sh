#!/usr/bin/env bash
# Runs ferry's benchmarks and the BullMQ peer benchmark back to back, so that every figure can be
# compared with the references taken in the same run (see BENCHMARKS.md).
#
#   scripts/bench.sh OUTDIR [BULLMQ_DIR]
#
# BULLMQ_DIR (default /tmp/bullmq-peer) is a copy of shared/peers/bullmq with `npm ci` done.
# Every bench starts and stops its own redis-server on a free loopback port.
# BULLMQ_ARGS (default "--runs 1") are passed to the peer's bench.mjs; MAXLOAD is passed to
# run-series.sh (its default waits for a 1-minute load average below 1.5).
set -euo pipefail
out=${1:?output directory}; peer=${2:-/tmp/bullmq-peer}
mkdir -p "$out"
cd "$(dirname "$0")/.."
cargo bench --no-run --bench events --bench claim --bench ingest --bench dispatch \
  --bench script_costs
{ uptime; nproc; redis-server --version; node --version; } | tee "$out/machine.txt"
for b in claim ingest dispatch script_costs; do
  cargo bench --bench "$b" 2>&1 | tee "$out/$b.txt"
done
(cd "$peer" && ./run-series.sh noaof "$out/bullmq.json" ${BULLMQ_ARGS:---runs 1} \
  && node report.mjs --series noaof="$out/bullmq.json") 2>&1 | tee "$out/bullmq.txt"
cargo bench --bench events 2>&1 | tee "$out/events.txt"
uptime | tee -a "$out/machine.txt"
