"""Weights or optimizer moments holding NaN or inf are refused when they load, naming the tensor
(docs/DESIGN.md, "Checkpoints"): a model that can only produce NaN, whether it starts a training
stage (``stage.init_from``), resumes a run (with its AdamW moments: a NaN ``exp_avg_sq`` makes
every later update NaN) or generates (``release/trained.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cosmos3.checkpoint.sharded_state import local_optimizers


class NonFiniteWeightsError(ValueError):
    """Weights or optimizer state holding NaN or inf (a run that diverged, or a crafted file)."""


def require_finite_weights(
    model: torch.nn.Module,
    source: Path,
    field: str = "checkpoint",
    why: str = "these weights can only generate NaN",
    optimizer=None,
) -> None:
    """Raises NonFiniteWeightsError on every rank when any rank's part of ``model`` (or, given
    ``optimizer``, of its state: AdamW's moments) holds NaN or inf (collective inside a process
    group, so no rank goes on alone into the next collective). The message starts
    ``<field>=<source>`` (what named the weights), names the tensor and ends with ``why``. A
    parameter that DeepSpeed ZeRO-3 partitions is checked in the part this rank holds (``_held``)."""
    bad = next((f"parameter {name!r}" for name, param in model.named_parameters() if not _finite(_held(param))), None)
    bad = bad or _nonfinite_optimizer_state(model, optimizer)
    device = next(model.parameters()).device  # NCCL reduces on the GPU
    found = torch.tensor([bad is not None], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if found.item():
        where = f"{bad} holds NaN or inf values" if bad else "another rank's part holds NaN or inf values"
        raise NonFiniteWeightsError(f"{field}={source}: {where}; {why}")


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _nonfinite_optimizer_state(model: torch.nn.Module, optimizer) -> str | None:
    """'optimizer state <key> of parameter <name>' for the first state tensor this rank holds that
    is not finite, else None. A state the model has no name for (DeepSpeed's flat partitions) is
    named by its optimizer and position."""
    names = {param: name for name, param in model.named_parameters()}
    for inner in local_optimizers(optimizer):
        for position, (param, state) in enumerate(getattr(inner, "state", {}).items()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not _finite(value):
                    owner = names.get(param)
                    owner = f"parameter {owner!r}" if owner else f"#{position} of {type(inner).__name__}"
                    return f"optimizer state {key} of {owner}"
    return None


def _held(param: torch.nn.Parameter) -> torch.Tensor:
    """The values of ``param`` this rank holds. DeepSpeed ZeRO-3 partitions a parameter over the
    ranks: outside the forward it is empty, and this rank's part is its ``ds_tensor``."""
    return getattr(param, "ds_tensor", param)
