#!/usr/bin/env bash
# The test-order guard, for a quiet machine (about an hour on 2 cores): the whole suite in reverse
# order, with OMP_NUM_THREADS unset, =1 and =2, and each test file alone. Any failure stops it.
# Tests set their own numerical settings (megatron_cosmos3/testing/numerics.py), so none of these
# may change a result. Extra args go to pytest, e.g. -x.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
run() { echo "== $*" >&2; "$@"; }
run env -u OMP_NUM_THREADS python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider --reverse "$@"
run env OMP_NUM_THREADS=1 python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "$@"
run env OMP_NUM_THREADS=2 python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "$@"
for file in $(find tests -name 'test_*.py' | sort); do
  run env -u OMP_NUM_THREADS python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "$file" "$@"
done
