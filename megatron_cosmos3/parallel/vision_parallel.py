"""The pictures of a pack spread over the ranks that share the pack, instead of every rank running
the whole ViT.

Tensor- and context-parallel ranks of one pipeline stage hold the same pack. Each encodes only its
share of the pictures (whole pictures, balanced by patch count; the same assignment on every rank),
and the features are gathered into the whole pack's (an all-reduce of disjoint rows: exact). The
gather's backward hands each rank the gradient of its own pictures' features:

* summed over the ranks whose losses are different parts of the pack — the context ranks, and under
  sequence parallelism the tensor ranks too (each holds its share of the rows);
* taken as is over tensor ranks without sequence parallelism, whose losses (and so gradients) are
  the same whole.

Each rank's ViT gradients then cover its own pictures only: they are summed over the tensor group
(``finalize_tensor_parallel_grads`` counts ``vision.*`` as partial) and averaged over data x context
like every replicated gradient (the context ranks' losses carry the factor cp that makes the average
a sum; see ``SequenceSplit.losses``). A rank with no picture in the pack still gives every ViT
parameter a (zero) gradient, so every rank reduces the same tensors. The gather's backward is a
collective, so every rank must use the gathered features in its forward: a row split hands a rank
whose rows hold no ViT token an empty slice of them (``context_parallel._restrict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_cosmos3.parallel.state import ParallelGroups


def assign_pictures(patches_per_picture: list[int], ranks: int) -> list[int]:
    """The rank that encodes each picture: largest first, each to the least-loaded rank (ties: lowest)."""
    load, owner = [0] * ranks, [0] * len(patches_per_picture)
    for picture in sorted(range(len(patches_per_picture)), key=lambda i: (-patches_per_picture[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[picture] = rank
        load[rank] += patches_per_picture[picture]
    return owner


class _GatherRows(torch.autograd.Function):
    """Forward: this rank's rows placed into the whole tensor, summed over ``group`` (disjoint rows).
    Backward: the rows' gradient, summed over ``gradient_group`` first unless it is None."""

    @staticmethod
    def forward(ctx, local, rows, num_rows, group, gradient_group):
        whole = local.new_zeros(num_rows, local.shape[1])
        whole[rows] = local
        dist.all_reduce(whole, group=group)
        ctx.rows, ctx.gradient_group = rows, gradient_group
        return whole

    @staticmethod
    def backward(ctx, grad):
        if ctx.gradient_group is not None:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.gradient_group)
        return grad[ctx.rows], None, None, None, None


@dataclass
class PictureSharing:
    """How one pack's pictures are shared out (module doc)."""

    group: dist.ProcessGroup  # the ranks holding the same pack: tensor x context of one stage
    gradient_group: dist.ProcessGroup | None  # ranks whose losses are different parts of the pack

    @classmethod
    def of(cls, groups: ParallelGroups | None) -> PictureSharing | None:
        """The sharing of a layout, or None where one rank holds its pack alone."""
        if groups is None or groups.sizes.tensor * groups.sizes.context == 1:
            return None
        sizes = groups.sizes
        if sizes.sequence_parallel:
            gradient_group = groups.tensor_and_context
        else:
            gradient_group = groups.context if sizes.context > 1 else None
        return cls(groups.tensor_and_context, gradient_group)

    def encode(self, encoder, pixels: torch.Tensor, grid_thw: torch.Tensor, merge: int):
        """``encoder(pixels, grid_thw) -> VisionFeatures`` on this rank's pictures, gathered into the
        whole pack's ``VisionFeatures``."""
        from megatron_cosmos3.model.vision import VisionFeatures

        patches = grid_thw.prod(-1).tolist()
        tokens = [n // merge for n in patches]
        owner = assign_pictures(patches, dist.get_world_size(self.group))
        rank = dist.get_rank(self.group)
        mine = [i for i, o in enumerate(owner) if o == rank]
        patch_start = [0, *torch.tensor(patches).cumsum(0).tolist()]
        token_start = [0, *torch.tensor(tokens).cumsum(0).tolist()]
        rows = torch.cat([torch.arange(token_start[i], token_start[i + 1]) for i in mine] or [torch.zeros(0)]).long()
        parameters = list(encoder.parameters())
        if mine:
            local_pixels = torch.cat([pixels[patch_start[i] : patch_start[i + 1]] for i in mine])
            features = encoder(local_pixels, grid_thw[mine])
            k = features.deepstack.shape[0]
            local = torch.cat([features.embeds, *features.deepstack], dim=1).float()  # one dtype on all ranks
        else:  # nothing to encode here: zero rows, tied to every parameter for a zero gradient
            width = encoder.config.out_hidden_size
            k = len(encoder.config.deepstack_visual_indexes)
            tie = sum(p.sum() for p in parameters) * 0.0
            local = torch.zeros(0, width * (1 + k), device=pixels.device) + tie.float()
        # In fp32 on every rank (autocast may make the features bf16): the model casts them on use.
        whole = _GatherRows.apply(local, rows.to(pixels.device), token_start[-1], self.group, self.gradient_group)
        parts = whole.chunk(1 + k, dim=1)
        deepstack = torch.stack(parts[1:]) if k else whole.new_zeros(0, whole.shape[0], parts[0].shape[1])
        return VisionFeatures(parts[0], deepstack)
