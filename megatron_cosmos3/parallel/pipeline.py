"""Pipeline parallelism for a built MoT: split into stages after building (torchtitan style).

Every rank builds the full model with the same seed, then keeps only its own model chunks; no model
fork. With ``pipeline`` ranks and ``virtual_pipeline`` chunks per rank the layers form
``pipeline * virtual_pipeline`` virtual stages (equal, or with megatron-core's uneven first and last
ranks: ``ParallelSizes.virtual_stage_layers``), and, as in Megatron's interleaving, chunk ``c`` of
pipeline rank ``r`` is virtual stage ``c * pipeline + r``. Virtual stage 0 also holds the
embeddings, the last one the final norms and both heads.

A stage runs, for its layers, the Reasoner halves and then the Generator halves (the Generator
half of layer i attends to layer i's AR keys/values, which live on the same stage). So between stages
only the two hidden streams travel, ``(ar_hidden (n_ar, hidden), dm_hidden (n_dm, hidden))``, and
their gradients; under context or sequence parallelism (a ``SequenceSplit``) only this rank's rows
of them, as in Megatron. The packing metadata (cu_seqlens, positions, noise masks, DM token index,
...) is never sent: every pipeline rank reads the same micro-batches from its own data source, as Megatron
does for masks and position ids, and derives the shapes of what it receives from them.

Parameters used at both ends of the pipeline — the DM stream projections (inputs embedded on the
first stage, velocities predicted on the last) and tied word embeddings — are held by the first and
the last stage; ``PipelineStages.finalize_grads`` sums their gradients over ``ParallelGroups.embedding``
so both copies take the same optimizer step (Megatron's embedding-group all-reduce).

Parameter and state-dict names are those of the full model (``layers.5.reasoner...``), so
checkpoints and per-parameter comparisons need no renaming.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.model.mot import MoTModel, MoTOutput, RankRows
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.parallel.state import ParallelGroups

# What travels between stages: (ar_hidden (n_ar, hidden), dm_hidden (n_dm, hidden)).
HiddenStreams = tuple[torch.Tensor, torch.Tensor]


def stage_layer_ranges(num_layers: int, sizes: ParallelSizes, pipeline_rank: int) -> list[range]:
    """The layers of each model chunk of ``pipeline_rank``: chunk c holds virtual stage
    ``c * pipeline + pipeline_rank`` of ``sizes.virtual_stage_layers``."""
    virtual_stages = sizes.virtual_stage_layers(num_layers)
    return [virtual_stages[chunk * sizes.pipeline + pipeline_rank] for chunk in range(sizes.virtual_pipeline)]


class MoTStage(nn.Module):
    """One model chunk: a block of consecutive layers, plus the embeddings on virtual stage 0 and
    the final norms and heads on the last virtual stage.

    Holds the very modules of the model it was cut from (no copies), under the model's names.
    """

    # MoTModel's own pass code, run on the stage: each part reads only attributes that a stage
    # holding that part has (the embeddings on the first stage, norms and heads on the last).
    embed_rows, embed_ar, embed_dm = MoTModel.embed_rows, MoTModel.embed_ar, MoTModel.embed_dm
    encode_vision = MoTModel.encode_vision
    run_layers, _rotary = MoTModel.run_layers, MoTModel._rotary
    heads, lm_logits, dm_predictions = MoTModel.heads, MoTModel.lm_logits, MoTModel.dm_predictions

    def __init__(self, model: MoTModel, layers: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.is_first, self.is_last = is_first, is_last
        self.layer_indices = layers
        self.rotary = model.rotary  # buffers only: every stage computes its own rotary tables
        # Keyed by the global layer index, so names stay "layers.<i>...." as in the full model.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        # The ViT runs where the pack enters (its DeepStack layers must be in this chunk too:
        # TrainConfig.validate), so no stage ever sends pictures or ViT features on.
        self.vision = model.vision if is_first else None
        if is_first:
            self.embed_tokens = model.embed_tokens
            self.timestep_embedding = model.timestep_embedding
        if is_first or is_last:
            self.dm_streams = model.dm_streams  # input projections used first, output ones last
        if is_last:
            self.reasoner_norm = model.reasoner_norm
            self.generator_norm = model.generator_norm
            self.lm_head = model.lm_head

    def forward(self, rows: RankRows, hidden: HiddenStreams | None) -> HiddenStreams | MoTOutput:
        """Runs this chunk on one micro-batch (``rows``: what this rank runs of it, see ``RankRows``).

        ``hidden``: the previous stage's streams (None on the first stage, which embeds the rows).
        Returns the streams for the next stage, or on the last stage the model's ``MoTOutput``.
        """
        ar, dm = self.embed_rows(rows) if self.is_first else hidden
        ar, dm = self.run_layers([(i, self.layers[str(i)]) for i in self.layer_indices], ar, dm, rows)
        return self.heads(ar, dm, rows) if self.is_last else (ar, dm)


def split_model(model: MoTModel, sizes: ParallelSizes, pipeline_rank: int) -> list[MoTStage]:
    """The model chunks of ``pipeline_rank``, in chunk order (no process group needed)."""
    pipeline, virtual = sizes.pipeline, sizes.virtual_pipeline
    ranges = stage_layer_ranges(model.config.num_layers, sizes, pipeline_rank)
    return [
        MoTStage(
            model,
            layers,
            is_first=chunk * pipeline + pipeline_rank == 0,
            is_last=chunk * pipeline + pipeline_rank == pipeline * virtual - 1,
        )
        for chunk, layers in enumerate(ranges)
    ]


def _canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in the full model (the first name of a tied parameter)."""
    return {id(p): name for name, p in model.named_parameters()}


