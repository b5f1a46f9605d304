"""The shared asymmetric attention and its backends.

The whole attention rule of the model, per sample of a pack:

* AR queries attend **causally to AR keys/values only** — DM keys/values are never passed to the
  AR half (``ar_attention`` does not even receive them), so the reasoner is blind to DM tokens by
  construction, not only by a mask;
* DM queries attend **bidirectionally to concat(AR, DM) keys/values of the same sample**.

Nothing attends across samples. Every backend implements the same two methods on the same
``PackLayout``; they differ only in kernels. Text generation adds a third, ``ar_decode_attention``:
one new AR query per sequence over that sequence's cached AR keys/values (``model/kv_cache.py``).

* ``dense`` — materialises the masks; the reference of the tests, never used for training;
* ``sdpa`` — varlen by slicing each sample and calling ``scaled_dot_product_attention`` (CPU/GPU),
  no N x N mask ever;
* ``flash`` — flash-attention's varlen kernels over the whole pack (GPU), with ``cu_seqlens``;
* ``flex`` — PyTorch's FlexAttention over the whole pack, the rule as a block-sparse mask (GPU:
  Triton-compiled, no extra package; CPU: forward only, torch has no CPU backward for it);
* ``te`` — Transformer Engine's fused attention in THD form with separate q and kv ``cu_seqlens``
  (GPU, bf16/fp16; ``TEFusedAttention`` states the exact arguments).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_cosmos3.model.transformer_engine import import_transformer_engine, transformer_engine_missing, warn_once

ATTENTION_BACKENDS = ("dense", "sdpa", "flash", "flex", "te")


@dataclass
class PackLayout:
    """Per-pack index tensors every layer's attention needs, computed once per micro-batch.

    Attributes:
        ar_cu_seqlens / dm_cu_seqlens: (S+1,) sample boundaries in the AR and DM streams.
        kv_cu_seqlens: (S+1,) boundaries of the per-sample [AR_s, DM_s] key/value sequence.
        kv_gather_index: (n_ar + n_dm,) rows of cat(AR stream, DM stream) in [AR_s, DM_s] order.
        ar_lengths / dm_lengths: python ints per sample (read once, so no device sync per layer).
    """

    ar_cu_seqlens: torch.Tensor
    dm_cu_seqlens: torch.Tensor
    kv_cu_seqlens: torch.Tensor
    kv_gather_index: torch.Tensor
    ar_lengths: list[int]
    dm_lengths: list[int]

    @classmethod
    def from_cu_seqlens(cls, ar_cu_seqlens: torch.Tensor, dm_cu_seqlens: torch.Tensor) -> PackLayout:
        ar_lengths = (ar_cu_seqlens[1:] - ar_cu_seqlens[:-1]).tolist()
        dm_lengths = (dm_cu_seqlens[1:] - dm_cu_seqlens[:-1]).tolist()
        n_ar = int(ar_cu_seqlens[-1])
        pieces = []
        for s, (n_a, n_d) in enumerate(zip(ar_lengths, dm_lengths)):
            a0, d0 = int(ar_cu_seqlens[s]), int(dm_cu_seqlens[s])
            pieces += [torch.arange(a0, a0 + n_a), torch.arange(n_ar + d0, n_ar + d0 + n_d)]
        gather = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return cls(
            ar_cu_seqlens=ar_cu_seqlens,
            dm_cu_seqlens=dm_cu_seqlens,
            kv_cu_seqlens=ar_cu_seqlens + dm_cu_seqlens,
            kv_gather_index=gather.to(ar_cu_seqlens.device),
            ar_lengths=ar_lengths,
            dm_lengths=dm_lengths,
        )

    @property
    def num_samples(self) -> int:
        return len(self.ar_lengths)

    def sample_ids(self, stream: str) -> torch.Tensor:
        """(n,) index of the sample each token of the ``"ar"`` or ``"dm"`` stream belongs to."""
        lengths = self.ar_lengths if stream == "ar" else self.dm_lengths
        device = self.ar_cu_seqlens.device
        return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


class AttentionBackend:
    """Interface: q (n, heads, d), k/v (n, kv_heads, d) -> output (n, heads, d)."""

    name = "abstract"

    def ar_attention(self, q_ar, k_ar, v_ar, layout: PackLayout) -> torch.Tensor:
        """Causal attention of AR queries over the AR keys/values of their own sample."""
        raise NotImplementedError

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout: PackLayout) -> torch.Tensor:
        """Bidirectional attention of DM queries over [AR_s, DM_s] keys/values of their sample."""
        raise NotImplementedError

    def ar_decode_attention(self, q, k_cache, v_cache, lengths) -> torch.Tensor:
        """Text generation's step (``model/kv_cache.py``): the one new AR query of each sequence,
        q (S, heads, d), over the first ``lengths[s]`` rows of its own cache row, k/v_cache
        (S, capacity, kv_heads, d); the new token's own key is already among them. Being the last
        token, it is allowed every filled row: the causal rule. Every backend shares this SDPA call
        with a length mask (one query per sequence: no varlen kernel is needed); ``dense`` states it."""
        filled = torch.arange(k_cache.shape[1], device=q.device)[None, :] < lengths[:, None]  # (S, capacity)
        q, k, v = _in_autocast_dtype(q, k_cache, v_cache)
        out = F.scaled_dot_product_attention(
            q[:, :, None],
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=filled[:, None, None, :],
            enable_gqa=q.shape[1] != k.shape[2],
        )
        return out[:, :, 0]


def _in_autocast_dtype(q, k, v):
    """q, k, v in the autocast dtype when autocast is on. Kernels outside autocast's op list (flash,
    flex) get no cast from it, while under bf16 autocast q and k arrive in fp32 (the per-head RMSNorm
    multiplies by fp32 weights) and v in bf16."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def _masked_softmax_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


