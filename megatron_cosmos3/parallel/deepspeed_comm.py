"""DeepSpeed's communication layer over the process group this package already started, without
compiling anything (docs/DESIGN.md, "The DeepSpeed engine"). Imported only where DeepSpeed is used."""

from __future__ import annotations

import datetime
import weakref


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


def start_deepspeed_comm(timeout_s: float | None = None) -> None:
    """``deepspeed.comm`` over the already initialised torch.distributed world (no new process
    group, no compiled op); in one process without a group, only the op is kept off (DeepSpeed
    starts its own then).

    ``timeout_s``: how long the collectives of ZeRO's data-parallel group wait (the configured
    ``distributed.init_timeout_s``). DeepSpeed makes that group once per process, a clone of the
    world (``deepspeed.utils.groups._WORLD_GROUP``, made by ``_clone_world_group``), with torch's
    default timeout for a new group (30 minutes), not the world's: a rank waiting there for one
    that failed would wait that long. The clone is made here instead, with ``timeout_s``
    (``_timed_world_clone``)."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    without_shared_memory_op()
    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_init_required=False)
    if dist.is_initialized() and timeout_s is not None:
        _timed_world_clone(datetime.timedelta(seconds=timeout_s))


# The clones made by ``_timed_world_clone`` and their timeouts; weak: a group goes when its users do.
_CLONE_TIMEOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _timed_world_clone(timeout: datetime.timedelta) -> None:
    """DeepSpeed's clone of the world is one with ``timeout``: the one it holds where this function
    made it with that timeout and it is still registered, else a new one (collective: every rank
    calls it in the same order). Kept while alive, so that the engines of one process (a run's
    retries, the tests' many runs) share one group instead of leaving one each; replaced once torch
    has destroyed it with the world it cloned (DeepSpeed would still hand out the dead group)."""
    import deepspeed.utils.groups
    import torch.distributed as dist

    held = deepspeed.utils.groups._WORLD_GROUP
    if held is not None and _CLONE_TIMEOUTS.get(held) == timeout and _registered(held):
        return
    clone = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)
    _CLONE_TIMEOUTS[clone] = timeout
    deepspeed.utils.groups._WORLD_GROUP = clone


def _registered(group) -> bool:
    """Whether torch still knows ``group`` (``destroy_process_group`` forgets every group it ends)."""
    import torch.distributed as dist

    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True
