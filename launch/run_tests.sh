#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite; the 15 slowest tests are listed
# at the end. Extra args go to pytest (e.g. --reverse; launch/check_test_order.sh runs the order guard).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
# Four pytest workers on two cores: tests compute on one intra-op thread each, and the long ones spend
# much of their time waiting (torchrun and daemon start-up, a live server, SLURM's time limits): with
# three workers the suite used under half of the machine's CPU time (user+sys / wall). A fresh clone
# on a quiet machine, 2026-11-30: 632 s of tests with four workers against 671 s with three (with
# bytecode cached; before, when every process compiled its imports, four were slower than three).
exec python -m pytest -n "${PYTEST_WORKERS:-4}" --dist worksteal --durations=15 "$@"
