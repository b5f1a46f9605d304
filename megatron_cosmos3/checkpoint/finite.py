"""Weights holding NaN or inf are refused when they load, naming the parameter (docs/DESIGN.md,
"Checkpoints"): a model that can only produce NaN, whether it starts a training stage
(``stage.init_from``) or generates (``release/trained.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or inf (a run that diverged, or a crafted file)."""


def require_finite_weights(
    model: torch.nn.Module, source: Path, field: str = "checkpoint", why: str = "these weights can only generate NaN"
) -> None:
    """Raises NonFiniteWeightsError on every rank when any rank's part of ``model`` holds NaN or inf
    (collective inside a process group, so no rank goes on alone into the next collective). The
    message starts ``<field>=<source>`` (what named the weights) and ends with ``why``. A parameter
    that DeepSpeed ZeRO-3 partitions is checked in the part this rank holds (``_held``)."""
    bad = next((name for name, param in model.named_parameters() if not torch.isfinite(_held(param)).all()), None)
    device = next(model.parameters()).device  # NCCL reduces on the GPU
    found = torch.tensor([bad is not None], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if found.item():
        where = f"parameter {bad!r} holds NaN or inf values" if bad else "another rank's part holds NaN or inf values"
        raise NonFiniteWeightsError(f"{field}={source}: {where}; {why}")


def _held(param: torch.nn.Parameter) -> torch.Tensor:
    """The values of ``param`` this rank holds. DeepSpeed ZeRO-3 partitions a parameter over the
    ranks: outside the forward it is empty, and this rank's part is its ``ds_tensor``."""
    return getattr(param, "ds_tensor", param)
