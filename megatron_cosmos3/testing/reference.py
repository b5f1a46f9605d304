"""Compare a parallel model with the single-process reference, parameter by parameter.

A sharded parameter (megatron's ``tensor_model_parallel`` attribute, an expert-parallel block, or
both) is compared with the matching slice of the reference tensor; a replicated one with the whole
tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_cosmos3.parallel.sharding import local_part

# A parameter whose reference gradient (or value) is below this fraction of the whole model's is
# compared against that floor instead of its own norm: a gradient that is zero in exact arithmetic
# (the Reasoner's q_norm when a sample's only AR token attends to itself alone) comes out as rounding
# noise (~1e-11 to 1e-8, larger in larger matrices) on both sides, and noise over noise is no
# relative error.
NEGLIGIBLE_FRACTION = 1e-3


def relative_difference(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor) (0 when both are zero): insensitive to the
    summation-order noise of single elements that a different reduction order (e.g. row-parallel
    partial sums) causes."""
    got, want = got.detach().double(), want.detach().double()
    norm = max(float(want.norm()), floor)
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
    """{parameter name: relative difference} of grads (``what="grad"``) or values (``"data"``),
    each relative to its own norm or, if that is negligible, to ``NEGLIGIBLE_FRACTION`` of the whole
    reference's norm."""

    def of(param: nn.Parameter) -> torch.Tensor | None:
        return param.grad if what == "grad" else param.data

    reference_params = dict(reference.named_parameters())
    whole = [of(p).detach().double() for p in reference_params.values() if of(p) is not None]
    whole_norm = float(torch.stack([t.norm() for t in whole]).norm()) if whole else 0.0
    floor = NEGLIGIBLE_FRACTION * whole_norm
    differences = {}
    for name, param in model.named_parameters():
        got, want = of(param), of(reference_params[name])
        if got is None or want is None:
            if (got is None) != (want is None):
                differences[name] = float("inf")
            continue
        differences[name] = relative_difference(
            got, local_part(want, param, tensor_rank, tensor_size, expert_rank, expert_size), floor
        )
    return differences
