#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite; the 15 slowest tests are listed
# at the end. Extra args go to pytest (e.g. --reverse; launch/check_test_order.sh runs the order guard).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
# Three pytest workers on two cores: tests compute on one intra-op thread each, and the long ones spend
# much of their time waiting (torchrun and daemon start-up, a live server, SLURM's time limits). In
# fresh clones (cold bytecode, as CI runs) on 2026-11-30: 671 s of tests with three workers against
# 710 s and 800 s with four; on 2026-12-02, 514 s with three (9 min 48 s with the set-up).
exec python -m pytest -n "${PYTEST_WORKERS:-3}" --dist worksteal --durations=15 "$@"
