"""Compare a parallel model with the single-process reference, parameter by parameter.

A sharded parameter (megatron's ``tensor_model_parallel`` attribute, an expert-parallel block, or
both) is compared with the matching slice of the reference tensor; a replicated one with the whole
tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_cosmos3.parallel.sharding import local_part


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (0 when both are zero): insensitive to the summation-order noise
    of single elements that a different reduction order (e.g. row-parallel partial sums) causes."""
    got, want = got.detach().double(), want.detach().double()
    norm = want.norm()
    if norm == 0:
        return float(got.norm())
    return float((got - want).norm() / norm)


def compare_to_reference(
    model: nn.Module,
    reference: nn.Module,
    tensor_rank: int = 0,
    tensor_size: int = 1,
    what: str = "grad",
    expert_rank: int = 0,
    expert_size: int = 1,
) -> dict[str, float]:
    """{parameter name: max relative difference} of grads (``what="grad"``) or values (``"data"``)."""
    reference_params = dict(reference.named_parameters())
    differences = {}
    for name, param in model.named_parameters():
        got = param.grad if what == "grad" else param.data
        want = reference_params[name].grad if what == "grad" else reference_params[name].data
        if got is None or want is None:
            if (got is None) != (want is None):
                differences[name] = float("inf")
            continue
        differences[name] = relative_difference(
            got, local_part(want, param, tensor_rank, tensor_size, expert_rank, expert_size)
        )
    return differences
