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
limit is cp <= kv_heads per TP rank, which ``ParallelSizes.validate`` checks; ring (or a Ulysses x
ring hybrid) is the extension beyond that.

**Mixture of experts.** The load-balancing loss is that of the whole micro-batch: the MoE layers
sum their routing statistics over the CP group and leave the pad rows out (``TokenBalance``);
under sequence parallelism they see the whole stream already (gathered), and leave out its padding.

**Gradients.** Parameters are replicated over the CP ranks; each rank backpropagates cp x its share
of the micro-batch loss (Megatron's convention), so gradients are *averaged* over CP, and in a full
job over ``ParallelGroups.data_and_context`` — exactly what DDP over that group (``data_parallel.py``)
and ``finalize_expert_grads`` already do: summed over CP, averaged over DP micro-batches.
``reduce_replicated_gradients`` is that all-reduce for a runner not under DDP. The CP runner calls
the layers of the bare ``MoTModel`` one by one, so it cannot run inside a DDP wrapper's forward.
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
from megatron_cosmos3.parallel.ulysses import ContextParallelAttention
from megatron_cosmos3.training.losses import LossBreakdown, LossFunction, loss_breakdown


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

    stream_rows = {key: (index >= dm.start) & (index < dm.stop) for key, index in batch.dm_token_index.items()}
    vision = {"ar_is_vision": None, "ar_vision_embeds": None, "ar_deepstack_embeds": None}
    if batch.ar_is_vision is not None and bool(batch.ar_is_vision[ar].any()):
        # ViT embeddings are stored in row order of the ViT rows: ours are a contiguous run of them.
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


def shard_pack(batch: PackedBatch, rank: int, size: int) -> ContextShard:
    """CP rank ``rank``'s part of ``batch`` among ``size`` ranks (see the module docstring)."""
    ar_rows, ar_padding = _chunk(batch.num_ar_tokens, rank, size)
    dm_rows, dm_padding = _chunk(batch.num_dm_tokens, rank, size)
    local, stream_rows = _restrict(batch, ar_rows, dm_rows)
    return ContextShard(local, padded_layout(batch, size), ar_padding, dm_padding, stream_rows)


def _rotary_positions(positions: torch.Tensor, padding: int) -> torch.Tensor:
    """(3, rows) positions followed by ``padding`` rows at position 0."""
    return torch.cat([positions, positions.new_zeros(positions.shape[0], padding)], dim=1) if padding else positions


@dataclass
class SequenceSplit:
    """How every micro-batch's rows are split over ``group``, for the model, pipeline stages alike.

    ``sequence_parallel=False``: ``group`` is the context-parallel group; attention exchanges
    sequence for heads (Ulysses) around ``inner``. ``sequence_parallel=True``: ``group`` is the
    tensor-parallel group of a model whose megatron linears run with sequence parallelism. The same
    row split then serves the norm/residual regions, but the column-parallel QKV all-gathers the rows
    itself: queries and keys cover the whole padded stream (so they are rotated with the whole
    stream's positions) and attention needs no exchange.
    """

    group: dist.ProcessGroup
    sequence_parallel: bool = False

    def rows(self, batch: PackedBatch, inner: AttentionBackend) -> tuple[RankRows, ContextShard]:
        """This rank's rows of ``batch`` (the same whole batch on every rank of the group)."""
        size = dist.get_world_size(self.group)
        shard = shard_pack(batch, dist.get_rank(self.group), size)
        local = shard.batch
        if self.sequence_parallel:
            attention = inner
            ar_positions = _rotary_positions(batch.ar_positions, (-batch.num_ar_tokens) % size)
            dm_positions = _rotary_positions(batch.dm_positions, (-batch.num_dm_tokens) % size)
            # MoE layers gather the whole padded stream: its real rows come first.
            ar_balance, dm_balance = TokenBalance(rows=batch.num_ar_tokens), TokenBalance(rows=batch.num_dm_tokens)
        else:  # q/k are rotated on this rank's rows, before the exchange
            attention = ContextParallelAttention(inner, self.group)
            ar_positions = _rotary_positions(local.ar_positions, shard.ar_padding)
            dm_positions = _rotary_positions(local.dm_positions, shard.dm_padding)
            ar_balance = TokenBalance(self.group, local.num_ar_tokens)
            dm_balance = TokenBalance(self.group, local.num_dm_tokens)
        rows = RankRows(
            batch=local,
            layout=shard.layout,
            batch_layout=PackLayout.from_cu_seqlens(local.ar_cu_seqlens, local.dm_cu_seqlens),
            attention=attention,
            ar_rotary_positions=ar_positions,
            dm_rotary_positions=dm_positions,
            ar_padding=shard.ar_padding,
            dm_padding=shard.dm_padding,
            ar_balance=ar_balance,
            dm_balance=dm_balance,
        )
        return rows, shard

    def losses(
        self, loss_fn: LossFunction, output: MoTOutput, shard: ContextShard, targets: dict[str, torch.Tensor]
    ) -> LossBreakdown:
        """``loss_fn`` (e.g. ``loss_breakdown`` with a flow-matching weight) of the whole micro-batch,
        from this rank's ``output`` and ``shard``; see ``context_parallel_losses`` and
        ``sequence_parallel_losses`` for what ``total`` carries."""
        losses = loss_fn(output, shard.batch, shard.local_targets(targets), group=self.group)
        if self.sequence_parallel:
            # loss_breakdown's gradient is size x this rank's share; the tensor-parallel linears and
            # finalize_tensor_parallel_grads (a sum over the group) want the share itself.
            share = losses.total / dist.get_world_size(self.group)
            losses.total = share + (losses.total - share).detach()
        return losses


def context_parallel_forward(
    model: MoTModel,
    batch: PackedBatch,
    group: dist.ProcessGroup,
    inner: AttentionBackend | None = None,
    sequence_parallel: bool = False,
) -> tuple[MoTOutput, ContextShard]:
    """The model's forward pass on ``batch`` with its streams split over ``group`` (see
    ``SequenceSplit``).

    Every rank of ``group`` passes the same whole ``batch``. Returns this rank's ``MoTOutput`` — that
    of the single-process model restricted to the rows of ``shard.batch`` (hidden states, logits of
    its labelled rows, velocity predictions) — and the shard. ``inner`` defaults to the model's
    configured attention backend.
    """
    inner = inner or attention_backend(model.config.attention_backend, model.embed_tokens.weight.device)
    rows, shard = SequenceSplit(group, sequence_parallel).rows(batch, inner)
    ar, dm = model.run_layers(enumerate(model.layers), *model.embed_rows(rows), rows)
    return model.heads(ar, dm, rows), shard


def context_parallel_losses(
    model: MoTModel,
    batch: PackedBatch,
    targets: dict[str, torch.Tensor],
    group: dist.ProcessGroup,
    flow_matching_weight: float = 1.0,
    inner: AttentionBackend | None = None,
) -> LossBreakdown:
    """``mot_losses`` of the whole ``batch`` computed by the CP ``group`` (same batch and targets on
    every rank).

    ``total`` has the single-process value on every rank and cp x the gradient of this rank's share;
    after ``reduce_replicated_gradients`` (an average) every rank holds the single-process gradient.
    Sums, counts and per-task parts are this rank's share (they add up over the group).
    """
    output, shard = context_parallel_forward(model, batch, group, inner)
    loss_fn = partial(loss_breakdown, flow_matching_weight=flow_matching_weight)
    return SequenceSplit(group).losses(loss_fn, output, shard, targets)


def sequence_parallel_losses(
    model: MoTModel,
    batch: PackedBatch,
    targets: dict[str, torch.Tensor],
    tensor_group: dist.ProcessGroup,
    flow_matching_weight: float = 1.0,
) -> LossBreakdown:
    """``mot_losses`` of ``batch`` under tensor + sequence parallelism (same batch on every TP rank).

    ``total`` has the whole micro-batch's value and the gradient of this rank's share only: the
    tensor-parallel linears and ``finalize_tensor_parallel_grads`` (a sum over the tensor group for
    every replicated parameter) add the shares up.
    """
    output, shard = context_parallel_forward(model, batch, tensor_group, sequence_parallel=True)
    loss_fn = partial(loss_breakdown, flow_matching_weight=flow_matching_weight)
    return SequenceSplit(tensor_group, sequence_parallel=True).losses(loss_fn, output, shard, targets)


def reduce_replicated_gradients(parameters, group: dist.ProcessGroup) -> None:
    """Averages the gradients of parameters replicated over ``group``, as DDP would.

    ``group``: the CP group, or ``ParallelGroups.data_and_context`` in a CP x DP job (the CP loss
    carries the factor cp, so the average is a sum over CP and a mean over DP micro-batches).
    Expert-parallel parameters differ between ranks of that group and are skipped
    (``finalize_expert_grads`` reduces them). A parameter no rank of the group used keeps
    ``grad=None``, as in one process (so AdamW skips it); one used on some ranks only counts as zero
    on the others.
    """
    params = [p for p in parameters if p.requires_grad and not getattr(p, "expert_parallel", False)]
    if not params:
        return
    size = dist.get_world_size(group)
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    live = [p for p, was_used in zip(params, used.tolist()) if was_used]
    for dtype in dict.fromkeys(p.dtype for p in live):  # one flat all-reduce per dtype
        same = [p for p in live if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        flat /= size
        for p, grad in zip(same, flat.split([p.numel() for p in same])):
            p.grad = grad.view_as(p)
