"""Release export of a trained model (docs/DESIGN.md, "Release").

``write_release_folder``: the whole model — both towers, the DM heads, every embodiment, the ViT —
as the weights folder of ``conversion`` (``model.yaml`` + safetensors under our names), plus what
generation needs to lay out conditioning as training did::

    <folder>/model.yaml, model*.safetensors    the weights (``conversion.mot_folder``)
    <folder>/config.yaml                       the run's resolved config, the model as trained
    <folder>/release.json                      step and source checkpoint
    <folder>/tokenizer.json ...                the run's tokenizer files (data.tokenizer.path = ".")
    <folder>/action_stats/<dataset>.json       each dataset's action statistics
    <folder>/checksums.json                    sha256 of every file, verified on load

``load_trained_model`` reads it without torch.distributed.checkpoint; ``stage.init_from`` and
``conversion.load_mot_folder`` read its weights as any weights folder. ``write_hf_folder``: the
Reasoner + ViT as a Hugging Face Qwen3-VL folder (``conversion.export_qwen3_vl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, write_manifest
from megatron_cosmos3.conversion.hf_qwen3_vl import check_support_folder, copy_support_files, export_qwen3_vl
from megatron_cosmos3.conversion.mot_folder import CONFIG_FILE, save_mot_folder
from megatron_cosmos3.conversion.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ConversionError
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.release.trained import ACTION_STATS_DIR, RELEASE_CONFIG, RELEASE_INFO, TrainedModel


def _whole(trained: TrainedModel) -> None:
    if trained.plan.model_parallel_size > 1 or trained.plan.sizes.expert > 1:
        raise ConversionError(
            f"{trained.source}: export needs the whole model in one process; it was loaded split over ranks "
            f"(parallel={trained.config.parallel})"
        )


def release_config(trained: TrainedModel) -> str:
    """The YAML of ``config.yaml``: the run's config with the model as built (embodiments a stage
    added are the model's own, so no stage is needed to rebuild it), one-process layout, and the
    tokenizer and action statistics named relative to the folder."""
    config = OmegaConf.structured(trained.config)
    config.model = OmegaConf.structured(trained.model.config)
    config.stage.new_embodiments = {}
    config.stage.init_from = ""
    config.parallel = OmegaConf.structured(ParallelSizes())
    if trained.config.data.tokenizer.path:
        config.data.tokenizer.path = "."
    for dataset in config.data.datasets:
        has_stats = dataset.name in trained.action_stats
        dataset.action_stats = f"{ACTION_STATS_DIR}/{dataset.name}.json" if has_stats else ""
    return OmegaConf.to_yaml(config)


def write_release_folder(
    trained: TrainedModel,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes the release folder of ``trained`` (module doc) into a new or empty ``folder``.
    ``dtype`` defaults to the model's. Needs the whole model (loaded in one process)."""
    _whole(trained)
    if trained.config.data.tokenizer.path:  # before any file is written
        check_support_folder(trained.config.data.tokenizer.path)
    folder = save_mot_folder(trained.model, trained.model.vision, folder, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if trained.config.data.tokenizer.path:
        copy_support_files(
            trained.config.data.tokenizer.path, folder, skip=(CONFIG_FILE, RELEASE_CONFIG, RELEASE_INFO, MANIFEST)
        )
    for name, stats in trained.action_stats.items():
        (folder / ACTION_STATS_DIR).mkdir(exist_ok=True)
        stats.save(folder / ACTION_STATS_DIR / f"{name}.json")
    (folder / RELEASE_CONFIG).write_text(release_config(trained))
    (folder / RELEASE_INFO).write_text(json.dumps({"step": trained.step, "source": str(trained.source)}, indent=1))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    write_manifest(folder, extra=tuple(files))
    return folder


def write_hf_folder(
    trained: TrainedModel,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_files_from: str | Path | None = None,
) -> Path:
    """Writes the Reasoner + ViT of ``trained`` as a Hugging Face Qwen3-VL folder (``export_qwen3_vl``);
    ``copy_files_from`` defaults to the run's tokenizer folder. ConversionError if the run trained
    no ViT: Qwen3-VL has one, so only the release folder can hold such a model."""
    _whole(trained)
    if trained.model.vision is None:
        raise ConversionError(
            f"{trained.source}: the run trained no ViT (model.vision is not set), and a Qwen3-VL folder needs "
            "one; write the release folder instead (cosmos3-convert release)"
        )
    return export_qwen3_vl(
        trained.model,
        trained.model.vision,
        folder,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        copy_files_from=copy_files_from or trained.config.data.tokenizer.path or None,
    )
