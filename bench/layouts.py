"""Step time and peak memory per rank of the trainer under each parallel layout (2 or 4 ranks).

Every layout trains the same tiny MoT on the same global batch (2 packs per step) for a few steps;
the single-process run is the baseline measured in the same invocation. Peak memory is rank 0's
resident set (CPU) or allocated memory (GPU).

    python bench/layouts.py [--steps 20] [--hidden 128] [--layers 4] [--only "PP=2 (1F1B)" "TP=2"]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
from harness import device_description, scaled_mrope_section

BASELINE = "1 process (baseline)"
LAYOUTS = {
    BASELINE: (1, []),
    "DP=2 + ZeRO": (2, ["optimizer.micro_batches_per_step=1"]),
    "TP=2": (2, ["parallel.tensor=2"]),
    "TP=2 + SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "PP=2 (1F1B)": (2, ["parallel.pipeline=2"]),
    "PP=2 x VPP=2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    # Uneven stages: the first rank (embeddings, ViT) holds 1 layer, the last the rest (the heads).
    "PP=2 uneven (first 1)": (2, ["parallel.pipeline=2", "parallel.num_layers_in_first_pipeline_stage=1"]),
    "CP=2": (2, ["parallel.context=2"]),
    "TP=2 x PP=2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "TP=2 x CP=2": (4, ["parallel.tensor=2", "parallel.context=2"]),
    "PP=2 x CP=2": (4, ["parallel.pipeline=2", "parallel.context=2"]),
    "TP=2 + SP x PP=2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"]),
    "TP=2 + SP x CP=2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2"]),
}
LINE = re.compile(r"step (\d+)/\d+ .* step ([0-9.]+)s .*?peak (\d+) MB")


def run(nproc: int, extra: list[str], args, workdir: str) -> tuple[float, float]:
    head = args.hidden // 8
    t, h, w = scaled_mrope_section(head)
    overrides = [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        "model.num_attention_heads=8",
        "model.num_kv_heads=4",
        f"model.head_dim={head}",
        f"model.mrope_section=[{t},{h},{w}]",
        f"model.ffn_hidden_size={4 * args.hidden}",
        "data_source=synthetic",
        "synthetic.samples_per_pack=8",
        "synthetic.scale=2",
        "optimizer.micro_batches_per_step=2",
        f"steps={args.steps}",
        f"log_every={args.steps // 2}",
        "checkpoint.save_every=100000",
        "tracking.enabled=false",
        f"checkpoint.directory={workdir}/{abs(hash(tuple(extra)))}-{nproc}",
        *extra,
    ]
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    result = subprocess.run(
        [*launcher, "-m", "megatron_cosmos3.training.train", *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    last = [m for m in LINE.finditer(result.stderr + result.stdout)][-1]  # the second half: warm
    return float(last.group(2)), float(last.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=list(LAYOUTS), help="these layouts (the baseline always runs)")
    args = parser.parse_args()
    # The ranks run in their own processes: the machine's cores, not this process's threads, count.
    device = device_description(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"device: {device}; {os.cpu_count()} cores; hidden {args.hidden}, {args.layers} layers, "
        f"global batch 2 packs of 8 synthetic samples; mean over the last {args.steps // 2} steps"
    )
    print(f"{'layout':<22} {'ranks':>5} {'s/step':>8} {'vs baseline':>12} {'peak MB (rank 0)':>17}")
    baseline = None
    with tempfile.TemporaryDirectory() as workdir:
        chosen = [name for name in LAYOUTS if args.only is None or name in args.only or name == BASELINE]
        for name in chosen:
            nproc, extra = LAYOUTS[name]
            seconds, peak = run(nproc, extra, args, workdir)
            baseline = baseline or seconds
            print(f"{name:<22} {nproc:>5} {seconds:>8.3f} {seconds / baseline:>11.2f}x {peak:>17.0f}", flush=True)


if __name__ == "__main__":
    main()
