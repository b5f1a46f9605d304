#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite; the 15 slowest tests are listed
# at the end. Extra args go to pytest (e.g. --reverse; launch/check_test_order.sh runs the order guard).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
# Two pytest workers: tests compute on one intra-op thread each, so one process would leave a core idle.
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=15 "$@"
