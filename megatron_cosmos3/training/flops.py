"""Model FLOPs of one training step (forward + backward), counted the standard way.

matmuls:   6 * N_tower * tokens — each token pays for the parameters of the tower it goes through
           (Reasoner for AR, Generator for DM), plus its input/output projection and, for labelled AR
           positions, the LM head (only those rows are projected to the vocabulary);
attention: 12 * L * heads * head_dim * P — P is the number of (query, key) pairs the mask allows:
           n(n+1)/2 per sample's AR section (causal) and n_dm * (n_ar + n_dm) per DM section.

vision:    when the model trains its own ViT, the same rule over its patches: 6 * N_blocks per patch
           (patch embedding and ViT blocks), 6 * N_mergers per Reasoner token (merger and DeepStack
           mergers), and 12 * depth * width * P over the (query, key) pairs within each picture
           (bidirectional). A frozen ViT (first in the graph: no backward at all) counts 2 for 6.

``megatron_convention`` is what Megatron-LM's counter reports for the same tokens: it knows no
sample boundaries or towers, so it treats the pack as one causal sequence through one tower
(``megatron_lm_flops``: Megatron-LM's own formula, not 6N + pairs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.model.mot import MoTModel

# Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by (default 128) times
# the tensor-parallel size; its FLOP counter uses the padded size. One GPU: TP = 1.
MEGATRON_VOCAB_DIVISOR = 128


@dataclass
class StepFlops:
    matmul: float
    attention: float
    megatron_convention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _active_params(module: nn.Module) -> float:
    """Parameters one token's matmuls use: a mixture-of-experts MLP counts its router and top_k of
    its experts (what Megatron-LM and torchtitan count), everything else in full."""
    experts = [m for m in module.modules() if isinstance(m, MoEMLP)]
    inactive = sum((m.gate_up_proj.numel() + m.down_proj.numel()) * (1 - m.top_k / m.num_experts) for m in experts)
    return _num_params(module) - inactive


def tower_parameter_counts(model: MoTModel) -> dict[str, float]:
    """Parameters each token uses in the Reasoner and Generator towers over all layers, final norm
    included (no embeddings/heads). ``model`` must be whole: not sharded by tensor or expert
    parallelism (``FlopCounter`` builds one on the meta device)."""
    return {
        "reasoner": sum(_active_params(layer.reasoner) for layer in model.layers) + _num_params(model.reasoner_norm),
        "generator": sum(_active_params(layer.generator) for layer in model.layers) + _num_params(model.generator_norm),
    }


def attention_pairs(layout: PackLayout) -> int:
    """(query, key) pairs the asymmetric mask allows over a pack."""
    return sum(a * (a + 1) // 2 + d * (a + d) for a, d in zip(layout.ar_lengths, layout.dm_lengths))


def megatron_lm_flops(config: MoTConfig, seq_length: int, batch_size: int = 1) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for a plain GPT with the Reasoner tower's shape.

    The formula of NVIDIA/Megatron-LM ``megatron/training/training.py`` (``transformer_flops``, read at
    commit 001b00c), evaluated for what a Qwen3 tower is: grouped-query attention, SwiGLU,
    no MLA/MTP/linear attention. Per token, 3 (fwd + 2 bwd GEMMs) x 2 (FMA) x
      per layer: hidden * (q + 2 kv projection widths)  + q * hidden (out proj)
                 + q * seq_length / 2 * 2   (QK^T and AV, half the square: the causal mask)
                 + 3 * ffn * hidden          (SwiGLU: the h -> 2 ffn and ffn -> h GEMMs)
      once:      hidden * padded vocab       (logits of every token)
    MoE layers count top_k experts of moe_ffn_hidden_size instead of the dense MLP (router not
    counted); norms, embeddings lookups and rotary are not counted at all.
    """
    c = config
    query, key_value = c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    projections = c.hidden_size * (query + 2 * key_value) + query * c.hidden_size
    core_attention = query * seq_length  # two matmuls (QK^T, AV) over half the square: 2 * s / 2
    moe = c.num_experts and "reasoner" in c.moe_towers
    mlp_width = (c.moe_ffn_hidden_size or c.ffn_hidden_size) * c.moe_top_k if moe else c.ffn_hidden_size
    mlp = 3 * mlp_width * c.hidden_size
    padded_vocab = -(-c.vocab_size // MEGATRON_VOCAB_DIVISOR) * MEGATRON_VOCAB_DIVISOR
    logits = c.hidden_size * padded_vocab
    return 6.0 * batch_size * seq_length * (c.num_layers * (projections + core_attention + mlp) + logits)


class FlopCounter:
    """Model FLOPs of training steps for one model config.

    Parameter counts come from the whole model built once on the meta device (no memory), so every
    rank counts the unsharded model whatever its tensor, expert or pipeline shard holds.
    """

    def __init__(self, config: MoTConfig, vision: nn.Module | None = None):
        """``vision``: the model's own ViT (``MoTModel.vision``, any device, meta included), if it has one."""
        with torch.device("meta"):
            model = MoTModel(copy.deepcopy(config))
        self.config = config
        self.towers = tower_parameter_counts(model)
        self.timestep_mlp = _num_params(model.timestep_embedding.mlp)
        self.vision = None
        if vision is not None:
            vit = vision.vit
            trainable = any(p.requires_grad for p in vision.parameters())
            self.vision = {
                "per_patch": _num_params(vit.patch_embed) + _num_params(vit.blocks),
                "per_token": _num_params(vit.merger) + _num_params(vit.deepstack_merger_list),
                "per_pair": 12.0 * len(vit.blocks) * vision.config.hidden_size,
                "merge": vision.config.spatial_merge_size**2,
                "passes": 3 if trainable else 1,  # forward + 2 backward GEMMs, or forward only
            }

    def step(
        self,
        layout: PackLayout,
        num_labelled_ar_tokens: int,
        dm_stream_widths: dict[str, tuple[int, int]] | None = None,
        vision_grid_thw: torch.Tensor | None = None,
    ) -> StepFlops:
        """FLOPs of forward + backward on one pack.

        ``dm_stream_widths`` maps a DM stream key to (num tokens, token width) for its projections.
        ``vision_grid_thw``: the patch grids of the pack's pictures, which the model's ViT encodes.
        """
        config = self.config
        n_ar, n_dm = sum(layout.ar_lengths), sum(layout.dm_lengths)
        dm_projection = sum(2 * n * width * config.hidden_size for n, width in (dm_stream_widths or {}).values())
        matmul = 6.0 * (
            self.towers["reasoner"] * n_ar
            + self.towers["generator"] * n_dm
            + config.vocab_size * config.hidden_size * num_labelled_ar_tokens
            + dm_projection
            + self.timestep_mlp * n_dm
        )
        per_pair = 12.0 * config.num_layers * config.num_attention_heads * config.head_dim
        attention = per_pair * attention_pairs(layout)
        if vision_grid_thw is not None and self.vision is not None:
            vit, grids = self.vision, vision_grid_thw.tolist()
            patches = sum(t * h * w for t, h, w in grids)
            pairs = sum(t * (h * w) ** 2 for t, h, w in grids)  # ViT attention: within each frame
            scale = vit["passes"] / 3
            matmul += scale * 6.0 * (vit["per_patch"] * patches + vit["per_token"] * patches // vit["merge"])
            attention += scale * vit["per_pair"] * pairs
        return StepFlops(
            matmul=matmul,
            attention=attention,
            # Megatron-LM sees the pack as one sequence (batch 1) of all its tokens.
            megatron_convention=megatron_lm_flops(config, seq_length=n_ar + n_dm),
        )
