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
    # Expert weights differ across expert-parallel ranks: finalize_expert_grads reduces them instead.
    from megatron_cosmos3.parallel.expert_parallel import expert_parameter_names

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    # Packs differ per rank in which DM streams they hold, so some heads go unused on some ranks.
    return DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_cap_mb, find_unused_parameters=True)


class OptimizerGroup:
    """Several optimizers stepped as one: replicated parameters under ZeRO, expert parameters
    (different on every expert-parallel rank, so never partitioned or broadcast) under their own.

    ``param_groups`` lists every group of every optimizer, so a learning-rate schedule sets all.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build_optimizer(
    params,
    groups: ParallelGroups,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    shard_state: bool = True,
):
    """AdamW whose state is sharded over the data-parallel ranks (``shard_state``), else plain AdamW.

    ``params``: parameters, or param-group dicts (extra keys such as ``lr_multiplier`` are kept).
    Expert-parallel parameters are already sharded (each rank holds its own experts) and get a
    local AdamW of their own.
    """
    param_groups = list(params)
    if param_groups and not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]

    def split(expert: bool) -> list[dict]:
        selected = []
        for group in param_groups:
            chosen = [p for p in group["params"] if getattr(p, "expert_parallel", False) == expert]
            if chosen:
                selected.append({**group, "params": chosen})
        return selected

    replicated, experts = split(False), split(True)
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay)
    if shard_state and torch.distributed.get_world_size(groups.data_and_context) > 1:
        main = ZeroRedundancyOptimizer(
            replicated[0]["params"], optimizer_class=torch.optim.AdamW, process_group=groups.data_and_context, **kwargs
        )
        for group in replicated[0:1]:  # ZeRO takes the first group at construction, the rest added
            main.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        for group in replicated[1:]:
            main.add_param_group(group)
    else:
        main = torch.optim.AdamW(replicated, **kwargs)
    if not experts:
        return main
    return OptimizerGroup([main, torch.optim.AdamW(experts, **kwargs)])
