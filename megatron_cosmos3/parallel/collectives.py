"""Differentiable collectives shared by the parallel runners (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        # The gradient travels the same routes backwards: what was received is sent back.
        back = grad.new_empty((sum(ctx.send_counts), *grad.shape[1:]))
        dist.all_to_all_single(
            back,
            grad.contiguous(),
            output_split_sizes=ctx.send_counts,
            input_split_sizes=ctx.recv_counts,
            group=ctx.group,
        )
        return back, None, None, None


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Rows ``x`` (sum(send_counts), ...) split by destination rank -> rows received from each rank."""
    return _AllToAll.apply(x, list(send_counts), list(recv_counts), group)


def exchange_counts(send_counts: torch.Tensor, group) -> list[int]:
    """Each rank's ``send_counts[j]`` (rows for rank j) -> how many rows this rank receives from each."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv.tolist()
