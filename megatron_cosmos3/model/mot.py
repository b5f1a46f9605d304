"""The MoT model: embeddings, the stack of two-tower layers, final norms and heads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_cosmos3.model.attention import PackLayout, attention_backend
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig
from megatron_cosmos3.model.embeddings import DMStreamProjections, TimestepEmbedding
from megatron_cosmos3.model.layer import MoTLayer, StreamRotary
from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch
from megatron_cosmos3.model.rope import MultimodalRotaryEmbedding
from megatron_cosmos3.model.tower import RMSNorm


@dataclass
class ARPass:
    """Result of the Reasoner pass: final-normed AR hidden states and every layer's AR K/V.

    The K/V list is exactly what cached inference keeps: DM passes attend to it, frozen.
    """

    hidden: torch.Tensor  # (n_ar, hidden)
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (n_ar, kv_heads, d) twice
    layout: PackLayout


@dataclass
class MoTOutput:
    ar_hidden: torch.Tensor  # (n_ar, hidden), after the Reasoner's final norm
    dm_hidden: torch.Tensor  # (n_dm, hidden), after the Generator's final norm
    layout: PackLayout
    lm_logits: torch.Tensor  # (n_labelled, vocab): only AR rows with a next-token label
    lm_logit_rows: torch.Tensor  # (n_labelled,) which AR rows those are
    dm_predictions: dict[str, torch.Tensor]  # per DM stream: (n_k, d_k) velocity predictions


def run_reasoner(
    layers: Iterable[tuple[int, MoTLayer]],
    hidden: torch.Tensor,
    rope: StreamRotary,
    layout: PackLayout,
    attention,
    batch: PackedBatch,
):
    """The Reasoner halves of ``layers`` ((global index, layer) pairs, in order) on the AR stream.

    Returns the AR hidden states and each layer's AR keys/values. Shared by the full model, pipeline
    stages and the context-parallel runner, so the layer loop (with DeepStack) exists once.
    """
    deepstack = batch.ar_deepstack_embeds
    vision_rows = batch.ar_is_vision.nonzero().squeeze(1) if deepstack is not None else None
    keys_values = []
    for index, layer in layers:
        hidden, k, v = layer.forward_ar(hidden, rope, layout, attention)
        keys_values.append((k, v))
        if deepstack is not None and index < deepstack.shape[0]:
            # DeepStack (Qwen3-VL): features of early ViT blocks join the ViT rows after layer i.
            hidden = hidden.index_add(0, vision_rows, deepstack[index].to(hidden.dtype))
    return hidden, keys_values


def run_generator(
    layers: Iterable[MoTLayer],
    hidden: torch.Tensor,
    rope: StreamRotary,
    keys_values: list[tuple[torch.Tensor, torch.Tensor]],
    layout: PackLayout,
    attention,
) -> torch.Tensor:
    """The Generator halves of ``layers`` on the DM stream, each against its layer's AR K/V."""
    for layer, (k_ar, v_ar) in zip(layers, keys_values, strict=True):
        hidden = layer.forward_dm(hidden, rope, k_ar, v_ar, layout, attention)
    return hidden


