"""One Mixture-of-Transformers layer: a Reasoner tower, a Generator tower, one shared attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.moe import WHOLE_INPUT, TokenBalance
from megatron_cosmos3.model.tower import Tower


@dataclass
class StreamRotary:
    """Per-token (cos, sin) of one token stream, computed once per forward and shared by layers,
    and which of its rows a mixture-of-experts MLP balances over (``TokenBalance``). Passed into
    each layer call, so recomputation in backward sees the same."""

    cos: torch.Tensor
    sin: torch.Tensor
    balance: TokenBalance = WHOLE_INPUT


class MoTLayer(nn.Module):
    """AR tokens go through ``reasoner``, DM tokens through ``generator``; each token through one."""

    RECOMPUTE_MODES = ("none", "selective", "full")

    def __init__(self, config: MoTConfig):
        super().__init__()
        moe = set(config.moe_towers) if config.num_experts else set()
        self.reasoner = Tower(config, mixture_of_experts="reasoner" in moe)
        self.generator = Tower(config, mixture_of_experts="generator" in moe)
        # Activation recomputation: "full" keeps only each half-layer's input and recomputes the rest
        # in backward; "selective" recomputes only the core attention (Megatron's selective mode).
        self.recompute = "none"

    def set_recompute(self, mode: str) -> None:
        if mode not in self.RECOMPUTE_MODES:
            raise ValueError(f"recompute={mode!r} is not one of {self.RECOMPUTE_MODES}")
        self.recompute = mode

    def _attend(self, function, *args):
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def forward_ar(
        self, ar_hidden: torch.Tensor, ar_rope: StreamRotary, layout: PackLayout, attention: AttentionBackend
    ):
        """The Reasoner half: returns the new AR hidden states and this layer's AR keys/values.

        It never sees a DM tensor, which is what makes the reasoner blind to DM tokens.
        """
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward_ar, ar_hidden, ar_rope, layout, attention, use_reentrant=False)
        return self._forward_ar(ar_hidden, ar_rope, layout, attention)

    def _forward_ar(self, ar_hidden, ar_rope, layout, attention):
        q_ar, k_ar, v_ar = self.reasoner.attention_inputs(ar_hidden, ar_rope.cos, ar_rope.sin)
        attended = self._attend(attention.ar_attention, q_ar, k_ar, v_ar, layout)
        ar_out = self.reasoner.finish(ar_hidden, attended, ar_rope.balance)
        return ar_out, k_ar, v_ar

    def decode_ar(
        self, ar_hidden: torch.Tensor, ar_rope: StreamRotary, cache, index: int, attention: AttentionBackend
    ) -> torch.Tensor:
        """The Reasoner half for one new AR token per sequence (ar_hidden (S, hidden)): its key/value
        joins layer ``index`` of ``cache`` (a ``ReasonerCache``) and it attends over its sequence's
        cached tokens. Inference only; like ``forward_ar`` it never sees a DM tensor."""
        q_ar, k_ar, v_ar = self.reasoner.attention_inputs(ar_hidden, ar_rope.cos, ar_rope.sin)
        k_cache, v_cache = cache.write(index, k_ar, v_ar)
        attended = attention.ar_decode_attention(q_ar, k_cache, v_cache, cache.lengths + 1)
        return self.reasoner.finish(ar_hidden, attended, ar_rope.balance)

    def forward_dm(
        self,
        dm_hidden: torch.Tensor,
        dm_rope: StreamRotary,
        k_ar: torch.Tensor,
        v_ar: torch.Tensor,
        layout: PackLayout,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """The Generator half alone, against given (possibly cached) AR keys/values."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward_dm, dm_hidden, dm_rope, k_ar, v_ar, layout, attention, use_reentrant=False)
        return self._forward_dm(dm_hidden, dm_rope, k_ar, v_ar, layout, attention)

    def _forward_dm(self, dm_hidden, dm_rope, k_ar, v_ar, layout, attention):
        q_dm, k_dm, v_dm = self.generator.attention_inputs(dm_hidden, dm_rope.cos, dm_rope.sin)
        attended = self._attend(attention.dm_attention, q_dm, k_ar, v_ar, k_dm, v_dm, layout)
        return self.generator.finish(dm_hidden, attended, dm_rope.balance)
