"""Process-group set-up from the launcher's environment (torchrun, or SLURM's srun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_env() -> tuple[int, int, int] | None:
    if "WORLD_SIZE" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:  # srun, one task per GPU
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("srun launch: set MASTER_ADDR to the first node (see slurm/train.sbatch)")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return None


def init_distributed() -> DistributedContext:
    """Initialises the default process group (NCCL + gloo on GPUs, gloo on CPUs); single process if unlaunched."""
    launched = _launcher_env()
    rank, world_size, local_rank = launched or (0, 1, 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched and not dist.is_initialized():
        # On GPUs, CUDA tensors go through NCCL and the small host-side collectives (metric sums,
        # finiteness flags, grad-norm partial sums, pickled packs and loader state) through gloo:
        # NCCL takes no CPU tensors. Every group made later inherits both.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method="env://")
    return DistributedContext(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values
