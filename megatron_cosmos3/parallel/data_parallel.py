"""Data parallelism: bucketed gradient all-reduce overlapped with backward, sharded optimizer state.

megatron-core's DistributedDataParallel and DistributedOptimizer allocate their contiguous gradient
buffers on CUDA, overlap through CUDA streams and type-check ``torch.cuda.*Tensor`` parameters, so
they cannot run on a CPU (gloo) at all. The PyTorch-native pair used instead gives the same
semantics on both CPU and GPU: ``DistributedDataParallel`` (gradient buckets all-reduced as soon as
they are ready, i.e. overlapped with the rest of the backward pass) and ``ZeroRedundancyOptimizer``
(each data-parallel rank keeps the optimizer state of its share of the parameters only — ZeRO-1,
what Megatron's distributed optimizer shards — and broadcasts its updated parameters).

Gradients are averaged over the data-and-context group: context-parallel ranks hold replicas of
the same parameters too. Each rank's loss is the mean over its own micro-batch, so the step equals
one process averaging the per-micro-batch mean losses of all ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from megatron_cosmos3.parallel.state import ParallelGroups


def wrap_data_parallel(model: nn.Module, groups: ParallelGroups, bucket_cap_mb: float = 25.0) -> nn.Module:
    """DDP over the data(-and-context) group; the model itself when that group has one rank."""
    group = groups.data_and_context
    if torch.distributed.get_world_size(group) == 1:
        return model
    # Packs differ per rank in which DM streams they hold, so some heads go unused on some ranks.
    return DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_cap_mb,
                                   find_unused_parameters=True)


def build_optimizer(params, groups: ParallelGroups, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    weight_decay: float = 0.0, shard_state: bool = True) -> torch.optim.Optimizer:
    """AdamW whose state is sharded over the data-parallel ranks (``shard_state``), else plain AdamW."""
    params = list(params)
    if shard_state and torch.distributed.get_world_size(groups.data_and_context) > 1:
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=groups.data_and_context,
                                       lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
