"""One Mixture-of-Transformers layer: a Reasoner tower, a Generator tower, one shared attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.tower import Tower


@dataclass
class StreamRotary:
    """Per-token (cos, sin) of one token stream, computed once per forward and shared by layers."""

    cos: torch.Tensor
    sin: torch.Tensor


class MoTLayer(nn.Module):
    """AR tokens go through ``reasoner``, DM tokens through ``generator``; each token through one."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.reasoner = Tower(config)
        self.generator = Tower(config)

    def forward_ar(self, ar_hidden: torch.Tensor, ar_rope: StreamRotary, layout: PackLayout,
                   attention: AttentionBackend):
        """The Reasoner half: returns the new AR hidden states and this layer's AR keys/values.

        It never sees a DM tensor, which is what makes the reasoner blind to DM tokens.
        """
        q_ar, k_ar, v_ar = self.reasoner.attention_inputs(ar_hidden, ar_rope.cos, ar_rope.sin)
        ar_out = self.reasoner.finish(ar_hidden, attention.ar_attention(q_ar, k_ar, v_ar, layout))
        return ar_out, k_ar, v_ar

    def forward_dm(self, dm_hidden: torch.Tensor, dm_rope: StreamRotary, k_ar: torch.Tensor,
                   v_ar: torch.Tensor, layout: PackLayout, attention: AttentionBackend) -> torch.Tensor:
        """The Generator half alone, against given (possibly cached) AR keys/values."""
        q_dm, k_dm, v_dm = self.generator.attention_inputs(dm_hidden, dm_rope.cos, dm_rope.sin)
        attended = attention.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout)
        return self.generator.finish(dm_hidden, attended)
