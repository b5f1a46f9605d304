"""Context parallelism (CP): one packed micro-batch spread over the ranks of a CP group.

**The split.** Each token stream of the pack is cut into cp equal, contiguous chunks; CP rank r holds
chunk r of the AR stream and chunk r of the DM stream (``shard_pack``). Every tower matmul, the
embeddings and the heads run on local rows only; only attention sees the whole pack, through the
Ulysses all-to-all of ``parallel/ulysses.py`` (sequence split <-> head split).

**Padding.** A stream whose length is not a multiple of cp is padded at its end. In the layout that
attention runs on, the pad rows form one extra *padding sample* after the real ones (AR pad rows and
DM pad rows together), so sample isolation — the same rule that keeps real samples apart — keeps
them out of every real token's attention and real tokens out of theirs; no mask or special case.
Pad rows enter with zero hidden states at position 0 and leave before the heads, so no loss and no
gradient ever sees them. Padding is < cp rows per stream.

**Why Ulysses, not ring attention.** The asymmetric rule is per sample and packs hold many samples
of uneven AR/DM split; a ring must re-derive which key blocks each query block may see (per sample,
per ring step) and balance causal work (zig-zag chunks), whereas after the all-to-all the ordinary
varlen backends run on the ordinary layout unchanged (``sdpa``, ``flash``, ``dense`` alike). The
cost is two all-to-alls per attention call, whose volume per rank shrinks as 1/cp (q, k, v and the
output: about 4·N·hidden/cp elements per layer, plus the AR K/V once more for the DM half). Its
limit is cp <= query heads per TP rank, which ``ParallelSizes.validate`` checks; fewer KV heads than
cp are repeated before the exchange (``ulysses.spread_kv_heads``: more K/V volume, same result).
Ring (or a Ulysses x ring hybrid) is the extension beyond that.

**Mixture of experts.** The load-balancing loss is that of the whole micro-batch: the MoE layers
sum their routing statistics over the CP group and leave the pad rows out (``TokenBalance``);
under sequence parallelism they see the whole stream already (gathered), and leave out its padding.

**Gradients.** Parameters are replicated over the CP ranks; each rank backpropagates cp x its share
of the micro-batch loss (Megatron's convention), so gradients are *averaged* over CP, and in a full
job over ``ParallelGroups.data_and_context`` — exactly what DDP over that group (``data_parallel.py``)
and ``finalize_expert_grads`` already do: summed over CP, averaged over DP micro-batches.
The CP runner calls the layers of the bare ``MoTModel`` one by one, so it cannot run inside a DDP
wrapper's forward: ``data_parallel.GradientReducer`` does that average, overlapped with the last
backward as DDP does (``reduce_replicated_gradients`` without overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout, attention_backend
from megatron_cosmos3.model.moe import TokenBalance
from megatron_cosmos3.model.mot import MoTModel, MoTOutput, RankRows
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.objectives.losses import LossBreakdown, LossFunction, loss_breakdown
from megatron_cosmos3.parallel.state import ParallelGroups
from megatron_cosmos3.parallel.ulysses import ContextParallelAttention, DeepSpeedUlyssesAttention


@dataclass
class ContextShard:
    """What one CP rank holds of a pack.

    Attributes:
        batch: the pack restricted to this rank's real rows — a valid ``PackedBatch`` whose samples
            are the parts of the pack's samples that fall in this rank's chunks (possibly empty).
        layout: the layout of the whole padded pack (S real samples + the padding sample if any),
            the one every attention call runs on after the all-to-all.
        ar_padding / dm_padding: pad rows that follow ``batch``'s rows in this rank's chunks.
        dm_stream_rows: per DM stream key, (n_k,) bool: which rows of ``dm_tokens[key]`` are local.
    """

    batch: PackedBatch
    layout: PackLayout
    ar_padding: int
    dm_padding: int
    dm_stream_rows: dict[str, torch.Tensor]

    def local_targets(self, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Velocity targets (key -> (n_k, d_k)) of the whole pack -> those of this rank's rows."""
        return {key: targets[key][rows] for key, rows in self.dm_stream_rows.items()}


