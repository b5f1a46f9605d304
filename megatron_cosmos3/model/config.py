"""Typed configuration of the MoT backbone (one dataclass carries every model knob)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.model.attention import ATTENTION_BACKENDS
from megatron_cosmos3.model.moe import EXPERT_IMPLS
from megatron_cosmos3.model.transformer_engine import LINEAR_IMPLS

# The FPS rule: one second of real time spans TPS_BASE temporal position units in every stream
# (24 fps video, 4x temporally compressed by the VAE -> 6 latent frames per second).
TPS_BASE = 6.0
# Latent cells per video token, each side, by default (Wan2.2's; encoders/video_vae.py TOKEN_PATCH,
# checked equal in tests/model/test_config.py). Any size works: MoTConfig.video_patch_size is the one
# source the encoders, the shard schema, generation requests and the decoders read it from.
VIDEO_PATCH_SIZE = 2

# Bounds of every size of the model, far above any real one (Qwen3-VL-235B: 94 layers, hidden size
# 4096, 151,936 tokens, 128 experts): a crafted or damaged config (a training YAML, a checkpoint's
# meta.json, a weights folder's model.yaml, a Hugging Face config.json) is refused by name when it
# loads, before anything builds or allocates by it (docs/DESIGN.md, "Model shapes").
MODEL_SIZE_LIMITS = dict(
    num_layers=1024,
    hidden_size=65_536,
    ffn_hidden_size=262_144,
    vocab_size=4_194_304,
    num_attention_heads=1024,
    num_kv_heads=1024,
    head_dim=4096,
    timestep_embedding_dim=65_536,
    video_latent_channels=4096,
    video_patch_size=64,
    audio_latent_dim=65_536,
    num_experts=4096,
    moe_ffn_hidden_size=262_144,
)
VISION_SIZE_LIMITS = dict(
    depth=1024,
    hidden_size=65_536,
    intermediate_size=262_144,
    num_heads=1024,
    out_hidden_size=65_536,
    num_position_embeddings=1_048_576,
    in_channels=64,
    patch_size=1024,
    temporal_patch_size=64,
    spatial_merge_size=64,
)
# VisionConfig's placeholder tokens of the Reasoner vocabulary.
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
EMBODIMENT_LIMITS = dict(embodiments=4096, action_dim=65_536)
# The whole backbone, both towers (``MoTConfig.parameter_count``): far above any real model, and
# each size within its bound can still multiply to petabytes.
MAX_PARAMETERS = 10**13


def _size_error(name: str, value, limit: int) -> str | None:
    """Why ``value`` is not a size in 1..``limit`` (None when it is)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return f"{name} must be a positive int, got {value!r}"
    if value > limit:
        return f"{name}={value} is above {limit:,}, far beyond any real model: a damaged or crafted config"
    return None


def refuse_below(section: str, owner: object, lowest: dict[str, float]) -> None:
    """ValueError ``<section>.<field>=<value> must be >= <lowest>`` for the first field of ``owner``
    (a config dataclass) below its lowest value: each setting refused by its own dotted name, not
    a message naming two (``save_every=... and keep_last=... must be >= 1``) of which one is bad."""
    for name, low in lowest.items():
        value = getattr(owner, name)
        if not value >= low:  # NaN too
            raise ValueError(f"{section}.{name}={value!r} must be >= {low:g}")


@dataclass
class EmbodimentConfig:
    """One robot/vehicle/camera embodiment: its pseudo-action width and sampling rate."""

    action_dim: int = 19
    rate_hz: float = 10.0


