#!/usr/bin/env bash
# Creates (once) the project virtualenv in .venv and installs the package with its dev extras.
# Sourced by the other launch scripts; re-installs only when pyproject.toml changed.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COSMOS3_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

# System packages the tests use, installed once where root and apt-get are at hand: ffmpeg's
# ffprobe/ffmpeg (the independent decoder the media tests read our mp4 files back with; the package
# writes them with PyAV's own FFmpeg) and slurm-wlm + munge (tests/slurm starts a one-node cluster;
# without them that test is skipped with the reason), and shellcheck (tests/bench/test_gpu_check.py
# lints bench/gpu_check.sh). They install in the background while pip installs the Python packages:
# on a fresh machine both are minutes of mostly waiting.
media=() cluster=()
command -v ffprobe >/dev/null 2>&1 || media+=(ffmpeg)
command -v shellcheck >/dev/null 2>&1 || media+=(shellcheck)
{ [ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null 2>&1; } || cluster+=(slurm-wlm)
[ -x /usr/sbin/munged ] || cluster+=(munge)
system_packages=""
if [ $((${#media[@]} + ${#cluster[@]})) -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (
      apt-get update -qq
      export DEBIAN_FRONTEND=noninteractive
      [ ${#media[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${media[@]}" >/dev/null
      [ ${#cluster[@]} -eq 0 ] || apt-get install -y -qq "${cluster[@]}" >/dev/null
    ) &
    system_packages=$!
  else
    echo "setup_env: ${media[*]} ${cluster[*]} not installed (needs root and apt-get)" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.megatron_cosmos3-installed"
want="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
installed=""
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  installed=1
  # The CPU wheel first, with pip and its configuration (where the machine keeps that wheel):
  # resolving "torch" through other packages could fetch a CUDA build.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  # The rest with uv, several times faster than pip here (parallel downloads, no bytecode compiled
  # up front), trusting the system's certificates as pip does (a proxy's CA; UV_NATIVE_TLS: older
  # uv); pip where uv cannot install (uv reads no pip configuration, e.g. a private index).
  if ! { "$venv/bin/python" -m pip install --quiet uv &&
    UV_SYSTEM_CERTS=1 UV_NATIVE_TLS=1 \
      "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" -e "${repo_root}[dev]"; }; then
    echo "setup_env: uv could not install the package; using pip" >&2
    "$venv/bin/python" -m pip install --quiet -e "${repo_root}[dev]"
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Let Python cache each module's bytecode on first import. Container images often set
# PYTHONDONTWRITEBYTECODE (this project's development image does) and uv installs no bytecode: then
# every interpreter, torchrun rank and pytest worker compiled megatron-core, MLflow, DeepSpeed and
# this package from source again. Importing the trainer took 29.5 s of CPU that way against 10.9 s
# with the cache (2 cores, 2026-11-30). The cache lands in .venv and in git-ignored __pycache__/.
unset PYTHONDONTWRITEBYTECODE
# After an install, the modules every test process imports are compiled once, here: otherwise the
# test command's first processes (pytest and its workers, their fork servers) each compile the same
# uncached modules at the same moment.
if [ -n "$installed" ]; then
  "$venv/bin/python" -c "import megatron_cosmos3.training.train, megatron_cosmos3.release.generate_cli, \
megatron_cosmos3.release.eval_cli, transformers.models.qwen3_vl.modeling_qwen3_vl, matplotlib.pyplot, \
mlflow.server, deepspeed, pytest, xdist" >/dev/null 2>&1 || echo "setup_env: warming the bytecode cache failed" >&2
fi

if [ -n "$system_packages" ] && ! wait "$system_packages"; then
  echo "setup_env: installing ${media[*]} ${cluster[*]} with apt-get failed" >&2
  # shellcheck disable=SC2317 # reached when the script is run, not sourced
  return 1 2>/dev/null || exit 1
fi
