#!/usr/bin/env bash
# The main job on one machine: sets up the environment if needed, then trains the tiny MoT with
# 2 data-parallel processes on CPU (gloo) on generated-world shards — MLflow run and sharded
# checkpoints under outputs/demo — and generates a few clips with sound and a policy trajectory plot
# from the trained checkpoint (outputs/demo/generated).
# Extra arguments are config overrides, e.g.: bash launch/train_demo.sh steps=100 optimizer.lr=1e-3
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/launch/setup_env.sh"
cd "$repo_root"
# The generated world the demo trains on, as mp4 clips with their sound muxed in (the path real
# video takes; the pooled latents are encoded from the decoded mp4): written once (about a minute),
# then reused.
if [ ! -f outputs/world/latent/index.json ]; then
  python data_pipelines/generate_world.py outputs/world --samples 256 --latents pooled --workers 2 --video-format mp4
fi
# A held-out world (another seed; 4 shards, so each data rank reads some): held-out loss,
# generation samples, and the inputs generated from.
if [ ! -f outputs/world-heldout/latent/index.json ]; then
  python data_pipelines/generate_world.py outputs/world-heldout --samples 32 --shard-size 8 --seed 1 --latents pooled \
    --video-format mp4
fi
nproc="${NPROC_PER_NODE:-2}"
# One intra-op thread per process: 2 processes on a 2-core box must not oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The demo's own folder, named here (not in the config): running it again resumes it.
torchrun --standalone --nproc-per-node "$nproc" -m megatron_cosmos3.training.train \
  --config configs/tiny_cpu.yaml checkpoint.directory=outputs/demo/checkpoints \
  tracking.tracking_uri=outputs/demo/mlflow.db tracking.run_name=tiny-mot-cpu "$@"
# What the trained model makes from held-out inputs: text->audio+video, image->video, video->audio
# and a policy trajectory (data_pipelines/export_requests.py writes the request file once: it never
# writes into a folder that holds files, and the held-out world is reused, so a re-run reuses them).
if [ ! -f outputs/demo/requests/requests.jsonl ]; then
  python data_pipelines/export_requests.py outputs/world-heldout/raw outputs/demo/requests
fi
cosmos3-generate --checkpoint outputs/demo/checkpoints --requests outputs/demo/requests/requests.jsonl \
  --out outputs/demo/generated --overwrite
# The trained model measured in a held-out world (docs/DESIGN.md, "Evaluation"): outputs/demo/eval/
# report.json (every metric beside its oracle and chance rows), side-by-side clips in media/, and the
# eval/* metrics in the demo's MLflow store.
cosmos3-eval --checkpoint outputs/demo/checkpoints --out outputs/demo/eval --overwrite --config configs/eval/suite.yaml \
  --tracking-uri outputs/demo/mlflow.db --experiment megatron_cosmos3-demo --run-name tiny-mot-cpu-eval
