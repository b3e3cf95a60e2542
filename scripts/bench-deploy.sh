#!/usr/bin/env bash
# The deploy benchmark (BENCHMARKS.md, "Deploy: ferry against Ansible"): one 20 MiB release to
# 10 real sshd hosts on loopback with ferry's deploy module, and in the same run, interleaved,
# with Ansible doing the same work (benches/ansible/deploy.yml).
#
#   scripts/bench-deploy.sh [OUTFILE]
#
# Installs ansible-core with pip into a virtualenv outside the repository (VENV, default
# /tmp/ferry-ansible-venv; ANSIBLE_VERSION pins a version). Like the SSH tests it needs root,
# openssh-server and util-linux `unshare` (every host runs in namespaces of its own).
# DEPLOY_HOSTS, DEPLOY_MIB, DEPLOY_RUNS and DEPLOY_TRACE are passed on to the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/ferry-ansible-venv}
if [ ! -x "$venv/bin/ansible-playbook" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "ansible-core${ANSIBLE_VERSION:+==$ANSIBLE_VERSION}"
fi
cargo bench --bench deploy --no-run
ANSIBLE_PLAYBOOK="$venv/bin/ansible-playbook" cargo bench --bench deploy 2>&1 | tee "${1:-/dev/null}"
