# shellcheck shell=bash disable=SC2034 # container: read by the batch scripts that source this file
# Sourced by the batch scripts of slurm/ once they have found the repository (see train.sbatch):
# sets COSMOS3_REPO to it, enters it, and activates the Python environment — the project's .venv
# (or COSMOS3_ACTIVATE), or, with COSMOS3_CONTAINER=<image>, a pyxis/enroot container that srun
# starts with the repository mounted (the `container` array holds srun's options for it).
COSMOS3_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COSMOS3_REPO
cd "$COSMOS3_REPO" || return
container=()
if [ -n "${COSMOS3_CONTAINER:-}" ]; then
  container=(--container-image="$COSMOS3_CONTAINER" --container-mounts="$COSMOS3_REPO:$COSMOS3_REPO"
    --container-workdir="$COSMOS3_REPO")
elif [ -f "${COSMOS3_ACTIVATE:-$COSMOS3_REPO/.venv/bin/activate}" ]; then
  # shellcheck disable=SC1090
  source "${COSMOS3_ACTIVATE:-$COSMOS3_REPO/.venv/bin/activate}"
fi
