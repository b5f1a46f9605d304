#!/usr/bin/env bash
# Creates (once) the project virtualenv in .venv and installs the package with its dev extras.
# Sourced by the other launch scripts; re-installs only when pyproject.toml changed.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COSMOS3_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"

# ffmpeg's command-line tools (ffprobe, ffmpeg): the independent decoder the media tests check our
# mp4 files with (the package itself writes them with PyAV's own FFmpeg).
if ! command -v ffprobe >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.megatron_cosmos3-installed"
want="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # The CPU wheel first: resolving "torch" through other packages could fetch a CUDA build.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "$repo_root[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

# The SLURM test (tests/slurm) starts a one-node cluster: Debian's slurm-wlm and munge, installed once
# where apt-get and root are at hand; elsewhere that test is skipped with the reason.
if ! command -v slurmctld >/dev/null 2>&1 && ! [ -x /usr/sbin/slurmctld ] || ! [ -x /usr/sbin/munged ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  else
    echo "setup_env: slurm-wlm and munge are not installed (needs root and apt-get); tests/slurm will be skipped" >&2
  fi
fi