class DenseMaskAttention(AttentionBackend):
    """Reference: explicit boolean masks over the whole pack. O(N^2) memory; tests only."""

    name = "dense"

    def ar_attention(self, q_ar, k_ar, v_ar, layout):
        sample = layout.sample_ids("ar")
        index = torch.arange(sample.numel(), device=sample.device)
        allowed = (sample[:, None] == sample[None, :]) & (index[None, :] <= index[:, None])
        return _masked_softmax_attention(q_ar, k_ar, v_ar, allowed)

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout):
        sample_q = layout.sample_ids("dm")
        sample_k = torch.cat([layout.sample_ids("ar"), sample_q])
        allowed = sample_q[:, None] == sample_k[None, :]
        return _masked_softmax_attention(q_dm, torch.cat([k_ar, k_dm]), torch.cat([v_ar, v_dm]), allowed)

    def ar_decode_attention(self, q, k_cache, v_cache, lengths):
        filled = torch.arange(k_cache.shape[1], device=q.device)[None, :] < lengths[:, None]
        k, v = _repeat_kv(k_cache.flatten(0, 1), q.shape[1]), _repeat_kv(v_cache.flatten(0, 1), q.shape[1])
        k, v = k.unflatten(0, k_cache.shape[:2]), v.unflatten(0, v_cache.shape[:2])
        scores = torch.einsum("shd,sthd->sht", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~filled[:, None, :], float("-inf"))
        return torch.einsum("sht,sthd->shd", scores.softmax(dim=-1), v)


