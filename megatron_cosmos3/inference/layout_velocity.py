"""Velocity predictions of a whole pack when the model is split over ranks by its layers (pipeline)
or its rows (context / sequence parallelism), for sampling during training.

The cached sampler (``denoising.sample_dm_tokens``) keeps one AR pass and runs only the Generator per
step; a split model has no single rank that could. Here every denoising step is one forward-only
pass through the layout's own driver — the pipeline schedule or the row-split runner — which gives
the same velocities (the AR keys and values never depend on DM inputs). Each rank's rows of each DM
stream are summed into the whole stream over the split group (disjoint rows: an exact gather), and
the last pipeline stage broadcasts them to the other stages, so every rank holds the same tokens for
the next step. All ranks of the model-parallel group must call it together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_cosmos3.model.mot import MoTModel, MoTOutput
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.objectives.losses import loss_breakdown
from megatron_cosmos3.parallel.context_parallel import (
    ContextShard,
    SequenceSplit,
    sequence_split,
    shard_pack,
    split_forward,
)
from megatron_cosmos3.parallel.pipeline import PipelineStages
from megatron_cosmos3.parallel.pipeline_schedules import forward_backward
from megatron_cosmos3.parallel.state import ParallelGroups

Velocity = Callable[[PackedBatch], dict[str, torch.Tensor]]


def _whole_streams(
    batch: PackedBatch, local: dict[str, torch.Tensor], split: SequenceSplit, shard: ContextShard | None = None
) -> dict[str, torch.Tensor]:
    """This rank's predictions (the rows of each stream that ``shard`` holds; computed when not given)
    -> every stream's predictions, on every rank of ``split.group``."""
    shard = shard or shard_pack(batch, dist.get_rank(split.group), dist.get_world_size(split.group))
    whole = {}
    for key, rows in shard.dm_stream_rows.items():
        prediction = local[key]
        full = prediction.new_zeros(batch.dm_tokens[key].shape[0], prediction.shape[1])
        full[rows] = prediction
        dist.all_reduce(full, group=split.group)
        whole[key] = full
    return whole


def layout_velocity(
    model: MoTModel, stages: PipelineStages | None, groups: ParallelGroups, targets: dict[str, torch.Tensor]
) -> Velocity:
    """The whole pack's velocity predictions under the layout of ``groups`` (module doc).
    ``targets``: the pack's velocity targets (the pipeline's last stage computes a loss it ignores)."""
    split = sequence_split(groups)

    def through_split(batch: PackedBatch) -> dict[str, torch.Tensor]:
        output, shard = split_forward(model, batch, split)
        return _whole_streams(batch, output.dm_predictions, split, shard)

    def through_pipeline(batch: PackedBatch) -> dict[str, torch.Tensor]:
        outputs: list[MoTOutput] = []

        def record(output, *args, **kwargs):
            outputs.append(output)
            return loss_breakdown(output, *args, **kwargs)

        forward_backward(stages, [(batch, targets)], record, forward_only=True, split=split)
        if outputs:  # the last stage: whole streams, in fp32 (autocast may have made them bf16)
            local = outputs[0].dm_predictions
            whole = _whole_streams(batch, local, split) if split is not None else local
            whole = {key: whole[key].float() for key in batch.dm_tokens}
        else:
            whole = {key: torch.empty(tokens.shape, dtype=torch.float32) for key, tokens in batch.dm_tokens.items()}
        last = dist.get_global_rank(groups.pipeline, groups.sizes.pipeline - 1)
        for key in batch.dm_tokens:  # the same order on every rank
            whole[key] = whole[key].to(batch.dm_tokens[key].device).contiguous()
            dist.broadcast(whole[key], src=last, group=groups.pipeline)
        return whole

    if stages is not None:
        return through_pipeline
    if split is not None:
        return through_split
    raise ValueError("layout_velocity: the layout splits neither layers nor rows; use the cached sampler")
