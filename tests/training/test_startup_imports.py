"""What a trainer process imports on its way to the first step (docs/DESIGN.md, "Preemption and
requeue", on start-up): every rank of every attempt pays for each import, so libraries that only
some runs use are imported where they are used. Checked in a fresh interpreter, by what is in
``sys.modules``, never by timing."""

import json
import subprocess
import sys

# Imported only by the runs that use them: the ViT (transformers), tracking on rank 0 (MLflow),
# engine=deepspeed, media files (PyAV), sample plots (matplotlib), sound and metrics (scipy), ZeRO's
# sharded optimizer state (torch.distributed.optim), and megatron-core where a layout needs its groups.
LAZY = (
    "av",
    "deepspeed",
    "diffusers",
    "matplotlib",
    "megatron",
    "mlflow",
    "scipy",
    "torch.distributed.optim",
    "transformers",
)

_START_UP = r"""
import json, sys
import torch.distributed as dist
import megatron_cosmos3.training.train  # what `python -m megatron_cosmos3.training.train` imports
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

lazy = sys.argv[1].split(",")
loaded = lambda: [name for name in lazy if name in sys.modules]
report = {"entry_point": loaded()}
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
initialize_parallel(ParallelSizes(), MoTConfig())
report["plain_data_parallel"] = loaded()
destroy_parallel()
initialize_parallel(ParallelSizes(ddp_impl="megatron"), MoTConfig())  # megatron-core's DDP reads its groups
from megatron.core import parallel_state
report["megatron_groups"] = parallel_state.model_parallel_is_initialized()
report["after_megatron_groups"] = loaded()
print(json.dumps(report))
"""


def test_the_entry_point_and_plain_data_parallel_import_no_library_only_some_runs_use():
    done = subprocess.run(
        [sys.executable, "-c", _START_UP, ",".join(LAZY)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["entry_point"] == []
    assert report["plain_data_parallel"] == []
    # Control: megatron-core still makes the groups where megatron-core's parts use them, and the
    # check sees that import.
    assert report["megatron_groups"] is True
    assert "megatron" in report["after_megatron_groups"]