class SdpaVarlenAttention(AttentionBackend):
    """Per-sample slices through ``F.scaled_dot_product_attention``: no mask tensor, no N x N.

    One kernel call per sample and half (a Python loop over samples, never over tokens); SDPA
    picks its fused CPU/GPU kernel. The loop costs launch overhead on packs of many tiny samples,
    which is what the flash backend removes on GPU.
    """

    name = "sdpa"

    @staticmethod
    def _sdpa(q, k, v, causal: bool) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=causal,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)

    def ar_attention(self, q_ar, k_ar, v_ar, layout):
        outputs, start = [], 0
        for n in layout.ar_lengths:
            if n:
                sl = slice(start, start + n)
                outputs.append(self._sdpa(q_ar[sl], k_ar[sl], v_ar[sl], causal=True))
            start += n
        return torch.cat(outputs) if outputs else q_ar.new_zeros(q_ar.shape)

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout):
        outputs, ar_start, dm_start = [], 0, 0
        for n_ar, n_dm in zip(layout.ar_lengths, layout.dm_lengths):
            if n_dm:
                a, d = slice(ar_start, ar_start + n_ar), slice(dm_start, dm_start + n_dm)
                outputs.append(
                    self._sdpa(q_dm[d], torch.cat([k_ar[a], k_dm[d]]), torch.cat([v_ar[a], v_dm[d]]), causal=False)
                )
            ar_start += n_ar
            dm_start += n_dm
        return torch.cat(outputs) if outputs else q_dm.new_zeros(q_dm.shape)


class FlashVarlenAttention(AttentionBackend):
    """flash-attention 2/3 varlen kernels over the whole pack (GPU only, imported lazily).

    The AR half is one causal varlen call on the AR stream as stored. The DM half needs each
    sample's keys as one contiguous [AR_s, DM_s] run, so K and V (not the hidden states) pay one
    O(N * kv_dim) gather per layer through ``kv_gather_index``.
    """

    name = "flash"

    def __init__(self, flash_attn_varlen_func):
        self._varlen = flash_attn_varlen_func

    def _call(self, q, k, v, cu_q, cu_k, lengths_q, lengths_k, causal):
        q, k, v = _in_autocast_dtype(q, k, v)
        out = self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=cu_q.int(),
            cu_seqlens_k=cu_k.int(),
            max_seqlen_q=max(lengths_q, default=0),
            max_seqlen_k=max(lengths_k, default=0),
            causal=causal,
        )
        return out[0] if isinstance(out, tuple) else out  # flash-attention 3 also returns the LSE

    def ar_attention(self, q_ar, k_ar, v_ar, layout):
        if q_ar.shape[0] == 0:
            return q_ar
        return self._call(
            q_ar,
            k_ar,
            v_ar,
            layout.ar_cu_seqlens,
            layout.ar_cu_seqlens,
            layout.ar_lengths,
            layout.ar_lengths,
            causal=True,
        )

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout):
        if q_dm.shape[0] == 0:
            return q_dm
        k = torch.cat([k_ar, k_dm]).index_select(0, layout.kv_gather_index)
        v = torch.cat([v_ar, v_dm]).index_select(0, layout.kv_gather_index)
        kv_lengths = [a + d for a, d in zip(layout.ar_lengths, layout.dm_lengths)]
        return self._call(
            q_dm, k, v, layout.dm_cu_seqlens, layout.kv_cu_seqlens, layout.dm_lengths, kv_lengths, causal=False
        )


