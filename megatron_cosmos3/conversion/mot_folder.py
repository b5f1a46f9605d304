"""Our own portable weights folder: what ``python -m megatron_cosmos3.conversion import`` writes.

    <folder>/model.yaml                       the MoTConfig (``model:`` section, vision included)
    <folder>/model*.safetensors (+ index)     every tensor under our names (ViT: ``vision.vit.*``)

It holds both towers, so a run can start from it (or from a fine-tuned one) and ``export`` can turn
it back into a Qwen3-VL folder. Reading and writing stream one tensor / one shard at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from megatron_cosmos3.conversion.hf_qwen3_vl import build_empty, named_tensors
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
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.vision import VisionEncoder

CONFIG_FILE = "model.yaml"


def save_mot_folder(
    model: MoTModel,
    vision: VisionEncoder | None,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes the config and every tensor of ``model`` and ``vision`` into a new or empty ``folder``."""
    folder = Path(folder)
    check_output_folder(folder)
    planned = [
        PlannedTensor(name, tuple(t.shape), dtype or t.dtype, lambda t=t: t)
        for name, t in named_tensors(model, vision).items()
    ]
    write_sharded(folder, planned, max_shard_bytes)
    config = OmegaConf.create({"model": OmegaConf.structured(model.config)})
    (folder / CONFIG_FILE).write_text(OmegaConf.to_yaml(config))
    return folder


def load_mot_folder(
    folder: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> tuple[MoTModel, VisionEncoder | None]:
    """Reads a folder written by ``save_mot_folder`` (model and ViT in eval mode)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ConversionError(f"{folder}: no {CONFIG_FILE}: not a megatron_cosmos3 weights folder")
    config = load_model_config(folder / CONFIG_FILE)
    depths = [
        ("num_layers", "layers.", config.num_layers),
        ("vision.depth", "vision.vit.blocks.", config.vision.depth if config.vision is not None else 0),
    ]
    check_depths(folder / CONFIG_FILE, tensor_shapes(folder), depths)
    describe = f"the model of {CONFIG_FILE}"

    def fits(model: MoTModel, vision: VisionEncoder | None) -> None:
        shapes = {name: tuple(t.shape) for name, t in named_tensors(model, vision).items()}
        check_shapes(folder, shapes, describe=describe)

    model, vision = build_empty(config, dtype or tensor_dtype(folder, "embed_tokens.weight"), device, fits)
    load_into(folder, {name: [t] for name, t in named_tensors(model, vision).items()}, describe=describe)
    return model.eval(), vision.eval() if vision is not None else None