@dataclass
class VisionConfig:
    """Qwen3-VL's understanding ViT (defaults: the SigLIP-2 tower of Qwen3-VL-8B/32B).

    Pixels are cut into ``temporal_patch_size`` x ``patch_size`` x ``patch_size`` patches; every
    ``spatial_merge_size`` x ``spatial_merge_size`` block of patches is merged by an MLP into one
    Reasoner token of width ``out_hidden_size``. ``deepstack_visual_indexes`` lists the ViT blocks
    whose features (merged by their own MLPs) are added to the ViT token rows after the first
    ``len(deepstack_visual_indexes)`` Reasoner layers (DeepStack). The ``*_token_id`` fields are the
    placeholder tokens of the Reasoner vocabulary that the ViT tokens replace.
    """

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    # A square number: the learned position grid, bilinearly resampled to every image's grid.
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"model.vision.{message}")  # the field's name in a model or training config

        for name, limit in VISION_SIZE_LIMITS.items():
            error = _size_error(name, getattr(self, name), limit)
            require(error is None, error)
        require(self.rope_theta > 0 and math.isfinite(self.rope_theta), f"rope_theta={self.rope_theta!r} must be > 0")
        require(
            self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 4 == 0,
            f"hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a multiple of 4 "
            "(the 2-D rotary embedding splits each head over h and w)",
        )
        side = round(self.num_position_embeddings**0.5)
        require(
            side * side == self.num_position_embeddings,
            f"num_position_embeddings={self.num_position_embeddings} must be a square number",
        )
        indexes = list(self.deepstack_visual_indexes)
        require(
            len(set(indexes)) == len(indexes) and all(0 <= i < self.depth for i in indexes),
            f"deepstack_visual_indexes={indexes} must be distinct ViT blocks in [0, depth={self.depth})",
        )
        # An image placeholder that is also the video's (or a start/end marker) was counted as the
        # other: "0 image placeholder tokens in input_ids but the ViT gave 4" for a prompt that has 4.
        ids = [getattr(self, name) for name in VISION_TOKEN_FIELDS]
        require(len(set(ids)) == len(ids), f"{'/'.join(VISION_TOKEN_FIELDS)}={ids} must be distinct ids")
        # The ViT's MLPs take transformers' activation by this name: another was a KeyError at build.
        if self.hidden_act != "gelu_pytorch_tanh":  # Qwen3-VL's; transformers imported only for another
            from transformers.activations import ACT2FN

            require(
                self.hidden_act in ACT2FN,
                f"hidden_act={self.hidden_act!r} is not one of transformers' activations {sorted(ACT2FN)}",
            )