class FlexPackAttention(AttentionBackend):
    """FlexAttention (``torch.nn.attention.flex_attention``) over the whole pack: one fused kernel
    per half, the rule given as a mask function of (query row, key row) that the block mask turns
    into block sparsity. Blocks the rule forbids entirely (other samples, the causal future of AR)
    are skipped, so the work follows the (q, k) pairs the mask allows, as in flash varlen, without
    the DM half's K/V gather. Compiled (Triton) on GPU; on CPU torch runs its forward only.

    The block masks are built once per pack layout and shared by every layer's call.
    """

    name = "flex"

    def __init__(self, device: torch.device | str):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        on_gpu = torch.device(device).type == "cuda"
        # Pack lengths change every micro-batch: compile for dynamic shapes once.
        self._flex = torch.compile(flex_attention, dynamic=True) if on_gpu else flex_attention
        self._layout: PackLayout | None = None
        self._masks = None

    def _block_masks(self, layout: PackLayout, device: torch.device):
        if layout is not self._layout:  # a new micro-batch: its masks, for every layer
            ar_sample, dm_sample = layout.sample_ids("ar").to(device), layout.sample_ids("dm").to(device)
            kv_sample = torch.cat([ar_sample, dm_sample])
            n_ar, n_dm = ar_sample.numel(), dm_sample.numel()

            def ar_rule(batch, head, q, k):
                return (ar_sample[q] == ar_sample[k]) & (k <= q)

            def dm_rule(batch, head, q, k):
                return dm_sample[q] == kv_sample[k]

            build = functools.partial(self._create_block_mask, B=None, H=None, device=device)
            self._masks = (
                build(ar_rule, Q_LEN=n_ar, KV_LEN=n_ar) if n_ar else None,
                build(dm_rule, Q_LEN=n_dm, KV_LEN=n_ar + n_dm) if n_dm else None,
            )
            self._layout = layout
        return self._masks

    def _attend(self, q, k, v, block_mask) -> torch.Tensor:
        q, k, v = _in_autocast_dtype(q, k, v)
        with warnings.catch_warnings():  # CPU: the unfused forward is the point (tests, references)
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = self._flex(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                block_mask=block_mask,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return out[0].transpose(0, 1)

    def ar_attention(self, q_ar, k_ar, v_ar, layout):
        if q_ar.shape[0] == 0:
            return q_ar
        ar_mask, _ = self._block_masks(layout, q_ar.device)
        return self._attend(q_ar, k_ar, v_ar, ar_mask)

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout):
        if q_dm.shape[0] == 0:
            return q_dm
        _, dm_mask = self._block_masks(layout, q_dm.device)
        return self._attend(q_dm, torch.cat([k_ar, k_dm]), torch.cat([v_ar, v_dm]), dm_mask)


@dataclass
class VarlenCall:
    """The arguments of one varlen kernel call for one half of the rule: queries and keys/values in
    THD form (rows of all samples, sample after sample) and their boundaries.

    ``kv_index`` picks the key/value rows, in order, from the keys/values the half is given
    (``None``: take them as they are). Samples with no query row are left out, so no kernel ever
    sees an empty query sequence.
    """

    cu_seqlens_q: torch.Tensor  # (S'+1,) int32
    cu_seqlens_kv: torch.Tensor  # (S'+1,) int32
    max_seqlen_q: int
    max_seqlen_kv: int
    kv_index: torch.Tensor | None
    mask_type: str  # Transformer Engine's attn_mask_type

    def te_keywords(self) -> dict:
        """The keyword arguments of Transformer Engine's ``DotProductAttention.forward`` for this call."""
        return dict(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_kv=self.cu_seqlens_kv,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_kv=self.max_seqlen_kv,
            attn_mask_type=self.mask_type,
        )

    @staticmethod
    def _boundaries(lengths: list[int], device) -> torch.Tensor:
        return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)

    @classmethod
    def ar_half(cls, layout: PackLayout) -> VarlenCall:
        """AR queries causally over the AR keys of their own sample: q and kv are the same rows,
        ``cu_seqlens_q == cu_seqlens_kv`` = the AR boundaries, mask ``padding_causal`` (each segment
        its own sequence; top-left causal, which equals bottom-right because q and kv lengths agree)."""
        device = layout.ar_cu_seqlens.device
        lengths = [n for n in layout.ar_lengths if n]
        cu = cls._boundaries(lengths, device)
        return cls(cu, cu, max(lengths, default=0), max(lengths, default=0), None, "padding_causal")

    @classmethod
    def dm_half(cls, layout: PackLayout) -> VarlenCall:
        """DM queries over [AR_s, DM_s] of their own sample, bidirectionally: ``cu_seqlens_q`` = the DM
        boundaries, ``cu_seqlens_kv`` = the boundaries of the per-sample [AR_s, DM_s] runs that
        ``kv_index`` gathers from cat(AR keys, DM keys); mask ``padding`` (no causal part: every query
        sees its whole kv segment, nothing outside it)."""
        device = layout.ar_cu_seqlens.device
        n_ar = sum(layout.ar_lengths)
        q_lengths, kv_lengths, pieces = [], [], []
        a0 = d0 = 0
        for n_a, n_d in zip(layout.ar_lengths, layout.dm_lengths):
            if n_d:  # a sample without DM rows has no DM query: its AR keys join no DM call
                q_lengths.append(n_d)
                kv_lengths.append(n_a + n_d)
                pieces += [torch.arange(a0, a0 + n_a), torch.arange(n_ar + d0, n_ar + d0 + n_d)]
            a0, d0 = a0 + n_a, d0 + n_d
        index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return cls(
            cls._boundaries(q_lengths, device),
            cls._boundaries(kv_lengths, device),
            max(q_lengths, default=0),
            max(kv_lengths, default=0),
            index.to(device),
            "padding",
        )


