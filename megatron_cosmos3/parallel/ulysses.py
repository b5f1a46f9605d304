"""Ulysses attention for context parallelism: trade the sequence split for a head split, attend, trade back.

Each rank of a context-parallel (CP) group holds a contiguous chunk of every token stream, so its
q/k/v are (n_local, heads, d). One all-to-all turns them into the *whole* stream for heads/cp of the
heads, (n_full, heads/cp, d); the ordinary attention backend then runs on the full pack layout — the
asymmetric rule (AR causal over AR, DM over [AR, DM] of the same sample) is applied by the very same
code as in one process — and a second all-to-all returns (n_local, heads, d). This is DeepSpeed-
Ulysses, Megatron-Core's ``cp_comm_type="a2a"``.

AR blindness survives by construction: ``ar_attention`` exchanges only AR tensors, so DM keys and
values never enter the AR attention pool on any rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout
from megatron_cosmos3.parallel.collectives import all_to_all


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cuts ``x`` into cp equal chunks along ``scatter_dim``, sends chunk j to rank j, and joins the
    chunks received along ``gather_dim`` in rank order. Differentiable (the gradient goes back the
    same way)."""
    size = dist.get_world_size(group)
    chunks = x.unflatten(scatter_dim, (size, -1)).movedim(scatter_dim, 0)  # (cp, ...): row j for rank j
    received = all_to_all(chunks, [1] * size, [1] * size, group)
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def sequence_to_heads(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """(n_local, h_i, d) each -> (n_local * cp, h_i / cp, d) each: rank r keeps the r-th block of every
    tensor's heads, over the whole sequence (rank order = sequence order).

    All tensors share one all-to-all (fewer, larger messages); contiguous head blocks keep grouped-query
    pairs together: query block r uses exactly kv block r.
    """
    size = dist.get_world_size(group)
    for x in tensors:
        if x.shape[1] % size:
            raise ValueError(f"context parallel: {x.shape[1]} heads are not divisible by the context size {size}")
    heads = [x.shape[1] // size for x in tensors]
    # (n, cp, h_i/cp, d) side by side, so that head block r of the packed tensor is [block r of each].
    packed = torch.cat([x.unflatten(1, (size, -1)) for x in tensors], dim=2).flatten(1, 2)
    return list(_exchange(packed, group, scatter_dim=1, gather_dim=0).split(heads, dim=1))


def spread_kv_heads(keys_values: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """(n, kv_heads, d) each -> (n, kv_heads * r, d): every KV head repeated r times in place (r the
    least with kv_heads * r divisible by ``size``; 1 where it already is), so that fewer KV heads than
    CP ranks (MQA, or GQA at a large TP) still split into contiguous blocks. Query head i used KV head
    i // g (g = heads / kv_heads); it now uses the repeated copy i // (g / r), which is the same head,
    and r divides g wherever the query heads split over ``size``. The repeats' gradients sum back
    into the one head (autograd of ``repeat_interleave``)."""
    kv_heads = keys_values[0].shape[1]
    repeats = size // math.gcd(kv_heads, size)
    return keys_values if repeats == 1 else [x.repeat_interleave(repeats, dim=1) for x in keys_values]


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(n_local * cp, h / cp, d) -> (n_local, h, d): the inverse of ``sequence_to_heads`` for one tensor."""
    return _exchange(x, group, scatter_dim=0, gather_dim=1)


class ContextParallelAttention(AttentionBackend):
    """Wraps an attention backend for sequence-sharded streams (see the module docstring).

    Inputs are this rank's contiguous chunks of the AR / DM streams of the padded pack that
    ``layout`` describes (every rank's chunk of a stream has the same length). The inner backend
    sees the whole pack with heads/cp heads; any backend works (``sdpa``, ``flash``, ``dense``).
    """

    name = "context_parallel"

    def __init__(self, inner: AttentionBackend, group: dist.ProcessGroup):
        self.inner = inner
        self.group = group

    def ar_attention(self, q_ar, k_ar, v_ar, layout: PackLayout) -> torch.Tensor:
        k_ar, v_ar = spread_kv_heads([k_ar, v_ar], dist.get_world_size(self.group))
        q_ar, k_ar, v_ar = sequence_to_heads([q_ar, k_ar, v_ar], self.group)
        return heads_to_sequence(self.inner.ar_attention(q_ar, k_ar, v_ar, layout), self.group)

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout: PackLayout) -> torch.Tensor:
        # The AR keys/values are exchanged again rather than kept from the AR pass: the AR stream is
        # short next to long DM (video) streams, and keeping them would hold every layer's copy.
        k_ar, v_ar, k_dm, v_dm = spread_kv_heads([k_ar, v_ar, k_dm, v_dm], dist.get_world_size(self.group))
        k_ar, v_ar = sequence_to_heads([k_ar, v_ar], self.group)
        q_dm, k_dm, v_dm = sequence_to_heads([q_dm, k_dm, v_dm], self.group)
        return heads_to_sequence(self.inner.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout), self.group)


class DeepSpeedUlyssesAttention(AttentionBackend):
    """The same exchange through DeepSpeed-Ulysses itself: ``deepspeed.sequence.layer.
    DistributedAttention`` around the inner backend (a drop-in for ``ContextParallelAttention``).

    DeepSpeed exchanges one (query, key, value) triple, laid out (sequence, batch, heads, d). The AR
    call is one triple of AR tensors only, so DM keys and values never reach the AR attention pool.
    The DM call sends the keys and values as [this rank's AR chunk, its DM chunk]; after the
    exchange the local attention takes the streams apart again (every rank's chunks of a stream have
    the same length) and calls the inner ``dm_attention`` on the whole pack's layout.
    """

    name = "deepspeed_ulysses"

    def __init__(self, inner: AttentionBackend, group: dist.ProcessGroup):
        from deepspeed.sequence.layer import DistributedAttention

        from megatron_cosmos3.parallel.deepspeed_comm import start_deepspeed_comm

        start_deepspeed_comm()
        self.inner = inner
        self.size = dist.get_world_size(group)
        # (sequence, batch=1, heads, d): heads scattered (2), sequence gathered (0).
        self._ar = DistributedAttention(self._ar_local, group, scatter_idx=2, gather_idx=0)
        self._dm = DistributedAttention(self._dm_local, group, scatter_idx=2, gather_idx=0)

    def _ar_local(self, q, k, v, layout: PackLayout) -> torch.Tensor:
        return self.inner.ar_attention(q[:, 0], k[:, 0], v[:, 0], layout).unsqueeze(1)

    def _dm_local(self, q, keys, values, num_ar_local: int, layout: PackLayout) -> torch.Tensor:
        def streams(x):  # [AR_0, DM_0, AR_1, DM_1, ...] by rank -> (whole AR stream, whole DM stream)
            blocks = x[:, 0].unflatten(0, (self.size, -1))
            return blocks[:, :num_ar_local].flatten(0, 1), blocks[:, num_ar_local:].flatten(0, 1)

        (k_ar, k_dm), (v_ar, v_dm) = streams(keys), streams(values)
        return self.inner.dm_attention(q[:, 0], k_ar, v_ar, k_dm, v_dm, layout).unsqueeze(1)

    def ar_attention(self, q_ar, k_ar, v_ar, layout: PackLayout) -> torch.Tensor:
        k_ar, v_ar = spread_kv_heads([k_ar, v_ar], self.size)
        batch_dim = 1
        out = self._ar(q_ar.unsqueeze(1), k_ar.unsqueeze(1), v_ar.unsqueeze(1), batch_dim, None, layout)
        return out[:, 0]

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout: PackLayout) -> torch.Tensor:
        k_ar, v_ar, k_dm, v_dm = spread_kv_heads([k_ar, v_ar, k_dm, v_dm], self.size)
        keys = torch.cat([k_ar, k_dm]).unsqueeze(1)
        values = torch.cat([v_ar, v_dm]).unsqueeze(1)
        out = self._dm(q_dm.unsqueeze(1), keys, values, 1, None, k_ar.shape[0], layout)
        return out[:, 0]
