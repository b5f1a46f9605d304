"""Which part of a parameter's global tensor this rank holds.

A parameter is whole (replicated), a tensor-parallel slice (megatron's ``tensor_model_parallel``
attributes: ``partition_dim``, and ``partition_stride`` for stacked blocks such as [gate; up]), an
expert-parallel block of experts (``expert_parallel``: dim 0), or an expert block split over FFN
units too. ``local_part`` cuts the global tensor the same way the parallel layers did, so weights
read from a single-process folder, or a single-process reference in a test, land on every rank as
the layers expect them.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_cosmos3.parallel.tensor_parallel import tensor_shard


def local_part(
    full: torch.Tensor,
    param: nn.Parameter,
    tensor_rank: int = 0,
    tensor_size: int = 1,
    expert_rank: int = 0,
    expert_size: int = 1,
) -> torch.Tensor:
    """This rank's part of ``full`` (the global tensor of ``param``): the whole tensor when replicated."""
    if getattr(param, "expert_parallel", False):
        full = full.chunk(expert_size, dim=0)[expert_rank]
    if getattr(param, "tensor_model_parallel", False):
        full = tensor_shard(full, param.partition_dim, tensor_rank, tensor_size, getattr(param, "partition_stride", 1))
    return full