class TEFusedAttention(AttentionBackend):
    """Transformer Engine's ``DotProductAttention`` in THD form (GPU; bf16/fp16), imported lazily.

    One call per half over the whole pack, with the arguments ``VarlenCall`` builds once per layout:

    * AR: ``cu_seqlens_q = cu_seqlens_kv`` = the AR sample boundaries, ``attn_mask_type="padding_causal"``;
    * DM: ``cu_seqlens_q`` = the DM boundaries, ``cu_seqlens_kv`` = the boundaries of the per-sample
      [AR_s, DM_s] runs (K and V gathered into that order, as for ``flash``), ``attn_mask_type="padding"``.

    THD has no unfused TE kernel, so fp32 tensors are refused (``precision: bf16`` or ``fp8``). The
    ``DotProductAttention`` modules hold no weights and no per-layer state (fp8 attention is off), so
    one per (heads, kv heads, head dim, mask) serves every layer and every forward; with heads as this
    rank holds them, so ``tp_size`` stays 1.
    """

    name = "te"
    _modules: dict[tuple, torch.nn.Module] = {}  # shared: a backend is made per forward

    def __init__(self, te_module):
        self._te = te_module
        self._layout: PackLayout | None = None
        self._calls: tuple[VarlenCall, VarlenCall] | None = None

    def _varlen_calls(self, layout: PackLayout) -> tuple[VarlenCall, VarlenCall]:
        if layout is not self._layout:  # a new micro-batch: its arguments, for every layer
            self._calls = (VarlenCall.ar_half(layout), VarlenCall.dm_half(layout))
            self._layout = layout
        return self._calls

    @staticmethod
    def module_keywords(heads: int, kv_heads: int, dim: int, mask_type: str) -> dict:
        """``DotProductAttention``'s constructor arguments for one (heads, kv heads, dim, mask)."""
        return dict(
            num_attention_heads=heads,
            kv_channels=dim,
            num_gqa_groups=kv_heads,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type=mask_type,
            attention_type="self" if mask_type == "padding_causal" else "cross",
        )

    def _module(self, heads: int, kv_heads: int, dim: int, mask_type: str):
        key = (heads, kv_heads, dim, mask_type)
        if key not in self._modules:
            self._modules[key] = self._te.DotProductAttention(**self.module_keywords(*key))
        return self._modules[key]

    def _attend(self, q, k, v, call: VarlenCall) -> torch.Tensor:
        q, k, v = _in_autocast_dtype(q, k, v)
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"attention_backend='te' runs bf16/fp16 tensors (THD has no fp32 kernel), got {q.dtype}: "
                "use precision=bf16 or fp8"
            )
        if call.kv_index is not None:
            k, v = k.index_select(0, call.kv_index), v.index_select(0, call.kv_index)
        out = self._module(q.shape[1], k.shape[1], q.shape[2], call.mask_type)(
            q.contiguous(), k.contiguous(), v.contiguous(), **call.te_keywords()
        )
        return out.reshape(q.shape[0], q.shape[1], -1)  # TE returns (t, heads * d)

    def ar_attention(self, q_ar, k_ar, v_ar, layout):
        if q_ar.shape[0] == 0:
            return q_ar
        return self._attend(q_ar, k_ar, v_ar, self._varlen_calls(layout)[0])

    def dm_attention(self, q_dm, k_ar, v_ar, k_dm, v_dm, layout):
        if q_dm.shape[0] == 0:
            return q_dm
        return self._attend(q_dm, torch.cat([k_ar, k_dm]), torch.cat([v_ar, v_dm]), self._varlen_calls(layout)[1])


