"""DeepSpeed's communication layer over the process group this package already started, without
compiling anything (docs/DESIGN.md, "The DeepSpeed engine"). Imported only where DeepSpeed is used."""

from __future__ import annotations


def without_shared_memory_op() -> None:
    """Keeps DeepSpeed's communication set-up on the CPU accelerator from compiling its shared-memory
    op (``deepspeed_shm_comm``: g++ for minutes, and a killed build leaves a lock in the torch
    extensions folder that hangs every later start).

    ``deepspeed.comm``'s ``TorchBackend`` builds that op whenever ``deepspeed.ops.__compatible_ops__``
    says it can; it serves only ``inference_all_reduce`` (tensor-parallel inference), never training
    collectives, which go through torch.distributed (gloo) either way. Marking it incompatible in
    that dict, which DeepSpeed caches once per process, makes ``build_shm_op`` return None. Call
    before ``deepspeed.init_distributed`` / ``deepspeed.initialize``."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def start_deepspeed_comm() -> None:
    """``deepspeed.comm`` over the already initialised torch.distributed world (no new process
    group, no compiled op); in one process without a group, only the op is kept off (DeepSpeed
    starts its own then)."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    without_shared_memory_op()
    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_init_required=False)