class PipelineStages:
    """This rank's share of the pipeline: its model chunks and the groups the schedule talks over.

    ``chunks[c]`` is virtual stage ``c * pipeline + pipeline_rank``. Parameters are named as in the
    full model; ``parameters()`` is what this rank's optimizer steps.
    """

    def __init__(
        self, chunks: list[MoTStage], groups: ParallelGroups, canonical_names: dict[int, str], shared_names: list[str]
    ):
        self.chunks = chunks
        self.groups = groups
        self.pipeline = groups.sizes.pipeline
        self.virtual_pipeline = groups.sizes.virtual_pipeline
        self.pipeline_rank = groups.pipeline_rank
        self.hidden_size = chunks[0].config.hidden_size
        self._names = canonical_names
        self._shared_names = shared_names  # held by several pipeline ranks; same order on every rank
        first = next(p for p in self.parameters() if p.is_floating_point())
        self.dtype, self.device = first.dtype, first.device  # of the hidden streams sent between stages

    def norm_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients this rank counts in the global gradient norm: each shared
        first/last-stage parameter counts on the first pipeline rank only."""
        shared = set(self._shared_names)
        return [p for name, p in self.named_parameters() if self.pipeline_rank == 0 or name not in shared]

    def shared_parameters(self) -> list[nn.Parameter]:
        """This rank's copies of parameters held by both the first and the last stage."""
        held = dict(self.named_parameters())
        return [held[name] for name in self._shared_names if name in held]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen = set()
        for chunk in self.chunks:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield self._names[id(p)], p

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def modules(self) -> Iterator[nn.Module]:
        for chunk in self.chunks:
            yield from chunk.modules()

    def train(self, mode: bool = True) -> PipelineStages:
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    def eval(self) -> PipelineStages:
        return self.train(False)

    def finalize_grads(self) -> None:
        """Sums the gradients of parameters held by both the first and the last stage, so every copy
        has the full gradient. A parameter no copy used keeps grad None (as in one process). Call once
        per optimizer step, after the last backward (``forward_backward`` does)."""
        shared = self.shared_parameters()
        if not shared:
            return
        group = self.groups.embedding
        used = torch.tensor([float(p.grad is not None) for p in shared], device=self.device)
        dist.all_reduce(used, group=group)
        shared = [p for p, u in zip(shared, used.tolist()) if u]
        if not shared:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
        dist.all_reduce(flat, group=group)
        for p, grad in zip(shared, flat.split([p.numel() for p in shared])):
            p.grad = grad.view_as(p).clone()


def split_into_stages(model: MoTModel, groups: ParallelGroups) -> PipelineStages:
    """Keeps this rank's chunks of ``model`` (built in full, with the same seed, on every rank).

    The stages share modules with ``model``; drop ``model`` afterwards so the other ranks' layers are
    freed.
    """
    sizes = groups.sizes
    names = _canonical_names(model)
    holders: dict[str, set[int]] = {}
    for rank in range(sizes.pipeline):
        for chunk in split_model(model, sizes, rank):
            for p in chunk.parameters():
                holders.setdefault(names[id(p)], set()).add(rank)
    unplaced = sorted(set(names.values()) - holders.keys())
    if unplaced:  # a module MoTStage does not know about (e.g. one newly added to MoTModel)
        raise ValueError(f"pipeline stages place no copy of {unplaced}; teach MoTStage where they belong")
    shared = [name for name, ranks in holders.items() if len(ranks) > 1]
    ends = {0, sizes.pipeline - 1}
    for name in shared:
        if holders[name] != ends:  # the embedding group holds exactly the first and the last stage
            raise ValueError(
                f"parameter {name} is held by pipeline ranks {sorted(holders[name])}; only "
                f"parameters of the first and last stage ({sorted(ends)}) may be shared"
            )
    return PipelineStages(split_model(model, sizes, groups.pipeline_rank), groups, names, shared)
