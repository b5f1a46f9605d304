"""Starting a stage from a weights folder: what ``python -m megatron_cosmos3.conversion import`` writes
from a Hugging Face Qwen3-VL folder (``model.yaml`` + safetensors under our parameter names).

``stage.init_from`` may name such a folder instead of a checkpoint. Each rank reads only the tensors
of the parameters it holds (its pipeline stages) and keeps its own part of each (tensor-parallel
slice, expert block: ``parallel.sharding.local_part``), so every layout starts from the same
weights. Missing and unused tensors are found against the whole model (every pipeline stage's
names) and said once, by rank 0. The ViT's tensors (``vision.vit.*``) are read when the run trains
the model's own ViT (``model.vision`` set; its first pipeline stage holds it), and left alone
otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError, MissingParametersError
from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, verify_checkpoint
from megatron_cosmos3.conversion.mot_folder import CONFIG_FILE
from megatron_cosmos3.conversion.safetensors_io import WEIGHT_DTYPES, iter_tensors, shard_map
from megatron_cosmos3.model.config import MoTConfig, load_model_config
from megatron_cosmos3.parallel.sharding import local_part
from megatron_cosmos3.parallel.state import ParallelGroups

log = logging.getLogger(__name__)

# What the weights must have been trained with to mean the same thing in this run's model (the
# shapes alone do not show rotary, normalisation or tying, and a different top-k changes the MLPs).
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_hidden_size",
    "rms_norm_eps",
    "rope_theta",
    "mrope_section",
    "tie_word_embeddings",
    "num_experts",
    "moe_top_k",
    "moe_ffn_hidden_size",
    "moe_towers",
)
ROUTING_FIELDS = ("moe_top_k", "moe_ffn_hidden_size", "moe_towers")  # meaningful only with num_experts > 0


def is_weights_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def verify_weights_folder(folder: str | Path) -> bool:
    """Checks every file of the weights folder against its checksums.json where it has one (a
    release folder: ``release.export`` writes it; ``conversion import`` writes none), before any is
    read: CheckpointCorruptError naming a damaged file. Returns whether it had checksums."""
    if not (Path(folder) / MANIFEST).is_file():
        return False
    verify_checkpoint(Path(folder))
    return True


def check_architecture(folder: Path, model: MoTConfig, vision: bool = False, field: str = "stage.init_from") -> None:
    """Raises ValueError naming the first field where the folder's model differs from this run's
    (``vision``: the ViT's config too, for a run that loads the ViT); ``field``: what named the folder."""
    saved = load_model_config(folder / CONFIG_FILE)
    check_same_architecture(model, saved, f"{field}={folder}", str(folder / CONFIG_FILE), vision)


def check_same_architecture(model: MoTConfig, saved: MoTConfig, where: str, source: str, vision: bool = False) -> None:
    """ValueError ``"<where>: model.<field>=..., but the weights were saved with <field>=... (<source>)"``
    for the first ARCHITECTURE_FIELDS (``vision``: and ViT) field where ``saved``, the model the
    weights were trained as, differs from ``model``: same shapes, another model."""

    def value(config: MoTConfig, name: str):
        return config.rope_sections if name == "mrope_section" else getattr(config, name)  # empty: the default

    # A dense model's routing settings shape nothing: two dense models differing there are one model.
    dense = model.num_experts == 0 and saved.num_experts == 0
    pairs = [
        (name, value(model, name), value(saved, name))
        for name in ARCHITECTURE_FIELDS
        if not (dense and name in ROUTING_FIELDS)
    ]
    if vision:
        if saved.vision is None:
            raise ValueError(f"{where}: this model has a ViT, but the weights have none")
        pairs += [
            (f"vision.{f.name}", getattr(model.vision, f.name), getattr(saved.vision, f.name))
            for f in dataclasses.fields(model.vision)
        ]
    for name, ours, theirs in pairs:
        if (list(ours) if isinstance(ours, list) else ours) != (list(theirs) if isinstance(theirs, list) else theirs):
            raise ValueError(
                f"{where}: model.{name}={ours!r}, but the weights were saved with {name}={theirs!r} ({source})"
            )


@torch.no_grad()
def load_weights_folder(
    folder: str | Path,
    owner: nn.Module,
    model: MoTConfig,
    groups: ParallelGroups | None,
    allow_missing: tuple[str, ...] = (),
    field: str = "stage.init_from",
) -> None:
    """Fills the parameters ``owner`` holds (a model, or a rank's pipeline stages, named as the full
    model) from ``folder``. Parameters the folder lacks are an error naming them, unless their name
    starts with one of ``allow_missing`` (e.g. the projections of an embodiment this stage adds).
    Errors start with ``field=folder``: the setting or argument that named the folder."""
    folder = Path(folder)
    held = dict(owner.named_parameters())
    # The folder is checked against the whole model: under a pipeline split, every stage's names.
    model_names = set(held)
    if groups is not None and groups.sizes.pipeline > 1:
        stages: list = [None] * groups.sizes.pipeline
        dist.all_gather_object(stages, sorted(held), group=groups.pipeline)
        model_names = set().union(*stages)
    vision = any(name.startswith("vision.") for name in model_names)
    check_architecture(folder, model, vision=vision, field=field)
    stored = {key for keys in shard_map(folder).values() for key in keys}
    missing = sorted(n for n in model_names if n not in stored and not n.startswith(tuple(allow_missing)))
    if missing:  # the same on every rank: all raise together
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingParametersError(f"{field}={folder}: the weights lack parameter {missing[0]!r}{more}")
    unused = sorted(k for k in stored - model_names if vision or not k.startswith("vision."))
    if unused and (not dist.is_initialized() or dist.get_rank() == 0):
        # e.g. an embodiment this model lacks: not an error, but never silent
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        log.warning("weights folder %s: %r%s match no parameter of this model: not loaded", folder, unused[0], more)
    tensors = ((f"{field}={folder / shard}", key, full) for shard, key, full in iter_tensors(folder, only=held.keys()))
    fill_parameters(held, tensors, groups)


@torch.no_grad()
def fill_parameters(held: dict[str, nn.Parameter], tensors, groups: ParallelGroups | None) -> None:
    """Copies into each parameter of ``held`` (name -> this rank's parameter) its part of the global
    tensor ``tensors`` gives for it, ``(where, name, full)`` triples (``where`` names the file in
    errors); a name not in ``held`` is passed over. Tensors in no WEIGHT_DTYPES width (integers, FP8)
    and wrong shapes are errors naming ``where``, the tensor and both shapes."""
    tensor_rank, tensor_size = (groups.tensor_rank, groups.sizes.tensor) if groups is not None else (0, 1)
    expert_size = groups.sizes.expert if groups is not None else 1
    expert_rank = dist.get_rank(groups.expert) if expert_size > 1 else 0
    for where, key, full in tensors:
        if key not in held:
            continue
        param = held[key]
        if full.dtype not in WEIGHT_DTYPES:  # neither integers nor FP8 (no scales) convert by value
            raise CheckpointMismatchError(
                f"{where}: tensor {key!r} is stored as {full.dtype}, but this run's model holds {param.dtype} there"
            )
        part = local_part(full, param, tensor_rank, tensor_size, expert_rank, expert_size)
        if part.shape != param.shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(full.shape)}; this run's "
                f"model needs {tuple(param.shape)} of it on this rank"
            )
        param.copy_(part)