@dataclass
class MoTConfig:
    """Dimensions of both towers (identical shapes: both start from the same Qwen3-VL weights)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden_size: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Qwen3-VL's interleaved 3-axis rotary split (t, h, w) of the head_dim/2 frequencies; empty =
    # Qwen3-VL's own split scaled to this head_dim (``scaled_mrope_section``; [4, 2, 2] at 16). Read
    # it through ``rope_sections``.
    mrope_section: list[int] = field(default_factory=list)
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # DM token streams. A video token is a video_patch_size x video_patch_size patch of VAE latents
    # (16 * video_patch_size pixels each side: 32x32 at 2).
    video_latent_channels: int = 8
    video_patch_size: int = VIDEO_PATCH_SIZE
    audio_latent_dim: int = 16
    embodiments: dict[str, EmbodimentConfig] = field(
        default_factory=lambda: {
            "single_arm": EmbodimentConfig(action_dim=19, rate_hz=10.0),
            "humanoid": EmbodimentConfig(action_dim=57, rate_hz=30.0),
        }
    )
    timestep_embedding_dim: int = 64
    # "sdpa" (varlen via per-sample SDPA, CPU and GPU), "flash" (flash-attn varlen, GPU),
    # "dense" (a dense-mask reference for tests), "flex" (FlexAttention block masks; GPU, CPU forward only),
    # "te" (Transformer Engine's fused THD attention; GPU, bf16/fp8). GPU-only ones fall back to "sdpa" elsewhere.
    attention_backend: str = "sdpa"
    # The towers' QKV/output/MLP linears: "torch" (nn.Linear; megatron-core's parallel linears under TP)
    # or "te" (Transformer Engine's; megatron-core's TE linears under TP). "te" falls back to "torch"
    # with a warning where CUDA or TE is missing (docs/DESIGN.md, "GPU fast paths").
    linear_impl: str = "torch"
    # Mixture of experts (Qwen3-VL-MoE style): 0 = dense SwiGLU MLPs. moe_towers says which towers
    # route their MLP through experts; moe_ffn_hidden_size 0 = ffn_hidden_size per expert.
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden_size: int = 0
    moe_towers: list[str] = field(default_factory=lambda: ["reasoner", "generator"])
    moe_aux_loss_weight: float = 0.01  # load-balancing loss coefficient (per MoE layer)
    # "grouped": experts as grouped GEMMs, no host sync per layer; "loop": one expert at a time
    # (the reference). docs/DESIGN.md, "Mixture of experts".
    moe_expert_impl: str = "grouped"
    # The understanding ViT (Qwen3-VL's); None = ViT embeddings, if any, come with the batch.
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"model.{message}")  # the field's name in a model or training config

        for name, limit in MODEL_SIZE_LIMITS.items():
            if name in ("num_experts", "moe_ffn_hidden_size"):  # 0 = none / ffn_hidden_size: checked below
                continue
            error = _size_error(name, getattr(self, name), limit)
            require(error is None, error)
        require(
            self.num_attention_heads % self.num_kv_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"num_kv_heads={self.num_kv_heads} (grouped-query attention)",
        )
        require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings")
        sections = self.rope_sections
        require(
            len(sections) == 3 and sum(sections) == self.head_dim // 2,
            f"mrope_section={sections} must have 3 entries summing to head_dim/2={self.head_dim // 2}",
        )
        require(min(sections) >= 0, f"mrope_section={sections} must not have a negative entry")
        # h takes frequencies 1, 4, 7, ..., w takes 2, 5, 8, ... (model/rope.py): each must fit in head_dim/2.
        require(
            3 * sections[1] - 2 < self.head_dim // 2 and 3 * sections[2] - 1 < self.head_dim // 2,
            f"mrope_section={sections}: the interleaved h/w frequencies (1, 4, ... and 2, 5, ...) do not fit in "
            f"head_dim/2={self.head_dim // 2}",
        )
        require(
            self.attention_backend in ATTENTION_BACKENDS,
            f"attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}",
        )
        require(self.linear_impl in LINEAR_IMPLS, f"linear_impl={self.linear_impl!r} is not one of {LINEAR_IMPLS}")
        for name in ("num_experts", "moe_ffn_hidden_size"):
            value = getattr(self, name)
            require(
                value == 0 or _size_error(name, value, MODEL_SIZE_LIMITS[name]) is None,
                f"{name}={value!r} must be 0 or an int in 1..{MODEL_SIZE_LIMITS[name]:,}",
            )
        if self.num_experts:
            require(
                0 < self.moe_top_k <= self.num_experts,
                f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]",
            )
            require(
                set(self.moe_towers) <= {"reasoner", "generator"} and len(self.moe_towers) > 0,
                f"moe_towers={list(self.moe_towers)} must name 'reasoner' and/or 'generator'",
            )
        require(
            self.moe_expert_impl in EXPERT_IMPLS,
            f"moe_expert_impl={self.moe_expert_impl!r} is not one of {EXPERT_IMPLS}",
        )
        require(
            self.timestep_embedding_dim % 2 == 0, f"timestep_embedding_dim={self.timestep_embedding_dim} must be even"
        )
        for name in ("rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), f"{name}={value!r} must be a finite number > 0")
        # Read only with experts, but a negative or non-finite one is no setting at all.
        require(self.moe_top_k >= 1, f"moe_top_k={self.moe_top_k!r} must be >= 1")
        weight = self.moe_aux_loss_weight
        require(weight >= 0 and math.isfinite(weight), f"moe_aux_loss_weight={weight!r} must be a finite number >= 0")
        require(
            len(self.embodiments) <= EMBODIMENT_LIMITS["embodiments"],
            f"embodiments lists {len(self.embodiments)}, more than {EMBODIMENT_LIMITS['embodiments']:,}",
        )
        for name, emb in self.embodiments.items():
            problem = embodiment_name_problem(name)
            require(problem is None, f"embodiments: {problem}")
            error = _size_error(f"embodiments.{name}.action_dim", emb.action_dim, EMBODIMENT_LIMITS["action_dim"])
            require(error is None, error)
            # inf put every action token of a clip at one time (a model.yaml or a direct config: load_config refuses it)
            require(
                emb.rate_hz > 0 and math.isfinite(emb.rate_hz),
                f"embodiments.{name}.rate_hz must be a finite number > 0, got {emb.rate_hz}",
            )
        if self.vision is not None:
            v = self.vision
            require(
                v.out_hidden_size == self.hidden_size,
                f"vision.out_hidden_size={v.out_hidden_size} must equal hidden_size={self.hidden_size}",
            )
            require(
                len(v.deepstack_visual_indexes) <= self.num_layers,
                f"vision.deepstack_visual_indexes has {len(v.deepstack_visual_indexes)} entries, "
                f"more than num_layers={self.num_layers} Reasoner layers to inject them into",
            )
            for name in VISION_TOKEN_FIELDS:
                value = getattr(v, name)
                require(
                    0 <= value < self.vocab_size,
                    f"vision.{name}={value} is outside the vocabulary (vocab_size={self.vocab_size})",
                )
        count = self.parameter_count_lower_bound()
        require(
            count <= MAX_PARAMETERS,
            f"num_layers={self.num_layers}, hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"vocab_size={self.vocab_size}, num_experts={self.num_experts} make at least {count:.3g} parameters, "
            f"above {MAX_PARAMETERS:.0e}, far beyond any real model: a damaged or crafted config",
        )

    def parameter_count_lower_bound(self) -> int:
        """The parameters of the weight matrices alone (embedding, LM head, both towers' attention
        and MLPs or experts, the ViT blocks' linears): norms, routers and DM-stream projections are
        left out, so the model holds at least this many (checked in tests/model/test_config.py)."""
        count = self.layer_parameter_count_lower_bound() + self.vocab_size * self.hidden_size * (
            1 if self.tie_word_embeddings else 2
        )
        if self.vision is not None:
            v = self.vision
            count += v.depth * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        return count

    def layer_parameter_count_lower_bound(self) -> int:
        """The layers' share of ``parameter_count_lower_bound`` (both towers' attention and MLPs or
        experts): what every pipeline stage holds a part of, in proportion to its layers."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_attention_heads + 2 * self.num_kv_heads)
        dense = 3 * h * self.ffn_hidden_size
        experts = self.num_experts * 3 * h * (self.moe_ffn_hidden_size or self.ffn_hidden_size)
        towers = sum(
            attention + (experts if self.num_experts and tower in self.moe_towers else dense)
            for tower in ("reasoner", "generator")
        )
        return self.num_layers * towers

    @property
    def rope_sections(self) -> list[int]:
        """The (t, h, w) rotary split in use: ``mrope_section``, or the scaled default when empty."""
        return list(self.mrope_section) or scaled_mrope_section(self.head_dim)

    @property
    def video_token_dim(self) -> int:
        return self.video_latent_channels * self.video_patch_size**2


