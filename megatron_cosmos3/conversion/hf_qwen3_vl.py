"""Hugging Face Qwen3-VL folders <-> our MoT model and ViT.

Import: ``config.json`` becomes a MoTConfig (with its ``vision`` section); the model is built on the
meta device, allocated once, and every checkpoint tensor is streamed into place — the language
model's layers into the Reasoner *and* the Generator tower, the final norm into both final norms,
the embeddings, LM head and ViT (with its merger and DeepStack mergers) as they are. Only the DM
projections and the timestep embedding, which Qwen3-VL does not have, start from fresh weights.

Export: the Reasoner, shared embeddings/head and ViT, under Qwen3-VL's names, into a folder that
``transformers`` loads as is. The Generator's weights are ours alone and are not exported.

Names: our towers already use Qwen3-VL's module names, so the mapping is a prefix rule
(``layers.<i>.reasoner.<rest>`` <-> ``model.language_model.layers.<i>.<rest>``, ``vision.vit.<rest>``
<-> ``model.visual.<rest>``), written once in ``hf_key``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_cosmos3.conversion.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ConversionError,
    PlannedTensor,
    check_depths,
    check_output_folder,
    check_shapes,
    load_into,
    tensor_dtype,
    tensor_shapes,
    write_sharded,
)
from megatron_cosmos3.json_files import read_json
from megatron_cosmos3.model.config import (
    MODEL_SIZE_LIMITS,
    VISION_SIZE_LIMITS,
    MoTConfig,
    VisionConfig,
    qwen3_vl_mrope_section,
)
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.vision import VisionEncoder, hf_vision_config

MODEL_TYPE = "qwen3_vl"
LM = "model.language_model."
VISION = "model.visual."
# Our parameters Qwen3-VL has no counterpart of: they start fresh at import and are not exported.
NOT_IN_QWEN3_VL = ("dm_streams.", "timestep_embedding.")
# Files of a Qwen3-VL folder that are not weights or config (tokenizer, processor, chat template,
# generation defaults): an export can take them over from the folder it came from.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Bounds of config.json's sizes: the model's own (model/config.py MODEL_SIZE_LIMITS and
# VISION_SIZE_LIMITS), under Hugging Face's names, so a crafted or damaged value is refused by name
# before transformers, or anything of ours, builds or allocates by it. Within them, the weights'
# own shapes decide.
_TEXT_NAMES = dict(
    num_hidden_layers="num_layers",
    hidden_size="hidden_size",
    intermediate_size="ffn_hidden_size",
    vocab_size="vocab_size",
    num_attention_heads="num_attention_heads",
    num_key_value_heads="num_kv_heads",
    head_dim="head_dim",
)
SIZE_LIMITS = {
    "text_config": {hf: MODEL_SIZE_LIMITS[ours] for hf, ours in _TEXT_NAMES.items()},
    "vision_config": dict(VISION_SIZE_LIMITS),
}
_GENERATOR_LAYER = re.compile(r"^layers\.(\d+)\.generator\.(.+)$")
_REASONER_LAYER = re.compile(r"^layers\.(\d+)\.reasoner\.(.+)$")


# ---------------------------------------------------------------------------------------- names
def reasoner_twin(name: str) -> str:
    """The Reasoner-side name a Generator tensor was copied from; other names map to themselves."""
    match = _GENERATOR_LAYER.match(name)
    if match:
        return f"layers.{match[1]}.reasoner.{match[2]}"
    return "reasoner_norm.weight" if name == "generator_norm.weight" else name


def hf_key(name: str) -> str | None:
    """The Qwen3-VL checkpoint key of our tensor ``name`` (a MoTModel name, or ``vision.<name>`` for
    the ViT); Generator tensors give their Reasoner twin's key; None if Qwen3-VL has no such tensor."""
    name = reasoner_twin(name)
    if name.startswith(NOT_IN_QWEN3_VL):
        return None
    match = _REASONER_LAYER.match(name)
    if match:
        return f"{LM}layers.{match[1]}.{match[2]}"
    if name.startswith("vision.vit."):
        return VISION + name[len("vision.vit.") :]
    simple = {
        "embed_tokens.weight": f"{LM}embed_tokens.weight",
        "reasoner_norm.weight": f"{LM}norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    if name not in simple:
        raise KeyError(f"no Qwen3-VL name rule for our tensor {name!r}")
    return simple[name]


def named_tensors(model: MoTModel, vision: VisionEncoder | None) -> dict[str, torch.Tensor]:
    """Every parameter of the model and ViT by our name (``vision.`` prefix for the ViT); a tied LM
    head appears once, as the embeddings."""
    tensors = dict(model.state_dict(keep_vars=True))
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    if vision is not None:
        tensors.update({f"vision.{k}": v for k, v in vision.state_dict(keep_vars=True).items()})
    return tensors


# --------------------------------------------------------------------------------------- config
def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise ConversionError(f"{path}: {message}")


def read_hf_config(folder: str | Path):
    """The folder's config.json as transformers' ``Qwen3VLConfig``, after checking it is Qwen3-VL."""
    from transformers import Qwen3VLConfig

    folder = Path(folder)
    _require(folder.is_dir(), folder, "not a folder")
    path = folder / "config.json"
    _require(path.is_file(), folder, "no config.json: not a Hugging Face model folder")
    raw = read_json(path, ConversionError)
    _require(isinstance(raw, dict), path, f"holds a JSON {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    _require(
        model_type == MODEL_TYPE,
        path,
        f"model_type={model_type!r}, expected {MODEL_TYPE!r}: not a Qwen3-VL (dense) checkpoint",
    )
    for section, limits in SIZE_LIMITS.items():
        fields = raw.get(section)
        for field, limit in limits.items():
            value = fields.get(field) if isinstance(fields, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # other kinds: transformers'
                _require(1 <= value <= limit, path, f"{section}.{field}={value!r}: must be 1..{limit}")
    try:
        return Qwen3VLConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers' field validation (a wrong type) names the field
        raise ConversionError(f"{path}: {' '.join(str(error).split())}") from None


def mot_config_from_hf(hf_config, path: Path | str = "config.json", base: MoTConfig | None = None) -> MoTConfig:
    """A MoTConfig with the checkpoint's dimensions; DM-stream fields (latent widths, embodiments,
    attention backend) come from ``base`` (default: MoTConfig's), whose backbone fields, if given,
    must equal the checkpoint's."""
    path = Path(path)
    text, vis = hf_config.text_config, hf_config.vision_config
    _require(not text.attention_bias, path, "text_config.attention_bias=true is not supported (Qwen3-VL has none)")
    _require(text.hidden_act == "silu", path, f"text_config.hidden_act={text.hidden_act!r}, expected 'silu'")
    rope = dict(text.rope_parameters or {})
    _require(
        rope.get("rope_type", "default") == "default",
        path,
        f"text_config.rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' is supported",
    )
    vision_rope = dict(vis.rope_parameters or {})
    try:
        from_hf = _backbone_fields(hf_config, text, vis, rope, vision_rope)
    except (ValueError, TypeError, KeyError) as error:  # a field of the wrong kind, or missing
        raise ConversionError(f"{path}: {error}") from None
    if base is not None:
        _require(
            not base.num_experts,
            path,
            f"the given config has num_experts={base.num_experts} (moe_towers={list(base.moe_towers)}), but a "
            "Qwen3-VL checkpoint's MLPs are dense: import with num_experts=0",
        )
        for key, value in from_hf.items():
            ours = getattr(base, key)
            if key == "vision" and ours is not None:
                for field in dataclasses.fields(VisionConfig):
                    a, b = getattr(ours, field.name), getattr(value, field.name)
                    _require(
                        a == b, path, f"the checkpoint has vision.{field.name}={b!r} but the given config has {a!r}"
                    )
            else:
                ours = base.rope_sections if key == "mrope_section" else ours  # empty: the scaled default
                _require(ours == value, path, f"the checkpoint has {key}={value!r} but the given config has {ours!r}")
    try:
        return dataclasses.replace(base or MoTConfig(), **from_hf)
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from None


def _backbone_fields(hf_config, text, vis, rope: dict, vision_rope: dict) -> dict:
    """MoTConfig fields read from transformers' config (a ValueError for a field that cannot be one)."""
    return dict(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        ffn_hidden_size=text.intermediate_size,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        # transformers' default split, cut to this head_dim as its rotary embedding cuts it.
        mrope_section=qwen3_vl_mrope_section(list(rope.get("mrope_section", [24, 20, 20])), text.head_dim),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        vision=VisionConfig(
            depth=vis.depth,
            hidden_size=vis.hidden_size,
            intermediate_size=vis.intermediate_size,
            num_heads=vis.num_heads,
            in_channels=vis.in_channels,
            patch_size=vis.patch_size,
            temporal_patch_size=vis.temporal_patch_size,
            spatial_merge_size=vis.spatial_merge_size,
            out_hidden_size=vis.out_hidden_size,
            num_position_embeddings=vis.num_position_embeddings,
            deepstack_visual_indexes=list(vis.deepstack_visual_indexes),
            hidden_act=vis.hidden_act,
            rope_theta=float(vision_rope.get("rope_theta", 10_000.0)),
            image_token_id=hf_config.image_token_id,
            video_token_id=hf_config.video_token_id,
            vision_start_token_id=hf_config.vision_start_token_id,
            vision_end_token_id=hf_config.vision_end_token_id,
        ),
    )


def hf_config_from_mot(config: MoTConfig, dtype: torch.dtype):
    """transformers' ``Qwen3VLConfig`` of the Reasoner (+ ViT) of ``config``."""
    from transformers import Qwen3VLConfig

    if config.vision is None:
        raise ConversionError("exporting to Qwen3-VL needs a model config with a 'vision' section")
    # Qwen3-VL's MLPs are dense: transformers would load routed experts as unexpected keys and start
    # every MLP from fresh weights, with only a warning. A Generator of experts is not exported.
    if config.num_experts and "reasoner" in config.moe_towers:
        raise ConversionError(
            f"exporting to Qwen3-VL: the Reasoner's MLPs are a mixture of experts (num_experts={config.num_experts}, "
            f"moe_towers={list(config.moe_towers)}) and Qwen3-VL's are dense SwiGLU MLPs; write the release folder "
            "instead (cosmos3-convert release)"
        )
    v = config.vision
    hf = Qwen3VLConfig(
        text_config=dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            intermediate_size=config.ffn_hidden_size,
            rms_norm_eps=config.rms_norm_eps,
            hidden_act="silu",
            attention_bias=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": config.rope_theta,
                "mrope_section": config.rope_sections,
                "mrope_interleaved": True,
            },
        ),
        vision_config=hf_vision_config(v).to_dict(),
        image_token_id=v.image_token_id,
        video_token_id=v.video_token_id,
        vision_start_token_id=v.vision_start_token_id,
        vision_end_token_id=v.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf.architectures = ["Qwen3VLForConditionalGeneration"]
    hf.dtype = str(dtype).removeprefix("torch.")
    return hf


# ---------------------------------------------------------------------------------------- build
def build_empty(
    config: MoTConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fits: Callable[[MoTModel, VisionEncoder | None], None] | None = None,
) -> tuple[MoTModel, VisionEncoder | None]:
    """Model and ViT allocated on ``device`` without initialisation (built on the meta device, so
    nothing is computed or copied twice); the rotary tables are real, the weights are not.
    ``fits(model, vision)``, called on the meta device, may refuse them before anything is allocated
    (the weights of a folder of other shapes)."""
    with torch.device("meta"):
        model = MoTModel(config).to(dtype)
        vision = VisionEncoder(config.vision).to(dtype) if config.vision is not None else None
    if fits is not None:
        fits(model, vision)
    model.materialize(device)
    if vision is not None:
        vision.materialize(device)
    return model, vision


# --------------------------------------------------------------------------------------- import
def load_qwen3_vl(
    folder: str | Path,
    *,
    config: MoTConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[MoTModel, VisionEncoder]:
    """Imports a Hugging Face Qwen3-VL folder: returns (our MoT model, its ViT), in eval mode.

    Both towers hold the language model's weights. ``config`` (e.g. ``configs/model/nano.yaml``)
    sets the DM-stream fields and must agree with the checkpoint on every backbone dimension.
    ``dtype`` defaults to the checkpoint's own, which keeps an export bit-exact. Peak memory is the
    model once plus one checkpoint tensor.
    """
    folder = Path(folder)
    mot_config = mot_config_from_hf(read_hf_config(folder), folder / "config.json", config)
    depths = [
        ("text_config.num_hidden_layers", f"{LM}layers.", mot_config.num_layers),
        ("vision_config.depth", f"{VISION}blocks.", mot_config.vision.depth),
    ]
    check_depths(folder / "config.json", tensor_shapes(folder), depths)
    dtype = dtype or tensor_dtype(folder, f"{LM}embed_tokens.weight")
    # Some exporters keep a tied LM head as its own tensor; it then fills the shared embedding again.
    optional = frozenset({"lm_head.weight"}) if mot_config.tie_word_embeddings else frozenset()
    describe = "Qwen3-VL with this config.json"

    def fits(model: MoTModel, vision: VisionEncoder) -> None:
        shapes = {key: tuple(tensors[0].shape) for key, tensors in _hf_targets(model, vision).items()}
        check_shapes(folder, shapes, optional, describe)

    model, vision = build_empty(mot_config, dtype, device, fits)
    model.reset_parameters(model.dm_streams, model.timestep_embedding)  # NOT_IN_QWEN3_VL: fresh weights
    load_into(folder, _hf_targets(model, vision), optional, describe)
    return model.eval(), vision.eval()


def _hf_targets(model: MoTModel, vision: VisionEncoder) -> dict[str, list[torch.Tensor]]:
    """Qwen3-VL key -> the tensors of ours it fills (a Reasoner tensor also fills its Generator twin)."""
    targets: dict[str, list[torch.Tensor]] = {}
    for name, tensor in named_tensors(model, vision).items():
        key = hf_key(name)
        if key is not None:
            targets.setdefault(key, []).append(tensor)
    if model.config.tie_word_embeddings:  # the optional own copy of a tied head
        targets["lm_head.weight"] = [model.lm_head.weight]
    return targets


# --------------------------------------------------------------------------------------- export
def export_qwen3_vl(
    model: MoTModel,
    vision: VisionEncoder,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_files_from: str | Path | None = None,
) -> Path:
    """Writes the Reasoner, embeddings, LM head and ViT as a Hugging Face Qwen3-VL folder.

    ``dtype`` defaults to the model's; tensors are converted one shard at a time. ``copy_files_from``
    (the folder the model was imported from) contributes its tokenizer, processor, chat-template and
    generation files, so the export is ready for the usual HF tools. ``folder`` must be new or empty.
    """
    folder = Path(folder)
    check_output_folder(folder, "export")
    if copy_files_from is not None:  # before any file is written
        check_support_folder(copy_files_from)
    dtype = dtype or model.embed_tokens.weight.dtype
    hf_config = hf_config_from_mot(model.config, dtype)
    if vision is None:
        raise ConversionError("exporting to Qwen3-VL needs the vision encoder")
    planned = []
    for name, tensor in named_tensors(model, vision).items():
        key = hf_key(name)
        if key is None or reasoner_twin(name) != name:
            continue  # the Generator and the DM heads stay ours
        planned.append(PlannedTensor(key, tuple(tensor.shape), dtype, lambda t=tensor: t))
    write_sharded(folder, planned, max_shard_bytes)
    hf_config.save_pretrained(str(folder))
    if copy_files_from is not None:
        copy_support_files(copy_files_from, folder)
    return folder


def check_support_folder(source: str | Path) -> None:
    """ConversionError naming ``source`` unless it is a folder ``copy_support_files`` can read: a
    missing one (``--copy-files-from`` mistyped, a run's tokenizer folder moved since) was
    FileNotFoundError's traceback after the weights had been written."""
    if not Path(source).is_dir():
        what = "a file" if Path(source).exists() else "missing"
        raise ConversionError(f"{source}: the folder to copy tokenizer and processor files from is {what}")


def copy_support_files(source: str | Path, folder: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copies the files of a Hugging Face folder that are neither weights nor ``config.json``
    (tokenizer, processor, chat template, generation defaults) into ``folder``; returns their names.
    ``skip``: further names not to copy (files the destination writes itself)."""
    check_support_folder(source)
    copied = []
    for path in sorted(Path(source).iterdir()):
        is_weights = path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json")
        if path.is_file() and path.name not in ("config.json", *skip) and not is_weights:
            shutil.copy2(path, Path(folder) / path.name)
            copied.append(path.name)
    return copied
