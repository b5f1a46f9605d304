"""Start-up CPU of a trainer rank: the entry point's imports and plain data parallelism's process
groups, beside a bare ``import torch`` measured in the same run.

    python bench/startup_cpu.py [--repeats 3]

Each figure is a fresh interpreter, as every torchrun or srun rank starts, and its user+sys CPU
seconds (the cores are shared: wall time would count the neighbours); median of the repeats. The
groups are made in a world of one (gloo): torch's, as plain data parallelism makes them, and
megatron-core's (``parallel.ddp_impl=megatron``, and what every data-parallel rank imported and made
before 2026-12-02; docs/DESIGN.md, "The parallel plan").
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from harness import repeats_parser

# One measurement in a fresh interpreter: CPU seconds after ``import torch``, after the entry point's
# import and after the groups of argv[1] ("none", "torch" or "megatron"), as JSON.
_PROBE = r"""
import json, os, sys
cpu = lambda: round(os.times().user + os.times().system, 3)
import torch
seconds = {"torch": cpu()}
groups = sys.argv[1]
if groups != "none":
    import megatron_cosmos3.training.train
    seconds["entry_point"] = cpu()
    import torch.distributed as dist
    from megatron_cosmos3.model.config import MoTConfig
    from megatron_cosmos3.parallel.sizes import ParallelSizes
    from megatron_cosmos3.parallel.state import initialize_parallel
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ddp_impl = "megatron" if groups == "megatron" else "torch"
    initialize_parallel(ParallelSizes(ddp_impl=ddp_impl), MoTConfig())
    seconds["groups"] = cpu()
print(json.dumps(seconds))
"""


def probe(groups: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _PROBE, groups], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    args = repeats_parser(__doc__).parse_args()
    runs = {groups: [probe(groups) for _ in range(args.repeats)] for groups in ("none", "torch", "megatron")}

    def median(groups: str, point: str) -> float:
        return statistics.median(run[point] for run in runs[groups])

    torch_alone = median("none", "torch")
    rows = [
        ("import torch", torch_alone),
        ("import megatron_cosmos3.training.train", median("torch", "entry_point")),
        ("+ plain data parallelism's groups (torch's)", median("torch", "groups")),
        ("+ megatron-core's groups (ddp_impl=megatron)", median("megatron", "groups")),
    ]
    print(f"fresh interpreters, user+sys CPU seconds, median of {args.repeats}")
    print("| start-up up to | CPU s | / import torch |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / torch_alone:.2f} |")


if __name__ == "__main__":
    main()
