#!/usr/bin/env bash
# The GPU image's smoke test (README, "Optional GPU fast paths"): every GPU path imports
# (launch/gpu_imports.py), Transformer Engine is selected on this GPU for the linears and the
# attention, and the trainer runs 10 steps on synthetic packs with them in bf16, then in fp8 where
# the GPU has fp8 — on one GPU, or TP=2 with NPROC=2. Exits non-zero at the first failure.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
nproc="${NPROC:-1}"
python launch/gpu_imports.py
python - <<'PY'
import torch
from megatron_cosmos3.model.attention import attention_backend
from megatron_cosmos3.model.transformer_engine import select_linear_impl
cuda = torch.device("cuda")
assert select_linear_impl("te", cuda) == "te", "TE linears were not selected on this GPU"
assert attention_backend("te", cuda).name == "te", "TE attention was not selected on this GPU"
print("selected on", torch.cuda.get_device_name(0), ": TE linears and TE attention")
PY
fp8=$(python -c 'import torch; from megatron_cosmos3.training.precision import fp8_unavailable; print(fp8_unavailable(torch.device("cuda")) or "yes")')
tensor=1
[[ "$nproc" -ge 2 ]] && tensor=2
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for precision in bf16 fp8; do
    if [[ "$precision" == fp8 && "$fp8" != yes ]]; then
        echo "gpu_smoke: fp8 skipped: $fp8"
        continue
    fi
    torchrun --standalone --nproc-per-node "$nproc" -m megatron_cosmos3.training.train \
        data_source=synthetic steps=10 log_every=1 "precision=$precision" \
        model.linear_impl=te model.attention_backend=te model.hidden_size=128 model.head_dim=32 \
        "model.mrope_section=[8,4,4]" model.ffn_hidden_size=256 "parallel.tensor=$tensor" \
        tracking.enabled=false tracking.generation_samples=false \
        "checkpoint.directory=$out/$precision" checkpoint.save_every=10
    echo "gpu_smoke: 10 steps in $precision on $nproc GPU(s) (TP=$tensor) finished"
done
