"""One tower of one MoT layer: Qwen3-style pre-norm attention projections and a SwiGLU MLP.

The module names follow Hugging Face's Qwen3-VL text layers (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm`` ...) so that converting a checkpoint is a rename of the prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.moe import WHOLE_INPUT, MoEMLP, TokenBalance
from megatron_cosmos3.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.eps)

    @staticmethod
    def normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Qwen3's RMSNorm: statistics in fp32 (bf16 variance loses too much precision), cast back,
        then the weight. torch's ``rms_norm`` kernel (fused on CUDA) on the fp32 input: bit-equal to
        the hand-written ``x * rsqrt(mean(x^2) + eps)`` on CPU (docs/DESIGN.md, "Fused kernels")."""
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class AttentionProjections(nn.Module):
    """QKV with per-head q/k RMSNorm (Qwen3), grouped-query heads, and the output projection."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (n, hidden) -> q (n, heads, d), k and v (n, kv_heads, d); q and k rotated."""
        # unflatten, not view(n, -1, d): a stream may be empty (a pack of text-only samples).
        heads = (-1, self.head_dim)
        q = self.q_norm(self.q_proj(x).unflatten(-1, heads))
        k = self.k_norm(self.k_proj(x).unflatten(-1, heads))
        v = self.v_proj(x).unflatten(-1, heads)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Tower(nn.Module):
    """The parameters one token stream uses in one layer. The attention itself is shared."""

    def __init__(self, config: MoTConfig, mixture_of_experts: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = AttentionProjections(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if mixture_of_experts:
            self.mlp = MoEMLP(
                config.hidden_size,
                config.moe_ffn_hidden_size or config.ffn_hidden_size,
                config.num_experts,
                config.moe_top_k,
                aux_loss_weight=config.moe_aux_loss_weight,
                expert_impl=config.moe_expert_impl,
            )
        else:
            self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def attention_inputs(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.self_attn.qkv(self.input_layernorm(hidden), cos, sin)

    def finish(
        self, hidden: torch.Tensor, attention_out: torch.Tensor, balance: TokenBalance = WHOLE_INPUT
    ) -> torch.Tensor:
        """Output projection and MLP, each with its residual; attention_out is (n, heads, d).
        ``balance``: the stream's tokens as a mixture-of-experts MLP balances over them."""
        hidden = hidden + self.self_attn.o_proj(attention_out.flatten(1))
        mlp_input = self.post_attention_layernorm(hidden)
        return hidden + (self.mlp(mlp_input, balance) if isinstance(self.mlp, MoEMLP) else self.mlp(mlp_input))
