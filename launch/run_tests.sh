#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite. Extra args go to pytest.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
exec python -m pytest "$@"
