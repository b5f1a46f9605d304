"""The global gradient norm of a model whose parameters may be sharded, and clipping by it.

Both use torch's multi-tensor (``_foreach``) kernels: one launch per group of gradients of one
device and dtype instead of a few per parameter (what ``torch.nn.utils.clip_grad_norm_`` does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def global_grad_norm(parameters, groups=None) -> torch.Tensor:
    """sqrt of the sum of squares of every *global* gradient entry, the same on every rank.

    ``parameters``: this rank's parameters (a module's, or a pipeline rank's norm_parameters()).
    Replicated parameters count once; tensor-parallel shards are summed over the tensor group,
    expert blocks over the expert group and pipeline stages over the pipeline group, so the result
    equals the single-process norm.
    """
    parameters = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    # Sums of squares by how the parameter is split: [replicated, tensor only, tensor and expert
    # (experts under TP), expert only], accumulated on the gradients' device and read back once.
    with_grad = [p for p in parameters if p.grad is not None]
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    by_kind: list[list[torch.Tensor]] = [[], [], [], []]
    for param in with_grad:
        expert = getattr(param, "expert_parallel", False)
        kind = (1 + int(expert)) if getattr(param, "tensor_model_parallel", False) else (3 if expert else 0)
        by_kind[kind].append(param.grad.detach())
    sums = torch.stack([sum_of_squares(grads, device) for grads in by_kind])
    sums = sums.cpu()  # the collectives below are host-side (gloo; see training/distributed.py)
    replicated, tensor_sharded, expert_sharded = sums[0], sums[1:3].clone(), sums[3]
    if groups is not None and groups.sizes.tensor > 1:
        dist.all_reduce(tensor_sharded, group=groups.tensor)
    expert_sharded = expert_sharded + tensor_sharded[1]
    tensor_sharded = tensor_sharded[0]
    if groups is not None:
        if groups.sizes.expert > 1:
            dist.all_reduce(expert_sharded, group=groups.expert)
        if groups.sizes.pipeline > 1:  # each stage holds other layers
            total = replicated + tensor_sharded + expert_sharded
            dist.all_reduce(total, group=groups.pipeline)
            return total.sqrt()
    return (replicated + tensor_sharded + expert_sharded).sqrt()


def sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum over ``tensors`` of their squared entries, in float64 (0 for none): foreach norms, each
    taken in float64 as the per-entry sum was, then squared and added."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack(norms).square().sum()


def clip_grad_norm(parameters, max_norm: float, groups=None, norm_parameters=None) -> torch.Tensor:
    """Scales the gradients of ``parameters`` so the global norm is at most ``max_norm``; returns
    the norm before. ``norm_parameters`` (default: ``parameters``) are those counted in the norm."""
    parameters = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    norm = global_grad_norm(parameters if norm_parameters is None else norm_parameters, groups)
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0 and torch.isfinite(norm):
        grads = [param.grad for param in parameters if param.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
    return norm.float()
