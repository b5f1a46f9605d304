#!/usr/bin/env bash
# The main job on one machine: sets up the environment if needed, then trains the tiny MoT with
# 2 data-parallel processes on CPU (gloo) on generated-world shards — MLflow run and sharded
# checkpoints under outputs/demo.
# Extra arguments are config overrides, e.g.: bash launch/train_demo.sh steps=100 optimizer.lr=1e-3
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
# The generated world the demo trains on: written once (about half a minute), then reused.
if [ ! -f outputs/world/latent/index.json ]; then
  python data_pipelines/generate_world.py outputs/world --samples 256 --latents pooled --workers 2
fi
nproc="${NPROC_PER_NODE:-2}"
# One intra-op thread per process: 2 processes on a 2-core box must not oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The demo's own folder, named here (not in the config): running it again resumes it.
exec torchrun --standalone --nproc-per-node "$nproc" -m megatron_cosmos3.training.train \
  --config configs/tiny_cpu.yaml checkpoint.directory=outputs/demo/checkpoints \
  tracking.tracking_uri=outputs/demo/mlflow.db tracking.run_name=tiny-mot-cpu "$@"
