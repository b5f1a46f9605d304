"""Process groups for a validated ParallelSizes, built by megatron-core's parallel_state.

Model and runner code receive a ``ParallelGroups`` and read groups from it; nothing below the
training entry point reaches for global parallel state. Plain data parallelism (every other size 1,
torch's DDP) needs none of megatron-core's: its groups are one of every rank and, for each rank, one
of that rank alone, which torch makes directly without importing megatron-core (docs/DESIGN.md,
"The parallel plan": seconds of CPU on every rank's start).
"""

from __future__ import annotations

import datetime
import sys
import warnings
from dataclasses import dataclass

import torch.distributed as dist

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.parallel.sizes import ParallelSizes

# Imported by whatever makes megatron-core's groups (``megatron.core`` imports it too).
_PARALLEL_STATE_MODULE = "megatron.core.parallel_state"


def _parallel_state():
    with warnings.catch_warnings():  # megatron-core warns about missing TE/apex on import; expected on CPU
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state
    return parallel_state


@dataclass
class ParallelGroups:
    sizes: ParallelSizes
    tensor: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    context: dist.ProcessGroup
    tensor_and_context: dist.ProcessGroup  # tensor rank fastest: one micro-batch's rows under SP x CP
    data: dist.ProcessGroup  # data-parallel ranks only
    data_and_context: dist.ProcessGroup  # where replicated gradients are reduced (DP x CP)
    expert: dist.ProcessGroup
    expert_data: dist.ProcessGroup  # ranks holding the same experts (expert weights reduced here)
    tensor_rank: int
    pipeline_rank: int
    context_rank: int
    data_rank: int
    data_size: int
    # First and last pipeline stage (Megatron's embedding group): where parameters used at both ends
    # of the pipeline (DM stream projections, tied word embeddings) have their gradients summed.
    # None on the other stages.
    embedding: dist.ProcessGroup | None = None
    # Every rank that trains on this rank's data (its tensor, context and pipeline peers, Megatron's
    # model-parallel ranks plus CP), and the global rank among them that reads it and shares it.
    same_data: dist.ProcessGroup | None = None
    data_reader: int = 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.sizes.pipeline - 1


MEGATRON_TIMEOUT_MINUTES = 30  # megatron-core's own default for its groups


def initialize_parallel(
    sizes: ParallelSizes, model: MoTConfig, num_experts: int = 0, timeout_s: float | None = None
) -> ParallelGroups:
    """Validates the layout against the world and the model, then creates every group (collective).
    ``timeout_s``: how long the groups' collectives wait (the configured ``distributed.init_timeout_s``;
    None: megatron-core's 30 minutes), as the world's do: a rank waiting in one for a rank that
    failed is released by it (docs/DESIGN.md, "The parallel plan")."""
    sizes.validate(dist.get_world_size(), model, num_experts)
    if data_parallel_only(sizes):
        return _data_parallel_groups(sizes, timeout_s)
    return _megatron_groups(sizes, timeout_s)


def data_parallel_only(sizes: ParallelSizes) -> bool:
    """Whether every rank holds the whole model and torch's DDP averages its gradients: nothing of
    megatron-core runs, and its groups would be the whole world's and single ranks'."""
    split = (sizes.tensor, sizes.pipeline, sizes.virtual_pipeline, sizes.context, sizes.expert)
    return split == (1, 1, 1, 1, 1) and not sizes.sequence_parallel and sizes.ddp_impl == "torch"


def _data_parallel_groups(sizes: ParallelSizes, timeout_s: float | None) -> ParallelGroups:
    """The groups megatron-core makes for ``data_parallel_only`` sizes (collective): the data groups
    hold every rank in rank order, every model-parallel group (and the embedding group of a single
    pipeline stage) only this rank; each a group of its own, as megatron-core's, with its timeout."""
    timeout = datetime.timedelta(minutes=MEGATRON_TIMEOUT_MINUTES if timeout_s is None else timeout_s / 60)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def whole_world() -> dist.ProcessGroup:
        return dist.new_group(list(range(world_size)), timeout=timeout)

    def this_rank_alone() -> dist.ProcessGroup:
        return dist.new_subgroups(1, timeout=timeout)[0]  # every rank makes every rank's: collective

    return ParallelGroups(
        sizes=sizes,
        tensor=this_rank_alone(),
        pipeline=this_rank_alone(),
        context=this_rank_alone(),
        tensor_and_context=this_rank_alone(),
        data=whole_world(),
        data_and_context=whole_world(),
        expert=this_rank_alone(),
        expert_data=whole_world(),
        tensor_rank=0,
        pipeline_rank=0,
        context_rank=0,
        data_rank=rank,
        data_size=world_size,
        embedding=this_rank_alone(),
        **_same_data_group(rank, timeout_s),
    )


def _megatron_groups(sizes: ParallelSizes, timeout_s: float | None) -> ParallelGroups:
    """Every group of ``sizes`` from megatron-core's ``initialize_model_parallel`` (collective)."""
    ps = _parallel_state()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline if sizes.virtual_pipeline > 1 else None,
        context_parallel_size=sizes.context,
        expert_model_parallel_size=sizes.expert,
        order="tp-cp-ep-dp-pp",
        distributed_timeout_minutes=MEGATRON_TIMEOUT_MINUTES if timeout_s is None else timeout_s / 60,
    )
    return ParallelGroups(
        sizes=sizes,
        tensor=ps.get_tensor_model_parallel_group(),
        pipeline=ps.get_pipeline_model_parallel_group(),
        context=ps.get_context_parallel_group(),
        tensor_and_context=ps.get_tensor_and_context_parallel_group(),
        data=ps.get_data_parallel_group(),
        data_and_context=ps.get_data_parallel_group(with_context_parallel=True),
        expert=ps.get_expert_model_parallel_group(),
        expert_data=ps.get_expert_data_parallel_group(),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        context_rank=ps.get_context_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
        data_size=ps.get_data_parallel_world_size(),
        embedding=ps.get_embedding_group(check_initialized=False),
        **_same_data_group(ps.get_data_parallel_rank(), timeout_s),
    )


def _same_data_group(data_rank: int, timeout_s: float | None) -> dict:
    """The group of ranks with ``data_rank`` (collective: every rank creates every such group, in
    data-rank order), and its lowest global rank — tensor, context and pipeline rank 0 — as reader."""
    data_ranks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(data_ranks, data_rank)
    mine = {}
    for rank_of_data in sorted(set(data_ranks)):
        members = [r for r, d in enumerate(data_ranks) if d == rank_of_data]
        group = dist.new_group(members, timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s))
        if rank_of_data == data_rank:
            mine = {"same_data": group, "data_reader": members[0]}
    return mine


def destroy_parallel() -> None:
    """Destroys megatron-core's model-parallel groups, where any were made: a run that made none
    (one unlaunched process, plain data parallelism) does not import megatron-core to tear down
    nothing (4.5 s of CPU: it compiles its fused kernels' wrappers on import, 2026-12-02)."""
    if _PARALLEL_STATE_MODULE in sys.modules:
        _parallel_state().destroy_model_parallel()