class MoTModel(nn.Module):
    """Mixture-of-Transformers backbone with a Reasoner (AR) and a Generator (DM) tower per layer.

    The forward pass is the Reasoner pass over the AR stream followed by the Generator pass over the
    DM stream: since AR tokens never attend to DM tokens, running the AR stream through all layers
    first is the same computation as interleaving, and it is exactly the cached-inference split.
    """

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dm_streams = DMStreamProjections(config)
        self.timestep_embedding = TimestepEmbedding(config.timestep_embedding_dim, config.hidden_size)
        self.rotary = MultimodalRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)
        self.layers = nn.ModuleList(MoTLayer(config) for _ in range(config.num_layers))
        self.reasoner_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.generator_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, MoEMLP):
            for experts in (module.gate_up_proj, module.down_proj):
                nn.init.normal_(experts, std=self.config.init_std)

    def init_weights(self, *modules: nn.Module) -> None:
        """Initialises the parameters of ``modules`` (submodules of this model) as at construction."""
        for module in modules:
            module.apply(self._init_weights)

    def materialize(self, device: torch.device | str) -> None:
        """Allocates a model built on the meta device on ``device``, parameters left uninitialised
        (a checkpoint or ``init_weights`` fills them): only the rotary tables are computed and
        tied weights re-tied, so no second copy of the model is ever made."""
        self.to_empty(device=device)
        self.rotary.reset_buffers(device)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # to_empty unties them

    def add_embodiment(self, name: str, embodiment: EmbodimentConfig) -> None:
        """Adds a new embodiment's action projections; every existing weight stays as it is."""
        self.dm_streams.add_embodiment(name, embodiment)
        self.config.embodiments[name] = embodiment

    # ------------------------------------------------------------------ passes
    def _attention(self):
        return attention_backend(self.config.attention_backend, self.embed_tokens.weight.device)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> StreamRotary:
        cos, sin = self.rotary(positions, dtype)
        return StreamRotary(cos, sin)

    def embed_ar(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.ar_token_ids)
        if batch.ar_is_vision is not None:
            # ViT tokens take their embeddings from the vision encoder, not the vocabulary.
            rows = batch.ar_is_vision.nonzero().squeeze(1)
            hidden = hidden.index_copy(0, rows, batch.ar_vision_embeds.to(hidden.dtype))
        return hidden

    def embed_dm(self, batch: PackedBatch) -> torch.Tensor:
        dtype = self.embed_tokens.weight.dtype
        hidden = self.dm_streams.embed(batch.dm_tokens, batch.dm_token_index, batch.num_dm_tokens, dtype)
        return hidden + self.timestep_embedding(batch.dm_timesteps).to(dtype)

    def forward_ar(self, batch: PackedBatch, layout: PackLayout | None = None) -> ARPass:
        """Runs only the AR stream through the Reasoner towers."""
        layout = layout or PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
        hidden = self.embed_ar(batch)
        rope = self._rotary(batch.ar_positions, hidden.dtype)
        hidden, keys_values = run_reasoner(enumerate(self.layers), hidden, rope, layout, self._attention(), batch)
        return ARPass(self.reasoner_norm(hidden), keys_values, layout)

    def forward_dm(self, batch: PackedBatch, ar_pass: ARPass) -> torch.Tensor:
        """Runs only the DM stream through the Generator towers against the AR pass's K/V."""
        hidden = self.embed_dm(batch)
        rope = self._rotary(batch.dm_positions, hidden.dtype)
        hidden = run_generator(self.layers, hidden, rope, ar_pass.keys_values, ar_pass.layout, self._attention())
        return self.generator_norm(hidden)

    def forward(self, batch: PackedBatch) -> MoTOutput:
        """Both passes and both heads (inside forward, so DDP-style wrappers see every parameter)."""
        ar_pass = self.forward_ar(batch)
        dm_hidden = self.forward_dm(batch, ar_pass)
        # Only labelled rows go through the vocabulary projection: prompts and ViT tokens are free.
        rows = (batch.ar_labels != IGNORE_INDEX).nonzero().squeeze(1)
        return MoTOutput(
            ar_hidden=ar_pass.hidden,
            dm_hidden=dm_hidden,
            layout=ar_pass.layout,
            lm_logits=self.lm_logits(ar_pass.hidden.index_select(0, rows)),
            lm_logit_rows=rows,
            dm_predictions=self.dm_predictions(dm_hidden, batch),
        )

    # ------------------------------------------------------------------ heads
    def lm_logits(self, ar_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(ar_hidden)

    def dm_predictions(self, dm_hidden: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Per-stream velocity predictions (n_k, d_k) for every DM token."""
        return self.dm_streams.predict(dm_hidden, batch.dm_token_index)