def _chunk(num_rows: int, rank: int, size: int) -> tuple[slice, int]:
    """(real rows of chunk ``rank``, its pad rows) for a stream of ``num_rows`` padded to cp chunks."""
    per_rank = -(-num_rows // size)
    start, stop = rank * per_rank, (rank + 1) * per_rank
    real = slice(min(start, num_rows), min(stop, num_rows))
    return real, per_rank - (real.stop - real.start)


def padded_layout(batch: PackedBatch, size: int) -> PackLayout:
    """Layout of ``batch`` with each stream padded to a multiple of ``size`` by one padding sample."""
    ar_cu, dm_cu = batch.ar_cu_seqlens, batch.dm_cu_seqlens
    ar_padded, dm_padded = -(-batch.num_ar_tokens // size) * size, -(-batch.num_dm_tokens // size) * size
    if (ar_padded, dm_padded) != (batch.num_ar_tokens, batch.num_dm_tokens):
        ar_cu = torch.cat([ar_cu, ar_cu.new_tensor([ar_padded])])
        dm_cu = torch.cat([dm_cu, dm_cu.new_tensor([dm_padded])])
    return PackLayout.from_cu_seqlens(ar_cu, dm_cu)


def _restrict(batch: PackedBatch, ar: slice, dm: slice) -> tuple[PackedBatch, dict[str, torch.Tensor]]:
    """``batch`` cut down to AR rows ``ar`` and DM rows ``dm`` (each sample keeps its part there)."""

    def clip(cu: torch.Tensor, rows: slice) -> torch.Tensor:
        return cu.clamp(rows.start, rows.stop) - rows.start

    stream_rows = _stream_rows(batch, dm)
    # Pictures never reach a part: the ViT encodes the whole pack first (MoTModel.encode_vision);
    # a stage that does not embed (pipeline) gets a part without ViT features, which it never reads.
    vision = dict.fromkeys(
        ("ar_is_vision", "ar_vision_embeds", "ar_deepstack_embeds", "vision_pixels", "vision_grid_thw")
    )
    if batch.ar_is_vision is not None and batch.vision_pixels is None:
        # ViT embeddings are stored in row order of the ViT rows: ours are a contiguous run of them
        # (maybe none: the empty slice still ties this part's graph to the whole pack's features,
        # whose backward may hold a collective every rank must join; see parallel/vision_parallel.py).
        first, stop = int(batch.ar_is_vision[: ar.start].sum()), int(batch.ar_is_vision[: ar.stop].sum())
        vision["ar_is_vision"] = batch.ar_is_vision[ar]
        vision["ar_vision_embeds"] = batch.ar_vision_embeds[first:stop]
        if batch.ar_deepstack_embeds is not None:
            vision["ar_deepstack_embeds"] = batch.ar_deepstack_embeds[:, first:stop]
    local = batch.replace(
        ar_token_ids=batch.ar_token_ids[ar],
        ar_labels=batch.ar_labels[ar],
        ar_positions=batch.ar_positions[:, ar],
        ar_cu_seqlens=clip(batch.ar_cu_seqlens, ar),
        dm_cu_seqlens=clip(batch.dm_cu_seqlens, dm),
        dm_positions=batch.dm_positions[:, dm],
        dm_noise_mask=batch.dm_noise_mask[dm],
        dm_timesteps=batch.dm_timesteps[dm],
        dm_tokens={key: values[stream_rows[key]] for key, values in batch.dm_tokens.items()},
        dm_token_index={key: index[stream_rows[key]] - dm.start for key, index in batch.dm_token_index.items()},
        **vision,
    )
    return local, stream_rows


def _stream_rows(batch: PackedBatch, dm: slice) -> dict[str, torch.Tensor]:
    return {key: (index >= dm.start) & (index < dm.stop) for key, index in batch.dm_token_index.items()}


def stream_rows(batch: PackedBatch, rank: int, size: int) -> dict[str, torch.Tensor]:
    """``shard_pack(batch, rank, size).dm_stream_rows`` without cutting the pack."""
    return _stream_rows(batch, _chunk(batch.num_dm_tokens, rank, size)[0])


def shard_pack(batch: PackedBatch, rank: int, size: int) -> ContextShard:
    """CP rank ``rank``'s part of ``batch`` among ``size`` ranks (see the module docstring)."""
    ar_rows, ar_padding = _chunk(batch.num_ar_tokens, rank, size)
    dm_rows, dm_padding = _chunk(batch.num_dm_tokens, rank, size)
    local, stream_rows = _restrict(batch, ar_rows, dm_rows)
    return ContextShard(local, padded_layout(batch, size), ar_padding, dm_padding, stream_rows)


def _rotary_positions(positions: torch.Tensor, padding: int) -> torch.Tensor:
    """(3, rows) positions followed by ``padding`` rows at position 0."""
    return torch.cat([positions, positions.new_zeros(positions.shape[0], padding)], dim=1) if padding else positions


def _part_rows(num_rows: int, part: int, parts: int, multiple: int) -> tuple[slice, int]:
    """(real rows, pad rows) of part ``part`` of ``parts`` equal parts of a stream of ``num_rows``
    padded to a multiple of ``multiple`` (itself a multiple of ``parts``)."""
    per_part = -(-num_rows // multiple) * multiple // parts
    start, stop = part * per_part, (part + 1) * per_part
    real = slice(min(start, num_rows), min(stop, num_rows))
    return real, per_part - (real.stop - real.start)


@dataclass
class SequenceSplit:
    """How every micro-batch's rows are split over ranks, for the model and pipeline stages alike.

    ``group``: the ranks that each hold a disjoint, contiguous part of one micro-batch's rows (group
    rank order = row order). ``context``: the context-parallel group among them, whose ranks trade
    sequence for heads around the attention (Ulysses); None without context parallelism.
    ``sequence_parallel``: the model's megatron linears run with sequence parallelism over the
    tensor-parallel ranks inside ``group`` — then ``group`` is Megatron's tensor-and-context group
    (tensor rank fastest), so the tensor ranks of one context rank hold consecutive parts of that
    context rank's chunk. The column-parallel QKV and the MoE layers all-gather the tensor ranks'
    rows themselves: queries and keys cover the context chunk (rotated with its positions), and
    without context parallelism attention needs no exchange at all.
    """

    group: dist.ProcessGroup
    context: dist.ProcessGroup | None = None
    sequence_parallel: bool = False
    # The Ulysses exchange through DeepSpeed's DistributedAttention (``DeepSpeedUlyssesAttention``)
    # instead of this package's all-to-all; the same rows, layout and results.
    deepspeed_ulysses: bool = False

    @property
    def context_size(self) -> int:
        return dist.get_world_size(self.context) if self.context is not None else 1

    def rows(self, batch: PackedBatch, inner: AttentionBackend) -> tuple[RankRows, ContextShard]:
        """This rank's rows of ``batch`` (the same whole batch on every rank of the group)."""
        size, rank, cp = dist.get_world_size(self.group), dist.get_rank(self.group), self.context_size
        shard = shard_pack(batch, rank, size)
        local = shard.batch
        attention = inner
        if self.context is not None:
            exchange = DeepSpeedUlyssesAttention if self.deepspeed_ulysses else ContextParallelAttention
            attention = exchange(inner, self.context)
        if self.sequence_parallel:  # q/k and MoE inputs: this rank's context chunk (gathered over TP)
            chunk = rank // (size // cp)
            ar_rows, ar_pad = _part_rows(batch.num_ar_tokens, chunk, cp, size)
            dm_rows, dm_pad = _part_rows(batch.num_dm_tokens, chunk, cp, size)
            ar_positions = _rotary_positions(batch.ar_positions[:, ar_rows], ar_pad)
            dm_positions = _rotary_positions(batch.dm_positions[:, dm_rows], dm_pad)
            ar_real, dm_real = ar_rows.stop - ar_rows.start, dm_rows.stop - dm_rows.start
        else:  # q/k are rotated on this rank's rows, before the exchange
            ar_positions = _rotary_positions(local.ar_positions, shard.ar_padding)
            dm_positions = _rotary_positions(local.dm_positions, shard.dm_padding)
            ar_real, dm_real = local.num_ar_tokens, local.num_dm_tokens
        rows = RankRows(
            batch=local,
            layout=shard.layout,
            batch_layout=PackLayout.from_cu_seqlens(local.ar_cu_seqlens, local.dm_cu_seqlens),
            attention=attention,
            ar_rotary_positions=ar_positions,
            dm_rotary_positions=dm_positions,
            ar_padding=shard.ar_padding,
            dm_padding=shard.dm_padding,
            # A MoE layer's input: real rows first, then padding; its statistics add up over CP.
            ar_balance=TokenBalance(self.context, ar_real),
            dm_balance=TokenBalance(self.context, dm_real),
        )
        return rows, shard

    def losses(
        self, loss_fn: LossFunction, output: MoTOutput, shard: ContextShard, targets: dict[str, torch.Tensor]
    ) -> LossBreakdown:
        """``loss_fn`` (e.g. ``loss_breakdown`` with a flow-matching weight) of the whole micro-batch,
        from this rank's ``output`` and ``shard``: ``total`` has the whole micro-batch's value, and
        cp x the gradient of this rank's share under context parallelism; under sequence parallelism
        (tensor ranks) cp x the share too, the tensor ranks' shares being summed."""
        losses = loss_fn(output, shard.batch, shard.local_targets(targets), group=self.group)
        if self.sequence_parallel:
            # loss_breakdown's gradient is size x this rank's share. The tensor ranks' shares are
            # summed (megatron's linears, finalize_tensor_parallel_grads), the context ranks'
            # averaged (reduce_replicated_gradients), so keep cp x the share.
            scaled = losses.total / dist.get_world_size(self.group) * self.context_size
            losses.total = scaled + (losses.total - scaled).detach()
        return losses


def sequence_split(groups: ParallelGroups | None) -> SequenceSplit | None:
    """How the layout of ``groups`` spreads each micro-batch's rows over ranks: over the context
    group (Ulysses), over the tensor group under sequence parallelism (and over both inside each
    context chunk), or not at all (None)."""
    if groups is None:
        return None
    sizes = groups.sizes
    if sizes.sequence_parallel:  # the rows of a context chunk are split again over its tensor ranks
        context = groups.context if sizes.context > 1 else None
        return SequenceSplit(groups.tensor_and_context, context=context, sequence_parallel=True)
    if sizes.context > 1:
        return SequenceSplit(groups.context, context=groups.context)
    return None


def split_forward(
    model: MoTModel, batch: PackedBatch, split: SequenceSplit, inner: AttentionBackend | None = None
) -> tuple[MoTOutput, ContextShard]:
    """The model's forward pass on ``batch`` with its rows split as ``split`` says.

    Every rank of ``split.group`` passes the same whole ``batch``. Returns this rank's ``MoTOutput``
    — that of the single-process model restricted to the rows of ``shard.batch`` (hidden states,
    logits of its labelled rows, velocity predictions) — and the shard. ``inner`` defaults to the
    model's configured attention backend.
    """
    config = model.config
    inner = inner or attention_backend(config.attention_backend, model.embed_tokens.weight.device, config.head_dim)
    rows, shard = split.rows(model.encode_vision(batch), inner)
    ar, dm = model.run_layers(enumerate(model.layers), *model.embed_rows(rows), rows)
    return model.heads(ar, dm, rows), shard


def split_losses(
    model: MoTModel,
    batch: PackedBatch,
    targets: dict[str, torch.Tensor],
    split: SequenceSplit,
    loss_fn: LossFunction | None = None,
    inner: AttentionBackend | None = None,
) -> LossBreakdown:
    """``loss_fn`` (default: ``loss_breakdown`` with flow-matching weight 1) of the whole ``batch``,
    computed by the ranks of ``split.group`` (same batch and targets on every rank).

    ``total`` has the single-process value on every rank and, as ``SequenceSplit.losses`` says, the
    gradient that the gradient reduction of the layout (an average over context, a sum over tensor
    ranks) turns into the single-process gradient. Sums, counts and per-task parts are this rank's
    share (they add up over the group).
    """
    output, shard = split_forward(model, batch, split, inner)
    return split.losses(loss_fn or partial(loss_breakdown, flow_matching_weight=1.0), output, shard, targets)
