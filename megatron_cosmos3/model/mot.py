"""The MoT model: embeddings, the stack of two-tower layers, final norms and heads."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_cosmos3.model.attention import AttentionBackend, PackLayout, attention_backend
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig
from megatron_cosmos3.model.embeddings import DMStreamProjections, TimestepEmbedding
from megatron_cosmos3.model.kv_cache import ReasonerCache
from megatron_cosmos3.model.layer import MoTLayer, StreamRotary
from megatron_cosmos3.model.moe import WHOLE_INPUT, MoEMLP, TokenBalance
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


@dataclass
class RankRows:
    """The rows of one micro-batch that this rank runs through its layers, and how attention sees them.

    Without a sequence split, the whole pack (``RankRows.whole``). Under context or sequence
    parallelism (``parallel/context_parallel.py``), this rank's chunk of each stream: ``batch`` is the
    pack restricted to the chunk's real rows, followed by ``ar_padding`` / ``dm_padding`` zero rows,
    while ``layout`` is the whole padded pack's, which ``attention`` (an exchanging backend) runs on.
    The full model, pipeline stages and the context-parallel runner all run a micro-batch through
    ``MoTModel.embed_rows`` -> ``MoTModel.run_layers`` -> ``MoTModel.heads``.
    """

    batch: PackedBatch
    layout: PackLayout  # what attention runs on
    batch_layout: PackLayout  # the layout of ``batch`` itself (this rank's real rows)
    attention: AttentionBackend
    ar_rotary_positions: torch.Tensor  # (3, rows): the positions q/k rows are rotated with
    dm_rotary_positions: torch.Tensor
    ar_padding: int = 0
    dm_padding: int = 0
    # Which rows of each stream a mixture-of-experts MLP balances over, and over which group.
    ar_balance: TokenBalance = WHOLE_INPUT
    dm_balance: TokenBalance = WHOLE_INPUT

    @classmethod
    def whole(cls, batch: PackedBatch, attention: AttentionBackend) -> RankRows:
        layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
        return cls(batch, layout, layout, attention, batch.ar_positions, batch.dm_positions)

    @property
    def num_ar_rows(self) -> int:
        """Rows of the AR hidden stream on this rank (real and padding)."""
        return self.batch.num_ar_tokens + self.ar_padding

    @property
    def num_dm_rows(self) -> int:
        return self.batch.num_dm_tokens + self.dm_padding


def _with_padding(rows: torch.Tensor, padding: int) -> torch.Tensor:
    """``rows`` followed by ``padding`` zero rows (padding rows enter with zero hidden states)."""
    if not padding:
        return rows
    return torch.cat([rows, rows.new_zeros(padding, *rows.shape[1:])])


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
        # Drawn first, from the global CPU generator: ``torch.manual_seed`` makes a model reproducible,
        # built eagerly or on the meta device alike (see ``reset_parameters``).
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dm_streams = DMStreamProjections(config)
        self.timestep_embedding = TimestepEmbedding(config.timestep_embedding_dim, config.hidden_size)
        self.rotary = MultimodalRotaryEmbedding(config.head_dim, config.rope_theta, config.rope_sections)
        self.layers = nn.ModuleList(MoTLayer(config) for _ in range(config.num_layers))
        self.reasoner_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.generator_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.vision = None  # the ViT, when the model trains its own (add_vision_encoder)
        self.reset_parameters()

    def reset_parameters(self, *modules: nn.Module) -> None:
        """Initialises the parameters of ``modules`` (submodules of this model; default: all of it).

        Each parameter is drawn from its own generator, seeded by ``init_seed`` and the parameter's
        name, so its values depend on nothing else on the rank: a pipeline rank that materialises
        only its own stage (``materialize``) holds exactly its part of the model built whole.
        Parameters still on the meta device are skipped.
        """
        wanted = {id(p) for m in modules for p in m.parameters()} if modules else None
        seen = set()
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen or param.is_meta or (wanted is not None and id(param) not in wanted):
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}" if module_name else param_name
                seed = (self.init_seed + zlib.crc32(name.encode())) % 2**63
                generator = torch.Generator(device=param.device).manual_seed(seed)
                with torch.no_grad():
                    self._initialise(name, module, param_name, param, generator)

    def _initialise(self, name: str, module: nn.Module, param_name: str, param: nn.Parameter, generator) -> None:
        if isinstance(module, (RMSNorm, nn.LayerNorm)) and param_name == "weight":
            param.fill_(1.0)
        elif param_name == "bias":
            param.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding, MoEMLP, nn.Conv3d)):  # Conv3d: the ViT's patches
            param.normal_(0.0, self.config.init_std, generator=generator)
        else:  # a new kind of module must say how it starts, rather than keep torch's default
            raise TypeError(f"no initialisation rule for parameter {name} of {type(module).__name__}")

    def materialize(self, device: torch.device | str, *modules: nn.Module) -> None:
        """Allocates a model built on the meta device on ``device`` — all of it, or only ``modules``
        (e.g. this rank's pipeline stages) — parameters left uninitialised (a checkpoint or
        ``reset_parameters`` fills them): only the rotary tables are computed and tied weights
        re-tied, so no second copy of the model is ever made."""
        for module in modules or (self,):
            module.to_empty(device=device)
        self.rotary.reset_buffers(device)
        if self.vision is not None and not next(self.vision.parameters()).is_meta:  # allocated just now
            self.vision.reset_buffers(device)
        if self.config.tie_word_embeddings:  # to_empty unties them: keep the allocated one
            embedding, head = self.embed_tokens.weight, self.lm_head.weight
            self.embed_tokens.weight = self.lm_head.weight = head if embedding.is_meta else embedding

    def add_vision_encoder(self) -> None:
        """Gives the model its own ViT (``config.vision``), which then trains with it: packs that carry
        pictures (``PackedBatch.vision_pixels``) are encoded inside the forward pass. Its parameters
        are ``vision.vit.*``, the names of a weights folder written by the conversion."""
        if self.config.vision is None:
            raise ValueError("model.vision is not set: a model without a ViT config cannot run a ViT")
        from megatron_cosmos3.model.vision import VisionEncoder  # transformers: only when used

        self.vision = VisionEncoder(self.config.vision)
        self.reset_parameters(self.vision)  # skipped on the meta device

    def encode_vision(self, batch: PackedBatch) -> PackedBatch:
        """``batch`` with its pictures (``vision_pixels``) replaced by this model's ViT tokens and
        DeepStack features; a batch without pictures is returned as is. Runs on the whole pack,
        before any split of its rows over ranks."""
        if batch.vision_pixels is None:
            return batch
        if self.vision is None:
            raise ValueError(
                "the pack carries pictures (vision_pixels) but the model has no ViT: set model.vision "
                "(MoTModel.add_vision_encoder)"
            )
        if batch.vision_pixels.shape[0] == 0:  # an empty picture set (with_every_module): the ViT still runs
            return self._blank_vision(batch)
        if self.vision.sharing is None:
            features = self.vision(batch.vision_pixels, batch.vision_grid_thw)
        else:  # this rank encodes its share of the pictures, then all are gathered
            merge = self.config.vision.spatial_merge_size**2
            features = self.vision.sharing.encode(self.vision, batch.vision_pixels, batch.vision_grid_thw, merge)
        n_vision = int(batch.ar_is_vision.sum())
        if features.embeds.shape[0] != n_vision:
            raise ValueError(
                f"the ViT made {features.embeds.shape[0]} tokens of vision_grid_thw={batch.vision_grid_thw.tolist()}, "
                f"but ar_is_vision marks {n_vision} rows"
            )
        deepstack = features.deepstack if features.deepstack.shape[0] else None
        return batch.replace(
            ar_vision_embeds=features.embeds, ar_deepstack_embeds=deepstack, vision_pixels=None, vision_grid_thw=None
        )

    def _blank_vision(self, batch: PackedBatch) -> PackedBatch:
        """``batch`` (no ViT rows) after its ViT ran on one blank picture of which no token is kept:
        the ViT's parameters are in the step's graph with exactly zero gradient."""
        m = self.config.vision.spatial_merge_size
        grid = torch.tensor([[1, m, m]], device=batch.vision_pixels.device)
        features = self.vision(batch.vision_pixels.new_zeros(m * m, self.vision.patch_dim), grid)
        deepstack = features.deepstack[:, :0] if features.deepstack.shape[0] else None
        kept = dict(ar_vision_embeds=features.embeds[:0], ar_deepstack_embeds=deepstack)
        return batch.replace(**kept, vision_pixels=None, vision_grid_thw=None)

    def with_every_module(self, batch: PackedBatch) -> PackedBatch:
        """``batch`` padded so that this model's forward on it calls every DM stream projection and
        (with a ViT) the ViT, in one fixed order, whatever the pack holds: empty streams and an empty
        picture set, which change no loss and give the modules they reach exactly zero gradient.
        ZeRO-3 gathers each module's parameters as the forward enters it, so its ranks must all
        enter the same modules (docs/DESIGN.md, "The DeepSpeed engine")."""
        patch_dim = self.vision.patch_dim if self.vision is not None else None
        return batch.with_every_stream(self.dm_streams.stream_widths(), patch_dim)

    def add_embodiment(self, name: str, embodiment: EmbodimentConfig) -> None:
        """Adds a new embodiment's action projections; every existing weight stays as it is."""
        self.dm_streams.add_embodiment(name, embodiment)
        self.config.embodiments[name] = embodiment
        self.reset_parameters(self.dm_streams.action_in[name], self.dm_streams.action_out[name])

    # ------------------------------------------------------------------ passes
    def _attention(self):
        config = self.config
        return attention_backend(config.attention_backend, self.embed_tokens.weight.device, config.head_dim)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype, balance: TokenBalance = WHOLE_INPUT) -> StreamRotary:
        cos, sin = self.rotary(positions, dtype)
        return StreamRotary(cos, sin, balance)

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
        batch = self.encode_vision(batch)
        layout = layout or PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
        hidden = self.embed_ar(batch)
        rope = self._rotary(batch.ar_positions, hidden.dtype)
        hidden, keys_values = run_reasoner(enumerate(self.layers), hidden, rope, layout, self._attention(), batch)
        return ARPass(self.reasoner_norm(hidden), keys_values, layout)

    def decode_ar(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: ReasonerCache) -> torch.Tensor:
        """One text-generation step: the next AR token of each of the cache's S sequences,
        token_ids (S,) at positions (3, S), through the Reasoner towers against ``cache``, which
        takes their keys/values. Returns their final-normed hidden states (S, hidden)."""
        if token_ids.shape != (cache.num_sequences,) or positions.shape != (3, cache.num_sequences):
            raise ValueError(
                f"decode_ar: token_ids {tuple(token_ids.shape)} and positions {tuple(positions.shape)} do not "
                f"match the cache's {cache.num_sequences} sequences ((S,) and (3, S))"
            )
        if not cache.has_room():
            raise ValueError(f"decode_ar: a sequence of the cache is full (capacity={cache.capacity})")
        hidden = self.embed_tokens(token_ids)
        rope = self._rotary(positions, hidden.dtype)
        attention = self._attention()
        for index, layer in enumerate(self.layers):
            hidden = layer.decode_ar(hidden, rope, cache, index, attention)
        cache.advance()
        return self.reasoner_norm(hidden)

    def forward_dm(self, batch: PackedBatch, ar_pass: ARPass) -> torch.Tensor:
        """Runs only the DM stream through the Generator towers against the AR pass's K/V."""
        hidden = self.embed_dm(batch)
        rope = self._rotary(batch.dm_positions, hidden.dtype)
        hidden = run_generator(self.layers, hidden, rope, ar_pass.keys_values, ar_pass.layout, self._attention())
        return self.generator_norm(hidden)

    def forward(self, batch: PackedBatch) -> MoTOutput:
        """Both passes and both heads (inside forward, so DDP-style wrappers see every parameter)."""
        rows = RankRows.whole(self.encode_vision(batch), self._attention())
        ar, dm = self.run_layers(enumerate(self.layers), *self.embed_rows(rows), rows)
        return self.heads(ar, dm, rows)

    # ------------------------------------------------------------------ the three parts of a pass
    # Each reads only attributes that a pipeline stage holding that part also has (MoTStage calls
    # them on itself), so one implementation serves the model, the stages and the CP runner.
    def embed_rows(self, rows: RankRows) -> tuple[torch.Tensor, torch.Tensor]:
        """The input hidden streams of ``rows``: (num_ar_rows, hidden), (num_dm_rows, hidden)."""
        return _with_padding(self.embed_ar(rows.batch), rows.ar_padding), _with_padding(
            self.embed_dm(rows.batch), rows.dm_padding
        )

    def run_layers(
        self, layers: Iterable[tuple[int, MoTLayer]], ar: torch.Tensor, dm: torch.Tensor, rows: RankRows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Reasoner halves of ``layers`` ((global index, layer), in order) on the AR stream, then
        their Generator halves on the DM stream."""
        layers = list(layers)
        ar_rope = self._rotary(rows.ar_rotary_positions, ar.dtype, rows.ar_balance)
        dm_rope = self._rotary(rows.dm_rotary_positions, dm.dtype, rows.dm_balance)
        # DeepStack rows index this rank's real AR rows, which come first (padding is at the end).
        ar, keys_values = run_reasoner(layers, ar, ar_rope, rows.layout, rows.attention, rows.batch)
        dm = run_generator([layer for _, layer in layers], dm, dm_rope, keys_values, rows.layout, rows.attention)
        return ar, dm

    def heads(self, ar: torch.Tensor, dm: torch.Tensor, rows: RankRows) -> MoTOutput:
        """Final norms and both heads on the real rows of ``rows`` (padding rows leave here)."""
        batch = rows.batch
        ar = self.reasoner_norm(ar[: batch.num_ar_tokens])
        dm = self.generator_norm(dm[: batch.num_dm_tokens])
        # Only labelled rows go through the vocabulary projection: prompts and ViT tokens are free.
        labelled = (batch.ar_labels != IGNORE_INDEX).nonzero().squeeze(1)
        return MoTOutput(
            ar_hidden=ar,
            dm_hidden=dm,
            layout=rows.batch_layout,
            lm_logits=self.lm_logits(ar.index_select(0, labelled)),
            lm_logit_rows=labelled,
            dm_predictions=self.dm_predictions(dm, batch),
        )

    # ------------------------------------------------------------------ heads
    def lm_logits(self, ar_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(ar_hidden)

    def dm_predictions(self, dm_hidden: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Per-stream velocity predictions (n_k, d_k) for every DM token."""
        return self.dm_streams.predict(dm_hidden, batch.dm_token_index)
