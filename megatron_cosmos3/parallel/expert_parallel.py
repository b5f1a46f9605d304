"""Expert parallelism: the experts of every MoE MLP are spread over the expert-parallel ranks.

megatron-core's MoE layer cannot run on CPU (its router moves weights to CUDA unconditionally and
its all-to-all dispatcher creates CUDA streams), so dispatch is PyTorch-native here: each routed
token copy travels by all-to-all to the rank owning its expert and comes back the same way.

Expert-parallel ranks are data-parallel ranks (different micro-batches, same non-expert weights),
so expert weights are *not* replicated across them: DDP must leave them alone
(``expert_parameter_names``), and their gradients — which already hold every rank's tokens —
are only scaled by 1/data-parallel size to match DDP's averaging of the other parameters
(``finalize_expert_grads``), then summed over the ranks that hold the same experts, if any.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.parallel.collectives import all_to_all, exchange_counts
from megatron_cosmos3.parallel.state import ParallelGroups

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


class AllToAllDispatcher:
    """Sends each token copy to the rank that holds its expert (experts are blocked by rank)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def dispatch(self, features: torch.Tensor, experts: torch.Tensor, num_experts: int):
        per_rank = num_experts // self.num_ranks
        # ``experts`` is sorted, so copies for each destination are contiguous and in rank order.
        send = torch.bincount(experts // per_rank, minlength=self.num_ranks)
        recv = exchange_counts(send, self.group)
        send = send.tolist()
        received = all_to_all(features, send, recv, self.group)
        received_experts = all_to_all(experts[:, None], send, recv, self.group)[:, 0]
        # Received rows are sorted by expert within each source rank; the experts want one sort.
        order = received_experts.sort(stable=True).indices
        return received.index_select(0, order), received_experts.index_select(0, order), (order, send, recv)

    def combine(self, outputs: torch.Tensor, handle) -> torch.Tensor:
        order, send, recv = handle
        unsorted = torch.empty_like(outputs).index_copy(0, order, outputs)
        return all_to_all(unsorted, recv, send, self.group)


def moe_modules(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Keeps this rank's block of experts in every MoE MLP and installs the all-to-all dispatcher."""
    size = groups.sizes.expert
    if size == 1:
        return model
    rank = dist.get_rank(groups.expert)
    for moe in moe_modules(model):
        per_rank = moe.num_experts // size
        block = slice(rank * per_rank, (rank + 1) * per_rank)
        for name in EXPERT_PARAMETERS:
            local = replace_parameter(moe, name, getattr(moe, name).detach()[block])
            local.expert_parallel = True  # excluded from DDP; reduced by finalize_expert_grads
        moe.expert_offset = rank * per_rank
        moe.dispatcher = AllToAllDispatcher(groups.expert)
    return model


def replace_parameter(module: nn.Module, name: str, data: torch.Tensor) -> nn.Parameter:
    """Swaps ``module.<name>`` for a parameter holding a copy of ``data`` (a shard of it), keeping
    ``requires_grad`` and the attributes other parallelisms marked it with; returns the new one."""
    full = getattr(module, name)
    local = nn.Parameter(data.clone(), requires_grad=full.requires_grad)
    local.__dict__.update(full.__dict__)
    setattr(module, name, local)
    return local


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if getattr(p, "expert_parallel", False)]


def finalize_expert_grads(model: nn.Module, groups: ParallelGroups) -> None:
    """Matches the expert gradients to DDP's averaging of the replicated parameters (after backward)."""
    if groups.sizes.expert == 1:
        return
    data_size = dist.get_world_size(groups.data_and_context)
    replicated = dist.get_world_size(groups.expert_data) > 1
    for param in model.parameters():
        if getattr(param, "expert_parallel", False) and param.grad is not None:
            if replicated:
                dist.all_reduce(param.grad, group=groups.expert_data)
            param.grad.div_(data_size)