def embodiment_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an embodiment (None when it can): it keys the ``action/<name>``
    stream and the ``action_in.<name>`` projections, so it must be non-empty, without '/' or '.'."""
    if not name or "/" in name or "." in name:
        return f"embodiment name {name!r} must be non-empty and contain no '/' or '.'"
    return None


def scaled_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's (t, h, w) split [24, 20, 20] of 64 rotary frequencies, scaled to ``head_dim / 2``
    (h and w rounded down, t the rest): [24, 20, 20] at 128, [6, 3, 3] at 24, [4, 2, 2] at 16."""
    spatial = (head_dim // 2) * 20 // 64
    return [head_dim // 2 - 2 * spatial, spatial, spatial]


def qwen3_vl_mrope_section(section: list[int], head_dim: int) -> list[int]:
    """The (t, h, w) split that Qwen3-VL's rotary embedding applies for a config's ``mrope_section``
    at ``head_dim``: transformers gives h the frequencies 1, 4, 7, ... below 3*h and w 2, 5, 8, ...
    below 3*w, cut at head_dim/2, and t the rest; it never reads t. So [24, 20, 20], its default, is
    [3, 3, 2] at head_dim 16. The result is a valid ``MoTConfig.mrope_section`` of the same rotation."""
    if not (len(section) == 3 and all(isinstance(n, int) and n >= 0 for n in section)):
        raise ValueError(f"mrope_section={list(section)} must be 3 non-negative ints")
    half = head_dim // 2
    h = len(range(1, min(3 * section[1], half), 3))
    w = len(range(2, min(3 * section[2], half), 3))
    return [half - h - w, h, w]


# Mappings of MoTConfig whose default entries are examples, not a floor: given whole (a YAML file's
# mapping, or ``model.embodiments={...}`` on the command line) they replace the default, where
# OmegaConf would merge into it (a model of one 6-D arm kept the default single_arm and humanoid
# heads). A dotted key below them (``model.embodiments.arm.rate_hz=20``) still changes one entry.
WHOLE_MAPPINGS = ("embodiments",)


def merge_config_layer(merged, layer, prefix: str = "", given: Iterable[str] | None = None):
    """``OmegaConf.merge(merged, layer)``, except that each of WHOLE_MAPPINGS that ``layer`` sets
    replaces ``merged``'s instead of merging into it. ``prefix``: where the model config sits in
    both (``"model."`` in a training config); ``given``: only the keys ``layer`` gives whole (an
    override list's ``key=`` names), None for every one it sets (a file)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(layer, DictConfig):  # a YAML list: OmegaConf named 'Index 'data' (str) is not an int'
        raise ValueError(
            f"holds a YAML {type(layer).__name__.removesuffix('Config').lower()}, not a mapping of settings"
        )
    problem = _container_mismatch(merged, layer)
    if problem:
        raise ValueError(problem)
    for key in (prefix + name for name in WHOLE_MAPPINGS):
        if (given is None or key in given) and OmegaConf.select(layer, key, default=None) is not None:
            OmegaConf.update(merged, key, {}, merge=False)
    return OmegaConf.merge(merged, layer)


def _container_mismatch(merged, layer, path: str = "") -> str | None:
    """The first key of ``layer`` that gives a mapping where ``merged`` holds a list or a list where
    it holds a mapping, named with both kinds; None where there is none. OmegaConf's own error was
    'Cannot merge incompatible container types', naming no key (a TypeError, for an override)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    entry_type = merged._metadata.element_type  # a mapping of settings (data.stages): its entries' dataclass
    for key in layer.keys():
        if not isinstance(key, str):
            continue
        if key in merged:
            target = merged._get_node(key)
        elif is_dataclass(entry_type):  # a new entry (a stage of its own): checked as the dataclass's fields
            target = OmegaConf.structured(entry_type)
        else:
            continue  # an unknown key: OmegaConf names it, with the nearest known one
        value = layer._get_node(key)
        where = f"{path}{key}"
        found = _nested_value(target, value, where)
        if found:
            return found
        if isinstance(target, ListConfig) and isinstance(value, DictConfig):
            return f"{where}: a mapping where a list belongs, got {value}"
        if isinstance(target, DictConfig) and isinstance(value, ListConfig):
            return f"{where}: a list where a mapping belongs, got {value}"
        if isinstance(target, ListConfig) and isinstance(value, ListConfig):
            found = _list_items_mismatch(target._metadata.element_type, value, where)
            if found:
                return found
        if isinstance(target, DictConfig) and isinstance(value, DictConfig):
            if target._is_none():  # an optional section left null (eval.suite): its dataclass's fields
                ref = target._metadata.ref_type
                if not is_dataclass(ref):
                    continue
                target = OmegaConf.structured(ref)
            found = _container_mismatch(target, value, f"{where}.")
            if found:
                return found
    return None


def _nested_value(target, value, where: str) -> str | None:
    """The first item of ``value`` that is a list or mapping where ``target`` (a list or mapping of
    plain values: ``optimizer.betas``, a stage's task weights) holds numbers or strings, named with
    its index or key; None where there is none. OmegaConf stored such an item as is, and the
    config's own range checks then failed with a TypeError naming no key."""
    from omegaconf import DictConfig, ListConfig

    if not isinstance(target, (DictConfig, ListConfig)) or target._metadata.element_type not in (int, float, str, bool):
        return None
    if isinstance(value, ListConfig):
        items = [(f"{where}[{index}]", value._get_node(index)) for index in range(len(value))]
    elif isinstance(value, DictConfig):
        items = [(f"{where}.{key}", value._get_node(key)) for key in value.keys()]
    else:
        return None
    want = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[target._metadata.element_type]
    for name, item in items:
        if isinstance(item, (DictConfig, ListConfig)):
            kind = "a mapping" if isinstance(item, DictConfig) else "a list"
            return f"{name}: {kind} where {want} belongs, got {item}"
    return None


def _list_items_mismatch(element_type, items, where: str) -> str | None:
    """The first item of a list of dataclass settings (``data.datasets``, ``eval.datasets``) with a
    key its dataclass lacks or a container of the wrong kind, named with its index: OmegaConf builds
    each item on its own and named only the key ('full_key: shard', not which list or item)."""
    from omegaconf import DictConfig, OmegaConf

    if not is_dataclass(element_type):
        return None
    known = [f.name for f in fields(element_type)]
    for index, item in enumerate(items):
        if not isinstance(item, DictConfig):
            continue  # a scalar where a mapping belongs: OmegaConf names the type
        unknown = [key for key in item.keys() if key not in known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
            return f"{where}[{index}]: unknown key {unknown[0]!r}{hint}"
        found = _container_mismatch(OmegaConf.structured(element_type), item, f"{where}[{index}].")
        if found:
            return found
    return None


def load_model_config(path: str | Path, name: str = "model config") -> MoTConfig:
    """The ``model:`` section of a YAML file (e.g. ``configs/model/nano.yaml``) as a validated MoTConfig
    (its ``embodiments``, if given, replace the default ones). A path that is no regular file is a
    ValueError naming ``name`` (the option that gave it; "" where the caller names it), the path and
    what the path is (``refuse_irregular_file``).

    The same file merges into a training config as is, since its one top-level key is ``model``.
    """
    from omegaconf import DictConfig, OmegaConf

    refuse_irregular_file(name, path)
    try:
        raw = OmegaConf.load(path)
    except OSError as error:
        if error.errno is not None:  # unreadable: the system's error names the path
            raise
        raise ValueError(f"{path}: {error}") from None  # OmegaConf's 'Invalid loaded object type' (a YAML scalar)
    except Exception as error:  # YAML syntax: name the file
        raise ValueError(f"{path}: not YAML ({type(error).__name__}: {error})") from None
    if not isinstance(raw, DictConfig) or "model" not in raw:
        found = sorted(map(str, raw)) if isinstance(raw, DictConfig) else type(raw).__name__
        raise ValueError(f"{path}: expected a top-level 'model:' section, found {found}")
    try:
        return OmegaConf.to_object(merge_config_layer(OmegaConf.structured(MoTConfig), raw.model))
    except Exception as error:  # OmegaConf's errors name the key, validation the value: add the file
        raise ValueError(f"{path}: not a valid model config: {error}") from None