def _import_flash_varlen():
    try:  # flash-attention 3 (Hopper) first, then 2
        from flash_attn_interface import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    return flash_attn_varlen_func


# The head dims the GPU kernels take (docs/DESIGN.md, "The attention rule"). flash-attention 2 and 3
# check both limits in C++ (FA2's Python wrapper pads other multiples, FA3's does not); TE's THD
# attention runs cuDNN's fused kernels or flash-attention (its unfused one takes no THD), which
# need both too. FlexAttention's Triton kernel (CUDA) takes no head_dim below 16 (tl.dot).
KERNEL_MAX_HEAD_DIM, KERNEL_HEAD_DIM_MULTIPLE, FLEX_MIN_HEAD_DIM = 256, 8, 16


def head_dim_problem(name: str, head_dim: int) -> str | None:
    """Why backend ``name``'s CUDA kernels cannot take heads of ``head_dim`` (a phrase), or None
    where they can; ``dense`` and ``sdpa`` (and ``flex`` off CUDA, which takes any) have no limit."""
    kernels = {"flash": "flash-attention's kernels", "te": "Transformer Engine's THD attention kernels"}
    if name in kernels and (head_dim > KERNEL_MAX_HEAD_DIM or head_dim % KERNEL_HEAD_DIM_MULTIPLE):
        return (
            f"{kernels[name]} take a head_dim of at most {KERNEL_MAX_HEAD_DIM} and a multiple of "
            f"{KERNEL_HEAD_DIM_MULTIPLE}"
        )
    if name == "flex" and head_dim < FLEX_MIN_HEAD_DIM:
        return f"FlexAttention's CUDA kernel takes a head_dim of at least {FLEX_MIN_HEAD_DIM}"
    return None


def attention_backend(name: str, device: torch.device | str = "cpu", head_dim: int | None = None) -> AttentionBackend:
    """The backend called ``name`` for tensors on ``device``; the GPU ones fall back to ``sdpa`` (the
    same rule) with one warning line where they cannot run: no CUDA, their library missing, or, on
    CUDA, heads of ``head_dim`` (``model.head_dim``; None: not checked) their kernels do not take."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {ATTENTION_BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    problem = head_dim_problem(name, head_dim) if on_cuda and head_dim is not None else None
    if problem is not None:  # before any import: the kernels would refuse these heads in the first step
        warn_once(f"attention backend {name!r}: model.head_dim={head_dim}, but {problem}; using 'sdpa'")
        return SdpaVarlenAttention()
    if name == "dense":
        return DenseMaskAttention()
    if name == "sdpa":
        return SdpaVarlenAttention()
    if name == "flash":
        if not on_cuda:
            warn_once(f"attention backend 'flash' needs CUDA (device is {device}); using 'sdpa'")
            return SdpaVarlenAttention()
        try:
            return FlashVarlenAttention(_import_flash_varlen())
        except ImportError:
            warn_once("attention backend 'flash': flash-attn is not installed; using 'sdpa'")
            return SdpaVarlenAttention()
    if name == "flex":
        return FlexPackAttention(device)
    missing = transformer_engine_missing(device)  # name == "te"
    if missing is not None:
        warn_once(f"attention backend 'te': {missing}; using 'sdpa'")
        return SdpaVarlenAttention()
    return TEFusedAttention(import_transformer_engine())
