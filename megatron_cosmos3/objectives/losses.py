"""The two objectives and their per-task breakdown.

* Reasoner: next-token cross-entropy on AR positions whose label is not IGNORE_INDEX.
* Generator: flow-matching MSE on the velocity of noisy DM targets only; clean conditioning tokens
  are selected out before the loss, so their targets get exactly zero gradient.

``total`` = mean CE + ``flow_matching_weight`` x mean FM over this micro-batch. The sums and counts
are returned too, so a trainer can normalise by global token counts across ranks and
accumulation steps. Under context parallelism one micro-batch is spread over a group of ranks:
``loss_breakdown(..., group=...)`` takes the means over the whole group's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_cosmos3.model.mot import MoTOutput
from megatron_cosmos3.model.packed_batch import PackedBatch


@dataclass
class LossBreakdown:
    total: torch.Tensor  # scalar, the thing to backpropagate
    ce_sum: torch.Tensor
    ce_count: torch.Tensor
    fm_sum: torch.Tensor
    fm_count: torch.Tensor
    # task -> {"ce_sum", "ce_count", "fm_sum", "fm_count"} (detached)
    per_task: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Losses of bf16/fp16 activations are taken in fp32; fp64 (equivalence tests) stays fp64.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cross_entropy_per_token(output: MoTOutput, batch: PackedBatch):
    """(losses, rows): CE of every labelled AR position, and the rows they came from."""
    rows = output.lm_logit_rows
    return F.cross_entropy(
        _at_least_fp32(output.lm_logits), batch.ar_labels.index_select(0, rows), reduction="none"
    ), rows


def flow_matching_per_token(predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], batch: PackedBatch):
    """(losses, rows): per-token velocity MSE (mean over the token's dims) of noisy DM targets."""
    losses, rows = [], []
    for key, index in batch.dm_token_index.items():
        noisy = batch.dm_noise_mask.index_select(0, index).nonzero().squeeze(1)
        prediction = _at_least_fp32(predictions[key].index_select(0, noisy))
        error = prediction - targets[key].index_select(0, noisy).to(prediction.dtype)
        losses.append(error.pow(2).mean(dim=-1))
        rows.append(index.index_select(0, noisy))
    device = batch.dm_noise_mask.device
    if not losses:
        return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(losses), torch.cat(rows)


def _per_task(batch: PackedBatch, sample_ids: torch.Tensor, losses: torch.Tensor, kind: str, into: dict) -> None:
    task_of_token = batch.sample_task.to(sample_ids.device).index_select(0, sample_ids)
    num_tasks = len(batch.task_names)
    sums = torch.zeros(num_tasks, device=losses.device, dtype=losses.dtype).index_add_(
        0, task_of_token, losses.detach()
    )
    counts = torch.bincount(task_of_token, minlength=num_tasks)
    for i, task in enumerate(batch.task_names):
        into.setdefault(task, {})[f"{kind}_sum"] = sums[i]
        into[task][f"{kind}_count"] = counts[i]


def _mean(total: torch.Tensor, count: int) -> torch.Tensor:
    # An empty objective contributes 0 but stays in the graph, so every rank runs the same backward.
    return total / count if count else total * 0.0


def mot_losses(
    model: torch.nn.Module, batch: PackedBatch, targets: dict[str, torch.Tensor], flow_matching_weight: float = 1.0
) -> LossBreakdown:
    """Runs the model (a MoTModel, or a wrapper such as DDP) on a noised batch; both objectives
    with their per-task parts."""
    return model_losses(model, batch, targets, partial(loss_breakdown, flow_matching_weight=flow_matching_weight))


def model_losses(
    model: torch.nn.Module, batch: PackedBatch, targets: dict[str, torch.Tensor], loss_fn: LossFunction
) -> LossBreakdown:
    """``loss_fn`` of the model's output on ``batch`` (``mot_losses`` with any loss function)."""
    output = model(batch)
    losses = loss_fn(output, batch, targets)
    # DDP (find_unused_parameters) waits for a gradient of every parameter reachable from the
    # forward's outputs. A pack without DM targets (or labels) leaves dm_hidden (or ar_hidden) out
    # of the loss, so those gradients would never come and the ranks would hang: tie every output
    # into the loss with weight zero (exact zeros, no numerical change).
    losses.total = losses.total + 0.0 * (output.ar_hidden.sum() + output.dm_hidden.sum())
    return losses


# What turns a model output into losses: ``loss_breakdown`` with its flow-matching weight bound,
# called as loss_fn(output, batch, targets[, group=...]).
LossFunction = Callable[..., "LossBreakdown"]


def loss_breakdown(
    output: MoTOutput,
    batch: PackedBatch,
    targets: dict[str, torch.Tensor],
    flow_matching_weight: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> LossBreakdown:
    """Both objectives of ``output`` (the model's output on ``batch``) with their per-task parts.

    ``group``: ranks that each hold a disjoint part of one micro-batch (context parallel; ``batch``
    is this rank's part). The means are then over the whole group's tokens: ``total`` has the value
    of the whole micro-batch's loss on every rank, and the gradient of group-size x this rank's
    share (Megatron's convention), so gradients *averaged* over the group — as DDP averages over the
    data-and-context ranks — are those of the whole loss. Sums, counts and per-task parts stay this
    rank's share: summed over all ranks (as the metrics do) each token counts once.
    """
    ce, ce_rows = cross_entropy_per_token(output, batch)
    fm, fm_rows = flow_matching_per_token(output.dm_predictions, targets, batch)
    per_task: dict[str, dict[str, torch.Tensor]] = {}
    _per_task(batch, output.layout.sample_ids("ar").index_select(0, ce_rows), ce, "ce", per_task)
    _per_task(batch, output.layout.sample_ids("dm").index_select(0, fm_rows), fm, "fm", per_task)
    ce_sum, fm_sum = ce.sum(), fm.sum()
    if group is None:
        total = _mean(ce_sum, ce.numel()) + flow_matching_weight * _mean(fm_sum, fm.numel())
    else:
        total = _group_mean(ce_sum, ce.numel(), fm_sum, fm.numel(), flow_matching_weight, group)
    return LossBreakdown(
        total=total,
        ce_sum=ce_sum.detach(),
        ce_count=torch.tensor(ce.numel()),
        fm_sum=fm_sum.detach(),
        fm_count=torch.tensor(fm.numel()),
        per_task=per_task,
    )


def _group_mean(
    ce_sum: torch.Tensor,
    ce_count: int,
    fm_sum: torch.Tensor,
    fm_count: int,
    flow_matching_weight: float,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    # One all-reduce of [ce_sum, fm_sum, ce_count, fm_count]; float64 keeps the counts exact.
    parts = torch.stack(
        [
            ce_sum.detach().double(),
            fm_sum.detach().double(),
            torch.tensor(float(ce_count), dtype=torch.float64, device=ce_sum.device),
            torch.tensor(float(fm_count), dtype=torch.float64, device=ce_sum.device),
        ]
    )
    dist.all_reduce(parts, group=group)
    group_ce_count, group_fm_count = int(parts[2]), int(parts[3])
    share = _mean(ce_sum, group_ce_count) + flow_matching_weight * _mean(fm_sum, group_fm_count)
    whole = _mean(parts[0], group_ce_count) + flow_matching_weight * _mean(parts[1], group_fm_count)
    # The whole micro-batch's loss as the value, group-size x this rank's share as the gradient.
    scaled = share * dist.get_world_size(group)
    return scaled + (whole.to(scaled.dtype) - scaled).detach()
