"""Model FLOPs of one training step (forward + backward), counted the standard way.

matmuls:   6 * N_tower * tokens — each token pays for the parameters of the tower it goes through
           (Reasoner for AR, Generator for DM), plus its input/output projection and, for labelled AR
           positions, the LM head (only those rows are projected to the vocabulary);
attention: 12 * L * heads * head_dim * P — P is the number of (query, key) pairs the mask allows:
           n(n+1)/2 per sample's AR section (causal) and n_dm * (n_ar + n_dm) per DM section.

``megatron_convention`` is what Megatron-LM's counter reports for the same tokens: it knows no
sample boundaries or towers, so it treats the pack as one causal sequence through one tower.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.mot import MoTModel


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


def tower_parameter_counts(model: MoTModel) -> dict[str, int]:
    """Parameters of the Reasoner and Generator towers over all layers (no embeddings/heads)."""
    return {
        "reasoner": sum(_num_params(layer.reasoner) for layer in model.layers) + _num_params(model.reasoner_norm),
        "generator": sum(_num_params(layer.generator) for layer in model.layers) + _num_params(model.generator_norm),
    }


def attention_pairs(layout: PackLayout) -> int:
    """(query, key) pairs the asymmetric mask allows over a pack."""
    return sum(a * (a + 1) // 2 + d * (a + d) for a, d in zip(layout.ar_lengths, layout.dm_lengths))


def step_flops(
    model: MoTModel,
    layout: PackLayout,
    num_labelled_ar_tokens: int,
    dm_stream_widths: dict[str, tuple[int, int]] | None = None,
) -> StepFlops:
    """FLOPs of forward + backward on one pack.

    ``dm_stream_widths`` maps a DM stream key to (num tokens, token width) for its projections.
    """
    config = model.config
    towers = tower_parameter_counts(model)
    n_ar, n_dm = sum(layout.ar_lengths), sum(layout.dm_lengths)
    dm_projection = sum(2 * n * width * config.hidden_size for n, width in (dm_stream_widths or {}).values())
    timestep_mlp = _num_params(model.timestep_embedding.mlp) * n_dm
    matmul = 6.0 * (
        towers["reasoner"] * n_ar
        + towers["generator"] * n_dm
        + config.vocab_size * config.hidden_size * num_labelled_ar_tokens
        + dm_projection
        + timestep_mlp
    )
    per_pair = 12.0 * config.num_layers * config.num_attention_heads * config.head_dim
    tokens = n_ar + n_dm
    megatron = (
        6.0 * (towers["reasoner"] + config.vocab_size * config.hidden_size) * tokens
        + per_pair * tokens * (tokens + 1) / 2
    )
    return StepFlops(matmul=matmul, attention=per_pair * attention_pairs(layout), megatron_convention=megatron)
