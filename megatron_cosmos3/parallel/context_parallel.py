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
sum their routing statistics over the CP group and leave the pad rows out (``MoEMLP.balance_over``);
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

import torch
import torch.distributed as dist

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout, attention_backend
from megatron_cosmos3.model.layer import StreamRotary
from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.model.mot import MoTModel, MoTOutput, run_generator, run_reasoner
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch
from megatron_cosmos3.parallel.ulysses import ContextParallelAttention
from megatron_cosmos3.training.losses import LossBreakdown, loss_breakdown


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


def _with_padding(rows: torch.Tensor, padding: int, dim: int = 0) -> torch.Tensor:
    """``rows`` followed by ``padding`` zero rows along ``dim`` (zero hidden states, position 0)."""
    if not padding:
        return rows
    shape = list(rows.shape)
    shape[dim] = padding
    return torch.cat([rows, rows.new_zeros(shape)], dim=dim)


def _rotary(model: MoTModel, positions: torch.Tensor, padding: int, dtype: torch.dtype) -> StreamRotary:
    return StreamRotary(*model.rotary(_with_padding(positions, padding, dim=1), dtype))


def _balance_experts_over(model: MoTModel, group: dist.ProcessGroup | None, ar_rows: int, dm_rows: int) -> None:
    """Tells every MoE layer which of its input rows are real tokens and over which group they add up."""
    for layer in model.layers:
        for tower, rows in ((layer.reasoner, ar_rows), (layer.generator, dm_rows)):
            if isinstance(tower.mlp, MoEMLP):
                tower.mlp.balance_over(group, rows)


def context_parallel_forward(
    model: MoTModel,
    batch: PackedBatch,
    group: dist.ProcessGroup,
    inner: AttentionBackend | None = None,
    sequence_parallel: bool = False,
) -> tuple[MoTOutput, ContextShard]:
    """The model's forward pass on ``batch`` with its streams split over the CP ``group``.

    Every rank of ``group`` passes the same whole ``batch``. Returns this rank's ``MoTOutput`` — that
    of the single-process model restricted to the rows of ``shard.batch`` (hidden states, logits of
    its labelled rows, velocity predictions) — and the shard. ``inner`` defaults to the model's
    configured attention backend.

    ``sequence_parallel``: ``group`` is the tensor-parallel group of a model whose megatron linears
    run with sequence parallelism. The same row split then serves the norm/residual regions, but
    the column-parallel QKV all-gathers the rows itself: queries and keys cover the whole padded
    stream (so they are rotated with the whole stream's positions) and attention needs no exchange.
    """
    size = dist.get_world_size(group)
    shard = shard_pack(batch, dist.get_rank(group), size)
    local, layout = shard.batch, shard.layout
    device = model.embed_tokens.weight.device
    inner = inner or attention_backend(model.config.attention_backend, device)
    attention = inner if sequence_parallel else ContextParallelAttention(inner, group)
    # Rotary rows: this rank's (CP: q/k are rotated before the exchange) or the whole stream's (SP).
    rotary_source = batch if sequence_parallel else local
    ar_rotary_padding = (-batch.num_ar_tokens) % size if sequence_parallel else shard.ar_padding
    dm_rotary_padding = (-batch.num_dm_tokens) % size if sequence_parallel else shard.dm_padding
    if sequence_parallel:  # the MoE layers gather the whole padded stream: its real rows come first
        _balance_experts_over(model, None, batch.num_ar_tokens, batch.num_dm_tokens)
    else:
        _balance_experts_over(model, group, local.num_ar_tokens, local.num_dm_tokens)

    # The Reasoner pass over the AR chunk, then the Generator pass over the DM chunk (as MoTModel.forward).
    ar_hidden = _with_padding(model.embed_ar(local), shard.ar_padding)
    ar_rope = _rotary(model, rotary_source.ar_positions, ar_rotary_padding, ar_hidden.dtype)
    # DeepStack rows index this rank's real AR rows, which come first (padding is at the end).
    ar_hidden, keys_values = run_reasoner(enumerate(model.layers), ar_hidden, ar_rope, layout, attention, local)
    dm_hidden = _with_padding(model.embed_dm(local), shard.dm_padding)
    dm_rope = _rotary(model, rotary_source.dm_positions, dm_rotary_padding, dm_hidden.dtype)
    dm_hidden = run_generator(model.layers, dm_hidden, dm_rope, keys_values, layout, attention)

    ar_hidden = model.reasoner_norm(ar_hidden[: local.num_ar_tokens])
    dm_hidden = model.generator_norm(dm_hidden[: local.num_dm_tokens])
    rows = (local.ar_labels != IGNORE_INDEX).nonzero().squeeze(1)
    output = MoTOutput(
        ar_hidden=ar_hidden,
        dm_hidden=dm_hidden,
        layout=PackLayout.from_cu_seqlens(local.ar_cu_seqlens, local.dm_cu_seqlens),
        lm_logits=model.lm_logits(ar_hidden.index_select(0, rows)),
        lm_logit_rows=rows,
        dm_predictions=model.dm_predictions(dm_hidden, local),
    )
    return output, shard


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
    return loss_breakdown(output, shard.batch, shard.local_targets(targets), flow_matching_weight, group)


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
    losses = loss_breakdown(output, shard.batch, shard.local_targets(targets), flow_matching_weight, tensor_group)
    share = losses.total / dist.get_world_size(tensor_group)  # loss_breakdown's gradient is size x share
    losses.total = share + (losses.total - share).detach()
    return losses


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
